"""scripts/memvp_figures.py: Fig. 6's blocking against the FFN with those entries removed from the
concatenated weights of Eq. 8 / 11-12, Fig. 5's similarity against lam f(z_i) read back from the keys, and a
small run of the script (both tiny LMs, 2 training steps) under tmp_path."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_stand_ins  # noqa: E402
import memvp  # noqa: E402
import memvp_figures  # noqa: E402

WEIGHTS = {"BartEncoderLayer": ("fc1", None, "fc2"), "T5DenseGatedActDense": ("wi_0", "wi_1", "wo"),
           "LlamaMLP": ("gate_proj", "up_proj", "down_proj")}


def tiny(arch, t5_ffn="relu"):
    torch.manual_seed(0)
    return make_stand_ins.tiny_lm(arch, 40, 32, 2, 64, 4, 2, t5_ffn).eval()


def vl(lm, mode, d_vis, **settings):
    """memvp.VLModel with the BART/T5 family's values of Args, but `settings`."""
    family = {"lam": 0.01, "scale": 1.0, "n_pos": 240, "mem_dropout": 0.0, "lora_rank": 0}
    return memvp.VLModel(lm, mode, d_vis, memvp.Args(**{**family, **settings}))


def ffn_without(mod, act, x, K, V, s, removed):
    """Eq. 8 (Eq. 11-12 for a gated FFN): the FFN with the visual entries appended to W1, W2 (and x/|x|^2 to
    W3), except the entries `removed` (B, k); one sample and one token at a time."""
    w1, w3, w2 = (getattr(mod, n) if n else None for n in WEIGHTS[type(mod).__name__])
    zero = lambda lin: torch.zeros(lin.out_features) if lin.bias is None else lin.bias  # noqa: E731
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        kept = [i for i in range(K.shape[1]) if i not in removed[b].tolist()]
        W1 = torch.cat([w1.weight, K[b, kept]], 0)  # k_1..k_D, then the kept lam f(z_i) + p^k_i
        W2 = torch.cat([w2.weight, s * V[b, kept].T], 1)  # v_1..v_D, then the kept lam f(z_i) + p^v_i
        for t in range(x.shape[1]):
            xt = x[b, t]
            h = act(W1 @ xt + torch.cat([zero(w1), torch.zeros(len(kept))]))
            if w3 is not None:
                h = h * (torch.cat([w3.weight, (xt / xt.dot(xt)).expand(len(kept), -1)], 0) @ xt)
            out[b, t] = W2 @ h + zero(w2)
    return out


@pytest.mark.parametrize("arch,t5_ffn", [("bart", "relu"), ("llama", "relu"), ("t5", "gated-gelu")])
def test_blocking_removes_the_entries_from_the_concatenated_weights(arch, t5_ffn):
    ref, original = tiny(arch, t5_ffn), memvp.visual_memory
    m = vl(ref, "memvp", 8, n_pos=5, scale=0.7).eval()
    torch.manual_seed(1)
    keys, values, x = torch.randn(2, 2, 5, 32) * 0.3, torch.randn(2, 2, 5, 32), torch.randn(2, 3, 32)
    blocked = torch.tensor([[0, 3], [4, 1]])  # per sample
    with torch.no_grad(), m.bank.use(keys, values):
        for t, (kind, name, mod, act) in enumerate(memvp.find_ffns(ref)):
            patched = m.lm.get_submodule(name)
            bart = lambda h: patched.fc2(patched.activation_fn(patched.fc1(h)))  # noqa: E731  inline FFN
            ffn = bart if kind == "bart" else patched
            with memvp_figures.probe(blocked) as calls:
                got = ffn(x)
            assert len(calls) == 1 and calls[0][0] is x
            table = 0 if arch == "llama" else t  # LLaMA: one table for all layers (Sec. 5.2)
            want = ffn_without(mod, act, x, keys[table], values[table], 0.7, blocked)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert (got - ffn(x)).abs().max() > 1e-3  # the probe is gone: all entries again
            with memvp_figures.probe(torch.arange(5).expand(2, 5)):  # every entry blocked: the frozen FFN
                torch.testing.assert_close(ffn(x), mod.fc2(act(mod.fc1(x))) if kind == "bart" else mod(x))
    assert memvp.visual_memory is original


