"""Tests of prefix_tuning.py: tiny BLIP-2 (pre-trained for 3 steps into a temp cache), few samples."""
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import write_coco_karpathy  # noqa: E402
import prefix_tuning as pt  # noqa: E402

TINY = ["--pretrain_steps", "3", "--train_limit", "8", "--eval_limit", "4", "--batch_size", "4", "--num_prefix", "4",
        "--max_new_tokens", "6", "--num_beams", "2", "--device", "cpu", "--log_every", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ctx(cache):
    a = pt.Args(pretrain_steps=3, cache_dir=cache, train_limit=8, eval_limit=4, max_new_tokens=6, num_beams=2)
    return pt.setup(a, torch.device("cpu"))


def _net(ctx, mode, n=4):
    ctx["prefix_mode"] = mode
    torch.manual_seed(0)
    net = pt.build(ctx, n)
    if net.prefix_encoder is not None:          # non-trivial prefix values
        with torch.no_grad():
            for p in net.prefix_encoder.parameters():
                p.normal_(0, 0.5)
    return net


def test_encoder_shapes_and_export(ctx):
    tc = ctx["base"].config.text_config
    for mode, shape in (("input", (4, tc.hidden_size)), ("kv", (tc.num_hidden_layers, 2, 4, tc.hidden_size))):
        net = _net(ctx, mode)
        P = net.prefix_encoder()
        assert P.shape == shape
        E = net.prefix_encoder.export()
        assert not E.requires_grad and torch.equal(E, P.detach())
        b = ctx["collate"](ctx["records"]["train"][:3])
        l_on = net(b)
        net.prefix_state = E                   # exported plain tensor reproduces the encoder's output
        assert torch.allclose(net(b), l_on, atol=0, rtol=0)


def _manual_base_logits(lmm, b):
    """Independent path: HF get_image_features + LM on [visual; text] with its default positions."""
    vis = lmm.get_image_features(pixel_values=b["pixel_values"]).pooler_output
    emb = torch.cat([vis, lmm.language_model.get_input_embeddings()(b["input_ids"])], 1)
    am = torch.cat([torch.ones(vis.shape[:2], dtype=torch.long), b["attention_mask"]], 1)
    return lmm.language_model(inputs_embeds=emb, attention_mask=am).logits


@pytest.mark.parametrize("mode", ["input", "kv"])
def test_disabled_prefix_equals_base(ctx, mode):
    b = ctx["collate"](ctx["records"]["train"][:3])
    ref = _manual_base_logits(ctx["base"], b)
    net0, net = _net(ctx, mode, 0), _net(ctx, mode, 4)
    net.prefix_state = "off"
    m = b["attention_mask"].bool()
    for w in (net0, net):
        out, n_in = w.lm_forward(b, b["input_ids"], b["attention_mask"])
        assert n_in == 0
        assert torch.allclose(out.logits[:, -m.shape[1]:][m], ref[:, -m.shape[1]:][m], atol=1e-5)
    net.prefix_state = "on"
    out, _ = net.lm_forward(b, b["input_ids"], b["attention_mask"])
    assert not torch.allclose(out.logits[:, -m.shape[1]:][m], ref[:, -m.shape[1]:][m], atol=1e-3)


@pytest.mark.parametrize("mode", ["input", "kv", "off"])
def test_cached_generation_equals_full_rerun(ctx, mode):
    """Beam search on the KV cache (beams reordered in it, finished beams fed masked pads) gives the same tokens as
    re-running the whole sequence every step, for greedy and beam 3, with the prefix in both modes and without."""
    net = _net(ctx, "kv" if mode == "off" else mode)
    if mode == "off":
        net.prefix_state = "off"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():          # the 3-step tiny LM repeats one token; noisy weights make beams swap parents
        for p in net.lmm.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    recs = [{k: v for k, v in r.items() if k != "target"} for r in ctx["records"]["eval"][:4]]
    b = ctx["collate"](recs)
    for beams, eos in ((1, 2), (3, 2), (3, 10)):     # eos 10 is frequent here: finished beams, masked pads
        fast = net.generate(b, beams, 8, eos_id=eos, pad_id=0)
        slow = net.generate(b, beams, 8, eos_id=eos, pad_id=0, use_cache=False)
        assert fast == slow and any(len(s) > 1 for s in fast)


def test_kv_mode_matches_hand_written_attention(ctx):
    net = _net(ctx, "kv")
    b = ctx["collate"](ctx["records"]["train"][:2])
    attn = net.lmm.language_model.model.decoder.layers[0].self_attn
    seen = {}
    h = attn.register_forward_hook(lambda m, args, kw, out: seen.update(x=kw.get("hidden_states", args[0] if args else None),
                                                                     y=out[0]), with_kwargs=True)
    net.lm_forward(b, b["input_ids"], b["attention_mask"])
    h.remove()
    x, y = seen["x"], seen["y"]                                     # (B, L, d)
    B, L, d = x.shape
    H, hd = net.n_heads, net.head_dim
    P = net.prefix_encoder()[0]                                     # layer 0: (2, Pn, d)
    Pn = P.shape[1]
    split = lambda t: t.view(B, -1, H, hd).transpose(1, 2)          # (B, H, n, hd)
    q = split(attn.q_proj(x)) * hd ** -0.5
    k = torch.cat([split(P[0].expand(B, -1, -1)), split(attn.k_proj(x))], 2)    # [prefix keys; keys]
    v = torch.cat([split(P[1].expand(B, -1, -1)), split(attn.v_proj(x))], 2)
    Q = L - b["attention_mask"].shape[1]
    valid = torch.cat([torch.ones(B, Pn + Q, dtype=torch.bool), b["attention_mask"].bool()], 1)   # (B, Pn+L)
    causal = torch.ones(L, Pn + L, dtype=torch.bool).tril(Pn)       # query i sees prefix + keys <= i
    allow = causal[None] & valid[:, None, :]
    s = (q @ k.transpose(-1, -2)).masked_fill(~allow[:, None], float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
    ref = attn.out_proj(o)
    rows = torch.cat([torch.ones(B, Q, dtype=torch.bool), b["attention_mask"].bool()], 1)
    assert torch.allclose(y[rows], ref[rows], atol=1e-5)


def test_input_mode_masks_and_labels(ctx):
    col, tok = ctx["collate"], ctx["tokenizer"]
    recs = ctx["records"]["train"][:3]
    b = col(recs)
    for i, r in enumerate(recs):                                    # labels = target + eos, right-aligned
        tgt = tok(r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lab = b["labels"][i]
        assert lab[lab != -100].tolist() == tgt and lab[-len(tgt):].tolist() == tgt
        assert (b["attention_mask"][i] == (b["input_ids"][i] != tok.pad_token_id)).all()
    net = _net(ctx, "input")
    out, n_in = net.lm_forward(b, b["input_ids"], b["attention_mask"])
    Q = net.lmm.config.num_query_tokens
    assert n_in == 4 and out.logits.shape[1] == 4 + Q + b["input_ids"].shape[1]
    # loss = mean CE of the target tokens only, predicted from the previous position
    T = b["labels"].shape[1]
    lg = out.logits[:, -T - 1:-1]
    m = b["labels"] != -100
    ref = F.cross_entropy(lg[m], b["labels"][m])
    assert torch.allclose(net(b), ref, atol=1e-6)
    # pads are masked: changing the ids under pads changes nothing
    b2 = dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 5))
    assert torch.allclose(net(b2), net(b), atol=1e-6)


@pytest.mark.parametrize("mode", ["input", "kv"])
def test_grads_only_to_prefix(ctx, mode):
    net = _net(ctx, mode)
    net(ctx["collate"](ctx["records"]["train"][:2])).backward()
    for n, p in net.named_parameters():
        if n.startswith("prefix_encoder."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_smoke_main_and_resume(tmp_path, cache):
    base = TINY + ["--cache_dir", cache, "--epochs", "2", "--save_every", "2"]
    full = pt.main(base + ["--out_dir", str(tmp_path / "full")])
    assert full["train"]["steps"] == 4 and "score" in full["prefix_tuned"]["downstream"]
    assert os.path.exists(tmp_path / "full" / "results.json") and os.path.exists(tmp_path / "full" / "prefix.pt")
    pt.main(base + ["--out_dir", str(tmp_path / "part"), "--max_steps", "2"])
    res = pt.main(base + ["--out_dir", str(tmp_path / "part"), "--resume"])
    assert res["train"] == full["train"]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["params"]
    c = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)["params"]
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_cli_kv(tmp_path, cache):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prefix_tuning.py"), *TINY, "--cache_dir", cache,
                        "--max_steps", "2", "--prefix_mode", "kv", "--dataset", "shapes_vqa",
                        "--out_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable:" in r.stdout and "prefix_tuned" in r.stdout
    assert json.load(open(tmp_path / "o" / "results.json"))["train"]["steps"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_procs(tmp_path, cache):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), os.path.join(ROOT, "prefix_tuning.py"), *TINY, "--cache_dir", cache,
                        "--max_steps", "2", "--out_dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trainable:") == 1
    assert json.load(open(tmp_path / "d" / "results.json"))["train"]["steps"] == 2


