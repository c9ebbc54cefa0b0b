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
