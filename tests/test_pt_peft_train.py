"""Tests of pt_peft_train.py (PT-PEFT): the rank analysis against known spectra, where LoRA goes (vs peft),
the merged export, adapters, the stage orders, and tiny end-to-end runs (gradients per stage, resume across a
stage boundary, --eval_only, CLI, DDP, bad inputs)."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import write_coco_karpathy  # noqa: E402
import pt_peft_train as P  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- Sec. 2.3: effective rank (Eq. 1-5, Table 1)
def _with_spectrum(sv, rows, cols, seed=0):
    """A (rows, cols) matrix whose singular values are `sv` (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(sv), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(sv), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ V.T


def test_effective_rank_of_known_spectra():
    for n in (10, 16, 20):                                   # flat spectrum: y = x, reaches 0.9 at 0.9
        assert P.effective_rank(*P.sv_curve([torch.eye(n)])) == pytest.approx(0.9)
    x, y = P.sv_curve([torch.diag(torch.tensor([6.0, 3.0, 1.0]))])      # Eq. 3: .6 .3 .1
    assert x.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1]) and y.tolist() == pytest.approx([0, .6, .9, 1])
    assert P.effective_rank(x, y) == pytest.approx(2 / 3)
    assert P.effective_rank(x, y, 0.5) == pytest.approx(0.5 / 0.6 / 3)   # on the first segment
    x, y = P.sv_curve([torch.diag(torch.tensor([5.0, 3.0, 2.0]))])      # .5 .8 1: 0.9 half-way to 1
    assert P.effective_rank(x, y) == pytest.approx(2 / 3 + 0.5 / 3)
    for k in (1, 3, 5):                                      # k equal singular values in a (20, 16) matrix
        x, y = P.sv_curve([_with_spectrum([1.0] * k, 20, 16)])
        assert P.effective_rank(x, y) == pytest.approx(0.9 * k / 16)


def test_effective_rank_averages_samples_of_different_lengths_on_k_over_M():
    a = torch.eye(4)                                         # M = 4, flat: y_a(x) = x
    b = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0]])         # M = 2, spectrum [1, 0]: y_b(x) = min(2x, 1)
    x, y = P.sv_curve([a, b])
    assert x.tolist() == pytest.approx([0, .25, .5, .75, 1])
    assert y.tolist() == pytest.approx([(t + min(2 * t, 1)) / 2 for t in x])   # Eq. 4 on the k/M axis
    assert P.effective_rank(x, y) == pytest.approx(0.8)      # (x + 1) / 2 = 0.9
    # random matrices of different lengths vs an independent per-sample computation on a fine grid
    mats = [torch.randn(L, 12, generator=torch.Generator().manual_seed(L)) for L in (3, 7, 12, 20)]
    grid = np.linspace(0, 1, 2001)
    want = np.zeros_like(grid)
    for m in mats:
        s = np.linalg.svd(m.double().numpy(), compute_uv=False)
        want += np.interp(grid, np.arange(len(s) + 1) / len(s), np.r_[0, np.cumsum(s / s.sum())]) / len(mats)
    x, y = P.sv_curve(mats)
    assert np.allclose(np.interp(grid, x, y), want, atol=1e-12)
    assert P.effective_rank(x, y) == pytest.approx(np.interp(0.9, want, grid), abs=1e-3)


def test_rank_matrices_take_sos_caption_eos_rows_and_visual_rows():
    B, Q, T, d = 2, 3, 6, 5
    feats = {"image": torch.randn(B, Q, d), "text": torch.randn(B, T, d),
             "text_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])}      # left padding
    labels = torch.tensor([[-100, -100, -100, 7, 8, 2], [-100, -100, -100, -100, -100, 2]])
    text, image = P.rank_matrices(feats, {"labels": labels})
    assert torch.equal(text[0], feats["text"][0, [1, 3, 4, 5]])    # [bos], caption words, [eos]; prompt out
    assert torch.equal(text[1], feats["text"][1, [3, 5]])
    assert len(image) == B and torch.equal(image[1], feats["image"][1])
    r = P.rank_report(text, image)
    assert r["pooled"] == pytest.approx(100 * P.effective_rank(*P.sv_curve([torch.cat(text)])), abs=0.01)
    assert len(r["curve_text"]) == len(P.GRID) and r["curve_text"][-1] == pytest.approx(1.0)


# ---------------------------------------------------------------- LoRA / adapters on a tiny BLIP-2
def _blip2(seed=0):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)
    torch.manual_seed(seed)
    vc = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8)
    qc = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=50)
    tc = OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, word_embed_proj_dim=32)
    cfg = Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                      num_query_tokens=4)
    return Blip2ForConditionalGeneration(cfg).eval()


