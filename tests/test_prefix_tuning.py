"""Tests of prefix_tuning.py on the tiny BLIP-2 stand-in (stand_ins/tiny-blip2), few samples."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import write_coco_karpathy  # noqa: E402
import prefix_tuning as pt  # noqa: E402

SMALL = ["--train_limit", "8", "--eval_limit", "4", "--batch_size", "4", "--num_beams", "2",
         "--max_new_tokens", "4", "--device", "cpu"]
STAND_IN = os.path.join(ROOT, "stand_ins", "tiny-blip2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s():
    args = pt.Args(train_limit=8, eval_limit=4, num_beams=2, max_new_tokens=6)
    return pt.setup(args, "cpu")


def _model(s, lm="input", qformer=True, P=4):
    s = copy.copy(s)
    s.args = pt.dataclasses.replace(s.args, lm_prefix=lm, qformer_prefix=qformer, num_prefix=P)
    torch.manual_seed(0)
    model = pt.build(s)
    with torch.no_grad():                        # non-trivial prefixes
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def _batch(s, n=3):
    return s.collate(s.records["train"][:n])


def test_encoder_shapes_count_and_export(s):
    tc, qc = s.base.config.text_config, s.base.config.qformer_config
    for lm, shape in (("input", (4, tc.hidden_size)), ("kv", (tc.num_hidden_layers, 2, 4, tc.hidden_size))):
        model = _model(s, lm)
        assert model.prefix_encoders["lm"]().shape == shape
        assert model.prefix_encoders["qformer"]().shape == (qc.num_hidden_layers, 2, 4, qc.hidden_size)
        for enc in model.prefix_encoders.values():
            assert enc.num_params() == sum(p.numel() for p in enc.parameters())
        b = _batch(s)
        loss = model(b)
        model.prefix_state = model.export_prefix()         # App. B.1: the plain tensors give the same model
        assert torch.equal(model(b), loss)


def _hf_logits(lmm, b, prefix_embeds=None):
    """Independent path: HF get_image_features + the LM on [prefix; visual; text] with HF's own positions."""
    vis = lmm.get_image_features(pixel_values=b["pixel_values"]).pooler_output
    parts = [vis, lmm.language_model.get_input_embeddings()(b["input_ids"])]
    if prefix_embeds is not None:
        parts.insert(0, prefix_embeds.expand(len(vis), -1, -1))
    emb = torch.cat(parts, 1)
    am = torch.cat([torch.ones(emb.shape[0], emb.shape[1] - b["attention_mask"].shape[1], dtype=torch.long),
                    b["attention_mask"]], 1)
    return lmm.language_model(inputs_embeds=emb, attention_mask=am).logits


def test_no_prefix_equals_hf_and_lm_input_prefix_layout(s):
    b = _batch(s)
    m = b["attention_mask"].bool()
    T = m.shape[1]
    ref = _hf_logits(s.base, b)
    for model in (pt.build(s, with_prefix=False), _model(s)):
        if model.prefix_encoders:
            model.prefix_state = "off"                          # exactly the base LMM
        x, am, pos, cache = model.lm_inputs(b)
        out = pt.call_lm(s.base.language_model, x, am, pos, cache)[0].logits
        assert cache is None and torch.allclose(out[:, -T:][m], ref[:, -T:][m], atol=1e-5)
    # LM input prefix alone (Fig. 5): the same as HF's LM on [P; visual; text] built by hand
    model = _model(s, "input", qformer=False)
    P = model.prefix_encoders["lm"]()
    x, am, pos, _ = model.lm_inputs(b)
    assert x.shape[1] == len(P) + s.base.config.num_query_tokens + T
    out = pt.call_lm(s.base.language_model, x, am, pos)[0].logits
    assert torch.allclose(out[:, -T:][m], _hf_logits(s.base, b, P)[:, -T:][m], atol=1e-5)
    # the loss is the mean CE of target + eos, each predicted from the previous position
    lab = b["labels"]
    expected = F.cross_entropy(out[:, -T - 1:-1][lab != -100], lab[lab != -100])
    assert torch.allclose(model(b), expected, atol=1e-6)


