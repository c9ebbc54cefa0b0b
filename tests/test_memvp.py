"""memvp.py: Eq. 8 / Eq. 11-12 against FFNs with concatenated weights, the patching (all or some layers),
gradients, generation with reused keys/values, FLOP formulas against torch's counter, and runs on the shipped
stand-ins: smoke, CLI, DDP, resume, seeds, eval_only, ScienceQA (a re-made stand-in) and VQAv2 fixtures in the
official layouts, the benchmark, bad inputs."""
import json
import os
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import data  # noqa: E402
import make_stand_ins  # noqa: E402
import memvp  # noqa: E402
from formats import write_scienceqa  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def fast_encoders(tmp_path_factory):
    """A random-weight tiny-cnn stands in for the pre-trained one (13 s to build; tested in test_data.py),
    with this file's own feature cache; a 2-layer CLIP tower for the subprocess runs."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    CACHE["dir"] = str(tmp_path_factory.mktemp("memvp_cache"))
    CACHE["clip"] = str(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=16)
                    ).save_pretrained(CACHE["clip"])
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(CACHE["clip"])
    with pytest.MonkeyPatch.context() as mp:
        torch.manual_seed(0)
        cnn = data.TinyCNN().eval().requires_grad_(False)
        mp.setattr(data, "tiny_cnn", lambda: cnn)
        yield


def tiny(arch, t5_ffn="relu", layers=2):
    torch.manual_seed(0)
    return make_stand_ins.tiny_lm(arch, 40, 32, layers, 64, 4, 2, t5_ffn).eval()


def vl(lm, mode, d_vis, **settings):
    """memvp.VLModel with the BART/T5 family's values of Args, but `settings`."""
    family = {"lam": 0.01, "scale": 1.0, "n_pos": 240, "mem_dropout": 0.0, "lora_rank": 0}
    return memvp.VLModel(lm, mode, d_vis, memvp.Args(**{**family, **settings}))


def small(out, *extra):
    """A small run: 24 training and 6 evaluation questions, 2 steps, on stand_ins/tiny-llama."""
    return ["--train_limit", "24", "--eval_limit", "6", "--max_steps", "2", "--batch_size", "8",
            "--log_every", "1", "--cache_dir", CACHE["dir"], "--out_dir", str(out), *extra]


# ------------------------------------------------------------------------------------- the math
def explicit_ffn(kind, mod, act, x, K, V, s):
    """Eq. 8 (standard FFN) / Eq. 11-12 (gated FFN): the FFN whose weight matrices get the visual entries
    appended, one sample and one token at a time. x (B, L, d), K / V (B, n, d)."""
    names = {"BartEncoderLayer": ("fc1", None, "fc2"), "T5DenseActDense": ("wi", None, "wo"),
             "T5DenseGatedActDense": ("wi_0", "wi_1", "wo"),
             "LlamaMLP": ("gate_proj", "up_proj", "down_proj")}
    w1, w3, w2 = (getattr(mod, n) if n else None for n in names[type(mod).__name__])
    b1 = w1.bias if w1.bias is not None else torch.zeros(w1.out_features)
    b2 = w2.bias if w2.bias is not None else torch.zeros(w2.out_features)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        n = K.shape[1]
        W1 = torch.cat([w1.weight, K[b]], 0)  # keys k_1..k_D, then lam f(z_i) + p^k_i
        B1 = torch.cat([b1, torch.zeros(n)])
        W2 = torch.cat([w2.weight, s * V[b].T], 1)  # values v_1..v_D, then lam f(z_i) + p^v_i (times s)
        for t in range(x.shape[1]):
            xt = x[b, t]
            h = act(W1 @ xt + B1)
            if w3 is not None:  # Eq. 11: the visual entries' gate keys are x / |x|^2, so <x, g> = 1
                h = h * (torch.cat([w3.weight, (xt / xt.dot(xt)).expand(n, -1)], 0) @ xt)
            out[b, t] = W2 @ h + b2
    return out