def _forward(m, seed=1):
    """Q-Former output on ViT features, and LM logits: every place LoRA can go."""
    g = torch.Generator().manual_seed(seed)
    img = m.vision_model(pixel_values=torch.randn(2, 3, 16, 16, generator=g)).last_hidden_state
    q = m.qformer(query_embeds=m.query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
    return q, m.language_model(input_ids=torch.randint(3, 50, (2, 7), generator=g)).logits


def test_lora_targets_qformer_self_attention_only_as_peft():
    m = _blip2()
    names = P.add_lora(m, "qformer", 4, 8, 0.0)
    assert len(names) == 6 and all(".attention.attention." in n and "crossattention" not in n for n in names)
    assert len(P.add_lora(m, "language_model", 4, 8, 0.0)) == 6      # OPT q/k/v_proj x 2 layers
    assert len(P.add_lora(m, "vision", 4, 8, 0.0)) == 2              # the ViT's fused qkv x 2 layers
    peft = pytest.importorskip("peft")
    ref, ours = _blip2(), _blip2()
    P.add_lora(ours, "qformer", 4, 8, 0.0)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=P.LORA_TARGETS["qformer"]), ref)
    theirs = {n: mod for n, mod in ref.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A)}
    assert sorted(theirs) == sorted(names)
    with torch.no_grad():
        for n, mod in theirs.items():
            mine = ours.get_submodule(n)
            mine.lora_B.normal_()
            mod.lora_A["default"].weight.copy_(mine.lora_A)
            mod.lora_B["default"].weight.copy_(mine.lora_B)
    for a, b in zip(_forward(ours), _forward(ref)):
        assert torch.allclose(a, b, atol=1e-5)


def test_lora_starts_at_base_and_merged_export_equals_unmerged(tmp_path):
    from transformers import Blip2ForConditionalGeneration
    m = _blip2()
    base = _forward(m)
    for target in ("qformer", "language_model", "vision"):
        P.add_lora(m, target, 4, 8, 0.05)
    m.eval()
    assert all(torch.equal(a, b) for a, b in zip(_forward(m), base))        # B = 0
    lora = [mod for mod in m.modules() if isinstance(mod, P.LoRALinear)]
    with torch.no_grad():
        for mod in lora:
            mod.lora_B.normal_()
    h, l0 = torch.randn(3, 32), lora[0]                                     # y = W x + b + (alpha/r) B A x
    assert torch.allclose(l0(h), h @ l0.base.weight.T + l0.base.bias + 2.0 * h @ l0.lora_A.T @ l0.lora_B.T,
                          atol=1e-5)
    unmerged = _forward(m)
    assert not torch.allclose(unmerged[1], base[1], atol=1e-3)
    merged = P.merged_lmm(m)
    assert not any(isinstance(mod, P.LoRALinear) for mod in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    for out in (_forward(merged), _forward(reloaded)):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, unmerged))


@pytest.mark.parametrize("parallel", [False, True])
def test_adapters_start_at_identity_and_follow_formula(parallel):
    m = _blip2()
    base = _forward(m)
    adapters = P.add_adapters(m, "language_model", 8, parallel)
    assert len(adapters) == 2 and all(torch.equal(a, b) for a, b in zip(_forward(m), base))   # up = 0
    assert len(P.add_adapters(_blip2(), "qformer", 8, parallel)) == 2
    layer = m.language_model.model.decoder.layers[0]
    nn.init.normal_(layer.adapter.up.weight)
    h = torch.randn(2, 5, 32)
    y = layer.fc2(torch.relu(layer.fc1(h)))                                 # hooks fire
    plain = nn.functional.linear(torch.relu(layer.fc1(h)), layer.fc2.weight, layer.fc2.bias)
    ad = layer.adapter
    assert torch.allclose(y, plain + ad.up(torch.relu(ad.down(h if parallel else plain))), atol=1e-5)


def test_stage_orders_budget_and_lrs():
    a = P.Args(pt_epochs=3, ft_epochs=2, pt_lr=0.1, lr=0.01)
    plans = {o: P.stage_plan(P.dataclasses.replace(a, order=o)) for o in P.ORDERS}
    assert all(sum(s.epochs for s in p) == 5 for p in plans.values())    # every order: the same budget
    s1, s2 = plans["pt_first"]
    assert s1.train == ("prefix",) and s1.lrs == {"prefix": 0.1}
    assert s2.train == ("prefix", "peft") and s2.lrs == {"prefix": 0.01, "peft": 0.01}
    assert [s.train for s in plans["peft_first"]] == [("peft",), ("prefix",)]
    assert [s.use_prefix for s in plans["peft_first"]] == [False, True]
    assert plans["parallel"][0].lrs == {"prefix": 0.1, "peft": 0.01}
    assert not plans["none"][0].use_prefix and plans["prefix_only"][0].train == ("prefix",)


