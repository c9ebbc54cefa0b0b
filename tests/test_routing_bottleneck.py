"""Tests for routing_bottleneck.py (tiny, offline, CPU)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import write_coco_karpathy  # noqa: E402
import data  # noqa: E402
import make_stand_ins  # noqa: E402
import routing_bottleneck as rb  # noqa: E402

SMALL = ["--r_bottleneck", "4", "--train_limit", "24", "--eval_limit", "6", "--batch_size", "8",
         "--num_beams", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # 2 shared cores: keep the in-process runs single-threaded
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Checkpoint folders of a random tiny GPT-2 and RoBERTa (width 32, 1 layer) + the synthetic tokenizer,
    built by the stand-in recipes' model function -> {"caption": [--model, folder], "vqa": [...]}."""
    folders, tok = {}, make_stand_ins.build_tokenizer()
    for task, name in (("caption", "tiny-gpt2"), ("vqa", "tiny-roberta")):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        make_stand_ins.tiny_gpt2_or_roberta(name, tok, 32, 1).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[task] = ["--model", str(folder)]
    return folders


# ------------------------------------------------------------------------------------------ route
def test_route_hand_computed_n1():
    x_t = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])          # (B=1, L=2, r=2)
    x_v = torch.tensor([[[2.0, 0.5]]])                       # (B=1, N=1, r=2)
    assert torch.equal(rb.route(x_t, x_v, "none"), x_t)
    assert torch.allclose(rb.route(x_t, x_v, "mul"), torch.tensor([[[2.0, 1.0], [6.0, -0.5]]]))
    assert torch.allclose(rb.route(x_t, x_v, "add"), torch.tensor([[[3.0, 2.5], [5.0, -0.5]]]))
    # <x_t, x_v> x_v: row 1: (2 + 1) * [2, .5]; row 2: (6 - .5) * [2, .5]
    assert torch.allclose(rb.route(x_t, x_v, "xtxvTxv"), torch.tensor([[[6.0, 1.5], [11.0, 2.75]]]))
    # (sum_k x_t[l, k]) x_v: row sums 3 and 2
    assert torch.allclose(rb.route(x_t, x_v, "xtxv2"), torch.tensor([[[6.0, 1.5], [4.0, 1.0]]]))
    with pytest.raises(ValueError, match="no branch"):
        rb.route(x_t, x_v, "bogus")


def released_style(after_a, vis, kind):
    """Independent re-statement of the released code's N = 1 formulas (reshape / expand based)."""
    b, n, r = vis.shape
    if kind == "mul":
        return after_a * vis
    if kind == "add":
        return after_a + vis.expand_as(after_a)
    if kind == "xtxv2":
        return after_a @ vis.expand(b, r, r)
    return after_a @ vis.reshape(b, r, n) @ vis


@pytest.mark.parametrize("kind", ["mul", "add", "xtxvTxv", "xtxv2"])
def test_route_matches_released_formulas_for_pooled_feature(kind):
    g = torch.Generator().manual_seed(0)
    x_t, x_v = torch.randn(3, 5, 8, generator=g), torch.randn(3, 1, 8, generator=g)
    assert torch.allclose(rb.route(x_t, x_v, kind), released_style(x_t, x_v, kind), atol=1e-5)


