"""Tests for memvp.py (fast, offline): the math of Eq. 8 / Eq. 11-12, the patching, gradients, generation
with reused visual keys/values, the FLOP formulas, main() smoke runs, CLI, resume, DDP and bad inputs."""
import copy
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import memvp  # noqa: E402

CASES = [("bart", "relu"), ("t5", "relu"), ("t5", "gated-gelu"), ("llama", "relu")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tiny(arch, t5_ffn="relu"):
    torch.manual_seed(0)
    return memvp.tiny_lm(arch, 40, 32, 2, 64, 4, 2, t5_ffn).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("memvp_cache"))


def small(cache, out, *extra):
    return ["--train_limit", "24", "--eval_limit", "6", "--max_steps", "2", "--lm_pretrain_steps", "2",
            "--batch_size", "8", "--log_every", "1", "--cache_dir", cache, "--out_dir", str(out), *extra]


# ------------------------------------------------------------------------------------- the math
def explicit_ffn(kind, mod, act, x, K, V, s):
    """Eq. 8 (standard FFN) / Eq. 11-12 (gated FFN): the FFN with the visual entries concatenated to its
    weight matrices, one sample and one token at a time. x (B, L, d), K/V (B, n, d)."""
    lin = {"bart": ("fc1", None, "fc2"), "t5": ("wi", None, "wo"), "t5-gated": ("wi_0", "wi_1", "wo"),
           "swiglu": ("gate_proj", "up_proj", "down_proj")}[kind]
    W1, W2 = getattr(mod, lin[0]), getattr(mod, lin[2])
    b1 = W1.bias if W1.bias is not None else torch.zeros(W1.out_features)
    b2 = W2.bias if W2.bias is not None else torch.zeros(W2.out_features)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        n = K.shape[1]
        W1p = torch.cat([W1.weight, K[b]], 0)  # keys k_1..k_D, lam f(z_i) + p^k_i
        b1p = torch.cat([b1, torch.zeros(n)])
        W2p = torch.cat([W2.weight, s * V[b].T], 1)  # values v_1..v_D, lam f(z_i) + p^v_i (times s)
        for t in range(x.shape[1]):
            xt = x[b, t]
            h = act(W1p @ xt + b1p)
            if lin[1]:  # Eq. 11: second key of a visual entry is x / |x|^2, so <x, .> = 1
                W3p = torch.cat([getattr(mod, lin[1]).weight, (xt / xt.dot(xt)).expand(n, -1)], 0)
                h = h * (W3p @ xt)
            out[b, t] = W2p @ h + b2
    return out


@pytest.mark.parametrize("arch,t5_ffn", CASES)
def test_visual_memory_equals_concatenated_weights(arch, t5_ffn):
    ref = tiny(arch, t5_ffn)
    m = memvp.VLModel(copy.deepcopy(ref), "memvp", 8, n_pos=5, shared_pos=False, scale=0.7, mem_dropout=0.0).eval()
    ffns = memvp.find_ffns(ref)
    assert len(ffns) == 2 and {k for k, *_ in ffns} == {{"bart": "bart", "llama": "swiglu"}.get(arch, "t5-gated" if "gated" in t5_ffn else "t5")}
    torch.manual_seed(1)
    B, L, n, d = 2, 3, 5, 32
    keys, values, x = torch.randn(len(ffns), B, n, d) * 0.3, torch.randn(len(ffns), B, n, d), torch.randn(B, L, d)
    with torch.no_grad(), m.bank.use(keys, values):
        for t, (kind, name, mod, act) in enumerate(ffns):
            patched = m.lm.get_submodule(name)
            got = patched.fc2(patched.activation_fn(patched.fc1(x))) if kind == "bart" else patched(x)
            want = explicit_ffn(kind, mod, act, x, keys[t], values[t], 0.7)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert (got - mod.fc2(act(mod.fc1(x))) if kind == "bart" else got - mod(x)).abs().max() > 1e-3


