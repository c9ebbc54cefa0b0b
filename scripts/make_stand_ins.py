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
BLIP2_PRETRAIN = dict(batch_size=32, lr=2e-3, warmup=50, steps=2000)
BLIP2_PROMPT_WORDS = ["question", "answer", "caption", ":"]  # prefix_tuning.SYNTHETIC["prompts"]


def tiny_blip2(vocab: int, init: str = "scaled"):
    """ViT 2x48 (32 px images, 8 px patches), Q-Former 2x48 with 8 queries, OPT 2x64. init "hf": transformers'
    BLIP-2 initialisation, made to be overwritten by a checkpoint (ViT std 1e-10, query tokens 0, std 0.02
    elsewhere); "scaled": weights N(0, 1/d), query tokens N(0, 1).
    DEVIATION: "scaled" for tiny-blip2. From "hf" (tiny-blip2-hf-init) the queries are all equal (the model
    barely sees the image) and the width-64 OPT ends pre-training attending almost uniformly: input prefixes
    do not train."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    vit_std, qformer_std, lm_std = (1e-10, 0.02, 0.02) if init == "hf" else (48 ** -.5, 48 ** -.5, 64 ** -.5)
    layers = dict(num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=48, intermediate_size=96, image_size=32, patch_size=8,
                  initializer_range=vit_std)
    qformer = dict(hidden_size=48, intermediate_size=96, encoder_hidden_size=48, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, vocab_size=vocab, initializer_range=qformer_std)
    text = dict(model_type="opt", vocab_size=vocab, hidden_size=64, ffn_dim=128, max_position_embeddings=128,
                word_embed_proj_dim=64, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                init_std=lm_std)
    cfg = Blip2Config(vision_config=vision | layers, qformer_config=qformer | layers,
                      text_config=text | layers, num_query_tokens=8, initializer_range=qformer_std)
    model = Blip2ForConditionalGeneration(cfg).float()
    if init == "scaled":
        torch.nn.init.normal_(model.query_tokens)        # distinct queries (a LayerNorm follows: any scale)
    return model


def blip2_image_processor():
    """32 px, mean = std = 0.5 per channel: the pixels prefix_tuning.Collate feeds the tiny ViT."""
    from transformers import BlipImageProcessor
    return BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def save_blip2(model, tok, folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    blip2_image_processor().save_pretrained(folder)


def pretrain_tiny_blip2(folder: Path, steps: Optional[int], init: str) -> None:
    """ALL weights of the tiny BLIP-2 trained on four caption styles and four VQA families of
    data.PRETRAIN_WORLD (prefix_tuning.mix_records), interleaved; AdamW, linear warm-up and decay."""
    import prefix_tuning as pt
    tok = data.build_tokenizer(data.synthetic_vocab() + BLIP2_PROMPT_WORDS)
    torch.manual_seed(0)
    model, r = tiny_blip2(len(tok), init), dict(BLIP2_PRETRAIN, steps=steps or BLIP2_PRETRAIN["steps"])
    recs = pt.mix_records("train", data.PRETRAIN_WORLD)
    processor = blip2_image_processor()
    col = pt.Collate(tok, 32, pt.SYNTHETIC["prompts"], processor.image_mean, processor.image_std)
    g = torch.Generator().manual_seed(0)
    net = pt.PrefixBlip2(model.train(), 0, "none", False, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    sched = pt.lr_schedule(opt, r["warmup"], r["steps"], decay="linear")
    for _ in range(r["steps"]):
        idx = torch.randint(len(recs), (r["batch_size"],), generator=g).tolist()
        loss = net(col([recs[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"pre-trained the tiny BLIP-2 ({init} init): {r['steps']} steps, last loss {loss.item():.3f}")
    save_blip2(model.eval(), tok, folder)


@recipe("tiny-blip2")
def make_tiny_blip2(folder: Path, steps: Optional[int]) -> None:
    pretrain_tiny_blip2(folder, steps, "scaled")


@recipe("tiny-blip2-hf-init")
def make_tiny_blip2_hf_init(folder: Path, steps: Optional[int]) -> None:
    pretrain_tiny_blip2(folder, steps, "hf")


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