def test_route_grid_features_n_gt_1():
    x_t = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [2.0, 2.0]]])     # (B=1, L=3, r=2)
    x_v = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                  # (B=1, N=2, r=2); x'_v = mean = [.5, 1]
    out = {k: rb.route(x_t, x_v, k) for k in rb.ROUTINGS}
    # x_t (x_v)^T x_v = x_t @ [[1, 0], [0, 4]]  (the formula as written, sum over the N visual rows)
    assert torch.allclose(out["xtxvTxv"], torch.tensor([[[1.0, 8.0], [0.0, -4.0], [2.0, 8.0]]]))
    assert torch.allclose(out["mul"], torch.tensor([[[0.5, 2.0], [0.0, -1.0], [1.0, 2.0]]]))
    assert torch.allclose(out["add"], torch.tensor([[[1.5, 3.0], [0.5, 0.0], [2.5, 3.0]]]))
    assert torch.allclose(out["xtxv2"], torch.tensor([[[1.5, 3.0], [-0.5, -1.0], [2.0, 4.0]]]))
    g = torch.Generator().manual_seed(1)
    x_t, x_v = torch.randn(2, 4, 3, generator=g), torch.randn(2, 5, 3, generator=g)   # B = 2, N = 5
    loop = torch.zeros(2, 4, 3)                                       # x_t (x_v)^T x_v by explicit sums
    for b in range(2):
        for n in range(5):
            loop[b] += (x_t[b] @ x_v[b, n])[:, None] * x_v[b, n][None]
    assert torch.allclose(rb.route(x_t, x_v, "xtxvTxv"), loop, atol=1e-5)
    for kind in ("mul", "add", "xtxv2"):                              # each sample sees only its own image
        assert torch.allclose(rb.route(x_t, x_v, kind)[1], rb.route(x_t[1:], x_v[1:], kind)[0], atol=1e-5)


def test_a_new_routing_function_is_one_entry_plus_one_branch(tiny, tmp_path, monkeypatch, capsys):
    """The exercise: add x_t o sigmoid(x'_v). Registered without a branch, route raises; with its branch
    (monkeypatched here) it runs in --compare and gets its own row in the table, under its label."""
    monkeypatch.setitem(rb.ROUTINGS, "mulsig", rb.Routing("x_t o sigmoid(x'_v)", "x_t∘σ(x'_v)"))
    x_t, x_v = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
    with pytest.raises(ValueError, match="no branch for the routing function 'mulsig'"):
        rb.route(x_t, x_v, "mulsig")
    route = rb.route

    def with_branch(x_t, x_v, kind):
        return x_t * torch.sigmoid(x_v) if kind == "mulsig" else route(x_t, x_v, kind)
    monkeypatch.setattr(rb, "route", with_branch)
    out = rb.main(["--out_dir", str(tmp_path), *SMALL, *tiny["vqa"], "--dataset", "shapes_vqa", "--compare",
                   "--max_steps", "1"])
    runs = [(r["method"], r["routing"]) for r in out["runs"]]
    assert len(runs) == 12 and runs[-2:] == [("adapter", "xtxv2"), ("adapter", "mulsig")]
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "x_t o sigmoid(x'_v)" in ln]
    assert [ln.split()[0] for ln in rows] == ["LoRA", "Adapter"]


# ------------------------------------------------------------------------------------------ modules
def tiny_model(task, method, kind, **kw):
    """A tiny VisualLM on a random frozen tiny LM (seed 0), r = 4, width 32, 2 layers -> (model, plain LM)."""
    a = rb.with_defaults(rb.Args(dataset="shapes_vqa" if task == "vqa" else "shapes_caption", r_bottleneck=4,
                                 **kw))
    tok = make_stand_ins.build_tokenizer()
    torch.manual_seed(0)
    plain = make_stand_ins.tiny_gpt2_or_roberta(a.model.split("/")[-1], tok, 32, 2)
    answers = ["yes", "no", "red"] if task == "vqa" else []
    p = rb.Prepared(task, tok, plain, None, [], None, None, [], rb.VisualMap(), answers=answers)
    return rb.build_model(a, p, method, kind), plain


def batch(seed=0, B=2, L=5, d=32, N=1):
    g = torch.Generator().manual_seed(seed)
    x_r, ids = torch.randn(B, N, d, generator=g), torch.randint(4, 40, (B, L), generator=g)
    return x_r, ids, torch.ones(B, L, dtype=torch.long)


def randomize_up(model, std=1.0):
    with torch.no_grad():
        for n, q in model.named_parameters():
            if n.endswith("lora_B") or ".up." in n:
                q.normal_(0, std)