def test_visual_memory_pure_function():
    torch.manual_seed(0)
    x, k, v = torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want = torch.stack([sum(F.gelu(x[b] @ k[b, i])[:, None] * v[b, i] for i in range(3)) for b in range(2)])
    torch.testing.assert_close(memvp.visual_memory(x, k, v, F.gelu), want)


@pytest.mark.parametrize("arch", ["bart", "t5", "llama"])
def test_zero_memory_gives_unpatched_logits(arch):
    ref = tiny(arch)
    m = memvp.VLModel(copy.deepcopy(ref), "memvp", 8, lam=0.0, n_pos=6, shared_pos=arch == "llama").eval()
    with torch.no_grad():
        m.prompts.pos_k.zero_()
        m.prompts.pos_v.zero_()
        ids = torch.randint(4, 40, (2, 5))
        mask = torch.ones_like(ids)
        inputs, ctx = m.lm_inputs(torch.randn(2, 6, 8), ids, mask)
        extra = {"labels": ids} if arch != "llama" else {}
        with ctx:
            assert m.bank.keys is not None
            got = m.lm(**inputs, **extra).logits
        torch.testing.assert_close(got, ref(input_ids=ids, attention_mask=mask, **extra).logits)
        m.prompts.pos_k.normal_()  # sanity: a non-zero memory changes the logits
        m.prompts.pos_v.normal_()
        inputs, ctx = m.lm_inputs(torch.randn(2, 6, 8), ids, mask)
        with ctx:
            diff = (m.lm(**inputs, **extra).logits - got).abs().max().item()
        assert diff > 1e-4


@pytest.mark.parametrize("mode,arch", [("memvp", "bart"), ("memvp", "llama"), ("input", "t5")])
def test_gradients_only_reach_method_params(mode, arch):
    m = memvp.VLModel(tiny(arch), mode, 8, lam=0.5, n_pos=6, shared_pos=arch == "llama",
                      lora_rank=2 if mode == "input" else 0)
    trainable = memvp.freeze(m, train_norms=True)
    ids = torch.randint(4, 40, (2, 5))
    labels = ids.clone() if arch == "llama" else torch.randint(4, 40, (2, 3))
    m(torch.randn(2, 6, 8), ids, torch.ones_like(ids), labels).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in m.named_parameters() if p.requires_grad} and len(trainable) == len(with_grad)
    assert all(n.startswith(("prompts.", "projector.")) or "norm" in n or "lora_" in n for n in with_grad)
    assert any("norm" in n for n in with_grad)
    frozen = [m.lm.get_input_embeddings().weight, m.lm.get_output_embeddings().weight]
    frozen += [p for n, p in m.named_parameters() if n.endswith(("fc1.fc.weight", "fc2.fc.weight", "wi.weight", "wo.weight",
                                                                 "gate_proj.weight", "q_proj.base.weight", "q.base.weight"))]
    assert len(frozen) > 3 and all(p.grad is None and not p.requires_grad for p in frozen)
    if mode == "memvp":
        for n in ("prompts.pos_k", "prompts.pos_v", "prompts.projector.net.0.weight" if arch == "llama" else "prompts.projector.net.weight"):
            assert dict(m.named_parameters())[n].grad.abs().sum() > 0, n
    else:
        assert any("lora_B" in n for n in with_grad)


