"""The infrastructure block at the end of every method file is the same text, and it behaves as documented."""
from __future__ import annotations  # parse_cli reads field types as strings, as in the method files

import importlib
import math
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHOD_FILES = ("memvp.py", "routing_bottleneck.py", "rlp.py", "prefix_tuning.py", "pt_peft_train.py")
BEGIN, END = "# Infrastructure -- the same text in every method file", "# End of infrastructure"


def block(name: str) -> str:
    text = (REPO / name).read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}: infrastructure markers missing"
    return text[text.index(BEGIN):text.index(END)]


def test_same_block_in_every_method_file():
    blocks = {name: block(name) for name in METHOD_FILES}
    ref = blocks[METHOD_FILES[0]]
    for name, b in blocks.items():
        assert b == ref, f"{name}: infrastructure block differs from {METHOD_FILES[0]}"
    names = {a or b for a, b in re.findall(r"^(?:def|class) (\w+)|^(\w+) = ", ref, re.M)}
    assert {"UsageError", "NonFiniteLoss", "setup_device", "seed_everything", "lr_schedule",
            "save_checkpoint", "load_checkpoint", "run_cli"} <= names


def test_one_bad_input_class_for_every_script():
    """pt_peft_train runs prefix_tuning's code: an error raised there is reported as any other bad input."""
    import data
    assert issubclass(data.DataError, data.UsageError)
    assert all(importlib.import_module(n[:-3]).UsageError is data.UsageError for n in METHOD_FILES)


@pytest.fixture(scope="module")
def infra():
    return importlib.import_module("rlp")  # any method file: the block is identical


def test_lr_schedule_shapes(infra):
    def lrs(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sch = infra.lr_schedule(opt, **kw)
        out = []
        for _ in range(kw["total_steps"]):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return out
    lin = lrs(warmup_steps=2, total_steps=6, warmup="linear", decay="linear")
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = lrs(warmup_steps=1, total_steps=5, warmup="constant", decay="cosine", warmup_factor=0.01)
    assert cos == pytest.approx([0.01, 1.0, 0.8535534, 0.5, 0.1464466])


def test_checkpoint_and_out_dir(infra, tmp_path):
    path = str(tmp_path / "ck.pt")
    infra.save_checkpoint(path, {"step": 3, "trainable": {"w": torch.ones(2)}})
    assert infra.load_checkpoint(path)["step"] == 3 and os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(infra.UsageError, match="no checkpoint"):
        infra.load_checkpoint(str(tmp_path / "missing.pt"))
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)  # frozen: not in the checkpoint, left as it is
    frozen = model[1].weight.detach().clone()
    args = NS(lr=0.1, r=2, eval_limit=5, out_dir="a", max_steps=3)
    setting = infra.setting_of(args, "eval_limit")
    assert setting == {"lr": 0.1, "r": 2}  # run controls and evaluation flags are not part of it
    trained = {"0.weight": torch.ones(3, 2), "0.bias": torch.zeros(3)}
    infra.save_checkpoint(path, {"trainable": trained, "setting": setting})
    same = infra.setting_of(NS(lr=0.1, r=2, eval_limit=9, out_dir="b"), "eval_limit")  # another evaluation
    infra.load_checkpoint(path, model, same)
    assert model[0].weight.eq(1).all() and model[0].bias.eq(0).all() and model[1].weight.equal(frozen)
    with pytest.raises(infra.UsageError, match=r"trained with other flags: --lr 0\.1 \(now 0\.2\)$"):
        infra.load_checkpoint(path, model, dict(setting, lr=0.2))
    for other in ({"0.weight": torch.ones(4, 2), "0.bias": torch.zeros(3)}, {"0.bias": torch.zeros(3)}):
        infra.save_checkpoint(path, {"trainable": other, "setting": setting})  # a size differs; a tensor lost
        with pytest.raises(infra.UsageError, match=r"trained with other flags: other sizes"):
            infra.load_checkpoint(path, model, setting)
    out = tmp_path / "run"
    infra.prepare_out_dir(str(out), resume=False, overwrite=False)
    infra.write_json(str(out / "results.json"), {"a": 1})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(infra.UsageError, match="--overwrite"):
        infra.prepare_out_dir(str(out), resume=False, overwrite=False)
    infra.prepare_out_dir(str(out), resume=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["notes.txt", "results.json"]  # nothing goes before the inputs load
    infra.clear_outputs(NS(out_dir=str(out), overwrite=True, resume=True, eval_only=False))  # --resume keeps
    assert sorted(os.listdir(out)) == ["notes.txt", "results.json"]
    infra.clear_outputs(NS(out_dir=str(out), overwrite=True, resume=False, eval_only=False))
    assert sorted(os.listdir(out)) == ["notes.txt"]  # only the script's own outputs are removed
    infra.save_checkpoint(str(tmp_path / "ck.pt"), {"step": 1})
    os.makedirs(out / "lora")
    os.replace(tmp_path / "ck.pt", out / "lora" / "checkpoint.pt")  # an interrupted run: no results.json
    with pytest.raises(infra.UsageError, match=r"holds a run \(lora/checkpoint.pt\); pass --resume"):
        infra.prepare_out_dir(str(out), resume=False, overwrite=False)
    infra.prepare_out_dir(str(out), resume=True, overwrite=False)


def test_parse_cli_and_exit_codes(infra, capsys, tmp_path):
    from dataclasses import dataclass, field
    from typing import Optional

    @dataclass
    class A:
        lr: Optional[float] = field(default=None, metadata={"help": "x"})
        steps: int = field(default=3, metadata={"help": "y"})
        fast: bool = field(default=False, metadata={"help": "z"})
    a = infra.parse_cli(A, ["--lr", "0.5", "--steps", "7", "--fast"])
    assert (a.lr, a.steps, a.fast) == (0.5, 7, True)
    assert infra.parse_cli(A, ["--lr", "auto"]).lr is None

    def bad(_):
        raise infra.UsageError("unknown --dataset 'x'")
    with pytest.raises(SystemExit) as e:
        infra.run_cli(bad, A())
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: unknown --dataset 'x'"

    def unwritable(_):  # an --out_dir below a file
        (tmp_path / "file").write_text("")
        os.makedirs(tmp_path / "file" / "run")
    with pytest.raises(SystemExit) as e:
        infra.run_cli(unwritable, A())
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'run'}'"]

    def nan(_):
        raise infra.NonFiniteLoss("non-finite loss at step 4")
    with pytest.raises(SystemExit) as e:
        infra.run_cli(nan, A())
    assert e.value.code == 1
    assert infra.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00" and infra.mean_std([5.0]) == "5.00 ± 0.00"


