"""The CUDA path of every script: its offline default (the shipped stand-ins) for a few steps, with bf16
autocast on a GPU: the loss is finite, the evaluation runs, and a run stopped and resumed equals an
uninterrupted one; and `memvp.py --benchmark`. The same test body runs on the CPU in every test run (fp32,
resumed == uninterrupted exactly) and on CUDA where a GPU is present (skipped otherwise):

    python -m pytest -q tests/test_cuda.py      # on a machine with a GPU: the whole CUDA path

On CUDA the resumed weights must agree within RESUME_TOL: bf16 kernels may sum in another order from one
launch to the next (exactly equal with torch.use_deterministic_algorithms, which not every kernel has).
"""
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESUME_TOL = 1e-2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no GPU on this machine"))]
# each script's offline default, shrunk to a few steps (training completes, so the evaluation runs)
FEW_STEPS = {
    "memvp": ["--prompting", "memvp", "--train_limit", "16", "--eval_limit", "4", "--batch_size", "8",
              "--epochs", "1"],
    "routing_bottleneck": ["--kinds", "mul", "--r_bottleneck", "4", "--train_limit", "24",
                           "--eval_limit", "4", "--batch_size", "8", "--epochs", "1", "--num_beams", "2"],
    "prefix_tuning": ["--train_limit", "8", "--eval_limit", "4", "--batch_size", "4", "--epochs", "1",
                      "--num_beams", "2", "--max_new_tokens", "4"],
    "pt_peft_train": ["--train_limit", "8", "--eval_limit", "4", "--batch_size", "4", "--epochs", "1",
                      "--num_prefix", "4", "--lora_r", "4"],
    "rlp": ["--prompt", "rlp", "--shots", "1", "--epochs", "2", "--batch_size", "8"],
}


def checkpoints(out: Path) -> dict:
    states = {str(p.relative_to(out)): torch.load(p, map_location="cpu", weights_only=False)
              for p in sorted(out.rglob("*.pt"))}
    return {name: s for name, s in states.items() if isinstance(s, dict) and "trainable" in s}


def losses(out: Path) -> list:
    rows = [json.loads(line) for p in out.rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    return [v for r in rows for k, v in r.items() if "loss" in k and isinstance(v, float)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", list(FEW_STEPS))
def test_few_steps_finite_evaluated_and_resumed_exactly(script, device, tmp_path):
    main = importlib.import_module(script).main
    argv = FEW_STEPS[script] + ["--device", device]
    main(argv + ["--out_dir", str(tmp_path / "full")])
    main(argv + ["--out_dir", str(tmp_path / "part"), "--max_steps", "1"])
    main(argv + ["--out_dir", str(tmp_path / "part"), "--resume"])
    full, part = checkpoints(tmp_path / "full"), checkpoints(tmp_path / "part")
    assert full and full.keys() == part.keys()
    for name in full:
        a, b = full[name]["trainable"], part[name]["trainable"]
        assert a.keys() == b.keys() and a
        for k in a:
            if device == "cpu":
                assert torch.equal(a[k], b[k]), (name, k)
            else:
                assert torch.allclose(a[k].float(), b[k].float(), atol=RESUME_TOL, rtol=RESUME_TOL), (name, k)
            assert torch.isfinite(a[k].float()).all(), (name, k)
    assert all(math.isfinite(v) for v in losses(tmp_path / "full"))
    assert list((tmp_path / "full").rglob("results.json"))  # the evaluation ran and wrote its results


@pytest.mark.parametrize("device", DEVICES)
def test_memvp_benchmark(device, tmp_path, capsys):
    """Speed / memory / FLOPs at SmolLM2-135M's shape (one layer here): the input side costs more."""
    import memvp
    res = memvp.main(["--benchmark", "--bench_layers", "1", "--bench_n", "8", "--bench_L", "4",
                      "--bench_batch", "1", "--bench_iters", "1", "--device", device,
                      "--out_dir", str(tmp_path)])
    s = res["sides"]
    assert s["input"]["analytic"] > s["memvp"]["analytic"] and s["input"]["counted"] > s["memvp"]["counted"]
    assert all(x[k] > 0 for x in s.values() for k in ("train", "prefill", "decode", "act_mb"))
    out = capsys.readouterr().out
    assert "MemVP memory: 320" in out and "LoRA r=6" in out and "input/MemVP" in out