def test_zero_padding_and_position_tables():
    torch.manual_seed(0)
    pr = memvp.MemVPPrompts(d_vis=6, d=8, n_pos=7, n_tables=3, lam=0.5)
    with torch.no_grad():
        pr.pos_v.normal_()
    z = torch.randn(2, 4, 6)
    k, v = pr(z)
    assert k.shape == v.shape == (3, 2, 7, 8)
    vp = 0.5 * pr.projector(z)
    torch.testing.assert_close(k[:, :, :4], vp[None] + pr.pos_k[:, None, :4])
    torch.testing.assert_close(v[:, :, :4], vp[None] + pr.pos_v[:, None, :4])
    assert torch.equal(k[:, :, 4:], pr.pos_k[:, None, 4:].expand(3, 2, 3, 8))  # padded: position embedding only
    assert torch.equal(v[:, :, 4:], pr.pos_v[:, None, 4:].expand(3, 2, 3, 8))
    with pytest.raises(memvp.UsageError):
        pr(torch.randn(1, 8, 6))
    for shared in (True, False):  # LLaMA: one table for all layers (Sec. 5.2); else one per layer
        m = memvp.VLModel(tiny("llama"), "memvp", 6, n_pos=7, shared_pos=shared)
        tables = [w.table for w in m.modules() if isinstance(w, memvp.MemVPFFN)]
        assert m.prompts.pos_k.shape == ((1 if shared else 2), 7, 32) and tables == ([0, 0] if shared else [0, 1])
    m = memvp.VLModel(tiny("bart"), "memvp", 6, n_pos=7)  # BART: encoder FFNs only (Sec. 5.1)
    assert [w.table for w in m.lm.model.encoder.modules() if isinstance(w, memvp.MemVPFC2)] == [0, 1]
    assert not any(isinstance(w, memvp.MemVPFC2) for w in m.lm.model.decoder.modules())


def test_generation_reuses_visual_memory_and_matches_uncached():
    torch.manual_seed(0)
    m = memvp.VLModel(tiny("llama"), "memvp", 8, lam=1.0, n_pos=6, shared_pos=True).eval()
    with torch.no_grad():
        m.prompts.pos_v.normal_()
    calls = []
    m.prompts.register_forward_hook(lambda *a: calls.append(1))
    z = torch.randn(2, 6, 8)
    ids = torch.tensor([[1, 0, 7, 8], [1, 9, 10, 11]])  # bos, left-padded prompt (row 0 has a hole)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    out = m.generate(z, ids, mask, 5, eos_id=2, pad_id=0, start_id=None)
    assert len(calls) == 1  # keys/values once per image, reused by every decode step
    keys, values = m.prompts(z)
    seq, msk = ids, mask
    with torch.no_grad(), m.bank.use(keys, values):  # reference: full recomputation at every step
        for t in range(out.shape[1]):
            pos = (msk.cumsum(-1) - 1).clamp(min=0)
            nxt = m.lm(input_ids=seq, attention_mask=msk, position_ids=pos).logits[:, -1].argmax(-1)
            assert torch.equal(nxt[out[:, t] != 0], out[:, t][out[:, t] != 0])
            seq, msk = torch.cat([seq, nxt[:, None]], 1), torch.cat([msk, torch.ones_like(msk[:, :1])], 1)


def test_flops_formulas_match_eq13_15():
    d, h, n, L, layers, V = 64, 4, 48, 16, 3, 100
    cfg = SimpleNamespace(hidden_size=d, num_attention_heads=h, intermediate_size=4 * d, vocab_size=V,
                          is_encoder_decoder=False, num_hidden_layers=layers, is_gated_act=False)
    e = memvp.eq13_15(d, n, L)
    head = 2 * L * d * V
    assert memvp.analytic_flops(cfg, "input", n, n, L, L) == layers * e["input"] + head
    assert memvp.analytic_flops(cfg, "memvp", n, n, L, L) == layers * e["memvp"] + head
    assert e["input"] - e["lm"] == 4 * n * d * (6 * d + n + 2 * L) and e["memvp"] - e["lm"] == 4 * n * d * L