@pytest.mark.parametrize("arch,t5_ffn",
                         [("bart", "relu"), ("t5", "relu"), ("t5", "gated-gelu"), ("llama", "relu")])
def test_visual_memory_equals_concatenated_weights(arch, t5_ffn):
    ref = tiny(arch, t5_ffn)
    m = vl(ref, "memvp", 8, n_pos=5, scale=0.7).eval()
    assert not any(isinstance(w, memvp.MemVPFFN) for w in ref.modules())  # VLModel patched a copy
    ffns = memvp.find_ffns(ref)
    assert len(ffns) == 2 and all(k == {"t5": "t5", "bart": "bart"}.get(arch, "llama") for k, *_ in ffns)
    torch.manual_seed(1)
    keys, values, x = torch.randn(2, 2, 5, 32) * 0.3, torch.randn(2, 2, 5, 32), torch.randn(2, 3, 32)
    with torch.no_grad(), m.bank.use(keys, values):
        for t, (kind, name, mod, act) in enumerate(ffns):
            patched, table = m.lm.get_submodule(name), 0 if arch == "llama" else t  # LLaMA: one table
            got = patched.fc2(patched.activation_fn(patched.fc1(x))) if kind == "bart" else patched(x)
            torch.testing.assert_close(got, explicit_ffn(kind, mod, act, x, keys[table], values[table], 0.7),
                                       rtol=1e-4, atol=1e-5)
            plain = mod.fc2(act(mod.fc1(x))) if kind == "bart" else mod(x)
            assert (got - plain).abs().max() > 1e-3


def test_visual_memory_pure_function():
    torch.manual_seed(0)
    x, k, v = torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want = torch.stack([sum(F.gelu(x[b] @ k[b, i])[:, None] * v[b, i] for i in range(3)) for b in range(2)])
    torch.testing.assert_close(memvp.visual_memory(x, k, v, F.gelu), want)


