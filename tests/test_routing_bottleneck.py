"""Tests for routing_bottleneck.py (tiny, offline, CPU)."""
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import write_coco_karpathy  # noqa: E402
import data  # noqa: E402
import routing_bottleneck as rb  # noqa: E402

CACHE = tempfile.mkdtemp(prefix="routing_test_cache_")     # the tiny vision encoder (3 steps) is cached here
TINY = ["--tiny_hidden", "32", "--tiny_layers", "1", "--r_bottleneck", "4", "--train_limit", "24", "--eval_limit", "6",
        "--batch_size", "8", "--tiny_pretrain_steps", "2", "--num_beams", "2", "--max_gen_len", "6", "--log_every", "1",
        "--vision_pretrain_steps", "3", "--cache_dir", CACHE]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # 2 shared cores: keep the in-process runs single-threaded
    yield
    torch.set_num_threads(n)


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
    with pytest.raises(ValueError):
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


def test_route_grid_features_n_gt_1_hand_computed():
    x_t = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [2.0, 2.0]]])     # (B=1, L=3, r=2)
    x_v = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                  # (B=1, N=2, r=2); x'_v = mean = [.5, 1]
    out = {k: rb.route(x_t, x_v, k) for k in rb.ROUTINGS}
    assert all(o.shape == (1, 3, 2) for o in out.values())
    # x_t (x_v)^T x_v = x_t @ [[1, 0], [0, 4]]  (the formula as written, sum over the N visual rows)
    assert torch.allclose(out["xtxvTxv"], torch.tensor([[[1.0, 8.0], [0.0, -4.0], [2.0, 8.0]]]))
    assert torch.allclose(out["mul"], torch.tensor([[[0.5, 2.0], [0.0, -1.0], [1.0, 2.0]]]))
    assert torch.allclose(out["add"], torch.tensor([[[1.5, 3.0], [0.5, 0.0], [2.5, 3.0]]]))
    # (sum_k x_t[l, k]) * x'_v: row sums 3, -1, 4
    assert torch.allclose(out["xtxv2"], torch.tensor([[[1.5, 3.0], [-0.5, -1.0], [2.0, 4.0]]]))


def test_route_random_n_gt_1_and_per_sample_broadcasting():
    g = torch.Generator().manual_seed(1)
    x_t, x_v = torch.randn(2, 4, 3, generator=g), torch.randn(2, 5, 3, generator=g)   # B = 2, N = 5
    loop = torch.zeros(2, 4, 3)                                       # x_t (x_v)^T x_v by explicit sums
    for b in range(2):
        for n in range(5):
            loop[b] += (x_t[b] @ x_v[b, n])[:, None] * x_v[b, n][None]
    assert torch.allclose(rb.route(x_t, x_v, "xtxvTxv"), loop, atol=1e-5)
    for kind in ("mul", "add", "xtxv2", "xtxvTxv"):                   # each sample sees only its own image
        for b in range(2):
            assert torch.allclose(rb.route(x_t, x_v, kind)[b], rb.route(x_t[b:b + 1], x_v[b:b + 1], kind)[0], atol=1e-5)
        for l in range(4):                                            # and each token is routed independently
            assert torch.allclose(rb.route(x_t, x_v, kind)[:, l], rb.route(x_t[:, l:l + 1], x_v, kind)[:, 0], atol=1e-5)
    assert torch.allclose(rb.route(x_t, x_v[:, :1], "mul")[:, 2], x_t[:, 2] * x_v[:, 0])   # same row for every token


# ------------------------------------------------------------------------------------------ modules
def tiny_prep(task="caption"):
    p = rb.Prep()
    p.task, p.tok, p.answers, p.lm_state = task, data.build_tokenizer(), (["yes", "no", "red"] if task == "vqa" else []), None
    return p


