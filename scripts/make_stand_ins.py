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


# ------------------------------------------------------------------------------------- memvp.py's tiny LMs


# ------------------------------------------------------------------------ routing_bottleneck.py's tiny LMs


# ------------------------------------------------------- prefix_tuning.py / pt_peft_train.py's tiny BLIP-2


# ---------------------------------------------------------------------------------- rlp.py's tiny CLIPs
# DEVIATION: ViT-B/16 needs the hub. Offline, a 2+2-layer CLIP (width 64; 48x48 images, a 3x3 grid of 16-px
# patches) is pre-trained with CLIP's loss on scenes of world data.PRETRAIN_WORLD (the benchmark is world 0),
# half with 1 object, half with 1-3, captioned "a photo of a red circle.", ... (so CoOp's init is meaningful).
# Three pre-training seeds, three stand-ins: tiny-clip (seed 0), tiny-clip-seed1, tiny-clip-seed2.
TINY_CLIP = dict(width=64, layers=2, heads=4, image_size=48, patch=16, scenes=2000, steps=1000, batch=64,
                 lr=2e-3, weight_decay=0.05, warmup=50)


def scene_captions(scene: dict) -> list:
    """-> ["a photo of a red circle and a blue star.", "an image with a red circle and a blue star.", ...]"""
    where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}
    things = [[f"{o['color']} {o['shape']}", f"{o['size']} {o['color']} {o['shape']}",
               f"{o['color']} {o['shape']} " + where.get(o["pos"], "on the " + o["pos"])]
              for o in scene["objects"]]
    a = [[("an " if t[0] in "aeiou" else "a ") + t for t in ts] for ts in zip(*things)]        # per style
    join = [x[0] if len(x) == 1 else ", ".join(x[:-1]) + " and " + x[-1] for x in a]
    return [f"a photo of {join[0]}.", f"an image with {join[0]}.", f"{join[1]}.", f"there is {join[2]}."]


def pretrain_clip(clip, tok, seed: int, steps: int):
    """CLIP's symmetric InfoNCE on (image, one of its captions); scenes of the same objects are positives."""
    import numpy as np
    import random
    from tqdm import tqdm
    from rlp import lr_schedule, tokenize
    rc, rng = TINY_CLIP, random.Random(seed)
    kw = dict(world_seed=data.PRETRAIN_WORLD, image_size=rc["image_size"],
              split_sizes={"train": rc["scenes"] // 2, "val": 1, "test": 1})
    recs = data.load_records("shapes_cls", "train", **kw) + data.load_records("shapes_caption", "train", **kw)
    captions = [scene_captions(r["meta"]["scene"]) for r in recs]
    objects = [str(sorted((o["color"], o["shape"]) for o in r["meta"]["scene"]["objects"])) for r in recs]
    key = torch.from_numpy(np.unique(objects, return_inverse=True)[1])               # same key: positives
    x = torch.from_numpy(np.stack([np.asarray(data.load_image(r, rc["image_size"])) for r in recs])) / 255
    images = ((x - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)).permute(0, 3, 1, 2)  # NCHW
    opt = torch.optim.AdamW(clip.parameters(), lr=rc["lr"], weight_decay=rc["weight_decay"])
    sched = lr_schedule(opt, rc["warmup"], steps)
    for _ in tqdm(range(steps), desc="pre-train the tiny CLIP", mininterval=10):
        idx = torch.randint(len(recs), (rc["batch"],))
        ids = tokenize(tok, [rng.choice(captions[i]) for i in idx.tolist()], clip)[0]
        logits = clip(input_ids=ids, pixel_values=images[idx]).logits_per_image                # (B, B)
        same = (key[idx, None] == key[None, idx]).float()
        target = same / same.sum(1, keepdim=True)                                               # symmetric
        loss = -((target * logits.log_softmax(1)).sum(1) + (target * logits.log_softmax(0)).sum(0)).mean() / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def make_tiny_clip(folder: Path, steps: Optional[int], seed: int) -> None:
    """The tiny CLIP of `seed`: its tokenizer, config and pre-training; saved with a CLIP image processor."""
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    # the tokenizer puts "<s> ... <eot>" around each text: data.py's [EOS] is id 2, which HF's CLIPTextModel
    # reads as legacy "pool at argmax(id)"; <eot> is the last id
    tok = data.build_tokenizer(["a an the of and is there photo image with on at in x , .", *data.COLORS,
                                *data.SHAPES, *data.SIZES, *data.POSITIONS])
    tok.add_special_tokens({"eos_token": "<eot>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A <eot>", special_tokens=[("<s>", tok.bos_token_id), ("<eot>", tok.eos_token_id)])
    w, rc = TINY_CLIP["width"], TINY_CLIP
    tower = dict(hidden_size=w, intermediate_size=4 * w, num_attention_heads=rc["heads"], projection_dim=w,
                 num_hidden_layers=rc["layers"], bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(vocab_size=len(tok), max_position_embeddings=48, eos_token_id=tok.eos_token_id, **tower)
    vision = dict(image_size=rc["image_size"], patch_size=rc["patch"], **tower)
    torch.manual_seed(seed)                                          # the tiny CLIP's init and batches
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=w))
    tok.save_pretrained(folder)                                      # before the batches set its padding
    pretrain_clip(clip, tok, seed, rc["steps"] if steps is None else steps)
    clip.save_pretrained(folder)
    # its pixels: the 48-px scenes unchanged, CLIP's mean / std (what the pre-training saw)
    side = rc["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD)).save_pretrained(folder)


for _seed, _name in ((0, "tiny-clip"), (1, "tiny-clip-seed1"), (2, "tiny-clip-seed2")):
    recipe(_name)(lambda folder, steps, seed=_seed: make_tiny_clip(folder, steps, seed))


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