@pytest.mark.parametrize("task,method", [("caption", "lora"), ("caption", "adapter"), ("vqa", "adapter")])
def test_zero_up_projection_leaves_outputs_unchanged(task, method):
    vlm, plain = tiny_model(task, method, "mul")
    plain = rb.VisualLM(plain, task, rb.VisualContext(), torch.nn.ModuleList(), 3)
    plain.head = vlm.head
    x_r, ids, mask = batch()
    with torch.no_grad():
        assert torch.allclose(vlm(x_r, ids, mask), plain(x_r, ids, mask), atol=1e-5)
        randomize_up(vlm)                                     # now W_up != 0: the output must change
        assert not torch.allclose(vlm(x_r, ids, mask), plain(x_r, ids, mask), atol=1e-3)


def test_fused_c_attn_lora_touches_only_q_and_v():
    vlm, _ = tiny_model("caption", "lora", "xtxvTxv")
    layer = vlm.lm.transformer.h[0].attn.c_attn
    assert isinstance(layer, rb.RoutedLoRA) and layer.slices == [(0, 32), (64, 96)]
    x_r, x = batch()[0], torch.randn(2, 5, 32)
    layer.ctx.x_r = x_r
    with torch.no_grad():
        layer.lora_B.normal_()
        delta = layer(x) - layer.base(x)
    assert delta[..., 32:64].abs().max() == 0                 # key third untouched
    x_t, x_v = x @ layer.lora_A.t(), x_r @ layer.lora_A.t()   # the routing spans the stacked q|v bottleneck
    h = (x_t @ x_v.transpose(1, 2)) @ x_v
    # released MergedLinearOnlyVLBeforeB layout: lora_B (2 * 32, r) as a grouped conv1d, then zero_pad
    after_b = torch.nn.functional.conv1d(h.transpose(-2, -1), layer.lora_B.reshape(64, 4).unsqueeze(-1),
                                         groups=2).transpose(-2, -1) * layer.scaling            # (B, L, 64)
    assert torch.allclose(torch.cat([delta[..., :32], delta[..., 64:]], -1), after_b, atol=1e-5)


def test_roberta_adapter_as_released_after_dropout_with_and_without_residual():
    for residual in (True, False):
        vlm, _ = tiny_model("vqa", "adapter", "add", adapter_residual=residual)
        randomize_up(vlm, 0.3)
        out = vlm.lm.encoder.layer[0].attention.output          # RobertaSelfOutput: dense, dropout, LayerNorm
        ad = vlm.adapters[0]
        vlm.ctx.x_r, h, x = batch()[0], torch.randn(2, 5, 32), torch.randn(2, 5, 32)
        with torch.no_grad():                           # released: LayerNorm(adapter(dropout(dense h)) + x)
            y = ad.up(ad.act(ad.down(out.dense(h)) + ad.down(vlm.ctx.x_r)))
            want = out.LayerNorm((out.dense(h) if residual else 0) + y + x)
            assert torch.allclose(out(h, x), want, atol=1e-5)
        assert len(vlm.adapters) == 4                          # one per sub-layer, 2 layers
    out.dropout.p = 1.0                                          # the adapter sits AFTER the dropout:
    out.train()                                                  # dropped output -> adapter(0), not 0
    with torch.no_grad():
        assert torch.allclose(out.dropout(h), ad(torch.zeros(2, 5, 32)), atol=1e-6)


def test_gpt2_one_adapter_per_block_after_attention_and_mlp():
    vlm, _ = tiny_model("caption", "adapter", "mul")
    randomize_up(vlm)
    blk, ad = vlm.lm.transformer.h[1], vlm.adapters[1]
    blk.attn.resid_dropout.p = blk.mlp.dropout.p = 1.0
    blk.train()
    vlm.ctx.x_r = batch()[0]
    with torch.no_grad():
        h = torch.randn(2, 5, 32)                               # both sub-layers reduce to adapter(0)
        mid = h + ad(torch.zeros(2, 5, 32))
        out = blk(h)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(out, mid + ad(torch.zeros(2, 5, 32)), atol=1e-5)


def test_roberta_text_is_embedded_once():
    vlm, _ = tiny_model("vqa", "lora", "none")
    seen = {}
    vlm.lm.embeddings.register_forward_hook(lambda m, args, kw, out: seen.update(kw), with_kwargs=True)
    x_r, ids, mask = batch()
    vlm(x_r, ids, mask)
    want = torch.cat([x_r, vlm.lm.embeddings.word_embeddings(ids)], 1)   # word embeddings only (not released)
    assert torch.equal(seen["inputs_embeds"], want)


