"""scripts/memvp_figures.py -- MemVP's Figures 5 and 6 (Sec. 5.1, "Visualization") on the offline stand-ins.

Jie et al., "Memory-Space Visual Prompting for Efficient Vision-Language Fine-Tuning", ICML 2024, arXiv
2405.05615. MemVP appends the n visual entries (K(z_i), V(z_i)) to the FFN memory (Eq. 6-8); Sec. 5.1 checks
that the LM really retrieves them as knowledge:
  Fig. 5  for each question token x, the similarity phi(<x, lam f(z_i)>) to the key of each visual entry
          (lam f(z_i) alone, without p^k_i), averaged over the memory layers. Here: one test question per
          family; the entries are tiny-cnn's 3 x 3 grid cells.              -> probe, similarity, figures
  Fig. 6  blocking the two most responsive entries (their phi(<x, K(z_i)>) in Eq. 6 set to 0) makes the
          model answer "0". Here a measurement: every count / colour / shape question of the test split
          unchanged, with the 2 entries of highest similarity averaged over the question's tokens blocked,
          and with 2 random entries blocked.                                -> probe, answer, measure, figure6

The checkpoints: memvp.py's runs in its --seeds layout; the missing ones are trained here by memvp.main.

  python scripts/memvp_figures.py                                  # tiny BART and tiny LLaMA, seeds 0,1,2
  python scripts/memvp_figures.py --models stand_ins/tiny-bart --seeds 0
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import memvp  # noqa: E402

CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
BLOCKED = ("top2", "random2")  # Fig. 6's blocking, and its control
FIG6_FAMILIES = ("count", "color", "shape")


# ------------------------------------------------------------------------------------------------ the probe
@contextlib.contextmanager
def probe(blocked: Optional[torch.Tensor] = None):
    """Inside: every call of memvp.visual_memory (Eq. 5, one per memory layer and forward pass) records its
    queries x and activation phi; with `blocked` (B, k) entry indices, their phi(<x, K(z_i)>) is set to 0
    (Fig. 6): the FFN then holds only the other entries of Eq. 8."""
    calls, original = [], memvp.visual_memory

    def visual_memory(x, keys, values, act, dropout=None):
        calls.append((x, act))
        if blocked is None:
            return original(x, keys, values, act, dropout)
        keep = torch.ones(keys.shape[:2], device=x.device).scatter(1, blocked.to(x.device), 0)  # (B, n)
        return original(x, keys, values, lambda s: act(s) * keep[:, None, :].to(s.dtype), dropout)
    memvp.visual_memory = visual_memory
    try:
        yield calls
    finally:
        memvp.visual_memory = original


def similarity(model: memvp.VLModel, feats: torch.Tensor, calls: list) -> torch.Tensor:
    """Fig. 5: phi(<x, lam f(z_i)>) averaged over the memory layers -> (B, L, n); calls: the first forward
    pass's (x, phi) of each memory layer, in order."""
    vp = model.prompts.lam * model.prompts.projector(feats) * memvp.image_present(feats)  # (B, n, d) lam f(z)
    return torch.stack([act(x @ vp.transpose(-1, -2).to(x.dtype)).float() for x, act in calls]).mean(0)


def question_rows(model: memvp.VLModel, src: list, width: int) -> slice:
    """The positions of the question's own tokens in a generation batch (memvp.Collator's layout)."""
    return slice(0, len(src)) if model.enc_dec else slice(width - len(src), width)


@torch.no_grad()
def answer(model: memvp.VLModel, split: memvp.Split, tok, items: list, gen, device, blocks: dict) -> tuple:
    """Greedy answers to `items`: {"none": unchanged, name: with the entries block(scores, i) blocked, for
    each of `blocks`}, and each question's Fig. 5 map (its tokens x entries); scores (n,): item i's map
    averaged over the question's tokens."""
    collate, preds, maps = memvp.Collator(split, model.enc_dec, tok, True), {}, []
    for s in range(0, len(items), 128):
        batch = collate(items[s:s + 128])
        inputs = [batch[k].to(device) for k in ("feats", "input_ids", "attention_mask")]
        with probe() as calls, memvp.autocast(device):
            out = {"none": model.generate(*inputs, generation_config=gen)}
        sims = similarity(model, inputs[0], calls[:len(model.memory_layers)])  # the prompt's pass
        width = batch["input_ids"].shape[1]
        maps += [m[question_rows(model, src, width)].cpu() for m, (_, src, _) in zip(sims, items[s:s + 128])]
        for name, block in blocks.items():
            blocked = torch.tensor([block(m.mean(0), i) for i, m in enumerate(maps[s:], s)])
            with probe(blocked), memvp.autocast(device):
                out[name] = model.generate(*inputs, generation_config=gen)
        for name, seqs in out.items():
            preds.setdefault(name, []).extend(tok.decode(q, skip_special_tokens=True).strip()
                                              for q in seqs.tolist())
    return preds, maps


