"""Tests for rlp.py (fast, offline; tiny CLIP with a few pre-training steps)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import rlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pretrain_steps", "2", "--pretrain_images", "48", "--tiny_width", "32", "--shots", "2",
        "--num_seeds", "1", "--batch_size", "8", "--log_every", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A pre-trained (2 steps) tiny CLIP in a module-wide cache, shared by every run below."""
    d = str(tmp_path_factory.mktemp("cache"))
    rlp.load_tiny_clip(rlp.parse_args(TINY + ["--cache_dir", d]), torch.device("cpu"), 0)
    return d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = rlp.tiny_tokenizer()
    clip = rlp.CLIPModel(rlp.tiny_config(tok, 32, 64, 16)).eval().requires_grad_(False)
    return clip, tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread is as fast on an idle machine and far faster on a busy one (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_main(argv, tmp_path, cache):
    return rlp.main(TINY + ["--cache_dir", cache, "--out_dir", str(tmp_path / "out")] + argv)


# ------------------------------------------------------------------ math vs independent computation
def test_text_forward_with_injected_context_matches_get_text_features(tiny):
    clip, tok = tiny
    names = ["red circle", "gray diamond"]
    ref_ids, _ = rlp.tokenize(tok, [f"a photo of a {n}." for n in names], 48, rlp.eos_id_of(clip, tok))
    ref = clip.get_text_features(input_ids=ref_ids)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output                       # (2, p), HF's own forward
    args = rlp.parse_args([])
    ctx = rlp.init_context(clip, tok, args)                                          # embeddings of "a photo of a"
    assert ctx.shape == (4, 32)
    prompts = rlp.ClassPrompts(clip, tok, names, "x x x x {}.", 4)
    assert not torch.allclose(prompts.assemble(torch.zeros_like(ctx)), prompts.assemble(ctx))
    out = rlp.encode_text(clip, prompts.assemble(ctx), prompts.eos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    zs = rlp.ClassPrompts(clip, tok, names, "a photo of a {}.", 0)                   # zero-shot path, same sentence
    torch.testing.assert_close(rlp.encode_text(clip, zs.assemble(None), zs.eos), ref, rtol=1e-5, atol=1e-5)


def test_eos_pooling_ignores_padding(tiny):
    clip, tok = tiny
    ids, eos = rlp.tokenize(tok, ["a red circle.", "there is a red circle on the left."], 48, rlp.eos_id_of(clip, tok))
    assert ids.shape[1] > eos[0] + 1 and ids[0, eos[0]] == len(tok)                 # padded, [EOS] = highest id
    emb = clip.text_model.embeddings.token_embedding(ids)
    short = rlp.encode_text(clip, emb[:1, :eos[0] + 1], eos[:1])
    torch.testing.assert_close(rlp.encode_text(clip, emb, eos)[:1], short, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ RLP parameterisation
def test_tunable_counts():
    p0 = torch.randn(4, 512)
    assert sum(p.numel() for p in rlp.RLPContext(p0, 1, 0.1, 1.0).parameters()) == 4 * 1 + 1 * 512 == 516
    assert sum(p.numel() for p in rlp.RLPContext(p0, 3, 0.1, 1.0).parameters()) == 4 * 3 + 3 * 512
    assert sum(p.numel() for p in rlp.CoOpContext(p0).parameters()) == 4 * 512


def test_prompt_models_trainable_sets_and_init(tiny):
    clip, tok = tiny
    args = rlp.parse_args(["--rank", "2"])
    coop = rlp.build_prompt_model("coop", clip, tok, args)
    r = rlp.build_prompt_model("rlp", clip, tok, args)
    n, d = 4, 32
    assert {k for k, p in coop.named_parameters() if p.requires_grad} == {"context.ctx"}
    assert sum(p.numel() for p in coop.parameters() if p.requires_grad) == n * d
    assert {k for k, p in r.named_parameters() if p.requires_grad} == {"context.P_A", "context.P_B"}
    assert sum(p.numel() for p in r.parameters() if p.requires_grad) == n * 2 + 2 * d
    p_fr = rlp.init_context(clip, tok, args)
    r.train()
    assert torch.equal(r.context(), p_fr) and torch.equal(coop.context(), p_fr)     # P == P_fr at init
    assert r.context.P_A.abs().sum() > 0                                            # not a degenerate init


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
    out = torch.stack([ctx() for _ in range(50)])                                   # P_fr is never dropped:
    assert (out - ctx.P_fr).abs().le(2 * low.abs() + 1e-5).all()                    # P - P_fr in {0, 2 * low}


def test_gradients_reach_only_PA_PB(tiny):
    clip, tok = tiny
    m = rlp.build_prompt_model("rlp", clip, tok, rlp.parse_args([]))
    with torch.no_grad():
        m.context.P_B.normal_(0, 0.1)                                               # so both get gradients
    prompts = rlp.ClassPrompts(clip, tok, ["red circle", "blue star", "gray cross"], "x x x x {}.", 4)
    m.train()
    loss = F.cross_entropy(m(prompts, torch.randn(5, 32)), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    got = {k for k, p in m.named_parameters() if p.grad is not None}
    assert got == {"context.P_A", "context.P_B"}
    assert m.context.P_A.grad.abs().sum() > 0 and m.context.P_B.grad.abs().sum() > 0
    assert not m.context.P_fr.requires_grad


def test_pretraining_never_sees_benchmark_images():
    pre = rlp.pretrain_records(100, 96)
    bench = data.load_records("shapes_cls", "test") + data.load_records("shapes_cls", "train", num_shots=2, seed=1)
    assert not {r["image_id"] for r in pre} & {r["image_id"] for r in bench}
    pix = lambda r: data.load_image(r, 96).tobytes()
    assert not {pix(r) for r in pre} & {pix(r) for r in bench}                        # not even identical pixels


# ------------------------------------------------------------------ protocol, smoke runs
def test_base_new_split_and_harmonic_mean(tmp_path, cache):
    base_tr = data.load_records("shapes_cls", "train", num_shots=2, seed=1, subset="base")
    new_te = data.load_records("shapes_cls", "test", subset="new")
    assert len(data.classnames_of(base_tr)) == 24 and not set(data.classnames_of(base_tr)) & set(data.classnames_of(new_te))
    res = run_main(["--prompt", "coop", "--max_steps", "2"], tmp_path, cache)
    s = res["methods"]["coop"]
    b, n = s["base_mean"], s["new_mean"]
    assert s["hm"] == pytest.approx(2 * b * n / (b + n))
    assert res["methods"]["coop"]["per_seed"][0]["steps"] == 2


@pytest.mark.parametrize("kind", ["zeroshot", "coop", "rlp"])
def test_smoke_main(kind, tmp_path, cache):
    res = run_main(["--prompt", kind, "--max_steps", "3"], tmp_path, cache)
    s = res["methods"][kind]
    assert 0 <= s["base_mean"] <= 100 and 0 <= s["new_mean"] <= 100
    assert s["tunable"] == {"zeroshot": 0, "coop": 4 * 32, "rlp": 4 + 32}[kind]
    out = tmp_path / "out"
    assert (out / "results.json").exists() and (out / "metrics.jsonl").exists()


def test_untrained_prompts_equal_zero_shot(tmp_path, cache):
    """P = P_fr = emb("a photo of a") at step 0 and the shapes template is "a photo of a {}.": identical accuracy."""
    res = run_main(["--compare", "--max_steps", "0"], tmp_path, cache)
    m = res["methods"]
    for k in ("coop", "rlp"):
        assert (m[k]["base_mean"], m[k]["new_mean"]) == (m["zeroshot"]["base_mean"], m["zeroshot"]["new_mean"])


def test_real_data_path_with_local_hf_clip(tmp_path):
    """CoOp-layout dataset (DTD, folder layout) + a local HF CLIP checkpoint: data.extract_features(pooled=True)
    with the HF tower, the checkpoint's tokenizer, the dataset's template; base-to-new runs end to end."""
    import numpy as np
    from PIL import Image
    tok = rlp.tiny_tokenizer()
    rlp.CLIPModel(rlp.tiny_config(tok, 32, 64, 32)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("red", "green", "blue", "gray"):
            d = tmp_path / "data" / "dtd" / "images" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    res = rlp.main(["--dataset", "DTD", "--data_root", str(tmp_path / "data"), "--model", str(tmp_path / "clip"),
                    "--compare", "--shots", "2", "--max_steps", "2", "--num_seeds", "1", "--out_dir",
                    str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    assert res["dataset"] == "dtd" and res["methods"]["rlp"]["tunable"] == 4 + 32
    assert list((tmp_path / "cache" / "features").glob("dtd-test-base-*.npy"))             # features cached on disk


def test_cli_subprocess(tmp_path, cache):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "rlp.py", "--max_steps", "2", "--prompt", "rlp", "--out_dir", str(out),
                        "--cache_dir", cache] + TINY, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: 36 || all:" in r.stdout and "HM" in r.stdout
    assert json.loads((out / "results.json").read_text())["methods"]["rlp"]["per_seed"][0]["steps"] == 2


def test_resume_equals_uninterrupted(tmp_path, cache):
    common = ["--prompt", "rlp", "--rlp_dropout", "0.3", "--warmup_epochs", "0", "--lr", "0.05", "--save_every", "1000"]
    a = rlp.main(TINY + common + ["--cache_dir", cache, "--out_dir", str(tmp_path / "a"), "--max_steps", "9"])
    rlp.main(TINY + common + ["--cache_dir", cache, "--out_dir", str(tmp_path / "b"), "--max_steps", "4"])
    b = rlp.main(TINY + common + ["--cache_dir", cache, "--out_dir", str(tmp_path / "b"), "--max_steps", "9", "--resume"])
    ca, cb = (torch.load(tmp_path / d / "rlp-seed1" / "ckpt.pt", weights_only=False) for d in "ab")
    assert ca["step"] == cb["step"] == 9
    assert ca["trainable"]["context.P_B"].abs().sum() > 0
    for k in ca["trainable"]:
        assert torch.equal(ca["trainable"][k], cb["trainable"][k]), k
    loss = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl") if '"step": 9' in l]
    assert loss("a") == loss("b")
    assert a["methods"]["rlp"]["base_mean"] == b["methods"]["rlp"]["base_mean"]


def test_ddp_two_gloo_processes(tmp_path, cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "rlp.py", "--prompt", "rlp", "--max_steps", "3", "--device", "cpu",
                        "--out_dir", str(out), "--cache_dir", cache] + TINY,
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["rlp"]["per_seed"][0]["steps"] == 3
    assert r.stdout.count("trainable: 36 ||") == 1                                   # only rank 0 prints


# ------------------------------------------------------------------ bad inputs -> exit 2, one line
def expect_exit(code, argv, tmp_path, cache, capsys, *words):
    with pytest.raises(SystemExit) as e:
        run_main(argv, tmp_path, cache)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


def test_unknown_dataset(tmp_path, cache, capsys):
    expect_exit(2, ["--dataset", "nope"], tmp_path, cache, capsys, "unknown dataset 'nope'")


def test_results_exist_needs_overwrite(tmp_path, cache, capsys):
    run_main(["--prompt", "zeroshot"], tmp_path, cache)
    expect_exit(2, ["--prompt", "zeroshot"], tmp_path, cache, capsys, "--overwrite")
    run_main(["--prompt", "zeroshot", "--overwrite"], tmp_path, cache)


def test_class_name_mismatch(tmp_path, cache, capsys, monkeypatch):
    real = data.load_records

    def renamed(dataset, split, *a, **k):
        recs = real(dataset, split, *a, **k)
        if split == "test":
            recs = [dict(r, classname="blue blob") if r["label"] == 0 else r for r in recs]
        return recs
    monkeypatch.setattr(data, "load_records", renamed)
    expect_exit(2, ["--prompt", "zeroshot"], tmp_path, cache, capsys, "class name mismatch")


def test_missing_split_file(tmp_path, cache, capsys):
    (tmp_path / "data" / "oxford_pets" / "images").mkdir(parents=True)
    expect_exit(2, ["--dataset", "OxfordPets", "--data_root", str(tmp_path / "data")], tmp_path, cache, capsys,
                "split_zhou_OxfordPets.json")


def test_class_name_mismatch_between_train_and_test(tmp_path, cache, capsys):
    """DTD in folder layout (no split file): the test split has a class the train split lacks."""
    for split, names in (("train", ["banded", "bubbly"]), ("test", ["banded", "cracked"])):
        for n in names:
            d = tmp_path / "data" / "dtd" / "images" / split / n
            d.mkdir(parents=True)
            (d / "0.jpg").write_bytes(b"")
    expect_exit(2, ["--dataset", "DTD", "--data_root", str(tmp_path / "data"), "--protocol", "all"],
                tmp_path, cache, capsys, "class name mismatch", "bubbly", "cracked")


def test_non_finite_loss_exits_1(tmp_path, cache, capsys):
    expect_exit(1, ["--prompt", "coop", "--lr", "1e38", "--warmup_epochs", "0", "--max_steps", "6"],
                tmp_path, cache, capsys, "non-finite loss at step")
