"""Tests of rlp.py: the prompts against independent computations, the protocol, the command line
(stand_ins/tiny-clip, and a tiny CLIP re-made by its recipe for 2 steps)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import data  # noqa: E402
import make_stand_ins  # noqa: E402
import rlp  # noqa: E402

FAST = ["--shots", "1", "--epochs", "2", "--batch_size", "8", "--device", "cpu"]
D = 64  # the width of stand_ins/tiny-clip (make_stand_ins.TINY_CLIP)


@pytest.fixture(scope="module")
def tiny():
    """stand_ins/tiny-clip (the default --model on shapes_cls) and its tokenizer, on one thread."""
    torch.set_num_threads(1)
    return rlp.load_clip(rlp.Args(device="cpu"), torch.device("cpu"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny CLIP re-made by its recipe in scripts/make_stand_ins.py with 2 pre-training steps: a local
    Hugging Face folder like any other --model."""
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    torch.set_num_threads(1)
    make_stand_ins.RECIPES["tiny-clip"](d, 2)
    return str(d)


def main(tmp_path, *argv):
    return rlp.main(FAST + ["--out_dir", str(tmp_path / "out"), *argv])


# --------------------------------------------------------------- the method against independent computations
def test_text_forward_with_context_equals_get_text_features(tiny):
    clip, tok = tiny
    names = ["red circle", "gray diamond"]
    ids, _ = rlp.tokenize(tok, [f"a photo of a {n}." for n in names], clip)
    ref = clip.get_text_features(input_ids=ids)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output                       # HF's own forward, (2, p)
    model, n_tunable, n = rlp.build_prompt_model("coop", clip, tok, rlp.Args())
    ctx = model.context()  # = embeddings of "a photo of a"
    assert ctx.shape == (4, D) and n_tunable == 4 * D and n == 4
    prompts = rlp.ClassPrompts(clip, tok, names, "X X X X {}.", 4)
    torch.testing.assert_close(rlp.encode_text(clip, prompts.assemble(ctx), prompts.eos), ref,
                               rtol=1e-5, atol=1e-5)
    zs = rlp.ClassPrompts(clip, tok, names, "a photo of a {}.", 0)                   # the zero-shot path
    torch.testing.assert_close(rlp.encode_text(clip, zs.assemble(None), zs.eos), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(prompts.assemble(torch.zeros_like(ctx)), prompts.assemble(ctx))


def test_eos_pooling_ignores_padding(tiny):
    clip, tok = tiny
    ids, eos = rlp.tokenize(tok, ["a red circle.", "there is a red circle on the left."], clip)
    assert ids.shape[1] > eos[0] + 1
    assert ids[0, eos[0]] == tok.eos_token_id == len(tok) - 1 == max(tok.get_vocab().values())
    emb = clip.text_model.embeddings.token_embedding(ids)
    short = rlp.encode_text(clip, emb[:1, :eos[0] + 1], eos[:1])
    torch.testing.assert_close(rlp.encode_text(clip, emb, eos)[:1], short, rtol=1e-5, atol=1e-5)


def test_tunable_counts():
    p0 = torch.randn(4, 512)
    assert sum(p.numel() for p in rlp.RLPContext(p0, 1, 0.1, 1.0).parameters()) == 4 * 1 + 1 * 512 == 516
    assert sum(p.numel() for p in rlp.RLPContext(p0, 3, 0.1, 1.0).parameters()) == 4 * 3 + 3 * 512
    assert sum(p.numel() for p in rlp.CoOpContext(p0).parameters()) == 4 * 512 == 2048


def test_prompt_models_trainable_sets_and_init(tiny):
    clip, tok = tiny
    a = rlp.Args(rank=2)
    coop, n_coop, _ = rlp.build_prompt_model("coop", clip, tok, a)
    torch.manual_seed(0)
    r, n_rlp, _ = rlp.build_prompt_model("rlp", clip, tok, a)
    torch.manual_seed(0)
    torch.randn(4, D)                                                               # CoOp's random P, unused
    P_A = torch.randn(4, 2) * 4 ** -0.5                                             # N(0, 1/n)
    assert {k for k, p in coop.named_parameters() if p.requires_grad} == {"context.ctx"}
    assert {k for k, p in r.named_parameters() if p.requires_grad} == {"context.P_A", "context.P_B"}
    assert sum(p.numel() for p in r.parameters() if p.requires_grad) == n_rlp == 4 * 2 + 2 * D
    assert sum(p.numel() for p in coop.parameters() if p.requires_grad) == n_coop == 4 * D
    r.train()
    assert torch.equal(r.context(), r.context.P_fr)                                 # P = P_fr
    assert torch.equal(coop.context(), r.context.P_fr)
    assert r.context.P_A.abs().sum() > 0                                            # not a degenerate init
    rand, n, n_ctx = rlp.build_prompt_model("coop", clip, tok, rlp.Args(n_ctx=16, ctx_init=""))
    assert rand.context().shape == (16, D) and n == 16 * D and n_ctx == 16
    assert 0.01 < rand.context().std() < 0.03
    assert torch.equal(r.context.P_A, P_A)


def test_dropout_train_only_and_only_on_low_rank_branch():
    torch.manual_seed(0)
    ctx = rlp.RLPContext(torch.randn(4, 64), 2, 0.5, 1.0)
    with torch.no_grad():
        ctx.P_B.normal_()
    low = ctx.P_A @ ctx.P_B
    ctx.eval()
    torch.testing.assert_close(ctx(), ctx.P_fr + low)                              # identity at eval
    ctx.train()
    delta = ctx() - ctx.P_fr
    dropped = delta.abs() < 1e-6
    assert 0.2 < dropped.float().mean() < 0.8                                       # p = 0.5 drops about half
    torch.testing.assert_close(delta[~dropped], 2 * low[~dropped])                  # inverted-dropout scaling


def test_gradients_reach_only_PA_PB(tiny):
    clip, tok = tiny
    m, _, _ = rlp.build_prompt_model("rlp", clip, tok, rlp.Args())
    with torch.no_grad():
        m.context.P_B.normal_(0, 0.1)  # so that both get gradients
    prompts = rlp.ClassPrompts(clip, tok, ["red circle", "blue star", "gray cross"], "X X X X {}.", 4)
    F.cross_entropy(m.train()(prompts, torch.randn(5, D)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert {k for k, p in m.named_parameters() if p.grad is not None} == {"context.P_A", "context.P_B"}
    assert m.context.P_A.grad.abs().sum() > 0 and m.context.P_B.grad.abs().sum() > 0


def test_pretraining_world_is_not_the_benchmark():
    assert data.PRETRAIN_WORLD != 0
    kw = dict(world_seed=data.PRETRAIN_WORLD, split_sizes={"train": 200, "val": 1, "test": 1})
    pre = data.load_records("shapes_cls", "train", **kw) + data.load_records("shapes_caption", "train", **kw)
    bench = (data.load_records("shapes_cls", "test")
             + data.load_records("shapes_cls", "train", num_shots=2, seed=1))
    pix = lambda r: data.load_image(r, 48).tobytes()                                # noqa: E731
    assert not {pix(r) for r in pre} & {pix(r) for r in bench}
    caps = make_stand_ins.scene_captions({"objects": [
        {"color": "orange", "shape": "star", "size": "small", "pos": "left"},
        {"color": "red", "shape": "cross", "size": "large", "pos": "top"}]})
    assert caps == ["a photo of an orange star and a red cross.",
                    "an image with an orange star and a red cross.",
                    "a small orange star and a large red cross.",
                    "there is an orange star on the left and a red cross at the top."]


# ------------------------------------------------------------------ protocol
@pytest.mark.parametrize("split", ["shape", "checker"])
def test_base_new_splits(split):
    a = rlp.Args(shapes_split=split)
    (base, bn), (new, nn) = (rlp.load_split(a, "test", s, 0, None) for s in ("base", "new"))
    assert len(bn) == len(nn) == 24 and not set(bn) & set(nn) and len(base) == len(new) == 960
    assert all(bn[r["label"]] == r["classname"] for r in base)
    assert all(nn[r["label"]] == r["classname"] for r in new)
    shapes = lambda names: {n.split()[1] for n in names}                            # noqa: E731
    if split == "shape":                                                           # new classes: unseen words
        assert shapes(bn) == {"circle", "square", "triangle"} and shapes(nn) == {"star", "cross", "diamond"}
    else:                                                                          # data.py's checkerboard
        assert bn == data.classnames_of(data.load_records("shapes_cls", "test", subset="base"))
        assert shapes(bn) == shapes(nn)
    train, tn = rlp.load_split(a, "train", "base", 1, 16)
    assert tn == bn and len(train) == 24 * 16


def test_sweep_is_one_factor_at_a_time():
    a = rlp.Args(sweep=True)
    rows = rlp.settings(a)
    assert [k for _, k, _ in rows[:4]] == ["zeroshot", "coop", "coop", "rlp"] and len(rows) == 18
    default = dataclasses.asdict(a)
    for label, kind, s in rows:
        changed = {k for k, v in dataclasses.asdict(s).items() if v != default[k]}
        assert (changed <= {"rank"} or changed <= {"rlp_dropout"}
                or changed <= {"n_ctx", "ctx_init", "epochs"}
                or changed <= {"n_ctx", "ctx_init", "shots"}), (label, changed)
    assert {s.rank for _, _, s in rows} == {1, 2, 4}
    assert {s.rlp_dropout for _, _, s in rows} == {0, .1, .3, .5}
    assert {s.epochs for _, _, s in rows} == {200, 800} and {s.shots for _, _, s in rows} == {1, 4, 16}


def test_compare_table_and_untrained_prompts_equal_zero_shot(tmp_path, capsys):
    """P = P_fr = emb("a photo of a") at step 0 and the template is "a photo of a {}.": identical accuracy."""
    res = main(tmp_path, "--max_steps", "0", "--seeds", "1,2")
    out = capsys.readouterr().out.splitlines()
    rs = res["results"]
    assert list(rs) == ["zero-shot", "CoOp n=4 init", "RLP r=1 p=0.1"] and len(rs["RLP r=1 p=0.1"]) == 2
    for k in ("base", "new"):
        assert rs["CoOp n=4 init"][0][k] == rs["RLP r=1 p=0.1"][1][k] == rs["zero-shot"][0][k]
    title = next(i for i, ln in enumerate(out)
                 if ln.startswith("shapes_cls (stand_ins/tiny-clip, shape split), base-to-new"))
    table = out[title + 1:title + 7]
    assert [c.strip() for c in table[0].split("|")] == ["method", "base", "new", "HM", "train", "tunable"]
    assert all(len(ln) <= 100 for ln in table)
    b, n = rs["zero-shot"][0]["base"], rs["zero-shot"][0]["new"]
    assert f"{b:.2f} ± 0.00" in table[2] and f"{2 * b * n / (b + n):.2f}" in table[2]
    assert table[4].endswith("| 68") and "trainable: 68 ||" in "\n".join(out)         # n r + r d = 4 + 64
    assert table[5] == "RLP > CoOp on new classes in 0 of 2 seed pairs"                # equal, not higher
    assert rlp.seed_pairs([{"new": 50.0}, {"new": 60.0}, {"new": 70.0}],
                          [{"new": 51.0}, {"new": 60.0}, {"new": 80.0}]).endswith("in 2 of 3 seed pairs")


def test_resume_equals_uninterrupted_and_eval_only_reproduces_it(tmp_path):
    run = ["--prompt", "rlp", "--rlp_dropout", "0.3", "--lr", "0.05", "--shots", "2", "--epochs", "3"]
    trained = main(tmp_path / "a", *run)["results"]["RLP r=1 p=0.3"][0]  # 6 steps an epoch, 18 in all
    main(tmp_path / "b", *run, "--max_steps", "8")                                 # stops inside epoch 2
    assert torch.load(tmp_path / "b/out/seed1/rlp/ckpt.pt", weights_only=True)["step"] == 8
    main(tmp_path / "b", *run, "--resume")
    ca, cb = (torch.load(tmp_path / d / "out/seed1/rlp/ckpt.pt", weights_only=True) for d in "ab")
    assert ca["step"] == cb["step"] == 18 and ca["trainable"]["context.P_B"].abs().sum() > 0
    for k in ca["trainable"]:
        assert torch.equal(ca["trainable"][k], cb["trainable"][k]), k
    again = main(tmp_path / "a", *run, "--eval_only")["results"]["RLP r=1 p=0.3"][0]
    assert again == trained and again["steps"] == 18


def folder_dataset(root, folder: str, classes=("red", "green", "blue", "gray")):
    """A CoOp dataset in the ImageNet-style folder layout (no split file), 2 random images per class."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / "data" / folder / "images" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return str(root / "data")


def test_real_model_path_coop_folder_layout_and_local_hf_clip(tmp_path, hf_dir, capsys):
    """Caltech101 in the CoOp folder layout + a local HF CLIP folder: its tokenizer, data.extract_features
    with the HF tower (cached), the dataset's template; base-to-new end to end. DTD's template holds a word
    the tiny CLIP does not know: an error line, not a silent <unk>."""
    res = main(tmp_path, "--dataset", "Caltech101", "--data_root", folder_dataset(tmp_path, "caltech-101"),
               "--model", hf_dir, "--shots", "2", "--max_steps", "2", "--cache_dir", str(tmp_path / "cache"))
    assert res["args"]["dataset"] == "caltech101" and res["results"]["RLP r=1 p=0.1"][0]["tunable"] == 4 + D
    assert list((tmp_path / "cache" / "features").glob("caltech101-test-base-*.npy"))
    dtd = ["--dataset", "DTD", "--data_root", folder_dataset(tmp_path, "dtd"), "--model", hf_dir]
    expect_exit(2, tmp_path / "dtd", capsys, dtd, "texture.'", "does not know")


# ------------------------------------------------------------------ command line, DDP
def test_cli_subprocess(tmp_path, hf_dir):
    r = subprocess.run([sys.executable, "rlp.py", *FAST, "--model", hf_dir, "--max_steps", "2",
                        "--prompt", "rlp", "--out_dir", str(tmp_path / "cli")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: 68 || all:" in r.stdout and "| HM " in r.stdout
    results = json.loads((tmp_path / "cli" / "results.json").read_text())["results"]
    assert results["RLP r=1 p=0.1"][0]["steps"] == 2


def test_ddp_two_gloo_processes(tmp_path, hf_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "rlp.py", *FAST, "--model", hf_dir, "--prompt", "coop",
                        "--max_steps", "2", "--out_dir", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())["results"]
    assert results["CoOp n=4 init"][0]["steps"] == 2
    assert r.stdout.count("trainable: 256 ||") == 1 and r.stdout.count("| HM ") == 1   # only rank 0 prints


# ------------------------------------------------------------------ bad inputs -> exit 2, one error line
def expect_exit(code, tmp_path, capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        main(tmp_path, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and err[-1].startswith("error:") and not any("Traceback" in ln for ln in err)
    assert all(w in err[-1] for w in words), err[-1]


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "nope"], ["--dataset nope"]),
    (["--seeds", "1,x"], ["--seeds '1,x'"]),
    (["--seeds", "1,1"], ["--seeds '1,1'", "distinct"]),
    (["--rlp_dropout", "1.5"], ["--rlp_dropout"]),
    (["--prompt", "lora"], ["--prompt lora"]),
    (["--model", "stand_ins/tiny-nope"], ["--model stand_ins/tiny-nope", "no stand-in at"]),
    (["--lr", "abc"], ["--lr", "abc"]),
    (["--lr", "0"], ["--lr 0.0: must be > 0"]),
    (["--no_such_flag", "1"], ["--no_such_flag"]),
    (["--shots", "0"], ["--shots 0: must be >= 1"]),
    (["--eval_only", "--prompt", "coop"], ["No such file or directory"]),
    (["--n_ctx", "8", "--prompt", "coop"], ["--n_ctx 8", "4 words"]),                  # n comes from ctx_init
    (["--ctx_init", "a zorblax of a", "--prompt", "coop"], ["does not know"]),
])
def test_bad_flags_exit_2(tmp_path, capsys, argv, words):
    expect_exit(2, tmp_path, capsys, argv, *words)


def test_finished_run_needs_overwrite_and_checkpoint_keeps_its_settings(tmp_path, capsys):
    trained = main(tmp_path, "--prompt", "rlp", "--max_steps", "1")["results"]["RLP r=1 p=0.1"][0]
    expect_exit(2, tmp_path, capsys, ["--prompt", "rlp", "--max_steps", "1"], "--overwrite")
    res = main(tmp_path, "--prompt", "rlp", "--rank", "2", "--lr", "0.5", "--eval_only")["results"]
    out = capsys.readouterr().out
    assert "the checkpoint's settings are used, ignored: --rank 2, --lr 0.5" in out
    assert list(res.values())[0] == [trained] and trained["tunable"] == 4 + D          # rank 1, as trained
    torch.testing.assert_close(trained["steps"], 1)


def test_missing_split_file(tmp_path, capsys, hf_dir):
    (tmp_path / "data" / "oxford_pets" / "images").mkdir(parents=True)
    expect_exit(2, tmp_path, capsys, ["--dataset", "OxfordPets", "--data_root", str(tmp_path / "data"),
                                      "--model", hf_dir], "split_zhou_OxfordPets.json")


def test_class_mismatch_between_train_and_test(tmp_path, capsys, hf_dir):
    """DTD in folder layout (no split file): the test split has a class the train split lacks."""
    for split, names in (("train", ["banded", "bubbly"]), ("test", ["banded", "cracked"])):
        for n in names:
            d = tmp_path / "data" / "dtd" / "images" / split / n
            d.mkdir(parents=True)
            (d / "0.jpg").write_bytes(b"")
    expect_exit(2, tmp_path, capsys,
                ["--dataset", "DTD", "--data_root", str(tmp_path / "data"), "--model", hf_dir],
                "class name mismatch", "bubbly", "cracked")


def test_non_finite_loss_exits_1(tmp_path, capsys):
    expect_exit(1, tmp_path, capsys, ["--prompt", "coop", "--lr", "1e38", "--max_steps", "6"],
                "non-finite loss at step")