# ------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("arch", ["llama", "bart", "t5"])
def test_main_smoke_both_modes(arch, cache, tmp_path, capsys):
    res = memvp.main(small(cache, tmp_path / arch, "--arch", arch, "--prompting", "both"))
    out = capsys.readouterr().out
    assert out.count("trainable: ") == 2 and "MemVP (memory space)" in out and "input-space prompting" in out
    for mode in ("memvp", "input"):
        r = res["modes"][mode]
        assert r["steps"] == 2 and 0 < r["trainable_params"] < r["all_params"] and 0 <= r["vqa"]["overall"] <= 100
    saved = json.load(open(tmp_path / arch / "results.json"))
    assert set(saved["modes"]) == {"memvp", "input"} and "answer_prior" in saved
    lines = [json.loads(x) for x in open(tmp_path / arch / "metrics.jsonl")]
    assert [x["step"] for x in lines if x["mode"] == "memvp" and "loss" in x] == [1, 2]


def test_local_hf_checkpoint(cache, tmp_path):
    """The real-model path (AutoConfig / AutoModel / AutoTokenizer from a local dir) with paper defaults."""
    import data
    tok = data.build_tokenizer()
    memvp.tiny_lm("llama", len(tok), 32, 1, 64, 2, 1).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    res = memvp.main(small(cache, tmp_path / "run", "--model", str(tmp_path / "lm"), "--vision", "patches",
                           "--prompting", "memvp", "--threads", "1"))
    ck = torch.load(tmp_path / "run" / "memvp" / "checkpoint.pt", weights_only=False)
    assert res["modes"]["memvp"]["steps"] == 2 and ck["trainable"]["prompts.pos_k"].shape == (1, 320, 32)
    assert (ck["args"]["lr"], ck["args"]["lam"], ck["args"]["scale"], ck["args"]["shared_pos"]) == (9e-3, 0.01, 0.1, True)


def test_real_vqav2_format_with_local_clip_tower(cache, tmp_path, capsys):
    """Official VQAv2 files (questions / annotations JSON + COCO-named JPEGs, one unreadable) + a local HF CLIP
    vision tower: features extracted by data.py, MemVP trains and is scored with the VQA accuracy."""
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel
    root = tmp_path / "vqav2"
    for cs, iids in (("train2014", [1, 2, 3, 4]), ("val2014", [5, 6])):
        qs, anns = [], []
        for iid in iids:
            (root / cs).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (40 * iid, 200, 30)).save(root / cs / f"COCO_{cs}_{iid:012d}.jpg")
            qs.append({"question_id": iid * 10, "image_id": iid, "question": "what color is it?"})
            anns.append({"question_id": iid * 10, "image_id": iid, "answer_type": "other", "question_type": "what color",
                         "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": k + 1}
                                                                      for k in range(10)]})
        (root / f"v2_OpenEnded_mscoco_{cs}_questions.json").write_text(json.dumps({"questions": qs}))
        (root / f"v2_mscoco_{cs}_annotations.json").write_text(json.dumps({"annotations": anns}))
    (root / "train2014" / "COCO_train2014_000000000004.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    argv = small(cache, tmp_path / "run", "--dataset", "vqav2", "--data_root", str(tmp_path), "--vision",
                 str(tmp_path / "clip"), "--image_size", "32", "--eval_split", "val", "--prompting", "memvp",
                 "--threads", "1", "--batch_size", "2")
    with pytest.raises(SystemExit) as e:          # 1 of 4 unreadable > the 1 % limit: clear error, exit 2
        memvp.main(argv)
    assert e.value.code == 2 and "COCO_train2014_000000000004.jpg" in capsys.readouterr().err
    Image.new("RGB", (40, 30)).save(root / "train2014" / "COCO_train2014_000000000004.jpg")
    r = memvp.main(argv)["modes"]["memvp"]
    assert r["steps"] == 2 and 0 <= r["vqa"]["overall"] <= 100
    assert any(f.startswith("vqav2-train") for f in os.listdir(os.path.join(cache, "features")))