def test_param_counts_and_gradients():
    counts = set()
    for kind in rb.ROUTINGS:
        for task, method in [("caption", "lora"), ("vqa", "adapter")]:
            vlm, _ = tiny_model(task, method, kind)
            randomize_up(vlm, 0.1)                         # W_up = 0 at init would zero W_down's grad
            x_r, ids, mask = batch(N=3 if kind == "xtxvTxv" else 1)
            vlm(x_r, ids, mask).float().pow(2).mean().backward()
            for n, q in vlm.named_parameters():                # gradients on the method's parameters only
                assert (q.grad.abs().sum() > 0) if q.requires_grad else q.grad is None, n
            n_train = sum(q.numel() for q in vlm.parameters() if q.requires_grad)
            counts.add((task, n_train, rb.expected_trainable(vlm)))
    # routing adds no parameters. GPT-2 LoRA on q and v: A (2r, d) + B (2, d, r) per layer; RoBERTa: 4
    # adapters (W_down, W_up with biases) + the head Linear(d, 2d), LayerNorm(2d), Linear(2d, 3)
    lora, adapter = 2 * (2 * 4 * 32 + 2 * 32 * 4), 4 * (32 * 4 + 4 + 4 * 32 + 32)
    head = 32 * 64 + 64 + 128 + 64 * 3 + 3
    assert counts == {("caption", lora, lora), ("vqa", adapter + head, adapter + head)}


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_merged_lora_equals_unmerged_and_routed_refuses(task):
    vlm, _ = tiny_model(task, "lora", "none")
    randomize_up(vlm, 0.2)
    x_r, ids, mask = batch()
    merged = rb.merge_lora(vlm.lm)
    assert not any(isinstance(m, rb.RoutedLoRA) for m in merged.modules())
    emb, m = vlm.inputs(x_r, ids, mask)
    with torch.no_grad():
        ref = vlm.lm(inputs_embeds=emb, attention_mask=m)[0]
        assert torch.allclose(merged(inputs_embeds=emb, attention_mask=m)[0], ref, atol=1e-5)
    routed, _ = tiny_model(task, "lora", "mul")
    with pytest.raises(rb.UsageError, match="cannot be merged"):
        rb.merge_lora(routed.lm)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_routing_none_equals_peft_lora(task):
    """GPT-2: the q|v LoRA is peft's LoRA on c_attn with rank 2r, the same W_down, W_up zero on the keys."""
    peft = pytest.importorskip("peft")
    vlm, plain = tiny_model(task, "lora", "none")
    randomize_up(vlm, 0.2)
    gpt2 = task == "caption"
    cfg = peft.LoraConfig(r=8 if gpt2 else 4, lora_alpha=8 if gpt2 else 4, lora_dropout=0.0,
                          fan_in_fan_out=gpt2, target_modules=["c_attn"] if gpt2 else ["query", "value"])
    ref = peft.get_peft_model(plain, cfg)
    with torch.no_grad():
        for name, m in vlm.lm.named_modules():
            if isinstance(m, rb.RoutedLoRA):
                layer = ref.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                B = torch.zeros(96, 8) if gpt2 else m.lora_B[0]
                if gpt2:
                    B[:32, :4], B[64:, 4:] = m.lora_B[0], m.lora_B[1]
                layer.lora_B["default"].weight.copy_(B)
        emb = vlm.inputs(*batch())[0]                                        # [x_R, text] embeddings
        assert torch.allclose(vlm.lm(inputs_embeds=emb)[0], ref(inputs_embeds=emb)[0], atol=1e-6)