def tiny_args(model, **kw):
    a = rb.resolve(rb.parse_args(["--model", model, "--dataset", "shapes_vqa" if model == "tiny-roberta" else "shapes_caption",
                                  "--tiny_hidden", "32", "--r_bottleneck", "4", "--out_dir", "unused"]))
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def batch(seed=0, B=2, L=5, d=32, N=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, d, generator=g), torch.randint(4, 40, (B, L), generator=g), torch.ones(B, L, dtype=torch.long)


@pytest.mark.parametrize("model,method", [("tiny-gpt2", "lora"), ("tiny-gpt2", "adapter"), ("tiny-llama", "lora"),
                                          ("tiny-roberta", "adapter")])
def test_zero_up_projection_leaves_outputs_unchanged(model, method):
    a, p = tiny_args(model), tiny_prep("vqa" if model == "tiny-roberta" else "caption")
    vlm, _ = rb.build_model(a, p, method, "mul")
    torch.manual_seed(a.seed)
    plain = rb.VisualLM(rb.load_lm(a, p.task, p.tok), p.task, rb.VisualContext(), torch.nn.ModuleList(), len(p.answers))
    plain.head = vlm.head
    x_r, ids, mask = batch()
    with torch.no_grad():
        assert torch.allclose(vlm(x_r, ids, mask), plain(x_r, ids, mask), atol=1e-5)
        for n, q in vlm.named_parameters():                  # now make W_up non-zero: output must change
            if n.endswith("lora_B") or n.endswith("up.weight"):
                q.normal_()
        assert not torch.allclose(vlm(x_r, ids, mask), plain(x_r, ids, mask), atol=1e-3)


def test_fused_c_attn_lora_touches_only_q_and_v():
    a, p = tiny_args("tiny-gpt2"), tiny_prep()
    vlm, fam = rb.build_model(a, p, "lora", "xtxvTxv")
    assert fam == "gpt2"
    layer = vlm.lm.transformer.h[0].attn.c_attn
    assert isinstance(layer, rb.RoutedLoRA) and layer.slices == [(0, 32), (64, 96)]
    x_r, _, _ = batch()
    layer.ctx.x_r = x_r
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer.lora_B.normal_()
        delta = layer(x) - layer.base(x)
    assert delta[..., 32:64].abs().max() == 0                 # key third untouched
    assert delta[..., :32].abs().min() > 0 and delta[..., 64:].abs().min() > 0
    # same as an explicit computation: the routing spans the stacked q|v bottleneck (released code)
    x_t, x_v = x @ layer.lora_A.t(), x_r @ layer.lora_A.t()
    h = (x_t @ x_v.transpose(1, 2)) @ x_v
    q = h[..., :4] @ layer.lora_B[0].t() * layer.scaling
    v = h[..., 4:] @ layer.lora_B[1].t() * layer.scaling
    assert torch.allclose(delta[..., :32], q, atol=1e-5) and torch.allclose(delta[..., 64:], v, atol=1e-5)
    # released MergedLinearOnlyVLBeforeB layout: lora_B (2 * 32, r) applied as a grouped conv1d, then zero_pad
    after_b = torch.nn.functional.conv1d(h.transpose(-2, -1), layer.lora_B.reshape(64, 4).unsqueeze(-1),
                                         groups=2).transpose(-2, -1) * layer.scaling            # (B, L, 64)
    assert torch.allclose(torch.cat([delta[..., :32], delta[..., 64:]], -1), after_b, atol=1e-5)


@pytest.mark.parametrize("model,method", [("tiny-gpt2", "lora"), ("tiny-gpt2", "adapter"), ("tiny-llama", "adapter"),
                                          ("tiny-roberta", "lora")])