def test_benchmark_tiny(tmp_path, capsys):
    res = memvp.main(["--benchmark", "--bench_layers", "1", "--bench_d", "32", "--bench_ffn", "64", "--bench_heads", "4",
                      "--bench_kv_heads", "2", "--bench_vocab", "64", "--bench_n", "12", "--bench_L", "6",
                      "--bench_batch", "2", "--bench_dv", "16", "--bench_gen", "2", "--bench_iters", "1",
                      "--out_dir", str(tmp_path)])
    q = res["ratios_input_over_memvp"]
    e = memvp.eq13_15(32, 12, 6)
    assert q["eq13_15_per_layer"] == pytest.approx(e["input"] / e["memvp"])
    assert q["analytic_whole_lm"] > 1 and q["counted_fwd_flops"] > 1
    for side in res["sides"].values():
        assert side["train_s"] > 0 and side["prefill_s"] > 0 and side["decode_s"] > 0 and side["train_saved_activations_mb"] > 0
    assert "input/MemVP" in capsys.readouterr().out and os.path.exists(tmp_path / "results.json")


def test_resume_equals_uninterrupted(cache, tmp_path):
    base = ["--prompting", "memvp", "--epochs", "2", "--mem_dropout", "0.1", "--ckpt_every", "1"]  # 3 steps/epoch
    full = small(cache, tmp_path / "a", *base)
    memvp.main(full[:full.index("--max_steps")] + ["--max_steps", "5"] + full[full.index("--max_steps") + 2:])
    part = small(cache, tmp_path / "b", *base)
    memvp.main(part)  # 2 steps
    memvp.main(part[:part.index("--max_steps")] + ["--max_steps", "5"] + part[part.index("--max_steps") + 2:] + ["--resume"])
    a = torch.load(tmp_path / "a" / "memvp" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "memvp" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 5 and a["epoch"] == b["epoch"] == 1
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    la = [x["loss"] for x in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in x]
    lb = [x["loss"] for x in map(json.loads, open(tmp_path / "b" / "metrics.jsonl")) if "loss" in x]
    assert la[-1] == lb[-1]


def test_non_finite_loss_stops(cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        memvp.main(small(cache, tmp_path, "--prompting", "memvp", "--lr", "1e30", "--warmup_ratio", "0",
                         "--max_steps", "6", "--ckpt_every", "1", "--lam", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite loss at step" in err and "checkpoint.pt" in err
    step = int(err.split("non-finite loss at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "memvp" / "checkpoint.pt", weights_only=False)["step"] == step - 1


def test_cli_subprocess(cache, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "memvp.py"), *small(cache, tmp_path, "--prompting", "memvp")],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable: " in r.stdout and "MemVP (memory space)" in r.stdout
    assert json.load(open(tmp_path / "results.json"))["modes"]["memvp"]["steps"] == 2


def test_ddp_two_gloo_processes(cache, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "memvp.py"), *small(cache, tmp_path, "--prompting", "memvp", "--device", "cpu")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))["modes"]["memvp"]
    assert res["steps"] == 2 and res["ddp_max_param_diff"] == 0.0
    assert r.stdout.count("trainable: ") == 1  # only rank 0 logs


# ------------------------------------------------------------------------------------- bad inputs
def run_bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        memvp.main(argv)
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # (HF may print progress bars first)
    assert e.value.code == 2 and err.startswith("error: "), err
    return err


def test_bad_inputs(cache, tmp_path, capsys):
    assert "unknown --arch 'gpt9'" in run_bad(["--arch", "gpt9"], capsys)
    assert "unknown --prompting" in run_bad(["--prompting", "cross"], capsys)
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    err = run_bad(["--model", str(tmp_path / "gpt2"), "--out_dir", str(tmp_path / "o1")], capsys)
    assert "cannot patch GPT2LMHeadModel" in err and "gate_proj" in err
    missing = tmp_path / "no_such_root"
    err = run_bad(small(cache, tmp_path / "o2", "--dataset", "vqav2", "--data_root", str(missing)), capsys)
    assert "vqav2" in err
    memvp.main(small(cache, tmp_path / "o3", "--prompting", "memvp", "--max_steps", "1"))
    capsys.readouterr()
    assert "pass --overwrite" in run_bad(small(cache, tmp_path / "o3", "--prompting", "memvp"), capsys)
