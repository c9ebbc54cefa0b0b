"""rlp.py -- Re-parameterized Low-rank Prompts (RLP) for CLIP, with CoOp and zero-shot baselines.

Paper: "Towards Efficient Vision-Language Tuning: More Information Density, More Generalizability"
(Hao et al., arXiv 2312.10813). Baseline: CoOp, "Learning to Prompt for Vision-Language Models" (Zhou et al.).

Idea. CoOp learns a full-rank context P (n x d) that replaces the words "a photo of a" in the class prompt
"[SOS] P name . [EOS]" of a frozen CLIP text encoder. RLP re-parameterises it as
    P = P_fr + Dropout(P_A @ P_B)                                   (Sec. 3, "RLP")
with P_fr the frozen CoOp initialisation (embeddings of "a photo of a"), and P_A (n x r), P_B (r x d) the only
tunable tensors: n*r + r*d parameters (516 for n=4, r=1, d=512) instead of n*d (2048). The low-rank branch
and its dropout regularise the prompt, which helps base-to-new generalisation.

The image tower is frozen and image features are computed once per split, so training is a text-encoder
pass over the class prompts plus a matmul per step. Protocol: base-to-new (CoCoOp): 16 shots on base classes,
accuracy on base and new test classes, harmonic mean, seeds 1 2 3 (mean +- std); or k-shot on all classes.

Examples:
  python rlp.py                     # tiny CLIP pre-trained on the synthetic world (cached), zero-shot vs CoOp
                                    # vs RLP, base-to-new on shapes_cls, 3 seeds, prints the table
  python rlp.py --prompt rlp --max_steps 200
  python rlp.py --compare --dataset OxfordPets --data_root $DATA   # ViT-B/16 (openai/clip-vit-base-patch16)
  python rlp.py --prompt coop --protocol all --shots 16 --dataset dtd --data_root $DATA
  torchrun --nproc_per_node 2 rlp.py --prompt rlp
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel

import data

HF_DEFAULT = "openai/clip-vit-base-patch16"  # the ViT-B/16 of the CoOp / CoCoOp / RLP tables


# ----------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------
@dataclass
class Args:
    dataset: str = field(default="shapes_cls", metadata={"help": "shapes_cls or a CoOp dataset (ImageNet, Caltech101, OxfordPets, StanfordCars, Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101)"})
    data_root: Optional[str] = field(default=None, metadata={"help": "root of the CoOp-layout datasets (ignored for shapes_cls)"})
    model: str = field(default="auto", metadata={"help": f"'tiny' (config-built CLIP pre-trained on the synthetic world) or a HF CLIP id/path; auto = tiny for shapes_cls, {HF_DEFAULT} otherwise"})
    prompt: Optional[str] = field(default=None, metadata={"help": "zeroshot | coop | rlp; unset = --compare (all three)"})
    compare: bool = field(default=False, metadata={"help": "run zeroshot, coop and rlp on the same split/shots and print one table"})
    protocol: str = field(default="base2new", metadata={"help": "base2new (train on base classes, test base+new) | all (k-shot on all classes)"})
    shots: int = field(default=16, metadata={"help": "training images per class (CoCoOp protocol: 16)"})
    seed: int = field(default=1, metadata={"help": "first seed; runs seed .. seed+num_seeds-1 (paper: 1 2 3)"})
    num_seeds: int = field(default=3, metadata={"help": "number of seeds (mean +- std over them)"})
    n_ctx: int = field(default=4, metadata={"help": "context length n for random init (with --ctx_init, n = its token count, as CoOp)"})
    ctx_init: str = field(default="a photo of a", metadata={"help": "words initialising P (CoOp ctxv1); '' = random N(0, 0.02)"})
    rank: int = field(default=1, metadata={"help": "RLP rank r (paper's 0.5K params = n4 r1 d512; not given in the summary: chosen)"})
    rlp_dropout: float = field(default=0.1, metadata={"help": "RLP dropout ratio p on the low-rank branch (not given in the summary: chosen)"})
    rlp_init_std: float = field(default=0.5, metadata={"help": "std of P_A init, P_B = 0 (P = P_fr at init); 0.5 = 1/sqrt(n): P_A P_A^T ~ 1 on its span, so an SGD step moves P as far as CoOp's (chosen)"})
    epochs: int = field(default=-1, metadata={"help": "epochs; -1 = CoOp's configs: 50 for ImageNet (vit_b16_ep50_ctxv1), 200 otherwise (vit_b16_ctxv1)"})
    max_steps: int = field(default=-1, metadata={"help": "stop each training run after this many steps (the LR schedule still spans --epochs); -1 = all"})
    batch_size: int = field(default=32, metadata={"help": "batch size per process (CoOp: 32)"})
    lr: float = field(default=0.002, metadata={"help": "SGD learning rate (CoOp: 0.002), cosine schedule"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Dassl default)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay (Dassl default)"})
    warmup_epochs: int = field(default=1, metadata={"help": "constant warmup epochs (CoOp: 1)"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "constant warmup LR (CoOp: 1e-5)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    out_dir: str = field(default="", metadata={"help": "default runs/rlp/<dataset>-<prompt>-<protocol>-<shots>shot"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoints / finished runs in out_dir"})
    overwrite: bool = field(default=False, metadata={"help": "discard previous results in out_dir"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers (features are in memory: 0 is best)"})
    log_every: int = field(default=50, metadata={"help": "log a training line every N steps"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    cache_dir: str = field(default="cache", metadata={"help": "image-feature and tiny-CLIP cache"})
    # tiny CLIP pre-training (offline default only)
    pretrain_steps: int = field(default=1200, metadata={"help": "--model tiny: contrastive pre-training steps (cached by config hash)"})
    pretrain_batch: int = field(default=128, metadata={"help": "--model tiny: pre-training batch size"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "--model tiny: AdamW learning rate"})
    pretrain_images: int = field(default=3000, metadata={"help": "--model tiny: captioned scenes (1-3 objects) of a separate world used for pre-training"})
    tiny_width: int = field(default=64, metadata={"help": "--model tiny: hidden size of both towers (= d of the prompt)"})
    tiny_image: int = field(default=96, metadata={"help": "--model tiny: image size the synthetic scenes are rendered at"})
    tiny_patch: int = field(default=32, metadata={"help": "--model tiny: ViT patch size (96/32: a 3x3 grid, one cell per object position)"})


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        h = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", action="store_true", help=h)
        else:
            typ = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=h)
    return Args(**vars(p.parse_args(argv)))


class UsageError(ValueError):
    """Bad flags: printed as `error: ...`, exit 2."""


# ----------------------------------------------------------------------------------------------
# Datasets and hand-crafted templates (CoOp zsclip.CUSTOM_TEMPLATES)
# ----------------------------------------------------------------------------------------------
TEMPLATES = {
    "shapes_cls": "a photo of a {}.", "imagenet": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.", "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.", "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "sun397": "a photo of a {}.",
    "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.", "ucf101": "a photo of a person doing {}.",
}
ALIASES = {"oxfordpets": "oxford_pets", "stanfordcars": "stanford_cars", "flowers102": "oxford_flowers",
           "oxfordflowers": "oxford_flowers", "fgvcaircraft": "fgvc_aircraft", "describabletextures": "dtd"}


def canonical_dataset(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    for canon in TEMPLATES:
        if key == canon.replace("_", ""):
            return canon
    if key in ALIASES:
        return ALIASES[key]
    raise UsageError(f"unknown dataset '{name}' for rlp.py; expected shapes_cls or one of the 11 CoOp datasets: "
                     + ", ".join(t for t in TEMPLATES if t != "shapes_cls"))


# ----------------------------------------------------------------------------------------------
# Text side: tokenisation and the explicit CLIP text forward with injected context
# ----------------------------------------------------------------------------------------------
def eos_id_of(clip: CLIPModel, tok) -> int:
    """Id of [EOS] in the model's id space: the config's, unless it is HF's legacy 2 (openai configs; there
    the tokenizer's EOT, the highest id, is meant and HF pools at argmax)."""
    e = clip.config.text_config.eos_token_id
    return tok.eos_token_id if e in (None, 2) else e