def test_param_counts_equal_and_gradients_only_to_method_params(model, method):
    p = tiny_prep("vqa" if model == "tiny-roberta" else "caption")
    counts = set()
    for kind in rb.ROUTINGS:
        vlm, _ = rb.build_model(tiny_args(model), p, method, kind)
        counts.add(rb.count_params(vlm))
        with torch.no_grad():                                     # W_up = 0 at init would zero W_down's grad
            for n, q in vlm.named_parameters():
                if n.endswith("lora_B") or n.endswith("up.weight"):
                    q.normal_(0, 0.1)
        x_r, ids, mask = batch(N=3 if kind == "xtxvTxv" else 1)
        out = vlm(x_r, ids, mask)
        out.float().pow(2).mean().backward()
        for n, q in vlm.named_parameters():
            if q.requires_grad:
                assert q.grad is not None and q.grad.abs().sum() > 0, n
            else:
                assert q.grad is None, n
        trainable = {n for n, q in vlm.named_parameters() if q.requires_grad}
        assert all(("lora_" in n) or n.startswith(("adapters.", "head.")) for n in trainable)
        assert any("lora_" in n or n.startswith("adapters.") for n in trainable)
    assert len(counts) == 1, counts                             # routing adds no parameters
    n_train = counts.pop()[0]
    if model == "tiny-gpt2" and method == "adapter":            # ONE adapter per block, shared by attn + MLP
        assert len(vlm.adapters) == 2 and n_train == 2 * ((32 * 4 + 4) + (4 * 32 + 32))
    if model == "tiny-gpt2" and method == "lora":               # q and v: A (2r, d) + B (2, d, r) per layer
        assert n_train == 2 * (2 * 4 * 32 + 2 * 32 * 4)


def test_unpatchable_model_names_expected_modules():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32))
    with pytest.raises(ValueError, match="c_attn.*q_proj.*query"):
        rb.lm_family(lm)


# ------------------------------------------------------------------------------------------ end to end
def run_main(tmp_path, *extra):
    return rb.main(["--out_dir", str(tmp_path / "out"), *TINY, *extra])


def test_smoke_gpt2_captioning(tmp_path, capsys):
    out = run_main(tmp_path, "--max_steps", "3", "--kinds", "none,mul")
    assert [r["routing"] for r in out["runs"]] == ["none", "mul"]
    assert out["runs"][0]["trainable"] == out["runs"][1]["trainable"]
    assert all(0 <= r["BLEU-4"] <= 100 and r["CIDEr"] >= 0 for r in out["runs"])
    text = capsys.readouterr().out
    assert "trainable: " in text and "|| all: " in text and "x_t o x'_v" in text
    assert os.path.exists(tmp_path / "out" / "results.json")
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert any('"step": 3' in l for l in lines)


def test_smoke_roberta_vqa_and_llama_adapter(tmp_path):
    out = rb.main(["--out_dir", str(tmp_path / "vqa"), *TINY, "--dataset", "shapes_vqa", "--max_steps", "2",
                   "--kinds", "xtxv2"])
    assert out["task"] == "vqa" and out["model"] == "tiny-roberta" and 0 <= out["runs"][0]["VQA"] <= 100
    out = rb.main(["--out_dir", str(tmp_path / "llama"), *TINY, "--model", "tiny-llama", "--method", "adapter",
                   "--max_steps", "2", "--kinds", "add", "--visual_tokens", "grid", "--pool_grid", "2",
                   "--vision", "patches"])
    assert out["runs"][0]["method"] == "adapter" and "CIDEr" in out["runs"][0]


def test_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    run = [*TINY, "--batch_size", "24", "--max_steps", "7", "--kinds", "mul",   # 120 captions: 5 steps/epoch
           "--lora_dropout", "0.1"]                                          # dropout: the RNG state must resume too
    rb.main(["--out_dir", str(full), *run])
    part = tmp_path / "part"
    assert rb.main(["--out_dir", str(part), *run, "--stop_at_step", "3"]) == {"stopped": True}
    assert not os.path.exists(part / "results.json")
    rb.main(["--out_dir", str(part), *run, "--resume"])          # resumes mid-epoch 0, crosses into epoch 1
    a = torch.load(full / "lora-mul" / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "lora-mul" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 7 and a["loss"] == b["loss"]
    for n in a["trainable"]:
        assert torch.equal(a["trainable"][n], b["trainable"][n]), n

    def losses(d):   # per-step log lines: the resumed run must continue at step 4, not restart at 1
        recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "step" in r]
    assert [s for s, _ in losses(part)] == list(range(1, 8))
    assert losses(part) == losses(full)