# ---------------------------------------------------------------- tiny end-to-end runs
TINY = ["--train_limit", "8", "--eval_limit", "4", "--batch_size", "4", "--epochs", "1", "--num_prefix", "4",
        "--lora_r", "4", "--adapter_dim", "4", "--device", "cpu"]


def _ckpt(d):
    return torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=False)


@pytest.mark.parametrize("order,peft,target", [("pt_first", "lora", "qformer"),
                                               ("peft_first", "full", "language_model")])
def test_gradients_only_on_each_stage_parameters(tmp_path, monkeypatch, order, peft, target):
    seen, built = [], []
    real = P.pt.build

    def build(setup, with_prefix=True):
        m = real(setup, with_prefix)
        fwd = m.forward

        def forward(batch):
            if m.training:
                seen.append({n for n, p in m.named_parameters() if p.requires_grad})
            return fwd(batch)
        m.forward = forward
        built.append((setup, m))
        return m

    monkeypatch.setattr(P.pt, "build", build)
    P.main(TINY + ["--order", order, "--peft", peft, "--peft_target", target, "--out_dir", str(tmp_path)])
    setup, model = built[0]
    params = dict(model.named_parameters())
    prefix = {n for n in params if n.startswith("prefix_encoders.")}
    stage2 = {n for n in params if n.startswith("lmm.") and P.is_peft_param(n[4:], P.Args(peft=peft,
                                                                                         peft_target=target))}
    want = {"pt_first": [prefix, prefix | stage2], "peft_first": [stage2, prefix]}[order]
    assert prefix and stage2 and seen == [want[0]] * 2 + [want[1]] * 2     # 2 steps per stage
    if peft == "lora":
        assert len(stage2) == 12 and all(".attention.attention." in n for n in stage2)
    frozen = {n: p for n, p in setup.base.named_parameters()}
    for n, p in params.items():          # the pre-trained weights outside the method never change
        if n.startswith("lmm.") and n not in stage2:
            assert torch.equal(p.detach().cpu(), frozen[n[4:].replace(".base.", ".")]), n
    if peft == "full":
        assert not any("embed_tokens" in n or "lm_head" in n for n in stage2)   # App. B.5