def tokenize(tok, texts, max_len: int, eos_id: Optional[int] = None):
    """-> ids (C, L) long, eos (C,) long: [SOS] words [EOS], right-padded; eos = position of [EOS].
    Padded to the longest text, not CLIP's 77: identical [EOS] features, as the text transformer is causal."""
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    seqs = []
    for t in texts:
        ids = [i for i in tok(t, add_special_tokens=True)["input_ids"] if i != tok.eos_token_id]
        if not ids or ids[0] != tok.bos_token_id:
            ids = [tok.bos_token_id] + ids
        seqs.append(ids[:max_len - 1] + [eos_id])
    L = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    out = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out, torch.tensor([len(s) - 1 for s in seqs])


def causal_mask(L: int, dtype, device) -> torch.Tensor:
    """(1, 1, L, L) additive mask: token i attends to tokens <= i (CLIP's text transformer is causal)."""
    return torch.full((L, L), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


def encode_text(clip: CLIPModel, token_embeds: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """CLIP text tower on given token embeddings (C, L, d) -> projected EOS features (C, p).

    Same computation as CLIPModel.get_text_features, but starting after the token lookup so learned
    context vectors can be injected (HF's CLIPTextModel takes input_ids only)."""
    tm = clip.text_model
    L = token_embeds.shape[1]
    h = token_embeds + tm.embeddings.position_embedding.weight[:L]            # (C, L, d)
    mask = causal_mask(L, h.dtype, h.device)
    for layer in tm.encoder.layers:
        out = layer(h, mask)
        h = out[0] if isinstance(out, tuple) else out                          # (C, L, d)
    h = tm.final_layer_norm(h)
    pooled = h[torch.arange(h.shape[0], device=h.device), eos.to(h.device)]   # (C, d) at [EOS]
    return clip.text_projection(pooled)                                       # (C, p)


class ClassPrompts(nn.Module):
    """Frozen token embeddings of "[SOS] X..X name. [EOS]" for C classes (CoOp class_token_position='end').
    `assemble(ctx)` puts a context (n, d) in the n placeholder slots -> (C, L, d). n_ctx=0: the template as is."""

    def __init__(self, clip: CLIPModel, tok, classnames, template: str, n_ctx: int):
        super().__init__()
        texts = [template.format(c.replace("_", " ")) for c in classnames]
        ids, eos = tokenize(tok, texts, clip.config.text_config.max_position_embeddings, eos_id_of(clip, tok))
        if n_ctx and not (ids[:, 1:1 + n_ctx] == ids[0, 1]).all():
            raise UsageError(f"the context placeholder does not tokenize to {n_ctx} single tokens")
        with torch.no_grad():
            emb = clip.text_model.embeddings.token_embedding(ids.to(clip.logit_scale.device))  # (C, L, d)
        self.n_ctx = n_ctx
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)                 # (C, 1, d) [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)         # (C, L-1-n, d)
        self.register_buffer("eos", eos.to(emb.device), persistent=False)                    # (C,)

    def assemble(self, ctx: Optional[torch.Tensor]) -> torch.Tensor:
        if self.n_ctx == 0:
            return torch.cat([self.prefix, self.suffix], 1)
        C = self.prefix.shape[0]
        return torch.cat([self.prefix, ctx.unsqueeze(0).expand(C, -1, -1).to(self.prefix.dtype), self.suffix], 1)


def init_context(clip: CLIPModel, tok, args: Args) -> torch.Tensor:
    """CoOp init: embeddings of ctx_init's tokens (n = their count), else N(0, 0.02) with n = n_ctx. -> (n, d)"""
    d = clip.config.text_config.hidden_size
    if args.ctx_init:
        ids, eos = tokenize(tok, [args.ctx_init], 10_000)
        ids = ids[0, 1:eos[0]]                                                # drop [SOS], [EOS]
        with torch.no_grad():
            return clip.text_model.embeddings.token_embedding(ids.to(clip.logit_scale.device)).detach().clone()
    return torch.randn(args.n_ctx, d) * 0.02


class CoOpContext(nn.Module):
    """Full-rank learnable context P (n, d): n*d tunable parameters."""

    def __init__(self, p_init: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(p_init.clone())                              # (n, d)

    def forward(self) -> torch.Tensor:
        return self.ctx


class RLPContext(nn.Module):
    """P = P_fr + Dropout(P_A @ P_B)  (RLP, Sec. 3): P_fr frozen (CoOp init), P_A (n, r), P_B (r, d) tunable.

    P_B starts at 0 so P == P_fr at init (training starts from the hand-crafted prompt); P_A ~ N(0, std).
    Dropout acts on the low-rank branch only and is the identity in eval mode."""
    # DEVIATION: the summary initialises P_A and P_B with small Gaussians (P ~ P_fr); the issue asks for
    # P == P_fr exactly, so P_B = 0 as in LoRA (P_A random, or no gradient would ever reach P_B).

    def __init__(self, p_init: torch.Tensor, rank: int, dropout: float, init_std: float):
        super().__init__()
        n, d = p_init.shape
        self.register_buffer("P_fr", p_init.clone())                        # (n, d) frozen full-rank branch
        self.P_A = nn.Parameter(torch.randn(n, rank, device=p_init.device) * init_std)    # (n, r)
        self.P_B = nn.Parameter(torch.zeros(rank, d, device=p_init.device))               # (r, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        return self.P_fr + self.dropout(self.P_A @ self.P_B)                 # (n, d)


class PromptCLIP(nn.Module):
    """Frozen CLIP + an optional learnable context. forward(prompts, img) -> logits (B, C)."""

    def __init__(self, clip: CLIPModel, context: Optional[nn.Module]):
        super().__init__()
        self.clip, self.context = clip, context

    def text_features(self, prompts: ClassPrompts) -> torch.Tensor:
        ctx = self.context() if self.context is not None else None           # (n, d)
        return F.normalize(encode_text(self.clip, prompts.assemble(ctx), prompts.eos), dim=-1)  # (C, p)

    def forward(self, prompts: ClassPrompts, img: torch.Tensor, txt: Optional[torch.Tensor] = None) -> torch.Tensor:
        txt = self.text_features(prompts) if txt is None else txt
        return self.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ txt.t()   # cos * exp(logit_scale)


def build_prompt_model(kind: str, clip: CLIPModel, tok, args: Args) -> PromptCLIP:
    if kind == "zeroshot":
        return PromptCLIP(clip, None)
    p_init = init_context(clip, tok, args).to(clip.logit_scale.device)
    if kind == "coop":
        return PromptCLIP(clip, CoOpContext(p_init))
    return PromptCLIP(clip, RLPContext(p_init, args.rank, args.rlp_dropout, args.rlp_init_std))


def make_prompts(kind: str, clip, tok, classnames, dataset: str, n_ctx: int) -> ClassPrompts:
    if kind == "zeroshot":
        return ClassPrompts(clip, tok, classnames, TEMPLATES[dataset], 0)
    return ClassPrompts(clip, tok, classnames, " ".join(["X"] * n_ctx) + " {}.", n_ctx)


def expected_trainable(kind: str) -> set:
    return {"zeroshot": set(), "coop": {"context.ctx"}, "rlp": {"context.P_A", "context.P_B"}}[kind]


# ----------------------------------------------------------------------------------------------
# Tiny CLIP: config-built, contrastively pre-trained on the synthetic world (cached)
# DEVIATION: offline default only (no hub): a random CLIP cannot name unseen classes, so a 2+2-layer CLIP
# (width 64, 96x96 images in a 3x3 grid of 32px patches) is pre-trained on another world's captions first.
# ----------------------------------------------------------------------------------------------
BENCH_WORLD, PRETRAIN_WORLD = 0, 1000    # world seeds: benchmark (data.load_records default) / pre-training
PRETRAIN_VERSION = 2                      # bump when the pre-training recipe changes (invalidates the cache)


def tiny_tokenizer():
    return data.build_tokenizer(list(data.synthetic_vocab()) + ["photo", "x"])   # + the prompt words it lacks


def tiny_config(tok, width: int, image_size: int, patch: int) -> CLIPConfig:
    # data.py's [EOS] is id 2, which HF's CLIPTextModel treats as "legacy: pool at argmax(id)"; like CLIP's
    # EOT, the tiny model's [EOS] gets the highest id instead (one extra embedding row), so both agree.
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=len(tok))
    return CLIPConfig(
        text_config=dict(vocab_size=len(tok) + 1, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48,
                         projection_dim=width, **ids),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch, projection_dim=width),
        projection_dim=width)