def test_cli_subprocess_and_bad_inputs(tmp_path, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "routing_bottleneck.py"), "--out_dir", str(tmp_path / "cli"), *TINY,
           "--max_steps", "2", "--kinds", "none"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: " in r.stdout and "None" in r.stdout
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["runs"][0]["steps"] == 2
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)   # finished: refuse
    assert r.returncode == 2 and r.stderr.strip().startswith("error: results exist"), r.stderr[-2000:]
    capsys.readouterr()
    # in-process (same code path as the CLI): exit 2 and ONE `error: ...` line naming the problem
    for argv, msg in [(["--dataset", "nope"], "unknown dataset"),
                      (["--model", "tiny-bert"], "unknown tiny model"),
                      (["--kinds", "none,foo"], "unknown routing"),
                      (["--method", "prefix"], "unknown --method"),
                      (["--dataset", "shapes_vqa", "--model", "tiny-gpt2"], "does not fit"),
                      (["--model", str(tmp_path / "no_such_model")], "cannot load"),
                      (["--dataset", "coco", "--data_root", str(tmp_path / "missing")], str(tmp_path / "missing"))]:
        with pytest.raises(SystemExit) as e:
            rb.main([*TINY, "--out_dir", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, argv
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "routing_bottleneck.py"), "--out_dir", str(tmp_path / "ddp"), *TINY,
           "--max_steps", "2", "--kinds", "mul", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["runs"][0]["steps"] == 2
    assert r.stdout.count("trainable: ") == 1                 # only rank 0 logs


def test_real_formats_local_gpt2_and_vit(tmp_path):
    """The real path end to end on fixtures: COCO Karpathy files (dataset_coco.json + JPEGs), a local GPT-2
    folder (+ tokenizer) and a local HF ViT tower whose pooled output (width 32 = GPT-2 width) is x_R."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel
    tok = data.build_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                       patch_size=8)).save_pretrained(tmp_path / "vit")
    write_coco_karpathy(tmp_path)
    out = rb.main(["--out_dir", str(tmp_path / "out"), "--dataset", "coco", "--data_root", str(tmp_path),
                   "--model", str(tmp_path / "gpt2"), "--vision", str(tmp_path / "vit"), "--image_size", "32",
                   "--eval_split", "val", "--kinds", "none,xtxvTxv", "--max_steps", "2", "--batch_size", "4",
                   "--r_bottleneck", "4", "--num_beams", "2", "--max_gen_len", "5", "--device", "cpu"])
    assert [r["routing"] for r in out["runs"]] == ["none", "xtxvTxv"] and out["task"] == "caption"
    assert out["runs"][0]["trainable"] == out["runs"][1]["trainable"] and out["runs"][1]["steps"] == 2


def test_tiny_vision_encoder_defaults_cache_and_frozen(tmp_path):
    a = rb.resolve(rb.parse_args(["--out_dir", str(tmp_path / "o"), "--vision_pretrain_steps", "2",
                                  "--cache_dir", str(tmp_path)]))
    assert a.vision == "tiny-cnn" and a.image_size == 48                  # auto: offline stand-in for the ViT
    assert rb.resolve(rb.parse_args(["--model", "gpt2", "--dataset", "coco"])).vision == "google/vit-base-patch16-224-in21k"
    e1, e2 = rb.tiny_vision_encoder(a, 16), rb.tiny_vision_encoder(a, 16)   # second call loads the cache
    assert len(list((tmp_path / "routing_bottleneck").glob("tiny_cnn_*.pt"))) == 1
    assert not any(p.requires_grad for p in e1.parameters())
    for (k, v), w in zip(e1.state_dict().items(), e2.state_dict().values()):
        assert torch.equal(v, w), k
    g, p = e1(torch.rand(2, 3, 48, 48))
    assert g.shape == (2, 9, 16) and p.shape == (2, 16)