def top2(scores: torch.Tensor, i: int) -> list:
    return scores.topk(2).indices.tolist()


# --------------------------------------------------------------------------------------- loading the runs
def trained_run(args: FigArgs, model: str, seed: int) -> str:
    """The folder of a finished MemVP run of `model` and `seed`: memvp.py's own (its default folder of a
    --seeds run, under --runs_dir), else one trained here (<out_dir>/<model>/seed<N>: never in memvp.py's
    folders, which a later memvp.py run would find occupied)."""
    name, seeds = os.path.basename(model.rstrip("/")), args.seeds.replace(",", "_")
    own = os.path.join(args.runs_dir, f"shapes_vqa-{name}-seeds{seeds}", f"seed{seed}")
    here = os.path.join(args.out_dir, name, f"seed{seed}")
    for out in (own, here):
        if os.path.isfile(os.path.join(out, "memvp", "results.json")):
            return out
    memvp.main(["--model", model, "--prompting", "memvp", "--seed", str(seed), "--out_dir", here, "--resume",
                *args.memvp_flags.split()])
    return here


def load_trained(out: str, device) -> tuple:
    """memvp.py's --eval_only path: the run's Args from its checkpoint, the frozen LM with the MemVP entries
    and the trained tensors, the evaluation split -> (run Args, VLModel, tokenizer, Split)."""
    path = os.path.join(out, "memvp", "checkpoint.pt")
    args = memvp.from_checkpoint(memvp.Args(out_dir=out), memvp.load_checkpoint(path))
    if args.dataset != "shapes_vqa":
        raise memvp.UsageError(f"{out} holds a {args.dataset} run: the figures read shapes_vqa's question "
                               "families")
    recs = data.load_records(args.dataset, args.eval_split, args.data_root)
    lm, tok = memvp.load_lm(args.model)
    data.pin_threads(lm, device)
    llama = not lm.config.is_encoder_decoder
    split = memvp.load_split(args, args.eval_split, recs, tok, False, llama, device)
    model = memvp.VLModel(lm.requires_grad_(False), "memvp", split.feats.shape[-1], args,
                          tok.bos_token_id is not None).to(device)
    memvp.load_checkpoint(path, model)
    return args, model.eval(), tok, split


def generation(run_args: memvp.Args, tok) -> transformers.GenerationConfig:
    """Greedy decoding as memvp.evaluate."""
    new_tokens = run_args.max_new_tokens or memvp.NEW_TOKENS[memvp.TASKS[run_args.dataset]]
    return transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0)


def family_items(split: memvp.Split) -> dict:
    """{question family: the split's items of that family}, in the world's family order."""
    out = {}
    for item in split.items:
        out.setdefault(split.records[item[0]]["question_type"], []).append(item)
    return out


# ---------------------------------------------------------------------------------------- Fig. 5, Fig. 6
def cell_names(n: int) -> list:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise memvp.UsageError(f"{n} visual entries do not form a square image grid")
    return list(CELLS) if n == 9 else [f"r{r}c{c}" for r in range(side) for c in range(side)]


def write_csv(path: Path, tokens: list, sim: torch.Tensor) -> None:
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["token", *cell_names(sim.shape[1])])
        rows.writerows([t, *(f"{v:.6f}" for v in row)] for t, row in zip(tokens, sim.tolist()))


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency
        return plt
    except ImportError:
        return None


def draw_image(ax, rec: dict, sim: torch.Tensor) -> None:
    """The image, its grid, and over it the similarity of each cell averaged over the question's tokens."""
    side, size = int(round(sim.shape[1] ** 0.5)), 192
    ax.imshow(data.load_image(rec, size))
    ax.imshow(sim.mean(0).reshape(side, side).numpy(), extent=(0, size, size, 0), alpha=0.5, cmap="magma")
    ax.set(xticks=np.arange(1, side) * size / side, yticks=np.arange(1, side) * size / side, xticklabels=[],
           yticklabels=[], title=f"{rec['question']}\n(answer: {rec['answer']})")
    ax.tick_params(length=0)
    ax.grid(color="white", linewidth=0.6)