@pytest.mark.parametrize("extra,msg", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--prefix_mode", "deep"], "prefix_mode"),
    (["--dataset", "coco", "--data_root", "/nonexistent/x"], "/nonexistent/x"),
    (["--model", "/nonexistent/blip2"], "/nonexistent/blip2"),
])
def test_bad_inputs(tmp_path, cache, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        pt.main(TINY + ["--cache_dir", cache, "--out_dir", str(tmp_path / "b")] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err


def test_existing_results_need_overwrite(tmp_path, cache, capsys):
    os.makedirs(tmp_path / "r")
    (tmp_path / "r" / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        pt.main(TINY + ["--cache_dir", cache, "--out_dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_local_blip2_checkpoint_on_coco_karpathy_files(tmp_path):
    """The real path: a local Blip2ForConditionalGeneration folder (+ its tokenizer) and COCO Karpathy files in the
    official layout (dataset_coco.json + val2014 JPEGs); input-mode prefix (the paper's), beam search, CIDEr."""
    tok = pt.tokenizer_tiny()
    pt.tiny_blip2(len(tok), 0).save_pretrained(tmp_path / "blip2")
    tok.save_pretrained(tmp_path / "blip2")
    write_coco_karpathy(tmp_path)
    res = pt.main(["--model", str(tmp_path / "blip2"), "--dataset", "coco", "--data_root", str(tmp_path),
                   "--max_steps", "2", "--batch_size", "2", "--num_prefix", "4", "--num_beams", "2",
                   "--max_new_tokens", "5", "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    assert res["prefix_mode"] == "input"          # auto -> the paper's input prefixes for HF models
    assert res["task"] == "caption" and res["train"]["steps"] == 2 and res["prefix_tuned"]["downstream"]["CIDEr"] >= 0
    assert os.path.exists(tmp_path / "out" / "prefix.pt")