def test_released_settings_for_real_datasets_and_help_from_the_same_table():
    a = rb.with_defaults(rb.Args(dataset="vqav2", compare=True))
    got = (a.model, rb.rank_of(a, "lora"), rb.rank_of(a, "adapter"), a.lora_dropout, a.lr, a.batch_size,
           a.warmup)
    assert got == ("roberta-base", 128, 64, 0.1, 3e-4, 512, 0.05)
    a = rb.with_defaults(rb.Args(dataset="coco"))
    got = (a.model, rb.rank_of(a, "lora"), rb.rank_of(a, "adapter"), a.lora_dropout, a.lr, a.warmup,
           a.num_beams)
    assert got == ("gpt2", 128, 128, 0.0, 3e-5, 5000, 5)
    assert a.vision == "google/vit-base-patch16-224-in21k"
    a = rb.with_defaults(rb.Args(dataset="shapes_vqa"))             # the synthetic dataset's own defaults
    got = (a.model, a.vision, rb.rank_of(a, "adapter"), a.lr, a.epochs)
    assert got == ("stand_ins/tiny-roberta", "tiny-cnn", 8, 3e-3, 3)
    helps = {f.name: " ".join(f.metadata["help"].split()) for f in rb.dataclasses.fields(rb.Args)}
    assert "default: 0.003 shapes_*; 3e-05 captions; 0.0003 VQA" in helps["lr"]
    assert "8 shapes_*; 128 captions; 128 LoRA/64 adapter VQA" in helps["r_bottleneck"]
    assert "stand_ins/tiny-gpt2 shapes_caption" in helps["model"] and "(default: None)" not in helps["lr"]
    assert all(f"{k}={r.formula}" in helps["kinds"] for k, r in rb.ROUTINGS.items())


def test_unpatchable_model_names_expected_modules():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(rb.UsageError, match="c_attn.*q_proj.*query"):
        rb.patch_lm(lm, "lora", 4, "none", rb.VisualContext())


def test_visual_map_per_batch_and_fitted_on_a_bounded_sample(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 3, 12, generator=g).half()                 # (images, N, C) as the cache holds
    m = rb.fit_visual_map(feats, 8, center=True)
    flat = feats.reshape(-1, 12).float()                               # all 150 rows <= FIT_ROWS: exact
    norm = torch.linalg.svd(flat, full_matrices=False)[2][:8].T
    norm = norm / (flat @ norm).pow(2).mean().sqrt()
    assert torch.equal(m.norm, norm) and torch.equal(m.mean, (flat @ norm).mean(0))
    rows = torch.tensor([3, 7, 7, 40])
    assert torch.allclose(m(feats, rows, "cpu"), (feats.float() @ norm - m.mean)[rows], atol=1e-6)
    assert rb.fit_visual_map(feats, 12, center=False) == rb.VisualMap()      # C = d: fed as it is
    monkeypatch.setattr(rb, "FIT_ROWS", 40)                             # more rows: a seeded sample of 40
    a, b = rb.fit_visual_map(feats, 8, center=True), rb.fit_visual_map(feats, 8, center=True)
    assert torch.equal(a.norm, b.norm) and not torch.equal(a.norm.abs(), m.norm.abs())


# ------------------------------------------------------------------------------------------ end to end
def test_pretraining_text_has_the_scene_in_context():
    tok = make_stand_ins.build_tokenizer()
    first = data.load_records("shapes_vqa", "train", world_seed=data.PRETRAIN_WORLD)[0]
    ids, n_answer = make_stand_ins.routing_pretrain_texts("vqa", tok, np.random.default_rng(0))[0]
    scene = rb.encode(tok, make_stand_ins.describe_scene(first["meta"]["scene"], np.random.default_rng(0)))
    assert ids[: len(scene)] == scene and tok.decode(ids[-1 - n_answer:-1]) == first["answer"]   # <s> scene </s>
    texts = make_stand_ins.routing_pretrain_texts("caption", tok, np.random.default_rng(0))     # [scene] <s> ...
    first = data.load_records("shapes_caption", "train", world_seed=data.PRETRAIN_WORLD)[0]
    assert tok.decode(texts[0][0]).endswith(" <s> " + tok.decode(rb.encode(tok, first["captions"][0])[1:]))
    assert 0.6 < np.mean([t[0].index(tok.bos_token_id) > 0 for t in texts]) < 0.9   # a quarter without scene


