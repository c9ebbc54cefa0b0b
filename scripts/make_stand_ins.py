"""Make the offline stand-ins in stand_ins/: tiny pre-trained backbones saved as Hugging Face checkpoint
folders (save_pretrained), which the method files load with --model exactly as they load a hub id.

Every recipe lives here (configuration, pre-training texts of data.PRETRAIN_WORLD, objective, steps, seed);
the method files and data.py only load the folders. Pre-training is seeded and single-threaded, so the same
kind of CPU makes the same weights; another CPU (other kernels) makes slightly other ones, which is why the
folders ship with the repository.

  python scripts/make_stand_ins.py --list                       # the stand-ins and their folders
  python scripts/make_stand_ins.py --check --only tiny-llama    # re-make into a temporary folder, compare
  python scripts/make_stand_ins.py --only tiny-llama --overwrite
  python scripts/make_stand_ins.py --only tiny-llama --out /tmp/si --steps 20   # a quick re-make
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402

RECIPES: dict[str, Callable[[Path, Optional[int]], None]] = {}  # name -> make(folder, steps or None)


def recipe(name: str):
    """Register make(folder, steps): pre-train the stand-in `name` (steps: None = the recipe's) and save it."""
    def register(make):
        RECIPES[name] = make
        return make
    return register


# ------------------------------------------------------------------------------ the frozen tiny CNN (data.py)
# DEVIATION (offline only): the papers' frozen towers (CLIP, an ImageNet-21k ViT) are pre-trained on real
# images; the synthetic world's stand-in is a small CNN trained, supervised, to name the objects of scenes of
# world PRETRAIN_WORLD (no benchmark uses it), so that its frozen features already say what an image holds.
TINY_CNN_RECIPE = {"images": 4000, "steps": 600, "batch": 32, "lr": 1e-2, "world": data.PRETRAIN_WORLD}
CELL = {"top": 1, "left": 3, "center": 4, "right": 5, "bottom": 7}  # grid cell (row-major) of a position


@recipe("tiny-cnn")
def make_tiny_cnn(folder: Path, steps: Optional[int]) -> None:
    """data.TinyCNN (width 96, 48 x 48 images) pre-trained on world PRETRAIN_WORLD, seed 0."""
    torch.manual_seed(0)
    model = data.TinyCNN(data.TINY_CNN_WIDTH, data.TINY_CNN_IMAGE_SIZE)
    pretrain_tiny_cnn(model, **dict(TINY_CNN_RECIPE, steps=steps or TINY_CNN_RECIPE["steps"]))
    model.save_pretrained(folder)


def pretrain_tiny_cnn(model: data.TinyCNN, *, images, steps, batch, lr, world) -> None:
    """Supervised pre-training: cross-entropy naming the colour / shape / size (or nothing) in each grid
    cell from its token, plus binary cross-entropy naming the scene's colours, shapes, positions and pairs
    from the pooled vector, both through linear heads (so the names are linearly readable)."""
    import torch.nn.functional as F
    size, width = model.config["image_size"], model.config["width"]
    w = data.ShapesWorld(seed=world, split_sizes={"train": images})
    scenes = [w.scene("train", i) for i in range(images)]
    px = data.tiny_cnn_pixels([w.render(sc, size) for sc in scenes], size)            # (N, 3, S, S)
    cells, names = tiny_cnn_targets(scenes)                                           # (N, 9, 3), (N, K)
    sizes = [1 + len(data.COLORS), 1 + len(data.SHAPES), 1 + len(data.SIZES)]
    cell_head = torch.nn.Linear(width, sum(sizes))
    name_head = torch.nn.Linear(width, names.shape[1])
    opt = torch.optim.Adam([*model.parameters(), *cell_head.parameters(), *name_head.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(px), (batch,), generator=gen)
        grid, pooled = model(px[idx])
        logits = cell_head(grid).split(sizes, -1)                                      # colour, shape, size
        loss = sum(F.cross_entropy(lg.flatten(0, 1), cells[idx, :, k].flatten())
                   for k, lg in enumerate(logits)) / 3
        loss = loss + F.binary_cross_entropy_with_logits(name_head(pooled), names[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():  # unit scale: each output divided by its RMS on 1000 pre-training images
        grid, pooled = model(px[:1000])
        model.scale.copy_(torch.stack([grid.pow(2).mean().sqrt(), pooled.pow(2).mean().sqrt()]))


def tiny_cnn_targets(scenes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> cells (N, 9, 3): 1 + colour / shape / size index of each grid cell's object, 0 = none; names (N, K):
    multi-hot of the scene's colours, shapes, positions and the pairs of names_of."""
    def names_of(o):
        return [o["color"], o["shape"], o["pos"], f"{o['size']} {o['shape']}", f"{o['color']} {o['shape']}",
                f"{o['shape']} {o['pos']}", f"{o['color']} {o['pos']}"]
    every = [{"color": c, "shape": s, "size": z, "pos": p} for c in data.COLORS for s in data.SHAPES
             for z in data.SIZES for p in data.POSITIONS]
    index = {n: i for i, n in enumerate(sorted({n for o in every for n in names_of(o)}))}
    cells, names = torch.zeros(len(scenes), 9, 3, dtype=torch.long), torch.zeros(len(scenes), len(index))
    for i, sc in enumerate(scenes):
        for o in sc["objects"]:
            kinds = (data.COLORS.index(o["color"]), data.SHAPES.index(o["shape"]),
                     data.SIZES.index(o["size"]))
            cells[i, CELL[o["pos"]]] = 1 + torch.tensor(kinds)
            names[i, [index[n] for n in names_of(o)]] = 1
    return cells, names



# ------------------------------------------------------------------------------------- memvp.py's tiny LMs


# ------------------------------------------------------------------------ routing_bottleneck.py's tiny LMs


# ------------------------------------------------------- prefix_tuning.py / pt_peft_train.py's tiny BLIP-2


# ---------------------------------------------------------------------------------- rlp.py's tiny CLIPs


# ------------------------------------------------------------------------------------------------- the CLI
def largest_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two stand-in folders (same tensor names)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated names (default: all)")
    p.add_argument("--out", default=str(REPO / "stand_ins"), help="where the folders go (default: stand_ins/)")
    p.add_argument("--steps", type=int, help="pre-training steps instead of the recipe's (a quick re-make)")
    p.add_argument("--check", action="store_true", help="re-make into a temporary folder and compare")
    p.add_argument("--overwrite", action="store_true", help="replace existing folders")
    p.add_argument("--list", action="store_true", help="list the stand-ins")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown stand-in {', '.join(unknown)}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    if a.list:
        print("\n".join(f"{n:24s} {REPO / 'stand_ins' / n}" for n in names))
        return 0
    torch.set_num_threads(1)  # the same weights on every run of the same kind of CPU
    for name in names:
        if a.check:
            with tempfile.TemporaryDirectory() as tmp:
                RECIPES[name](Path(tmp, name), a.steps)
                diff = largest_difference(Path(tmp, name), REPO / "stand_ins" / name)
            print(f"{name}: largest weight difference to stand_ins/{name}: {diff:.3g}")
            continue
        folder = Path(a.out, name)
        if folder.exists() and not a.overwrite:
            print(f"error: {folder} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        RECIPES[name](folder, a.steps)
        print(f"{name}: written to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