@pytest.mark.parametrize("arch", ["bart", "llama"])
def test_similarity_is_phi_of_lam_f_without_the_position_embedding(arch):
    """Fig. 5's phi(<x, lam f(z_i)>), averaged over the memory layers: lam f(z_i) read back as K(z_i) - p^k_i
    from the keys the FFNs received, x as the queries they received."""
    m = vl(tiny(arch), "memvp", 8, lam=0.5, n_pos=6).eval()
    torch.manual_seed(2)
    m.prompts.pos_k.data.normal_()
    feats, ids = torch.randn(2, 4, 8), torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        inputs, ctx = m.lm_inputs(feats, ids, torch.ones_like(ids))
        with ctx, memvp_figures.probe() as calls:
            keys = m.bank.keys
            m.lm(**inputs, **({"labels": ids} if m.enc_dec else {}))
        got = memvp_figures.similarity(m, feats, calls)
    assert len(calls) == 2 and got.shape == (2, 5, 4)
    want = 0
    for t, (x, act) in enumerate(calls):
        table = 0 if arch == "llama" else t  # LLaMA: one table for every layer (Sec. 5.2)
        vp = keys[table] - m.prompts.pos_k[table]  # (B, n_pos, d): lam f(z), zero-padded to n_pos
        assert vp[:, 4:].abs().max() < 1e-6 and vp[:, :4].abs().min() > 0
        want = want + torch.tensor([[[float(act(x[b, j] @ vp[b, i]).detach()) for i in range(4)] for j in range(5)]
                                    for b in range(2)]) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_main_small(tmp_path, capsys, monkeypatch):
    """Both tiny LMs, seed 0 trained for 2 steps by memvp.main, then the figures and Fig. 6's table."""
    flags = "--train_limit 24 --eval_limit 6 --max_steps 2 --batch_size 8"
    argv = ["--seeds", "0", "--runs_dir", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out"),
            "--per_family", "5", "--memvp_flags", flags]
    res = memvp_figures.main(argv)
    out = capsys.readouterr().out
    for name in ("tiny-bart", "tiny-llama"):
        folder = tmp_path / "out" / name  # runs/ holds none of memvp.py's runs: trained here
        assert memvp.load_checkpoint(str(folder / "seed0" / "memvp" / "checkpoint.pt"))["step"] == 2
        saved = json.loads((folder / "results.json").read_text())
        assert set(saved["families"]) == {"count", "color", "shape"}
        for fam, acc in saved["families"].items():
            assert set(acc) == {"none", "top2", "random2"} and all(0 <= v <= 100 for v in acc.values())
            assert saved["seeds"][0]["questions"][fam] == 5
            assert all(0 <= v <= 100 for v in saved["seeds"][0]["on_objects"][fam].values())
        for fam in ("color", "shape", "count", "exist", "position", "relation"):
            rows = (folder / f"fig5_{fam}.csv").read_text().splitlines()
            assert rows[0].split(",") == ["token", *memvp_figures.CELLS] and len(rows) > 2
            assert (folder / f"fig5_{fam}.png").is_file() == (memvp_figures.pyplot() is not None)
        assert res[f"stand_ins/{name}"]["families"] == saved["families"]
        assert f"Fig. 6, stand_ins/{name} (MemVP, seed 0): test VQA accuracy" in out
    assert all(len(line) <= 100 for line in out.splitlines())
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(memvp, "main", lambda argv: pytest.fail("a finished run was trained again"))
    again = memvp_figures.main(argv[:-2] + ["--models", "stand_ins/tiny-bart"])
    assert again["stand_ins/tiny-bart"]["families"] == res["stand_ins/tiny-bart"]["families"]
    mine = tmp_path / "runs" / "shapes_vqa-tiny-bart-seeds0"  # memvp.py's own run of that name comes first
    mine.parent.mkdir()
    (tmp_path / "out" / "tiny-bart").rename(mine)
    argv[argv.index("--out_dir") + 1] = str(tmp_path / "elsewhere")
    used = memvp_figures.main(argv[:-2] + ["--models", "stand_ins/tiny-bart"])
    assert used["stand_ins/tiny-bart"]["runs"] == [str(mine / "seed0")]
    assert used["stand_ins/tiny-bart"]["families"] == res["stand_ins/tiny-bart"]["families"]


def test_object_cells_of_the_grid():
    objects = [{"x": 0.21, "y": 0.49}, {"x": 0.5, "y": 0.8}, {"x": 0.8, "y": 0.5}]
    rec = {"meta": {"scene": {"objects": objects}}}
    assert memvp_figures.object_cells(rec, 9) == {3, 7, 5}  # left, bottom, right (row-major 3 x 3)


def test_generation_length_is_the_tasks_as_in_memvp():
    """A run's Args without --max_new_tokens decode as many tokens as memvp.evaluate does (8 for VQA)."""
    from types import SimpleNamespace
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    assert memvp_figures.generation(memvp.Args(), tok).max_new_tokens == memvp.NEW_TOKENS["vqa"] == 8
    assert memvp_figures.generation(memvp.Args(max_new_tokens=3), tok).max_new_tokens == 3