def test_remade_stand_in_through_model_and_eval_only_with_checkpoint_settings(tmp_path, capsys, cache_dir):
    """The tiny-roberta recipe (2 steps) writes a checkpoint folder; --model reads it like a hub id; the cache
    gets frozen features only. --eval_only with another --lr evaluates the checkpoint's run and says so."""
    make_stand_ins.RECIPES["tiny-roberta"](tmp_path / "tiny-roberta", 2)
    run = ["--out_dir", str(tmp_path / "vqa"), *SMALL, "--dataset", "shapes_vqa", "--kinds", "xtxv2",
           "--method", "adapter", "--epochs", "1", "--model", str(tmp_path / "tiny-roberta")]
    out = rb.main([*run, "--max_steps", "2"])
    r = out["runs"][0]
    assert out["task"] == "vqa" and 0 <= r["VQA"] <= 100 and r["steps"] == 2
    assert not [p for p in cache_dir.rglob("*") if "roberta" in p.name or "routing" in str(p)]  # features
    capsys.readouterr()
    again = rb.main([*run, "--eval_only", "--lr", "0.5"])
    assert again["runs"][0]["VQA"] == r["VQA"] and again["runs"][0]["steps"] == 2
    assert again["args"]["lr"] == 3e-3
    assert "the checkpoint's settings are used, ignored: --lr 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:                                   # nothing to evaluate
        rb.main(["--out_dir", str(tmp_path / "empty"), *run[2:], "--eval_only"])
    assert e.value.code == 2 and "No such file or directory" in capsys.readouterr().err