def draw_map(ax, tokens: list, sim: torch.Tensor, title: str, blocked=(), scale=None):
    """Rows: the question's tokens, columns: the visual entries; blocked ones framed in red (Fig. 6).
    scale: the (min, max) of the colours (default: sim's)."""
    from matplotlib.patches import Rectangle
    low, high = scale or (sim.min().item(), sim.max().item())
    image = ax.imshow(sim.numpy(), cmap="magma", aspect="auto", vmin=low, vmax=high)
    ax.set_xticks(range(sim.shape[1]), cell_names(sim.shape[1]), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_title(title, fontsize=10)
    for i in blocked:
        ax.add_patch(Rectangle((i - 0.5, -0.5), 1, len(tokens), fill=False, color="red", linewidth=2))
    return image


def figures(out: Path, model: memvp.VLModel, tok, split: memvp.Split, gen, device, seed: int) -> list:
    """Fig. 5 for one test question per family (fig5_<family>.csv, .png) and Fig. 6 for the counting one
    (fig6_count.png: unchanged, then its two most similar entries blocked) -> the files written."""
    rng = np.random.default_rng(seed)
    picked = {fam: items[rng.integers(len(items))] for fam, items in family_items(split).items()}
    preds, sims = answer(model, split, tok, list(picked.values()), gen, device, {"top2": top2})
    plt, written = pyplot(), []
    for k, (fam, (i, src, _)) in enumerate(picked.items()):
        rec, tokens, sim = split.records[i], tok.convert_ids_to_tokens(src), sims[k]
        write_csv(out / f"fig5_{fam}.csv", tokens, sim)
        written.append(out / f"fig5_{fam}.csv")
        if plt is None:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 2.6 + 0.3 * len(tokens)), width_ratios=[1, 1.5],
                                 layout="constrained")
        draw_image(axes[0], rec, sim)
        image = draw_map(axes[1], tokens, sim, f"model: {preds['none'][k]}")
        fig.colorbar(image, ax=axes[1], label="φ(<x, λ f(z_i)>), mean over memory layers")
        written.append(save(plt, fig, out / f"fig5_{fam}.png"))
        if fam == "count":
            written.append(figure6(plt, out / "fig6_count.png", rec, tokens, sim, preds["none"][k],
                                   preds["top2"][k]))
    return written


def figure6(plt, path: Path, rec: dict, tokens: list, sim: torch.Tensor, before: str, after: str) -> Path:
    """Fig. 6: the inputs, the similarity, and the similarity with the two most similar entries blocked."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 2.6 + 0.3 * len(tokens)), width_ratios=[1, 1.5, 1.5],
                             layout="constrained")
    draw_image(axes[0], rec, sim)
    blocked, zeroed = top2(sim.mean(0), 0), sim.clone()
    zeroed[:, blocked] = 0  # phi = 0 for the blocked entries
    scale = (min(0.0, sim.min().item()), sim.max().item())  # one colour scale for both, 0 included
    draw_map(axes[1], tokens, sim, f"unchanged, model: {before}", scale=scale)
    image = draw_map(axes[2], tokens, zeroed, f"2 most similar entries blocked, model: {after}", blocked,
                     scale)
    fig.colorbar(image, ax=axes[2], label="φ(<x, λ f(z_i)>)")
    return save(plt, fig, path)


def save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def object_cells(rec: dict, n: int) -> set:
    """The grid cells (row-major) that hold an object's centre."""
    side = int(round(n ** 0.5))
    return {int(o["y"] * side) * side + int(o["x"] * side) for o in rec["meta"]["scene"]["objects"]}


def measure(args: FigArgs, model: memvp.VLModel, tok, split: memvp.Split, gen, device) -> dict:
    """Fig. 6 on every count / colour / shape question: VQA accuracy unchanged ("none"), with the 2 entries
    most similar to the question's tokens blocked ("top2"), with 2 random entries blocked ("random2"); the %
    of questions whose answer changes, and the % of blocked entries that hold an object."""
    rng, n = np.random.default_rng(args.seed), split.feats.shape[1]
    res = {"families": {}, "changed": {}, "on_objects": {}, "questions": {}}
    for fam in FIG6_FAMILIES:
        items = family_items(split)[fam][:args.per_family]
        drawn = [rng.choice(n, 2, replace=False).tolist() for _ in items]
        blocks = {"top2": top2, "random2": lambda scores, i: drawn[i]}
        preds, maps = answer(model, split, tok, items, gen, device, blocks)
        recs = [split.records[i] for i, *_ in items]
        picks = {"top2": [top2(m.mean(0), i) for i, m in enumerate(maps)], "random2": drawn}
        res["families"][fam] = {k: data.vqa_accuracy(p, recs)["overall"] for k, p in preds.items()}
        res["changed"][fam] = {k: 100 * float(np.mean([a != b for a, b in zip(preds["none"], preds[k])]))
                               for k in BLOCKED}
        res["on_objects"][fam] = {k: 100 * float(np.mean([len(set(c) & object_cells(r, n)) / 2
                                                          for c, r in zip(picks[k], recs)])) for k in BLOCKED}
        res["questions"][fam] = len(items)
    return res