def test_rules_every_script_shares(infra, capsys):
    """Learning rates > 0, dropout probabilities in [0, 1), distinct --seeds: one error line, exit 2."""
    ran = []
    assert infra.run_cli(ran.append, NS(lr=None, pt_lr=1e-4, lora_dropout=0.0, seeds="2,0,1")) is None and ran
    for bad, msg in ((NS(lr=-1.0), "--lr -1.0: must be > 0"), (NS(pt_lr=math.nan), "--pt_lr nan: must be"),
                     (NS(mem_dropout=1.0), "--mem_dropout 1.0: must be in [0, 1)"),
                     (NS(num_workers=-1), "--num_workers -1: must be >= 0"),
                     (NS(seeds="0,1,0"), "--seeds '0,1,0': expected distinct integers, e.g. 0,1,2"),
                     (NS(seeds="0;1"), "--seeds '0;1'"), (NS(seeds="-1"), "--seeds '-1'")):
        with pytest.raises(SystemExit) as e:
            infra.run_cli(ran.append, bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {msg}"), err
    assert len(ran) == 1
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(infra.UsageError, match="expected auto, cpu, cuda or cuda:<index>"):
            infra.setup_device(bad)


def test_tiny_models_run_single_threaded(infra):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def run(_):
            dev, rank, world = infra.setup_device("cpu", tiny=True)
            return dev.type, rank, world, torch.get_num_threads()
        assert infra.run_cli(run, NS()) == ("cpu", 0, 1, 1)
        assert torch.get_num_threads() == 2  # run_cli gives the caller its threads back
        infra.setup_device("cpu")
        assert torch.get_num_threads() == 2  # a real model keeps every core
    finally:
        torch.set_num_threads(threads)


def test_ctrl_c_takes_effect_at_the_end_of_a_step(infra):
    """A Ctrl-C inside whole_step() is held until the block ends, then raised as KeyboardInterrupt."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C behaviour
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with infra.whole_step():
                os.kill(os.getpid(), signal.SIGINT)
                finished += [sum(range(1000))]  # Python runs the handler between these bytecodes
                finished += ["the rest of the step"]
        assert finished == [499500, "the rest of the step"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with infra.whole_step():  # no Ctrl-C: nothing happens
            pass
        with pytest.raises(KeyboardInterrupt):  # outside a step: at once
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
    finally:
        signal.signal(signal.SIGINT, old)
