"""The infrastructure block at the end of every method file is the same text, and it behaves as documented."""
from __future__ import annotations  # as in the method files: HfArgumentParser resolves the string types

import dataclasses
import importlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
METHOD_FILES = ("memvp.py", "routing_bottleneck.py", "rlp.py", "prefix_tuning.py")
BEGIN, END = "# Infrastructure -- the same text in every method file", "# End of infrastructure"


def block(name: str) -> str:
    text = (REPO / name).read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}: infrastructure markers missing"
    return text[text.index(BEGIN):text.index(END)]


def test_same_block_in_every_method_file():
    blocks = {name: block(name) for name in METHOD_FILES}
    for name, b in blocks.items():
        assert b == blocks[METHOD_FILES[0]], f"{name}: infrastructure block differs from {METHOD_FILES[0]}"
    names = set(re.findall(r"^(?:def|class) (\w+)|^(\w+) = ", blocks[METHOD_FILES[0]], re.M))
    names = {a or b for a, b in names}
    assert {"from_checkpoint", "setup_device", "lr_schedule", "whole_step",
            "save_checkpoint", "load_checkpoint", "prepare_out_dir", "run_cli"} <= names
    assert len(blocks[METHOD_FILES[0]].splitlines()) <= 90
    for name in METHOD_FILES:  # last in the file; the flags' `arg` comes from data.py, as in pt_peft_train.py
        module = importlib.import_module(name[:-3])
        assert (REPO / name).read_text().index(BEGIN) > (REPO / name).read_text().index("\ndef main(")
        assert module.arg is data.arg and "\ndef arg(" not in (REPO / name).read_text()


def test_pt_peft_train_takes_the_block_from_prefix_tuning():
    """pt_peft_train.py builds on prefix_tuning.py (its stage 1): it carries no copy of the block."""
    assert BEGIN not in (REPO / "pt_peft_train.py").read_text()
    pt_peft, prefix = importlib.import_module("pt_peft_train"), importlib.import_module("prefix_tuning")
    for name in ("run_cli", "save_checkpoint", "load_checkpoint", "from_checkpoint", "lr_schedule"):
        assert getattr(pt_peft, name, getattr(prefix, name)) is getattr(prefix, name), name


def test_one_bad_input_class_for_every_script():
    import data
    assert issubclass(data.DataError, data.UsageError)
    assert all(importlib.import_module(n[:-3]).UsageError is data.UsageError for n in METHOD_FILES)


@pytest.fixture(scope="module")
def infra():
    return importlib.import_module("rlp")  # any method file: the block is identical


def make_args(infra):
    @dataclasses.dataclass
    class Args:
        lr: Optional[float] = data.arg(None, "learning rate (default: 1e-3 for BART/T5)")
        epochs: int = data.arg(3, "epochs, 100% of the data")
        mem_dropout: float = data.arg(0.1, "dropout")
        fast: bool = data.arg(True, "a switch")
        eval_limit: Optional[int] = data.arg(None, "evaluate the first N", eval_only=True)
        seeds: Optional[str] = data.arg(None, "comma-separated seeds")
        out_dir: str = data.arg("runs/x", "output folder")

        def __post_init__(self):
            data.check_values(self, {"epochs": (">= 1", lambda v: v >= 1)})
    return Args


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
    assert lrs(warmup_steps=2, total_steps=6, decay="linear") == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = lrs(warmup_steps=1, total_steps=5, constant_warmup=0.01)
    assert cos == pytest.approx([0.01, 1.0, 0.8535534, 0.5, 0.1464466])


def test_checkpoint_holds_the_run_and_its_random_state(infra, tmp_path):
    path = str(tmp_path / "ck.pt")
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)  # frozen: not in the checkpoint, left as it is
    frozen = model[1].weight.detach().clone()
    Args = make_args(infra)
    trained = {"0.weight": torch.ones(3, 2), "0.bias": torch.zeros(3)}
    infra.save_checkpoint(path, {"trainable": trained, "step": 3, "args": dataclasses.asdict(Args(lr=0.1))})
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left
    draws = torch.rand(3)
    state = infra.load_checkpoint(path, model)  # loads with weights_only=True
    assert state["step"] == 3 and model[0].weight.eq(1).all() and model[1].weight.equal(frozen)
    assert torch.rand(3).equal(draws)  # --resume continues exactly (the scripts draw from torch only)
    with pytest.raises(OSError, match="missing.pt"):  # run_cli: one error line, exit 2
        infra.load_checkpoint(str(tmp_path / "missing.pt"))


def test_resumed_run_takes_its_settings_from_the_checkpoint(infra, capsys):
    Args = make_args(infra)
    state = {"args": dataclasses.asdict(Args(lr=0.1, epochs=5, eval_limit=7, out_dir="old"))}
    cli = Args(lr=0.3, eval_limit=9, out_dir="new")  # --lr 0.3 is ignored, the rest is the command line's
    got = infra.from_checkpoint(cli, state)
    assert (got.lr, got.epochs, got.eval_limit, got.out_dir) == (0.1, 5, 9, "new")
    assert capsys.readouterr().out.strip() == "the checkpoint's settings are used, ignored: --lr 0.3"
    infra.from_checkpoint(Args(), state)  # nothing set on the command line: nothing to say
    assert capsys.readouterr().out == ""