@pytest.mark.parametrize("arch", ["bart", "t5", "llama"])
def test_zero_memory_gives_the_frozen_lm(arch):
    ref = tiny(arch)
    m = vl(ref, "memvp", 8, lam=0.0, n_pos=6).eval()
    ids = torch.randint(4, 40, (2, 5))
    extra = {"labels": ids} if arch != "llama" else {}
    with torch.no_grad():
        m.prompts.pos_k.zero_()
        inputs, ctx = m.lm_inputs(torch.randn(2, 6, 8), ids, torch.ones_like(ids))
        with ctx:
            got = m.lm(**inputs, **extra).logits
        torch.testing.assert_close(
            got, ref(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits)
        m.prompts.pos_k.normal_()  # a non-zero memory changes the logits
        m.prompts.pos_v.normal_()
        inputs, ctx = m.lm_inputs(torch.randn(2, 6, 8), ids, torch.ones_like(ids))
        with ctx:
            assert (m.lm(**inputs, **extra).logits - got).abs().max() > 1e-4


@pytest.mark.parametrize("mode,arch",
                         [("memvp", "bart"), ("memvp", "llama"), ("input", "t5"), ("input", "llama")])
def test_gradients_reach_only_the_method(mode, arch):
    m = vl(tiny(arch), mode, 8, lam=0.5, n_pos=6, lora_rank=2)
    names = memvp.freeze(m)
    ids = torch.randint(4, 40, (2, 5))
    labels = ids.clone() if arch == "llama" else torch.randint(4, 40, (2, 3))
    m(torch.randn(2, 6, 8), ids, torch.ones_like(ids), labels).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == set(names) == {n for n, p in m.named_parameters() if p.requires_grad}
    # every trainable tensor gets a gradient signal (lora_A only once B moves away from 0)
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n in names and "lora_A" not in n)
    own = {n for n in names if n.startswith(("prompts.", "projector.")) or "lora_" in n}
    assert all("norm" in n for n in set(names) - own)
    assert any("norm" in n for n in names) == (arch != "llama")  # BART/T5 train their norms (Sec. 5.1)
    if mode == "input":  # LoRA on q and v of self- and (T5) cross-attention, nothing else
        lora = {n.rsplit(".", 1)[0] for n in names if "lora_" in n}
        wanted = {n for n, mod in m.lm.named_modules()
                  if n.rpartition(".")[2] in ("q", "v", "q_proj", "v_proj")}
        assert lora == {"lm." + n for n in wanted} and (arch == "llama" or any("EncDec" in n for n in lora))
    if mode == "memvp":
        assert not any("lora" in n for n in names)
    assert memvp.method_parameters(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_prompts_padding_tables_and_text_only_samples():
    torch.manual_seed(0)
    pr = memvp.MemVPPrompts(d_vis=6, d=8, n_pos=7, n_tables=3, lam=0.5)
    with torch.no_grad():
        pr.pos_v.normal_()
    z = torch.randn(2, 4, 6)
    z[1] = 0  # a sample without an image: positions only (Sec. 5.2)
    k, v = pr(z)
    assert k.shape == v.shape == (3, 2, 7, 8)
    vp = 0.5 * pr.projector(z[:1])
    torch.testing.assert_close(k[:, :1, :4], vp[None] + pr.pos_k[:, None, :4])
    torch.testing.assert_close(v[:, :1, :4], vp[None] + pr.pos_v[:, None, :4])
    assert torch.equal(k[:, :1, 4:], pr.pos_k[:, None, 4:])  # zero-padded entries: position embedding only
    assert torch.equal(k[:, 1], pr.pos_k) and torch.equal(v[:, 1], pr.pos_v)
    with pytest.raises(memvp.UsageError):
        pr(torch.randn(1, 8, 6))
    m = vl(tiny("llama"), "memvp", 6, n_pos=7)  # LLaMA: one table for all layers (Sec. 5.2)
    assert m.prompts.pos_k.shape[0] == 1
    assert [w.table for w in m.modules() if isinstance(w, memvp.MemVPFFN)] == [0, 0]
    m = vl(tiny("bart"), "memvp", 6, n_pos=7)  # BART: the encoder FFNs only (Sec. 5.1), one table each
    assert m.prompts.pos_k.shape[0] == 2
    assert [w.table for w in m.lm.model.encoder.modules() if isinstance(w, memvp.MemVPFFN)] == [0, 1]
    assert not any(isinstance(w, memvp.MemVPFFN) for w in m.lm.model.decoder.modules())


@pytest.mark.parametrize("mode", ["memvp", "input"])
def test_generation_reuses_keys_values_and_matches_full_recomputation(mode):
    torch.manual_seed(0)
    m = vl(tiny("llama"), mode, 8, lam=1.0, n_pos=6, lora_rank=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    calls = []
    (m.prompts if mode == "memvp" else m.projector).register_forward_hook(lambda *a: calls.append(1))
    z = torch.randn(2, 6, 8)
    ids = torch.tensor([[1, 0, 7, 8], [1, 9, 10, 11]])  # bos, then a left-padded prompt (row 0: a hole)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    out = m.generate(z, ids, mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(calls) == 1 and out.shape == (2, 5)  # keys/values once per image, reused at every step
    seq, msk = ids, mask
    with torch.no_grad():
        for t in range(5):  # reference: the whole sequence again at every step, no cache
            inputs, ctx = m.lm_inputs(z, seq, msk)
            with ctx:
                pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                nxt = m.lm(**inputs, position_ids=pos).logits[:, -1].argmax(-1)
            assert torch.equal(nxt, out[:, t])
            seq, msk = torch.cat([seq, nxt[:, None]], 1), torch.cat([msk, torch.ones_like(msk[:, :1])], 1)


def test_merged_lora_gives_the_same_lm():
    m = vl(tiny("bart"), "input", 8, lora_rank=3).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        want = m.lm(input_ids=ids, labels=ids).logits
        merged = memvp.merge_lora(m.lm)
        assert not any(isinstance(x, memvp.LoRALinear) for x in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids, labels=ids).logits, want, rtol=1e-4, atol=1e-5)


def counted(model, *args):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(*args)
    return fc.get_total_flops()


def test_flops_eq13_15_and_against_torch_counter():
    d, n, L = 64, 48, 16
    cfg = SimpleNamespace(hidden_size=d, num_attention_heads=4, intermediate_size=4 * d, vocab_size=100,
                          is_encoder_decoder=False, num_hidden_layers=3, is_gated_act=False)
    e, head = memvp.eq13_15(d, n, L), 2 * L * d * 100
    causal = lambda T: 4 * d * T * T - 2 * d * T * (T + 1)  # noqa: E731  Eq. 13's square minus the triangle
    assert memvp.analytic_flops(cfg, "input", n, n, L, L) == 3 * (e["input"] - causal(n + L)) + head
    want = 3 * (e["memvp"] - causal(L)) + head
    assert memvp.analytic_flops(cfg, "memvp", n, n, L, L, memory_layers=3) == want
    assert e["input"] - e["lm"] == 4 * n * d * (6 * d + n + 2 * L) and e["memvp"] - e["lm"] == 4 * n * d * L
    # LoRA FLOPs (decoder self- and cross-attention included) and memory FLOPs (n_pos padded entries) exactly
    # as torch counts them: differences between two models that differ only in that part
    B, n, L, t, d_v = 2, 6, 5, 3, 8
    z, ids, lab = torch.randn(B, n, d_v), torch.randint(4, 40, (B, L)), torch.randint(4, 40, (B, t))
    for arch in ("bart", "t5"):
        lm, cfg = tiny(arch), tiny(arch).config
        with_lora = counted(vl(lm, "input", d_v, lora_rank=3), z, ids, ids * 0 + 1, lab)
        plain = counted(vl(lm, "input", d_v), z, ids, ids * 0 + 1, lab)
        want = (memvp.analytic_flops(cfg, "input", n, n, L, t, 3)
                - memvp.analytic_flops(cfg, "input", n, n, L, t))
        assert with_lora - plain == B * want
    lm, cfg = tiny("llama"), tiny("llama").config
    m = vl(lm, "memvp", d_v, n_pos=9)
    mem = counted(m, z, ids, ids * 0 + 1, ids) - counted(m.prompts, z) - counted(lm, ids)
    assert mem == B * (memvp.analytic_flops(cfg, "memvp", n, 9, L, L, memory_layers=2)
                       - memvp.analytic_flops(cfg, "memvp", n, 0, L, L, memory_layers=2))


@pytest.mark.parametrize("arch,t5_ffn", [("llama", "relu"), ("bart", "relu"), ("t5", "gated-gelu")])
def test_memory_in_half_the_layers(arch, t5_ffn):
    """The memory in the last 2 of 4 FFNs: the trainable count from the added modules' shapes, and the
    analytic FLOPs (Eq. 15 for the 2 memory layers only) within 5 % of torch's count (not with all 4)."""
    lm = tiny(arch, t5_ffn, layers=4)
    m = vl(lm, "memvp", 8, n_pos=64, memory_layers="2,3")
    memvp.freeze(m)
    ffns = memvp.find_ffns(tiny(arch, t5_ffn, layers=4))
    assert m.memory_layers == [ffns[2][1], ffns[3][1]]
    assert m.prompts.pos_k.shape[0] == (1 if arch == "llama" else 2)
    data.count_trainable(m, memvp.method_parameters(m))
    B, n, L, t = 2, 6, 8, 3
    z, ids, lab = torch.randn(B, n, 8), torch.randint(4, 40, (B, L)), torch.randint(4, 40, (B, t))
    labels = ids if arch == "llama" else lab
    flops = (counted(m, z, ids, torch.ones_like(ids), labels) - counted(m.prompts, z)) / B
    tgt = L if arch == "llama" else t
    half = memvp.analytic_flops(m.lm.config, "memvp", n, 64, L, tgt, memory_layers=len(m.memory_layers))
    every = memvp.analytic_flops(m.lm.config, "memvp", n, 64, L, tgt, memory_layers=4)
    assert abs(half / flops - 1) < 0.05 < abs(every / flops - 1)
    with pytest.raises(memvp.UsageError, match="has FFNs 0-3"):
        vl(tiny(arch, t5_ffn, layers=4), "memvp", 8, memory_layers="4")


def test_scienceqa_prompt_official_format():
    rec = {"question": "Which is a mammal?", "context": "", "choices": ["frog", "cat"], "answer": "B",
           "answer_index": 1, "meta": {"caption": "", "subject": "natural science", "grade": "grade3",
                                       "has_context": False, "has_image": False}}
    src, tgt = memvp.texts(rec, "mcq", train=True)
    assert src == "Question: Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) cat\nResponse:"
    assert tgt == "The answer is B." and memvp.texts(rec, "mcq", False) == (src + "The answer is", "")
    other = dict(rec, answer="A", answer_index=0)
    scores = memvp.score("mcq", ["B", "a", ""], [rec, other, rec])  # official: case-sensitive, "a" is wrong
    assert scores["average"] == pytest.approx(33.33)


# ------------------------------------------------------------------------------------- runs
def test_main_smoke_default_path(tmp_path, capfd):
    """The offline default (tiny LLaMA, tiny-cnn grid tokens, both sides: one process each), small."""
    res = memvp.main(small(tmp_path))
    out = capfd.readouterr().out
    assert out.count("trainable: ") == 2 and "MemVP: f, p_k, p_v " in out and "input: f, LoRA q,v r=6 " in out
    assert "answer prior" in out and "training time, input space / MemVP: " in out
    assert "[memvp] trainable: " in out and "[input] trainable: " in out
    assert all(len(line) <= 100 for line in out.splitlines() if "trainable: " not in line)
    for mode in ("memvp", "input"):
        r = res["modes"][mode]
        assert r["steps"] == 2 and 0 <= r["metrics"]["overall"] <= 100
        assert [x["step"] for x in map(json.loads, open(tmp_path / mode / "metrics.jsonl"))] == [1, 2]
    assert res["args"]["lr"] == pytest.approx(9e-3 * 8 / 256) and res["args"]["vision"] == "tiny-cnn"
    assert set(json.load(open(tmp_path / "results.json"))["modes"]) == {"memvp", "input"}
    with pytest.MonkeyPatch.context() as mp:  # one core: the sides one after the other, the same numbers
        mp.setattr(os, "cpu_count", lambda: 1)
        one = memvp.main(small(tmp_path / "one_core"))
    for mode in ("memvp", "input"):
        assert one["modes"][mode]["train_loss"] == res["modes"][mode]["train_loss"]
        assert one["modes"][mode]["metrics"] == res["modes"][mode]["metrics"]
        a, b = (memvp.load_checkpoint(p / mode / "checkpoint.pt")["trainable"]
                for p in (tmp_path, tmp_path / "one_core"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_main_encoder_decoder(arch, tmp_path):
    res = memvp.main(small(tmp_path, "--model", f"stand_ins/tiny-{arch}", "--dataset", "shapes_caption",
                           "--max_new_tokens", "4"))
    assert res["args"]["lora_rank"] == 40 and res["args"]["lr"] == 1e-3
    assert all(0 <= r["metrics"]["CIDEr"] for r in res["modes"].values())
    if arch == "bart":  # --eval_only without --dataset: the checkpoint's task, with its greedy length
        again = memvp.main(small(tmp_path, "--model", "stand_ins/tiny-bart", "--eval_only"))
        assert again["task"] == "caption" and again["args"]["max_new_tokens"] == 30


def test_cli_subprocess(tmp_path):
    """A value of the wrong type, an unknown flag, a bad value: one 'error:' line and exit code 2."""
    for argv, want in ((["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
                       (["--arch", "t5"], "error: unrecognized arguments: --arch t5"),
                       (["--prompting", "x"], "error: --prompting x: must be one of both, memvp, input")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "memvp.py"), *argv],
                           capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [want]


def test_ddp_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "memvp.py"), *small(tmp_path, "--prompting", "memvp", "--device", "cpu",
                                                   "--vision", CACHE["clip"], "--image_size", "32")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "results.json"))["modes"]["memvp"]["steps"] == 2
    assert r.stdout.count("trainable: ") == 1  # only rank 0 prints


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Stopped by --max_steps or by a Ctrl-C that arrives inside an optimizer step, then resumed."""
    # 5 steps an epoch
    base = ["--prompting", "memvp", "--epochs", "2", "--mem_dropout", "0.1", "--train_limit", "40"]
    full = small(tmp_path / "a", *base) + ["--max_steps", "7"]
    memvp.main(full)
    memvp.main(small(tmp_path / "b", *base, "--max_steps", "3"))
    memvp.main(small(tmp_path / "b", *base, "--max_steps", "7", "--resume"))
    adamw_step, calls = torch.optim.AdamW.step, []

    def ctrl_c_in_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return adamw_step(self, *args, **kwargs)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C behaviour
    monkeypatch.setattr(torch.optim.AdamW, "step", ctrl_c_in_step_4)
    try:
        with pytest.raises(SystemExit) as e:
            memvp.main(small(tmp_path / "c", *base, "--max_steps", "7"))
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, old)
    assert e.value.code == 130  # the step that was running finished and was saved: resume from step 4
    assert memvp.load_checkpoint(tmp_path / "c" / "memvp" / "checkpoint.pt")["step"] == 4
    memvp.main(small(tmp_path / "c", *base, "--max_steps", "7", "--resume"))
    a, b, c = (torch.load(tmp_path / x / "memvp" / "checkpoint.pt", weights_only=False) for x in "abc")
    for other in (b, c):
        assert a["step"] == other["step"] == 7 and a["scheduler"] == other["scheduler"]
        assert a["recent_losses"] == other["recent_losses"]
        assert all(torch.equal(a["trainable"][k], other["trainable"][k]) for k in a["trainable"])


def test_seeds_table_and_eval_only(tmp_path, capsys):
    res = memvp.main(small(tmp_path, "--prompting", "memvp", "--seeds", "0,1"))
    out = capsys.readouterr().out
    assert "seeds 0,1" in out and " ± " in out.splitlines()[-1]
    # the checkpoint's settings win: another --lr is named as ignored, the trained run is evaluated
    again = memvp.main(small(tmp_path / "seed1", "--prompting", "memvp", "--seed", "1", "--eval_only",
                             "--lr", "0.5"))
    assert "the checkpoint's settings are used, ignored: --lr 0.5" in capsys.readouterr().out
    assert again["modes"]["memvp"]["metrics"] == res["runs"][1]["modes"]["memvp"]["metrics"]
    assert again["args"]["lr"] == res["runs"][1]["args"]["lr"]


def test_scienceqa_fixture(tmp_path, capsys):
    """The official ScienceQA layout (formats.write_scienceqa) on the ScienceQA stand-in re-made with 2 steps
    (its letters A-E stay upper-case): text-only questions get no visual prompt (zero features, Sec. 5.2),
    the table has Table 2's columns; a prompt longer than --max_text_len is cut and counted."""
    write_scienceqa(tmp_path)
    make_stand_ins.make_tiny_llama_scienceqa(tmp_path / "lm", 2)
    tok = memvp.load_lm(str(tmp_path / "lm"))[1]
    ids = tok("Options: (A) red (B) blue The answer is B.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "options : ( A ) red ( B ) blue the answer is B ."
    res = memvp.main(small(tmp_path / "run", "--dataset", "scienceqa", "--data_root", str(tmp_path),
                           "--batch_size", "2", "--model", str(tmp_path / "lm"), "--vision", "tiny-cnn",
                           "--max_text_len", "12"))
    out = capsys.readouterr().out
    assert "scienceqa train: " in out and "texts cut to their first 12 tokens" in out
    for col in ("average", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"):
        assert col in out
    assert res["args"]["max_new_tokens"] == 1
    assert set(res["modes"]["memvp"]["metrics"]) == {"average", "NAT", "SOC", "LAN", "TXT", "IMG", "NO",
                                                     "G1-6", "G7-12"}


def test_official_vqav2_with_local_llama_and_clip(tmp_path, capsys):
    """Official VQAv2 files (one unreadable image) + a local HF LLaMA checkpoint and tokenizer + a local CLIP
    tower: the paper's LLaMA values, CLIP's penultimate layer through its ln_post, VQA accuracy."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    root = tmp_path / "vqav2"
    for cs, iids in (("train2014", [1, 2, 3, 4]), ("val2014", [5, 6])):
        qs, anns = [], []
        (root / cs).mkdir(parents=True)
        for iid in iids:
            Image.new("RGB", (40, 30), (40 * iid, 200, 30)).save(root / cs / f"COCO_{cs}_{iid:012d}.jpg")
            qs.append({"question_id": iid * 10, "image_id": iid, "question": "what color is it?"})
            anns.append({"question_id": iid * 10, "image_id": iid, "answer_type": "other",
                         "question_type": "what", "multiple_choice_answer": "red",
                         "answers": [{"answer": "red", "answer_id": k + 1} for k in range(10)]})
        (root / f"v2_OpenEnded_mscoco_{cs}_questions.json").write_text(json.dumps({"questions": qs}))
        (root / f"v2_mscoco_{cs}_annotations.json").write_text(json.dumps({"annotations": anns}))
    (root / "train2014" / "COCO_train2014_000000000004.jpg").write_bytes(b"not a jpeg")
    tok = make_stand_ins.build_tokenizer(["what color is it ? red"])
    make_stand_ins.tiny_lm("llama", len(tok), 32, 1, 64, 2, 1).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
                    ).save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "clip")
    argv = small(tmp_path / "run", "--dataset", "vqav2", "--data_root", str(tmp_path), "--vision",
                 str(tmp_path / "clip"), "--image_size", "32", "--eval_split", "val", "--prompting", "memvp",
                 "--model", str(tmp_path / "lm"), "--batch_size", "2")
    assert "COCO_train2014_000000000004.jpg" in run_bad(argv, capsys)  # 1 of 4 unreadable > 1 %: exit 2
    Image.new("RGB", (40, 30)).save(root / "train2014" / "COCO_train2014_000000000004.jpg")
    r = memvp.main(argv)
    a = r["args"]
    assert (a["lr"], a["lam"], a["scale"], a["n_pos"], a["mem_dropout"]) == (
        9e-3 * 2 / 256, 0.01, 0.1, 320, 0.1)
    ck = torch.load(tmp_path / "run" / "memvp" / "checkpoint.pt", weights_only=False)
    assert ck["trainable"]["prompts.pos_k"].shape == (1, 320, 32)
    assert 0 <= r["modes"]["memvp"]["metrics"]["overall"]


# ------------------------------------------------------------------------------------- bad inputs
def run_bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        memvp.main(argv)
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ")
    assert sum(x.startswith("error:") for x in err) == 1
    return err[-1]


def test_bad_inputs(tmp_path, capsys):
    assert "--lr: invalid float value: 'abc'" in run_bad(["--lr", "abc"], capsys)
    assert "unrecognized arguments: --arch t5" in run_bad(["--arch", "t5"], capsys)
    assert "--prompting cross: must be one of both, memvp, input" in run_bad(["--prompting", "cross"], capsys)
    assert "--memory_layers 1-2: must be comma-separated FFN indices" in run_bad(["--memory_layers", "1-2"],
                                                                               capsys)
    assert "--seeds" in run_bad(["--seeds", "0;1"], capsys)
    assert "distinct" in run_bad(["--seeds", "0,0"], capsys)
    assert "--mem_dropout 2.0: must be in [0, 1)" in run_bad(["--mem_dropout", "2"], capsys)
    assert "--lr -0.1: must be > 0" in run_bad(["--lr", "-0.1"], capsys)
    assert "--proj_hidden 0: must be >= 1" in run_bad(["--proj_hidden", "0"], capsys)
    assert "--warmup_ratio nan: must be in [0, 1]" in run_bad(["--warmup_ratio", "nan"], capsys)
    assert "with --benchmark" in run_bad(["--benchmark", "--seeds", "0,1"], capsys)
    assert "--epochs 0: must be >= 1" in run_bad(["--epochs", "0"], capsys)
    assert "--batch_size 0: must be >= 1" in run_bad(["--batch_size", "0"], capsys)
    import transformers
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
                                 ).save_pretrained(tmp_path / "gpt2")
    make_stand_ins.build_tokenizer(["a"]).save_pretrained(tmp_path / "gpt2")
    bad_model = small(tmp_path / "o1", "--model", str(tmp_path / "gpt2"))
    assert "cannot patch GPT2LMHeadModel" in run_bad(bad_model, capsys)
    bad_data = small(tmp_path / "o2", "--dataset", "vqav2", "--data_root", str(tmp_path / "no"))
    assert "vqav2" in run_bad(bad_data, capsys)
    assert "No such file or directory" in run_bad(small(tmp_path / "o3", "--eval_only"), capsys)
    assert "no stand-in at" in run_bad(small(tmp_path / "o5", "--model", "stand_ins/tiny-gpt9"), capsys)
    assert "has FFNs 0-1" in run_bad(small(tmp_path / "o6", "--memory_layers", "2"), capsys)
    memvp.main(small(tmp_path / "o4", "--prompting", "memvp", "--max_steps", "1"))
    assert "--overwrite" in run_bad(small(tmp_path / "o4", "--prompting", "memvp"), capsys)


def test_resume_takes_the_checkpoints_settings_and_a_nan_loss_keeps_it(tmp_path, monkeypatch, capsys):
    run = small(tmp_path, "--prompting", "memvp", "--epochs", "2", "--train_limit", "40")  # 5 steps an epoch
    memvp.main(run + ["--max_steps", "1"])
    ckpt = tmp_path / "memvp" / "checkpoint.pt"
    res = memvp.main(run + ["--max_steps", "2", "--resume", "--proj_hidden", "64"])  # another projector width
    assert "the checkpoint's settings are used, ignored: --proj_hidden 64" in capsys.readouterr().out
    assert res["args"]["proj_hidden"] == 128 and res["modes"]["memvp"]["steps"] == 2
    good = memvp.load_checkpoint(ckpt)
    forward = memvp.VLModel.forward
    monkeypatch.setattr(memvp.VLModel, "forward", lambda self, *a: forward(self, *a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        memvp.main(run + ["--max_steps", "5", "--resume"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 1 and err == [f"error: non-finite loss at step 3; last good checkpoint: {ckpt}"]
    kept = memvp.load_checkpoint(ckpt)
    assert kept["step"] == 2
    assert all(torch.equal(good["trainable"][k], v) for k, v in kept["trainable"].items())