def pil_to_uint8(images, image_size: int) -> torch.Tensor:
    """list of PIL -> (B, 3, H, W) uint8."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size)), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def to_pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(127.5).sub(1.0)                                     # [-1, 1]


def image_embeds(clip: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)   # (B, p)


def pretrain_records(n: int, image_size: int) -> list:
    """Captioned scenes (1-3 objects, 5 captions each) of a different world than the benchmark's, so
    pre-training never sees a benchmark image (few-shot train or test images of shapes_cls)."""
    assert PRETRAIN_WORLD != BENCH_WORLD
    return data.load_records("shapes_caption", "train", world_seed=PRETRAIN_WORLD, image_size=image_size,
                             split_sizes={"train": n, "val": 1, "test": 1})


def scene_key(rec: dict) -> tuple:
    """Scenes with the same (colour, shape) objects match each other's captions: contrastive positives."""
    return tuple(sorted((o["color"], o["shape"]) for o in rec["meta"]["scene"]["objects"]))


def load_tiny_clip(args: Args, device, rank: int):
    """Build the tiny CLIP and pre-train it once (cached under cache_dir/rlp/, keyed by a hash of its settings)."""
    tok, image_size = tiny_tokenizer(), args.tiny_image
    cfg = tiny_config(tok, args.tiny_width, image_size, args.tiny_patch)
    key = json.dumps([PRETRAIN_VERSION, args.tiny_width, args.tiny_patch, image_size, args.pretrain_steps, args.pretrain_batch,
                      args.pretrain_lr, args.pretrain_images, sorted(tok.get_vocab().items())])
    path = os.path.join(args.cache_dir, "rlp", f"tiny_clip_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    if not os.path.exists(path) and rank == 0:
        t0 = time.time()
        clip = pretrain_tiny(args, tok, cfg, device, image_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({"state_dict": clip.state_dict()}, path)
        print(f"pre-trained tiny CLIP in {time.time() - t0:.0f}s, cached at {path}")
    if dist.is_initialized():
        dist.barrier()
    clip = CLIPModel(cfg)
    clip.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    return clip.to(device).eval(), tok


def pretrain_tiny(args: Args, tok, cfg: CLIPConfig, device, image_size: int) -> CLIPModel:
    """CLIP's symmetric InfoNCE on (image, one of its captions); scenes with the same objects are positives."""
    torch.manual_seed(0)
    rng = random.Random(0)
    recs = pretrain_records(args.pretrain_images, image_size)
    keys = {}
    key_ids = torch.tensor([keys.setdefault(scene_key(r), len(keys)) for r in recs], device=device)
    pixels = torch.cat([pil_to_uint8([data.load_image(r, image_size) for r in recs[i:i + 500]], image_size)
                        for i in tqdm(range(0, len(recs), 500), desc="render pre-training images")])
    clip = CLIPModel(cfg).to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=args.pretrain_lr, weight_decay=0.05)
    T = args.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / T)))
    bar = tqdm(range(T), desc="pre-train tiny CLIP")
    for step in bar:
        idx = torch.randint(len(recs), (args.pretrain_batch,))
        texts = [rng.choice(recs[i]["captions"]) for i in idx.tolist()]
        ids, eos = tokenize(tok, texts, cfg.text_config.max_position_embeddings, cfg.text_config.eos_token_id)
        img = F.normalize(image_embeds(clip, to_pixels(pixels[idx].to(device))), dim=-1)      # (B, p)
        txt = F.normalize(encode_text(clip, clip.text_model.embeddings.token_embedding(ids.to(device)), eos), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.t()                          # (B, B)
        k = key_ids[idx.to(device)]
        same = (k[:, None] == k[None, :]).float()                                               # (B, B)
        target = same / same.sum(1, keepdim=True)                                               # symmetric
        loss = -0.5 * ((target * logits.log_softmax(1)).sum(1).mean() + (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip.eval()


def load_hf_clip(name: str, device):
    from transformers import AutoTokenizer
    try:
        clip = CLIPModel.from_pretrained(name)
    except OSError as e:
        raise UsageError(f"cannot load CLIP model '{name}' ({str(e).splitlines()[0]}); pass a local path or --model tiny")
    if not hasattr(getattr(getattr(clip, "text_model", None), "embeddings", None), "token_embedding"):
        raise UsageError(f"model '{name}' has no text_model.embeddings.token_embedding (CLIPTextModel); rlp.py needs a CLIP model")
    return clip.to(device).eval(), AutoTokenizer.from_pretrained(name)


# ----------------------------------------------------------------------------------------------
# Image features: frozen tower, computed once per split
# ----------------------------------------------------------------------------------------------
class FeatureBank:
    """image_id -> frozen, projected image embedding. Tiny: computed here and memoised in memory. HF CLIP:
    data.extract_features(pooled=True), cached on disk per (dataset, split label)."""
    # DEVIATION: CoOp trains on random-resized-crop + flip views; the frozen image tower's features are
    # computed once from the plain image instead, so a training step is a text pass plus a matmul.

    def __init__(self, args: Args, clip: CLIPModel, device, rank: int):
        self.args, self.clip, self.device, self.rank, self.memo = args, clip, device, rank, {}

    @torch.no_grad()
    def __call__(self, records, label: str) -> torch.Tensor:
        if self.args.model == "tiny":
            todo = list({r["image_id"]: r for r in records if r["image_id"] not in self.memo}.values())
            size = self.clip.config.vision_config.image_size
            for i in tqdm(range(0, len(todo), 128), desc=f"image features {label}", disable=self.rank != 0 or not todo):
                chunk = todo[i:i + 128]
                emb = image_embeds(self.clip, to_pixels(pil_to_uint8([data.load_image(r, size) for r in chunk], size).to(self.device)))
                self.memo.update({r["image_id"]: e.float().cpu() for r, e in zip(chunk, emb)})
            return torch.stack([self.memo[r["image_id"]] for r in records])            # (N, p)
        kw = dict(encoder=self.args.model, pooled=True, cache_dir=os.path.join(self.args.cache_dir, "features"),
                  dataset=self.args.dataset, split=label, image_size=self.clip.config.vision_config.image_size,
                  device=str(self.device))
        feats, rows = data.extract_features(records, **kw)      # under DDP rank 0 extracts, the others wait
        return feats[rows, 0].float()                                                  # (N, p)


# ----------------------------------------------------------------------------------------------
# Infrastructure: devices, DDP, checkpoints
# ----------------------------------------------------------------------------------------------
def setup_device(args: Args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, world


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteLoss(RuntimeError):
    pass


def lr_factor(step: int, total: int, warmup: int, lr: float, warmup_lr: float) -> float:
    """CoOp schedule: constant warmup_lr for `warmup` steps, then cosine from lr to 0 over `total` steps."""
    # DEVIATION: Dassl steps the cosine once per epoch; here once per step (same curve, smoother).
    if step < warmup:
        return warmup_lr / lr
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_prompt(args, job, model, prompts, feats, labels, seed, device, rank, world, log) -> int:
    """SGD on the context parameters with cross-entropy over the class logits. Returns steps done."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = data.make_loader(torch.utils.data.TensorDataset(feats, labels), args.batch_size, shuffle=True,
                              seed=seed, num_workers=args.num_workers)
    spe = len(loader)
    total = args.epochs * spe
    stop = total if args.max_steps < 0 else min(total, args.max_steps)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, args.warmup_epochs * spe, args.lr, args.warmup_lr))
    ckpt = os.path.join(args.out_dir, job, "ckpt.pt")
    step = 0
    if args.resume and os.path.exists(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(st["trainable"][n])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        set_rng_state(st["rng"])
        log({"job": job, "event": "resumed", "step": step})

    def save():
        if rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            atomic_save({"trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                         "epoch": step // spe, "rng": rng_state()}, ckpt)

    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    model.train()
    bar = tqdm(total=stop, initial=step, desc=f"train {job}", disable=rank != 0)
    try:
        while step < stop:
            epoch, skip = divmod(step, spe)
            data.set_epoch(loader, epoch)               # order = f(seed, epoch): resume = same epoch, skip seen batches
            for i, (x, y) in enumerate(loader):
                if i < skip:
                    continue
                x, y = x.to(device), y.to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(prompts, x)
                loss = F.cross_entropy(logits.float(), y)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                        f"{ckpt if os.path.exists(ckpt) else 'none'}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == stop:
                    log({"job": job, "step": step, "epoch": step / spe, "loss": round(loss.item(), 5),
                         "lr": opt.param_groups[0]["lr"]})
                if step % args.save_every == 0:
                    save()
                if step >= stop:
                    break
    except KeyboardInterrupt:
        save()
        log({"job": job, "event": "interrupted", "step": step, "checkpoint": ckpt})
        raise
    finally:
        bar.close()
    save()
    if world > 1:                                   # DDP keeps replicas identical: check it
        flat = torch.cat([p.detach().flatten() for p in params]).to(device)
        ref = flat.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(flat, ref), "DDP replicas diverged"
    model.eval()
    return step


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: PromptCLIP, prompts: ClassPrompts, feats: torch.Tensor, labels: torch.Tensor, device) -> float:
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        txt = model.text_features(prompts)                                              # (C, p)
        preds = torch.cat([model(prompts, feats[i:i + 1024].to(device), txt).argmax(1).cpu()
                           for i in range(0, len(feats), 1024)])
    return data.accuracy(preds.tolist(), labels.tolist())


def mean_std(xs):
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_table(summary: dict, protocol: str) -> str:
    rows = [("method", "base" if protocol == "base2new" else "all", "new", "HM", "tunable")]
    for k, s in summary.items():
        rows.append((k, f"{s['base_mean']:.2f} ± {s['base_std']:.2f}",
                     f"{s['new_mean']:.2f} ± {s['new_std']:.2f}" if protocol == "base2new" else "-",
                     f"{s['hm']:.2f}" if protocol == "base2new" else "-", str(s["tunable"])))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([lines[0], "-+-".join("-" * x for x in w)] + lines[1:])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def load_split(args: Args, split: str, subset: str, seed: int, shots: Optional[int]):
    recs = data.load_records(args.dataset, split, args.data_root, seed=seed, num_shots=shots, subset=subset)
    names = data.classnames_of(recs)
    for r in recs:
        if names[r["label"]] != r["classname"]:
            raise data.DataError(f"class name mismatch in {args.dataset}/{split}: label {r['label']} is "
                                 f"{names[r['label']]!r} in the class list but {r['classname']!r} for {r['id']}")
    return recs, names


def check_same_classes(a, b, what: str) -> None:
    if a != b:
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        got = (a[i] if i < len(a) else None, b[i] if i < len(b) else None)
        raise data.DataError(f"class name mismatch ({what}): label {i} is {got[0]!r} in train but {got[1]!r} in test")


def run(args: Args) -> dict:
    args.dataset = canonical_dataset(args.dataset)
    if args.protocol not in ("base2new", "all"):
        raise UsageError(f"--protocol must be base2new or all, got '{args.protocol}'")
    if args.compare or args.prompt is None:
        kinds = ["zeroshot", "coop", "rlp"]
    elif args.prompt in ("zeroshot", "coop", "rlp"):
        kinds = [args.prompt]
    else:
        raise UsageError(f"unknown --prompt '{args.prompt}' (zeroshot | coop | rlp)")
    if args.model == "auto":
        args.model = "tiny" if args.dataset == "shapes_cls" else HF_DEFAULT
    if args.model == "tiny" and args.dataset != "shapes_cls":
        raise UsageError("--model tiny knows only the synthetic world's words; use it with --dataset shapes_cls")
    if args.epochs < 0:
        args.epochs = 50 if args.dataset == "imagenet" else 200
    tag = "compare" if len(kinds) > 1 else kinds[0]
    args.out_dir = args.out_dir or os.path.join("runs", "rlp", f"{args.dataset}-{tag}-{args.protocol}-{args.shots}shot")
    device, rank, world = setup_device(args)
    res_path = os.path.join(args.out_dir, "results.json")
    if os.path.exists(res_path) and not (args.resume or args.overwrite):
        raise UsageError(f"results exist in {args.out_dir}; pass --overwrite (or --resume)")
    if rank == 0 and args.overwrite and os.path.isdir(args.out_dir):
        for e in os.listdir(args.out_dir):
            if e in ("results.json", "metrics.jsonl") or e.startswith(tuple(f"{k}-seed" for k in ("zeroshot", "coop", "rlp"))):
                p = os.path.join(args.out_dir, e)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    seeds = list(range(args.seed, args.seed + args.num_seeds))

    # data first (bad inputs fail before any model is loaded)
    test_subsets = ("base", "new") if args.protocol == "base2new" else ("all",)
    train_subset = "base" if args.protocol == "base2new" else "all"
    test = {s: load_split(args, "test", s, 0, None) for s in test_subsets}
    trains = {sd: load_split(args, "train", train_subset, sd, args.shots) for sd in seeds}
    for sd, (_, names) in trains.items():
        check_same_classes(names, test[train_subset][1], f"seed {sd}")

    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)

    def log(rec: dict) -> None:
        if rank == 0:
            tqdm.write(" ".join(f"{k}={v}" for k, v in rec.items()))
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    t0 = time.time()
    if args.model == "tiny":
        clip, tok = load_tiny_clip(args, device, rank)
    else:
        clip, tok = load_hf_clip(args.model, device)
    clip.requires_grad_(False)
    bank = FeatureBank(args, clip, device, rank)
    test_feats = {s: (bank(r, f"test-{s}"), torch.tensor([x["label"] for x in r])) for s, (r, _) in test.items()}

    per_seed = {k: [] for k in kinds}
    n_ctx = init_context(clip, tok, args).shape[0]
    for kind in kinds:
        for sd in seeds:
            job = f"{kind}-seed{sd}"
            jres = os.path.join(args.out_dir, job, "result.json")
            seed_everything(sd)
            model = build_prompt_model(kind, clip, tok, args).to(device)
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            assert names == expected_trainable(kind), f"trainable params {names} != {expected_trainable(kind)}"
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in model.parameters())
            if sd == seeds[0] and rank == 0:
                print(f"trainable: {n_train} || all: {n_all} || {100 * n_train / n_all:.4f}%   ({kind})")
            tr_recs, tr_names = trains[sd]
            steps = 0
            if kind != "zeroshot":
                target = args.epochs * math.ceil(math.ceil(len(tr_recs) / world) / args.batch_size)  # = len(loader)
                target = target if args.max_steps < 0 else min(target, args.max_steps)
                if args.resume and os.path.exists(jres) and json.load(open(jres)).get("steps") == target:
                    per_seed[kind].append(json.load(open(jres)))
                    continue
                feats = bank(tr_recs, f"train-{train_subset}-{args.shots}shot-seed{sd}")
                labels = torch.tensor([r["label"] for r in tr_recs])
                steps = train_prompt(args, job, model, make_prompts(kind, clip, tok, tr_names, args.dataset, n_ctx),
                                     feats, labels, sd, device, rank, world, log)
            res = {"job": job, "prompt": kind, "seed": sd, "steps": steps, "tunable": n_train}
            for s, (recs, names) in test.items():
                res[s] = evaluate(model, make_prompts(kind, clip, tok, names, args.dataset, n_ctx), *test_feats[s], device)
            if args.protocol == "base2new":
                res["hm"] = data.harmonic_mean(res["base"], res["new"])
            log(res)
            if rank == 0:
                os.makedirs(os.path.dirname(jres), exist_ok=True)
                with open(jres, "w") as f:
                    json.dump(res, f)
            per_seed[kind].append(res)

    summary = {}
    first = "base" if args.protocol == "base2new" else "all"
    for kind, rs in per_seed.items():
        bm, bs = mean_std([r[first] for r in rs])
        s = {"base_mean": bm, "base_std": bs, "tunable": rs[0]["tunable"], "per_seed": rs}
        if args.protocol == "base2new":
            s["new_mean"], s["new_std"] = mean_std([r["new"] for r in rs])
            s["hm"] = data.harmonic_mean(s["base_mean"], s["new_mean"])   # HM of the mean accuracies, as the tables
        summary[kind] = s
    result = {"dataset": args.dataset, "model": args.model, "protocol": args.protocol, "shots": args.shots,
              "seeds": seeds, "epochs": args.epochs, "methods": summary, "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        table = format_table(summary, args.protocol)
        print(f"\n{args.dataset} ({args.model}), {args.protocol}, {args.shots} shots, seeds {seeds}\n{table}")
        atomic_write_json(result, res_path)
    return result


def atomic_write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (data.DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted: checkpoint saved; rerun with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