def test_qformer_kv_prefix_matches_hand_computation(s):
    """Eq. 7 in the Q-Former: queries attend to [P_k; K] / [P_v; V] concatenated by hand; same number of
    visual tokens for the LM; without a prefix the patched module equals HF's own attention."""
    model = _model(s, "none", qformer=True)
    b = _batch(s)
    attn, seen = model.qformer_attn[0], {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw["hidden_states"], y=out[0]),
                                      with_kwargs=True)
    vis = model.visual_tokens(b, model.prefix_encoders["qformer"]())
    hook.remove()
    x, y = seen["x"], seen["y"]                                              # (B, Q, d)
    B, Q, d = x.shape
    H = s.base.config.qformer_config.num_attention_heads
    P = model.prefix_encoders["qformer"]()[0]                                # layer 0: (2, P, d)
    heads = lambda t: t.reshape(B, -1, H, d // H).transpose(1, 2)           # noqa: E731
    q = heads(attn.query(x))
    k = heads(torch.cat([P[0].expand(B, -1, -1), attn.key(x)], 1))           # [P_k; K]
    v = heads(torch.cat([P[1].expand(B, -1, -1), attn.value(x)], 1))         # [P_v; V]
    ref = ((q @ k.transpose(-1, -2)) / (d // H) ** 0.5).softmax(-1) @ v
    assert torch.allclose(y, ref.transpose(1, 2).reshape(B, Q, d), atol=1e-5)
    assert vis.shape[1] == Q == s.base.config.num_query_tokens
    hf = s.base.qformer.encoder.layer[0].attention.attention                 # HF's module (unpatched base)
    assert type(hf).__name__ == "Blip2QFormerMultiHeadAttention"
    assert torch.allclose(attn(x)[0], hf(hidden_states=x)[0], atol=1e-5)
    assert not torch.allclose(vis, model.visual_tokens(b, None), atol=1e-4)


def test_lm_kv_prefix_matches_hand_written_attention(s):
    model = _model(s, "kv", qformer=False)
    b = _batch(s, 2)
    attn, seen = model.lmm.language_model.model.decoder.layers[0].self_attn, {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw["hidden_states"], y=out[0]),
                                      with_kwargs=True)
    model(b)
    hook.remove()
    x, y = seen["x"], seen["y"]
    B, L, d = x.shape
    H = s.base.config.text_config.num_attention_heads
    P = model.prefix_encoders["lm"]()[0]                                     # layer 0: (2, P, d)
    heads = lambda t: t.reshape(B, -1, H, d // H).transpose(1, 2)           # noqa: E731
    k = heads(torch.cat([P[0].expand(B, -1, -1), attn.k_proj(x)], 1))
    v = heads(torch.cat([P[1].expand(B, -1, -1), attn.v_proj(x)], 1))
    Pn, Q = P.shape[1], L - b["attention_mask"].shape[1]
    valid = torch.cat([torch.ones(B, Pn + Q, dtype=torch.bool), b["attention_mask"].bool()], 1)
    allow = torch.ones(L, Pn + L, dtype=torch.bool).tril(Pn)[None] & valid[:, None]
    scores = (heads(attn.q_proj(x)) * (d // H) ** -0.5) @ k.transpose(-1, -2)
    ref = attn.out_proj((scores.masked_fill(~allow[:, None], float("-inf")).softmax(-1) @ v)
                        .transpose(1, 2).reshape(B, L, d))
    rows = valid[:, Pn:]
    assert torch.allclose(y[rows], ref[rows], atol=1e-5)


@pytest.mark.parametrize("lm", ["input", "kv", "off"])
def test_cached_beam_search_equals_full_rerun(s, lm):
    """Beam search on the KV cache (beams reordered in it, finished beams fed masked pads) gives the tokens of
    re-running the whole sequence every step: greedy and beam 3, with LM input / kv prefixes and without."""
    model = _model(s, "kv" if lm == "off" else lm)
    if lm == "off":
        model.prefix_state = "off"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise makes beams swap parents
        for p in model.lmm.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    b = s.collate(s.records["eval"][:4])
    for beams, eos in ((1, 2), (3, 2), (3, 10)):    # eos 10 is frequent here: finished beams, masked pads
        fast = pt.beam_search(model, b, beams, 8, eos, 0)
        assert fast == pt.beam_search(model, b, beams, 8, eos, 0, use_cache=False)
        assert any(len(x) > 1 for x in fast)


def test_grads_only_to_prefixes(s):
    model = _model(s, "input", True)
    model(_batch(s, 2)).backward()
    for n, p in model.named_parameters():
        trains = n.startswith("prefix_encoders.")
        assert p.requires_grad == trains and (p.grad is not None and p.grad.abs().sum() > 0) == trains, n


def test_caches_stay_within_their_bound(tmp_path):
    """A few hundred images through the real path: the ViT output cache stays within vision_cache_mb (least
    recently used dropped), the collate object keeps nothing per image, and cached == uncached outputs."""
    tok_dir = tmp_path / "blip2"
    shutil.copytree(STAND_IN, tok_dir)
    write_coco_karpathy(tmp_path, splits=("train",) * 300 + ("test",) * 4)
    args = pt.Args(model=str(tok_dir), dataset="coco", data_root=str(tmp_path), vision_cache_mb=0.04)
    s = pt.setup(args, "cpu")
    assert len(s.records["train"]) == 600                          # every (image, caption) pair
    model, state = pt.build(s), dict(vars(s.collate))
    entry = 17 * 48 * 4                                             # (N, d_vit) float32 per image
    cap = int(0.04 * 2 ** 20) // entry
    recs = s.records["train"][::2]                                  # 300 distinct images
    with torch.no_grad():
        for i in range(0, len(recs), 50):
            b = s.collate(recs[i:i + 50])
            model.visual_tokens(b, None)
            assert len(model.vision_cache.items) <= cap and model.vision_cache.bytes <= 0.04 * 2 ** 20
            assert list(model.vision_cache.items)[-1] == b["image_ids"][-1]
    assert len(model.vision_cache.items) == cap and vars(s.collate) == state
    vit, pixels, ids = model.lmm.vision_model, b["pixel_values"], b["image_ids"]
    direct = vit(pixel_values=pixels).last_hidden_state          # the last `cap` images are cache hits now
    assert torch.equal(model.vision_cache(vit, pixels, ids)[-cap:], direct[-cap:])
    # a trainable ViT: cache bypassed and emptied
    for p in model.lmm.vision_model.parameters():
        p.requires_grad_(True)
    model.visual_tokens(b, None)
    assert not model.vision_cache.items


def test_real_path_local_blip2_on_coco_karpathy(tmp_path):
    """The stand-in re-made by its recipe (3 steps) as a local BLIP-2 folder + COCO Karpathy files (official
    layout): Table 8 prefixes, training on caption pairs, beam search, CIDEr; --eval_only reproduces the
    scores from the checkpoint."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_stand_ins
    make_stand_ins.RECIPES["tiny-blip2"](tmp_path / "blip2", 3)
    write_coco_karpathy(tmp_path, splits=("train", "restval", "train", "val", "test", "test"))
    args = ["--model", str(tmp_path / "blip2"), "--dataset", "coco", "--data_root", str(tmp_path),
            "--max_steps", "2", "--batch_size", "2", "--num_beams", "2", "--max_new_tokens", "5",
            "--device", "cpu", "--out_dir", str(tmp_path / "out")]
    rows = pt.main(args)
    r = rows["prefix-tuned"][0]
    assert r["steps"] == 2 and set(r["downstream"]) >= {"CIDEr", "BLEU-4"} and r["mix"] == {}
    assert torch.load(tmp_path / "out" / "prefix.pt")["lm"].shape == (8, 64)      # P = 8 for captioning
    again = pt.main(args + ["--eval_only"])["prefix-tuned"][0]
    assert again["downstream"] == r["downstream"] and again["train_loss"] == r["train_loss"]


def test_resume_equals_uninterrupted(tmp_path):
    base = SMALL + ["--epochs", "2"]                          # 8 records / batch 4: 4 steps
    full = pt.main(base + ["--out_dir", str(tmp_path / "full")])["prefix-tuned"][0]
    pt.main(base + ["--out_dir", str(tmp_path / "part"), "--max_steps", "2"])
    part = pt.main(base + ["--out_dir", str(tmp_path / "part"), "--resume"])["prefix-tuned"][0]
    assert full["steps"] == part["steps"] == 4 and full["train_loss"] == part["train_loss"]
    a, c = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["trainable"] for d in ("full", "part"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert full["downstream"] == part["downstream"]


@pytest.mark.parametrize("extra,msg", [
    (["--dataset", "nope"], "--dataset nope: must be shapes_caption"),
    (["--lm_prefix", "deep"], "--lm_prefix deep: must be input, kv or none"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"), (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--lm_prefix", "none", "--no_qformer_prefix"], "no prefix to train"),
    (["--model", "stand_ins/tiny-nope"], "no stand-in at"), (["--model", "NOPROC"], "image processor"),
    (["--seeds", "0,x"], "--seeds"),
    (["--dataset", "coco", "--data_root", "/nonexistent/x"], "/nonexistent/x"),
    (["--model", "/nonexistent/blip2"], "/nonexistent/blip2"),
    (["--eval_only"], "No such file or directory"),
    (["--train_limit", "0"], "--train_limit 0: must be >= 1"), (["--eval_limit", "0"], "must be >= 1"),
    (["--num_prefix", "0"], "--num_prefix 0: must be >= 1"), (["--prefix_hidden", "0"], "must be >= 1"),
    (["--max_steps", "-3"], "--max_steps -3: must be >= 0"), (["--model", "GPT2"], "gpt2; expected BLIP-2"),
])
def test_bad_inputs_exit_2_with_one_error_line(tmp_path, capsys, extra, msg):
    if extra[-1] == "NOPROC":  # a BLIP-2 folder without its image processor config
        without = shutil.ignore_patterns("preprocessor_config.json")
        shutil.copytree(STAND_IN, tmp_path / "noproc", ignore=without)
        extra = extra[:-1] + [str(tmp_path / "noproc")]
    if extra[-1] == "GPT2":  # a model folder of another kind (config and tokenizer suffice)
        import transformers
        transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import make_stand_ins
        make_stand_ins.build_tokenizer(["a"]).save_pretrained(tmp_path / "gpt2")
        extra = extra[:-1] + [str(tmp_path / "gpt2")]
    with pytest.raises(SystemExit) as e:
        pt.main(SMALL + ["--out_dir", str(tmp_path / "b")] + extra)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len([ln for ln in err if ln.startswith("error:")]) == 1
    assert err[-1].startswith("error:") and msg in err[-1]


def test_overwrite_with_bad_input_keeps_the_finished_run(tmp_path, capsys):
    run = SMALL + ["--out_dir", str(tmp_path), "--max_steps", "1"]
    pt.main(run)
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"results.json", "ckpt.pt"} <= set(kept)
    with pytest.raises(SystemExit) as e:
        pt.main(run + ["--overwrite", "--dataset", "coco", "--data_root", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept
    pt.main(run + ["--overwrite", "--max_steps", "2"])  # good input: the run is replaced
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


def test_compare_over_seeds_table(tmp_path, capsys):
    """--compare --seeds: one row per prefix placement, `mean ± std` cells, at most 100 characters wide."""
    rows = pt.main(SMALL + ["--max_steps", "1", "--compare", "--seeds", "0,1", "--eval_limit", "2",
                            "--out_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out.splitlines()
    table = out[[i for i, ln in enumerate(out) if ln.startswith("prefix-tuning a frozen tiny-blip2")][-1]:]
    assert len(table) == 3 + 1 + len(pt.VARIANTS) and all(len(ln) <= 100 for ln in table)
    assert all("±" in ln for ln in table[4:]) and len(rows) == 1 + len(pt.VARIANTS)
    assert json.load(open(tmp_path / "o" / "lm_kv" / "seed1" / "results.json"))["steps"] == 1
    folder = tmp_path / "o" / "lm_kv" / "seed1"       # a variant's checkpoint, evaluated on its own settings
    alone = pt.main(SMALL + ["--eval_limit", "2", "--eval_only", "--out_dir", str(folder)])
    prefix = torch.load(folder / "prefix.pt")           # LM kv prefixes (L, 2, P, d), no Q-Former prefix
    assert alone["prefix-tuned"][0]["steps"] == 1 and set(prefix) == {"lm"} and prefix["lm"].dim() == 4
    assert "ignored" not in capsys.readouterr().out


def test_cli_subprocess(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prefix_tuning.py"), *SMALL, "--max_steps", "1",
                        "--eval_limit", "2", "--out_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| prefix-tuned " in r.stdout and "trainable:" in r.stdout and "prefix-tuning:" in r.stderr


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_gloo_processes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), os.path.join(ROOT, "prefix_tuning.py"), *SMALL,
                        "--max_steps", "2", "--eval_limit", "2", "--out_dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trainable:") == 1 and r.stdout.count("| prefix-tuned") == 1
    assert json.load(open(tmp_path / "d" / "results.json"))["rows"]["prefix-tuned"][0]["steps"] == 2


def test_checkpoint_settings_win_and_a_nan_loss_keeps_it(tmp_path, monkeypatch, capsys):
    run = SMALL + ["--epochs", "2", "--out_dir", str(tmp_path)]  # 4 steps
    pt.main(run + ["--max_steps", "2"])
    good = pt.load_checkpoint(tmp_path / "ckpt.pt")
    assert good["args"]["lm_prefix"] == "input" and good["args"]["prefix_hidden"] == 128
    forward = pt.PrefixBlip2.forward
    monkeypatch.setattr(pt.PrefixBlip2, "forward", lambda self, *a: forward(self, *a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        pt.main(run + ["--resume"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    ckpt = os.path.join(str(tmp_path), "ckpt.pt")
    assert e.value.code == 1 and err == [f"error: non-finite loss at step 3; last good checkpoint: {ckpt}"]
    kept = pt.load_checkpoint(ckpt)
    assert kept["step"] == 2
    assert all(torch.equal(good["trainable"][k], v) for k, v in kept["trainable"].items())
    monkeypatch.undo()
    # another size or placement on the command line: the checkpoint's settings are used, and said so
    full = pt.main(SMALL + ["--epochs", "2", "--out_dir", str(tmp_path / "full")])["prefix-tuned"][0]
    resumed = pt.main(run + ["--resume", "--prefix_hidden", "8"])["prefix-tuned"][0]
    assert "ignored: --prefix_hidden 8" in capsys.readouterr().out
    assert resumed["steps"] == 4 and resumed["train_loss"] == full["train_loss"]
    again = pt.main(run + ["--eval_only", "--lm_prefix", "none"])["prefix-tuned"][0]
    assert "the checkpoint's settings are used, ignored: --lm_prefix none" in capsys.readouterr().out
    assert again["downstream"] == resumed["downstream"]


def _corrupt_coco(tmp_path):
    """COCO Karpathy files whose second training image and first test image are not images."""
    coco = write_coco_karpathy(tmp_path, splits=("train",) * 4 + ("test",) * 3)
    for i in (1, 4):
        (coco / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"not a jpeg")
    return coco


def test_unreadable_images_dropped_in_training_zero_in_evaluation(tmp_path, capsys):
    """The pixel path follows data.py's policy: a training record with an unreadable image is dropped; in
    evaluation every record is kept (pixel values 0), counted and reported."""
    _corrupt_coco(tmp_path)
    rows = pt.main(["--model", STAND_IN, "--dataset", "coco", "--data_root", str(tmp_path),
                    "--batch_size", "8", "--epochs", "1", "--num_beams", "1", "--max_new_tokens", "3",
                    "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("its training record is dropped") == 2            # 2 caption pairs of the image, once
    assert "warning: 1 of 3 evaluation records have an unreadable image" in err
    r = rows["prefix-tuned"][0]
    assert r["steps"] == 1 and r["downstream"]["unreadable"] == 1 and "CIDEr" in r["downstream"]
    s = pt.setup(pt.Args(model=STAND_IN, dataset="coco", data_root=str(tmp_path)), "cpu")
    train = s.collate(s.records["train"][:4])                          # pairs of images 0 and 1
    test = s.collate(s.records["eval"], train=False)
    assert len(train["image_ids"]) == 2 and train["unreadable"] == 0
    assert len(test["image_ids"]) == 3 and test["unreadable"] == 1 and not test["pixel_values"][0].any()


def test_prefix_length_follows_the_task_table_8():
    """P = 8 for captioning, 16 for VQA (Table 8, BLIP-2), on the real and the synthetic datasets."""
    assert {d: pt.resolve(pt.Args(dataset=d)).num_prefix for d in pt.DATASETS} == {
        "shapes_caption": 8, "shapes_vqa": 16, "coco": 8, "flickr30k": 8, "vqav2": 16}
