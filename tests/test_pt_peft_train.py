"""Tests of pt_peft_train.py (PT-PEFT). Tiny configs; the whole file runs in well under 40 s on 2 CPU cores."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from transformers import OPTConfig, OPTForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pt_peft_train as P  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is as fast and immune to OpenMP spin contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- effective rank (Eq. 1-5, Table 1)
def test_effective_rank_identity_and_rank_k():
    # identity n x n: all singular values equal -> cumsum i/n -> smallest k with k/n >= 0.9 is ceil(0.9 n)
    for n in (10, 16, 20):
        assert P.effective_rank(torch.eye(n)) == pytest.approx(math.ceil(0.9 * n - 1e-9) / n)
    # rank-k matrices with k equal singular values in a (L, d) = (20, 16) matrix: M = 16
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 5):
        U, _ = torch.linalg.qr(torch.randn(20, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(16, k, generator=g, dtype=torch.float64))
        X = U @ V.T                                          # singular values: k ones
        assert P.effective_rank(X) == pytest.approx(math.ceil(0.9 * k - 1e-9) / 16)
        assert P.effective_rank(X, threshold=1.0) == pytest.approx(k / 16)
    # a known non-flat spectrum: singular values 6, 3, 1 (normalised .6 .3 .1): 0.6 < 0.9 <= 0.9 -> k = 2 of 3
    X = torch.diag(torch.tensor([6.0, 3.0, 1.0]))
    assert P.sv_curve(X).tolist() == pytest.approx([0.6, 0.9, 1.0])
    assert P.effective_rank(X) == pytest.approx(2 / 3)
    assert P.effective_rank(X, threshold=0.5) == pytest.approx(1 / 3)


def test_effective_rank_averages_samples_and_pads_short_ones():
    a = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))         # normalised [.25]*4
    b = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0]])              # 2 rows -> M_b = 2: [1, 0] padded to [1, 0, 0, 0]
    y = P.sv_curve([a, b])
    assert y.tolist() == pytest.approx([0.625, 0.75, 0.875, 1.0])  # Eq. (4): mean of [.25]*4 and [1,0,0,0]
    # (K, L, d) tensor + mask == list of the masked rows
    F3 = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).bool()
    assert torch.allclose(P.sv_curve(F3, mask), P.sv_curve([F3[0], F3[1, :4], F3[2, :2]]))
    # pooled: one matrix of all rows
    assert P.pooled_effective_rank([a, b]) == P.effective_rank(torch.cat([a, b]))
    with pytest.raises(ValueError):
        P.effective_rank(torch.eye(3), threshold=0.0)


# ---------------------------------------------------------------- LoRA / adapters
def _tiny_lm():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = OPTForCausalLM(cfg)

    return Wrap()


def test_lora_zero_b_unchanged_merge_equal_and_layout():
    m = _tiny_lm().eval()
    x = torch.randint(0, 40, (2, 7))
    ref = m.language_model(input_ids=x).logits
    names = P.add_lora(m, "language_model", r=4, alpha=8, dropout=0.05)
    assert len(names) == 6 and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in names)
    m.eval()
    assert torch.allclose(m.language_model(input_ids=x).logits, ref, atol=1e-6)   # B = 0
    lora = [mod for mod in m.modules() if isinstance(mod, P.LoRALinear)]
    assert lora[0].lora_A.shape == (4, 32) and lora[0].lora_B.shape == (32, 4) and lora[0].scaling == 2.0
    assert lora[0].lora_A.abs().sum() > 0 and lora[0].lora_B.abs().sum() == 0
    for mod in lora:
        nn.init.normal_(mod.lora_B, std=0.5)
    # independent computation for one layer: W x + b + s * B A x
    l0 = lora[0]
    h = torch.randn(3, 32)
    want = h @ l0.base.weight.T + l0.base.bias + 2.0 * (h @ l0.lora_A.T @ l0.lora_B.T)
    assert torch.allclose(l0(h), want, atol=1e-5)
    unmerged = m.language_model(input_ids=x).logits
    assert not torch.allclose(unmerged, ref, atol=1e-3)
    assert P.merge_lora(m) == 6
    assert torch.allclose(m.language_model(input_ids=x).logits, unmerged, atol=1e-5)


@pytest.mark.parametrize("parallel", [False, True])
def test_adapters_start_at_identity_and_follow_formula(parallel):
    m = _tiny_lm().eval()
    x = torch.randint(0, 40, (2, 5))
    ref = m.language_model(input_ids=x).logits
    hooks = P.add_adapters(m, "language_model", dim=8, parallel=parallel)
    assert len(hooks) == 2
    assert torch.allclose(m.language_model(input_ids=x).logits, ref, atol=1e-6)   # up = 0
    layer = m.language_model.model.decoder.layers[0]
    nn.init.normal_(layer.adapter.up.weight)
    h = torch.randn(2, 5, 32)
    y = layer.fc2(torch.relu(layer.fc1(h)))                   # hooks fire: adapted FFN output
    base = torch.nn.functional.linear(torch.relu(layer.fc1(h)), layer.fc2.weight, layer.fc2.bias)
    ad = layer.adapter
    want = base + ad.up(torch.relu(ad.down(h if parallel else base)))
    assert torch.allclose(y, want, atol=1e-5)   # parallel: adapter of the FFN input (captured by a pre-hook on fc1)
    assert not torch.allclose(y, base, atol=1e-3)


def test_patch_errors_name_expected_module():
    class NoLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(P.UsageError, match="q_proj/k_proj/v_proj"):
        P.add_lora(NoLM(), "language_model", 4, 8, 0.0)
    with pytest.raises(P.UsageError, match="fc1/fc2"):
        P.add_adapters(NoLM(), "language_model", 4, False)
    with pytest.raises(P.UsageError, match="qformer"):
        P.add_lora(NoLM(), "qformer", 4, 8, 0.0)


# ---------------------------------------------------------------- stage plans
def test_stage_plans_budget_and_prefix_keeps_training():
    a = P.resolve(P.parse_args(["--pt_epochs", "3", "--ft_epochs", "2", "--pt_lr", "0.1", "--lr", "0.01"]))
    plans = {}
    for o in P.ORDERS:
        plans[o] = P.stage_plan(P.dataclasses.replace(a, order=o))
        assert sum(s.epochs for s in plans[o]) == 5            # same budget for every order
    s1, s2 = plans["pt_first"]
    assert s1.train == ("prefix",) and s1.lrs == {"prefix": 0.1}
    assert s2.train == ("prefix", "peft") and s2.lrs == {"prefix": 0.01, "peft": 0.01}   # prefix keeps training
    assert [s.train for s in plans["peft_first"]] == [("peft",), ("prefix",)]
    assert plans["peft_first"][0].use_prefix is False and plans["peft_first"][1].use_prefix
    assert plans["parallel"][0].lrs == {"prefix": 0.1, "peft": 0.01}
    assert plans["none"][0].use_prefix is False and plans["prefix_only"][0].train == ("prefix",)


# ---------------------------------------------------------------- end to end (tiny)
TINY = ["--train_limit", "8", "--eval_limit", "4", "--rank_samples", "4", "--batch_size", "4",
        "--pt_epochs", "1", "--ft_epochs", "1", "--num_prefix", "4", "--lora_r", "4", "--adapter_dim", "4",
        "--log_every", "1", "--pretrain_steps", "3", "--max_new_tokens", "6", "--device", "cpu",
        "--cache_dir", os.path.join(ROOT, "cache", "test_pt_peft_train")]   # tiny BLIP-2 pre-trained for 3 steps


def _ckpt(d):
    return torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=False)


@pytest.mark.parametrize("order,peft", [("pt_first", "lora"), ("peft_first", "s_adapter"), ("parallel", "p_adapter"),
                                        ("none", "full"), ("prefix_only", "lora")])
def test_smoke_orders_and_trainable_sets(tmp_path, order, peft, monkeypatch):
    seen = []
    real = P.set_trainable

    def spy(model, names):
        out = real(model, names)
        seen.append(sorted(n for n, p in model.named_parameters() if p.requires_grad))
        return out

    monkeypatch.setattr(P, "set_trainable", spy)
    r = P.main(TINY + ["--order", order, "--peft", peft, "--out_dir", str(tmp_path)])["result"]
    assert r["finished"] and r["global_step"] == 4 and math.isfinite(r["final_loss"])
    plan = P.stage_plan(P.resolve(P.parse_args(TINY + ["--order", order, "--peft", peft])))
    assert len(seen) == len(plan)
    for names, st in zip(seen, plan):
        is_prefix = [P.pt_is_prefix_param(n) for n in names]
        assert ("prefix" in st.train) == any(is_prefix)
        assert ("peft" in st.train) == (not all(is_prefix))
        for n in names:       # nothing outside the method's parameters ever trains
            assert P.pt_is_prefix_param(n) or P.is_peft_param(n, P.resolve(P.parse_args(["--peft", peft])))
        if peft == "full" and "peft" in st.train:
            assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "metrics.jsonl")
    if order != "none":
        assert "downstream_no_prefix" in r and "downstream_noise_prefix" in r


def test_resume_equals_uninterrupted_across_stage_boundary(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    P.main(TINY + ["--order", "pt_first", "--out_dir", full])
    r1 = P.main(TINY + ["--order", "pt_first", "--out_dir", part, "--max_steps", "3"])["result"]
    assert not r1["finished"] and _ckpt(part)["stage"] == 1 and _ckpt(part)["step"] == 1   # inside stage 2
    r2 = P.main(TINY + ["--order", "pt_first", "--out_dir", part, "--resume"])["result"]
    assert r2["finished"] and r2["global_step"] == 4
    a, b = _ckpt(full)["params"], _ckpt(part)["params"]
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
    lb = [json.loads(l) for l in open(os.path.join(part, "metrics.jsonl"))]
    assert [x["loss"] for x in la if "loss" in x] == [x["loss"] for x in lb if "loss" in x]


def test_analyze_rank_writes_curves(tmp_path):
    r = P.main(TINY + ["--order", "pt_first", "--analyze_rank", "--out_dir", str(tmp_path)])["result"]
    assert set(r["rank_analysis"]) == {"pretrained", "after_stage1_prefix", "after_stage2_peft", "final"}
    # stage 1 freezes the LMM; the analysed positions exclude the prefix, so only attention to the prefix moves them
    rows = list(open(tmp_path / "rank_curves.csv"))
    assert rows[0].startswith("index,fraction,") and len(rows) > 2
    last = rows[-1].strip().split(",")
    assert all(abs(float(v) - 1.0) < 1e-6 for v in last[2:] if v)       # every cumulative curve ends at 1


def test_cli_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "pt_peft_train.py")]
    r = subprocess.run(cmd + TINY + ["--max_steps", "2", "--out_dir", str(tmp_path / "cli")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: " in r.stdout and "|| all: " in r.stdout
    res = json.load(open(tmp_path / "cli" / "results.json"))
    assert res["result"]["global_step"] == 2


@pytest.mark.parametrize("bad,msg", [(["--order", "sideways"], "unknown --order"), (["--peft", "ia3"], "unknown --peft"),
                                     (["--dataset", "nope"], "unknown dataset"), (["--pt_epochs", "0", "--ft_epochs", "0"], "nothing to train"),
                                     (["--dataset", "coco", "--data_root", "/nonexistent/dir"], "/nonexistent/dir")])
def test_bad_inputs_exit_2(tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        P.main(TINY + ["--max_steps", "1", "--out_dir", str(tmp_path / "x")] + bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_results_exist_exit_2(tmp_path, capsys):
    os.makedirs(tmp_path / "done")
    open(tmp_path / "done" / "results.json", "w").write("{}")
    with pytest.raises(SystemExit) as e:
        P.main(TINY + ["--out_dir", str(tmp_path / "done")])
    assert e.value.code == 2 and "results exist" in capsys.readouterr().err


def test_ddp_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), os.path.join(ROOT, "pt_peft_train.py")] + TINY +
                       ["--device", "cpu", "--out_dir", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    assert res["result"]["finished"] and res["result"]["global_step"] == 2    # 8 records / (4 x 2 procs) = 1 step/stage


def test_nonfinite_loss_stops_with_exit_1(tmp_path, capsys, monkeypatch):
    real = P.pt_build

    def nan_build(*args, **kw):
        m = real(*args, **kw)
        fwd = m.forward
        calls = {"n": 0}

        def forward(batch):
            calls["n"] += 1
            loss = fwd(batch)
            return loss * float("nan") if calls["n"] == 3 else loss

        m.forward = forward
        return m

    monkeypatch.setattr(P, "pt_build", nan_build)
    with pytest.raises(SystemExit) as e:
        P.main(TINY + ["--order", "pt_first", "--save_every", "2", "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite loss at step 2" in err and "ckpt.pt" in err
    ck = _ckpt(tmp_path)
    assert ck["global_step"] == 2 and all(torch.isfinite(v).all() for v in ck["params"].values())