def test_resume_across_stage_boundary_equals_uninterrupted_and_eval_only(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r_full = P.main(TINY + ["--out_dir", full, "--export_merged"])
    r1 = P.main(TINY + ["--out_dir", part, "--max_steps", "3"])
    assert not list(r1.values())[1][0]["finished"] and (_ckpt(part)["stage"], _ckpt(part)["step"]) == (1, 1)
    P.main(TINY + ["--out_dir", part, "--resume"])
    a, b = _ckpt(full)["trainable"], _ckpt(part)["trainable"]
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = P.main(TINY + ["--out_dir", full, "--eval_only"])
    for name, runs in r_full.items():    # the same numbers from the checkpoint (curves: float noise only)
        got, want = again[name][0], runs[0]
        assert got["downstream"]["score"] == want["downstream"]["score"]
        assert [got["rank"][k] for k in ("text", "image", "pooled")] == [want["rank"][k] for k in
                                                                         ("text", "image", "pooled")]
        assert np.allclose(got["rank"]["curve_text"], want["rank"]["curve_text"], atol=1e-4)
    assert os.path.exists(os.path.join(full, "fig4_curves.csv"))
    assert os.path.exists(os.path.join(full, "merged", "model.safetensors"))


@pytest.mark.parametrize("bad,msg", [(["--order", "sideways"], "--order sideways: must be pt_first"),
                                     (["--peft_target", "decoder"], "--peft_target decoder: must be"),
                                     (["--dataset", "nope"], "--dataset nope: must be"),
                                     (["--epochs", "0"], "no epochs to train"), (["--seeds", "0,x"], "--seeds"),
                                     (["--pt_epochs", "-1"], "--pt_epochs -1: must be >= 0"),
                                     (["--save_every", "0"], "--save_every 0: must be >= 1"),
                                     (["--rank_images", "0"], "--rank_images 0: must be >= 1"),
                                     (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                                     (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
                                     (["--peft", "s_adapter", "--export_merged"], "no merged form"),
                                     (["--num_prefix", "0"], "--num_prefix 0: must be >= 1"),
                                     (["--lr", "-1"], "--lr -1.0: must be > 0"),   # param groups: no check
                                     (["--seeds", "1,0,1"], "distinct"), (["--lora_dropout", "1"], "[0, 1)"),
                                     (["--eval_only"], "No such file or directory"), (["--train_limit", "0"], "--train_limit 0: must be >= 1"),
                                     (["--model", "/nonexistent/blip2"], "/nonexistent/blip2")])
def test_bad_inputs_exit_2_with_one_error_line(tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit) as e:
        P.main(TINY + ["--out_dir", str(tmp_path / "x")] + bad)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and msg in err[0]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def test_cli_subprocess_prints_the_table(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pt_peft_train.py")] + TINY +
                       ["--max_steps", "2", "--out_dir", str(tmp_path)], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("PT-PEFT on shapes_caption") and "rank text" in lines[1]
    assert lines[2].startswith("zero-shot") and lines[3].startswith("Prefix -> LoRA-QF")
    assert max(len(ln) for ln in lines[:4]) <= 100 and "trainable: " in r.stderr


def test_ddp_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "pt_peft_train.py")] + TINY + ["--out_dir", str(tmp_path)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))["rows"]["Prefix -> LoRA-QF"][0]
    assert res["finished"] and res["global_step"] == 2       # 8 records / (4 x 2 processes): 1 step per stage
    assert math.isfinite(res["rank"]["text"])


def test_checkpoint_settings_win_and_a_nan_loss_keeps_it(tmp_path, monkeypatch, capsys):
    run = TINY + ["--out_dir", str(tmp_path)]             # 2 steps per stage
    P.main(run + ["--max_steps", "3"])
    good = _ckpt(tmp_path)
    assert good["args"]["lora_r"] == 4 and good["args"]["order"] == "pt_first"
    forward = P.pt.PrefixBlip2.forward
    monkeypatch.setattr(P.pt.PrefixBlip2, "forward", lambda self, *a: forward(self, *a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        P.main(run + ["--resume"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    ckpt = os.path.join(str(tmp_path), "ckpt.pt")
    assert e.value.code == 1 and err == [f"error: non-finite loss at step 4; last good checkpoint: {ckpt}"]
    kept = _ckpt(tmp_path)
    assert (kept["stage"], kept["step"], kept["global_step"]) == (1, 1, 3)
    assert all(torch.equal(good["trainable"][k], v) for k, v in kept["trainable"].items())
    monkeypatch.undo()
    # another LoRA rank on the command line: the checkpoint's rank is resumed, and the flag named as ignored
    rows = P.main(run + ["--resume", "--lora_r", "2"])
    assert "the checkpoint's settings are used, ignored: --lora_r 2" in capsys.readouterr().out
    assert rows["Prefix -> LoRA-QF"][0]["finished"] and _ckpt(tmp_path)["args"]["lora_r"] == 4


def test_rank_analysis_on_a_fixed_sample_of_images(capsys):
    recs = [{"id": i, "image_id": f"im{i // 2}"} for i in range(20)]           # 10 images, 2 records each
    assert P.rank_sample(recs, 10) == recs and P.rank_sample(recs, 1000) == recs  # <= n: all, in order
    a, b = P.rank_sample(recs, 3), P.rank_sample(list(recs), 3)
    assert a == b and len(a) == 6 and len({r["image_id"] for r in a}) == 3        # fixed; whole images
    assert [r["id"] for r in a] == sorted(r["id"] for r in a)


def test_unreadable_images_dropped_in_training_zero_in_evaluation(tmp_path, capsys):
    coco = write_coco_karpathy(tmp_path, splits=("train",) * 4 + ("test",) * 3)
    for i in (1, 4):                                     # a training image and an evaluation image
        (coco / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"not a jpeg")
    rows = P.main(["--model", os.path.join(ROOT, "stand_ins", "tiny-blip2"), "--dataset", "coco",
                   "--data_root", str(tmp_path), "--batch_size", "8", "--epochs", "1", "--num_beams", "1",
                   "--num_prefix", "4", "--lora_r", "4", "--rank_images", "2", "--device", "cpu",
                   "--out_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert err.count("its training record is dropped") == 4            # 2 pairs of the image, in 2 stages
    assert "warning: 1 of 3 evaluation records have an unreadable image" in err
    r = rows["Prefix -> LoRA-QF"][0]
    assert r["finished"] and r["global_step"] == 2 and r["downstream"]["unreadable"] == 1
    assert r["rank"]["images"] == 2 and "rank = Table 1 rank % on 2 images" in out