def test_resume_equals_uninterrupted(tiny, tmp_path):
    run = [*SMALL, *tiny["caption"], "--batch_size", "24", "--epochs", "2", "--kinds", "mul",   # 5 steps/ep.
           "--eval_limit", "2", "--visual_tokens", "grid",               # N = 9 visual tokens
           "--lora_dropout", "0.1"]                                   # dropout: the RNG state must resume too
    rb.main(["--out_dir", str(tmp_path / "full"), *run])
    rb.main(["--out_dir", str(tmp_path / "part"), *run, "--max_steps", "3"])
    assert not os.path.exists(tmp_path / "part" / "lora-mul" / "results.json")   # stopped early: not complete
    rb.main(["--out_dir", str(tmp_path / "part"), *run, "--resume"])       # resumes mid-epoch 0, into epoch 1
    a, b = (torch.load(tmp_path / d / "lora-mul" / "checkpoint.pt", weights_only=True)
            for d in ("full", "part"))
    assert a["step"] == b["step"] == 10
    for n in a["trainable"]:
        assert torch.equal(a["trainable"][n], b["trainable"][n]), n

    def losses(d):
        return [json.loads(x) for x in (tmp_path / d / "lora-mul" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses("part")] == list(range(1, 11)) and losses("part") == losses("full")


def test_cli_subprocess_export_and_bad_inputs(tiny, tmp_path, capsys):
    cmd = [sys.executable, os.path.join(ROOT, "routing_bottleneck.py"), "--out_dir", str(tmp_path / "cli"),
           *SMALL, *tiny["caption"], "--max_steps", "2", "--kinds", "none", "--export_merged",
           str(tmp_path / "merged"), "--seeds", "0,1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: " in r.stdout and " ± " in r.stdout and "None" in r.stdout
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert [x["seed"] for x in res["runs"]] == [0, 1] and (tmp_path / "cli" / "seed1" / "lora-none").is_dir()
    from transformers import GPT2LMHeadModel
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")         # a plain GPT-2 checkpoint
    assert merged.config.n_embd == 32 and (tmp_path / "merged" / "visual_prefix.pt").is_file()
    capsys.readouterr()
    for argv, msg in [(["--dataset", "nope"], "--dataset nope: must be one of shapes_caption"),
                      (["--model", "stand_ins/tiny-bert"], "no stand-in at"),
                      (["--kinds", "none,foo"], "unknown or repeated: ['foo']"),
                      (["--kinds", "mul,none,mul"], "unknown or repeated: ['mul']"),
                      (["--warmup", "nan"], "--warmup nan: must be a number >= 0"),
                      (["--max_steps", "-1"], "--max_steps -1: must be >= 0"),
                      (["--method", "prefix"], "--method prefix: must be lora, adapter or both"),
                      (["--seeds", "0,a"], "--seeds"), (["--lr", "-1"], "--lr -1.0: must be > 0"),
                      (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                      (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
                      (["--r_bottleneck", "0"], "must be >= 1"), (["--batch_size", "0"], "must be >= 1"),
                      (["--method", "adapter", "--export_merged", str(tmp_path / "x")], "cannot be merged"),
                      (["--dataset", "shapes_vqa", *tiny["caption"]], "does not fit"),
                      (["--model", str(tmp_path / "no_such_model")], "cannot load"),
                      (["--out_dir", str(tmp_path / "cli")], "holds a run"),
                      (["--dataset", "coco", "--data_root", str(tmp_path / "no")], str(tmp_path / "no"))]:
        with pytest.raises(SystemExit) as e:
            rb.main([*SMALL, "--out_dir", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, argv
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)


def test_ddp_two_gloo_processes(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "routing_bottleneck.py"), "--out_dir", str(tmp_path / "ddp"), *SMALL,
           *tiny["caption"], "--max_steps", "2", "--kinds", "mul", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["runs"][0]["steps"] == 2
    assert r.stdout.count("trainable: ") == 1                 # only rank 0 logs


def test_real_formats_local_gpt2_and_vit(tmp_path):
    """COCO Karpathy files (dataset_coco.json + JPEGs), a local GPT-2 folder (+ tokenizer) and a local HF ViT
    tower whose pooled output (width 32 = GPT-2 width) is x_R, fed as it is."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel
    tok = make_stand_ins.build_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    write_coco_karpathy(tmp_path)
    out = rb.main(["--out_dir", str(tmp_path / "out"), "--dataset", "coco", "--data_root", str(tmp_path),
                   "--model", str(tmp_path / "gpt2"), "--vision", str(tmp_path / "vit"), "--image_size", "32",
                   "--eval_split", "val", "--kinds", "none,xtxvTxv", "--max_steps", "2", "--batch_size", "4",
                   "--r_bottleneck", "4", "--num_beams", "2", "--device", "cpu"])
    assert [r["routing"] for r in out["runs"]] == ["none", "xtxvTxv"] and out["task"] == "caption"
    assert out["runs"][0]["trainable"] == out["runs"][1]["trainable"] == 2 * 4 * 32 + 2 * 32 * 4   # 1 layer


def test_checkpoint_settings_win_on_resume_and_a_nan_loss_keeps_it(tiny, tmp_path, monkeypatch, capsys):
    run = ["--out_dir", str(tmp_path), *SMALL, *tiny["caption"], "--epochs", "2", "--kinds", "mul",
           "--eval_limit", "2"]
    rb.main(run + ["--max_steps", "2"])
    ckpt = tmp_path / "lora-mul" / "checkpoint.pt"
    good = rb.load_checkpoint(ckpt)
    assert good["args"]["r_bottleneck"] == 4
    capsys.readouterr()
    out = rb.main(run + ["--max_steps", "3", "--resume", "--r_bottleneck", "2"])   # another rank: ignored
    assert "ignored: --r_bottleneck 2" in capsys.readouterr().out
    good = rb.load_checkpoint(ckpt)
    assert out["args"]["r_bottleneck"] == 4 and good["step"] == 3
    assert good["trainable"]["lm.transformer.h.0.attn.c_attn.lora_A"].shape[0] == 2 * 4     # rank 4 (q|v)
    loss_fn = rb.loss_fn
    monkeypatch.setattr(rb, "loss_fn", lambda *a: loss_fn(*a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        rb.main(run + ["--max_steps", "5", "--resume"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 1 and err == [f"error: non-finite loss at step 4; last good checkpoint: {ckpt}"]
    kept = rb.load_checkpoint(ckpt)
    assert kept["step"] == 3
    assert all(torch.equal(good["trainable"][k], v) for k, v in kept["trainable"].items())
    out = rb.main(run + ["--eval_only"])
    assert out["runs"][0]["steps"] == 3