def format_table(model: str, seeds: list, res: dict) -> str:
    """VQA accuracy per family and condition, % of answers changed, % of blocked entries on an object:
    mean ± std over the seeds."""
    runs = res["seeds"]
    cell = lambda v: f"{v[0]:.2f}" if len(v) == 1 else data.mean_std(v)  # noqa: E731
    rows = [["family", "questions", "unchanged", "top-2 blocked", "random-2 blocked", "changed top-2",
             "changed random-2"]]
    objects = [["blocked entries on an object's cell (%)", "top-2", "random-2"]]
    for fam in FIG6_FAMILIES:
        acc = [cell([r["families"][fam][k] for r in runs]) for k in ("none", *BLOCKED)]
        changed = [cell([r["changed"][fam][k] for r in runs]) for k in BLOCKED]
        rows.append([fam, str(runs[0]["questions"][fam]), *acc, *changed])
        objects.append([fam, *(cell([r["on_objects"][fam][k] for r in runs]) for k in BLOCKED)])
    seeds = f"seed{'s' * (len(seeds) > 1)} {','.join(map(str, seeds))}"
    title = f"Fig. 6, {model} (MemVP, {seeds}): test VQA accuracy, % answers changed"
    return "\n".join([title, *aligned(rows), *aligned(objects)])


def aligned(rows: list) -> list:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]


# --------------------------------------------------------------------------------------- Args, CLI, main
@dataclasses.dataclass
class FigArgs:
    models: str = data.arg("stand_ins/tiny-bart,stand_ins/tiny-llama",
                           "memvp.py --model values, comma-separated")
    seeds: str = data.arg("0,1,2", "the checkpoints' seeds (Fig. 5 from the first)")
    runs_dir: str = data.arg("runs/memvp",
                             "memvp.py's runs (read only): <runs_dir>/shapes_vqa-<model>-seeds<seeds>")
    memvp_flags: str = data.arg("", "memvp.py flags for the runs trained here (default: none), "
                                    "e.g. '--lam 0.1 --scale 1'")
    out_dir: str = data.arg("runs/memvp_figures",
                            "<out_dir>/<model>: figures, CSV, results.json, runs trained here")
    per_family: Optional[int] = data.arg(None, "Fig. 6: the first N questions per family (default: all)")
    seed: int = data.arg(0, "picks Fig. 5's questions and Fig. 6's random entries")
    device: str = data.arg("auto", "auto | cpu | cuda")

    def __post_init__(self):
        data.check_values(self, {"per_family": (">= 1", lambda v: v >= 1),
                                  "models": ("comma-separated --model values", lambda v: all(v.split(",")))})


def run(args: FigArgs) -> dict:
    device, seeds, out = memvp.setup_device(args.device)[0], [int(s) for s in args.seeds.split(",")], {}
    models = args.models.split(",")
    runs = {(m, s): trained_run(args, m, s) for m in models for s in seeds}  # train what is missing first
    for m in models:
        folder = Path(args.out_dir, os.path.basename(m.rstrip("/")))
        folder.mkdir(parents=True, exist_ok=True)
        per_seed = []
        for s in seeds:
            run_args, model, tok, split = load_trained(runs[m, s], device)
            gen = generation(run_args, tok)
            if s == seeds[0]:
                figures(folder, model, tok, split, gen, device, args.seed)
            per_seed.append({"seed": s, **measure(args, model, tok, split, gen, device)})
        mean = {fam: {k: float(np.mean([r["families"][fam][k] for r in per_seed]))
                      for k in ("none", *BLOCKED)} for fam in FIG6_FAMILIES}
        out[m] = {"families": mean, "seeds": per_seed, "runs": [runs[m, s] for s in seeds]}
        Path(folder, "results.json").write_text(json.dumps(out[m], indent=2))
    for m in models:
        print(format_table(m, seeds, out[m]))
    return out


def main(argv=None) -> dict:
    return memvp.run_cli(run, FigArgs, argv, __doc__)


if __name__ == "__main__":
    main()