def test_a_run_is_kept_unless_resumed_or_overwritten(infra, tmp_path):
    from types import SimpleNamespace as NS
    out = tmp_path / "run"

    def args(**kw):
        return NS(**{"out_dir": str(out), "resume": False, "eval_only": False, "overwrite": False, **kw})
    infra.prepare_out_dir(args())
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(infra.UsageError, match=r"holds a run \(results.json\): pass --resume"):
        infra.prepare_out_dir(args())
    infra.prepare_out_dir(args(overwrite=True))
    assert sorted(os.listdir(out)) == ["notes.txt", "results.json"]  # nothing goes before the inputs load
    infra.prepare_out_dir(args(overwrite=True, resume=True), inputs_loaded=True)  # --resume keeps it
    assert sorted(os.listdir(out)) == ["notes.txt", "results.json"]
    infra.prepare_out_dir(args(overwrite=True), inputs_loaded=True)
    assert sorted(os.listdir(out)) == ["notes.txt"]  # only the script's own outputs are removed
    os.makedirs(out / "lora")
    infra.save_checkpoint(str(out / "lora" / "checkpoint.pt"), {"step": 1})  # an interrupted run
    with pytest.raises(infra.UsageError, match=r"holds a run \(lora/checkpoint.pt\)"):
        infra.prepare_out_dir(args())
    infra.prepare_out_dir(args(resume=True))


def one_error_line(infra, capsys, run, cls, argv, code=2):
    with pytest.raises(SystemExit) as e:
        infra.run_cli(run, cls, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_command_line_and_exit_codes(infra, capsys, tmp_path):
    Args = make_args(infra)
    a = infra.run_cli(lambda a: a, Args, ["--lr", "0.5", "--epochs", "7", "--no_fast", "--seeds", "2,0,1"])
    assert (a.lr, a.epochs, a.fast, a.seeds) == (0.5, 7, False, "2,0,1")
    for argv, msg in ((["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                      (["--lr"], "argument --lr: expected one argument"),
                      (["--lr", "-1"], "--lr -1.0: must be > 0"),
                      (["--lr", "nan"], "--lr nan: must be > 0"),
                      (["--mem_dropout", "1"], "--mem_dropout 1.0: must be in [0, 1)"),
                      (["--epochs", "0"], "--epochs 0: must be >= 1"),
                      (["--seeds", "0,1,0"], "--seeds '0,1,0': expected distinct integers"),
                      (["--seeds", "-1"], "--seeds '-1'"),
                      (["--lrr", "1"], "unrecognized arguments: --lrr 1")):
        assert msg in one_error_line(infra, capsys, lambda a: a, Args, argv), argv

    def unwritable(_):  # an --out_dir below a file
        (tmp_path / "file").write_text("")
        os.makedirs(tmp_path / "file" / "run")
    assert "Not a directory" in one_error_line(infra, capsys, unwritable, Args, [])

    def nan(_):
        raise FloatingPointError("non-finite loss at step 4")
    assert one_error_line(infra, capsys, nan, Args, [], code=1) == "error: non-finite loss at step 4"
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(infra.UsageError, match="expected auto, cpu or cuda"):
            infra.setup_device(bad)
    assert data.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00" and data.mean_std([5.0]) == "5.00 ± 0.00"


def test_setup_device_joins_the_process_group_once(infra, monkeypatch):
    """Under torchrun a script may set up once per seed (memvp's --seeds): the group is made only once."""
    import socket
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the group above stands in for the launch
    try:
        assert infra.setup_device("cpu") == infra.setup_device("cpu") == (torch.device("cpu"), 0, 1)
    finally:
        dist.destroy_process_group()


def test_help_shows_every_default(infra, capsys):
    with pytest.raises(SystemExit) as e:
        infra.run_cli(lambda a: a, make_args(infra), ["--help"], "A test script.\n\nMore text.")
    out = " ".join(capsys.readouterr().out.split())
    assert "A test script." in out and "More text" not in out
    assert e.value.code == 0 and "(default: 1e-3 for BART/T5)" in out and "(default: None)" not in out[:200]
    assert "epochs, 100% of the data (default: 3)" in out and "(evaluation only)" in out


@pytest.mark.parametrize("name", [*METHOD_FILES, "pt_peft_train.py"])
def test_help_opens_with_the_scripts_own_summary(name, capsys):
    module = importlib.import_module(name[:-3])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and " ".join(module.__doc__.split("\n\n")[0].split()) in out

def test_small_models_run_single_threaded(infra):
    torch.set_num_threads(2)  # tests/conftest.py gives every test its threads back
    data.pin_threads(torch.nn.Linear(4, 4), torch.device("cpu"))
    assert torch.get_num_threads() == 1


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
