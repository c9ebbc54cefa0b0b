"""rlp.py -- Re-parameterized Low-rank Prompts (RLP) for CLIP, with CoOp and zero-shot CLIP as baselines.

Paper: "Towards Efficient Vision-Language Tuning: More Information Density, More Generalizability"
(arXiv 2312.10813). Baseline: CoOp, "Learning to Prompt for Vision-Language Models" (arXiv 2109.01134).
CoOp replaces the words "a photo of a" in the prompt "[SOS] a photo of a <class>. [EOS]" of a frozen CLIP text
encoder by a learned full-rank context P (n x d). RLP re-parameterises it as P = P_fr + Dropout(P_A P_B),
P_fr the frozen CoOp initialisation, P_A (n x r), P_B (r x d): n*r + r*d tunable parameters (516 at n=4, r=1,
d=512) instead of n*d (2048), and claims better generalisation from the base classes to new classes.

Equation -> code
    P = P_fr + Dropout(P_A P_B)                       RLPContext.forward
    P (n x d), all of it tunable (CoOp)               CoOpContext
    w_c = g([SOS] P name_c . [EOS]), g frozen         ClassPrompts.assemble, encode_text
    p(y = c | x) = softmax_c(tau cos(f(x), w_c))      PromptCLIP.forward
    base-to-new H = 2 B N / (B + N)                   format_table (of the mean accuracies, as the tables)
Unknown (the paper's text is not at hand): r and p, here flags (--rank 1: the paper's 0.5K parameters;
--rlp_dropout 0.1), and whether prompts also enter the image tower (here: text side only, as CoOp).

Offline default: a tiny CLIP pre-trained on captioned scenes of another synthetic world (cached) stands in
for ViT-B/16 on shapes_cls (48 "colour shape" classes). Base classes are the circles, squares and triangles,
new classes the stars, crosses and diamonds, so each new class name holds a word never seen in tuning, as with
real datasets (--shapes_split checker: data.py's split, where new names recombine the words of base names).

  python rlp.py                                # zero-shot vs CoOp vs RLP, base-to-new, seed 1
  python rlp.py --seeds 1,2,3                  # the same, mean ± std over the paper's three seeds
  python rlp.py --sweep --seeds 1,2,3          # r, p, epochs, shots, CoOp n=4 / n=16: one at a time
  python rlp.py --dataset OxfordPets --data_root $DATA --seeds 1,2,3     # openai/clip-vit-base-patch16
  torchrun --nproc_per_node 2 rlp.py --prompt rlp --rank 2 --rlp_dropout 0.3
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

import data


# ---------------------------------------------------------------------- the method: a context for CLIP's text
class RLPContext(nn.Module):
    """P = P_fr + Dropout(P_A @ P_B)  (RLP, Sec. 3): P_fr frozen (CoOp init), P_A (n, r), P_B (r, d) tunable.

    P_B starts at 0 so P == P_fr at init (training starts from the hand-crafted prompt); P_A ~ N(0, std).
    Dropout acts on the low-rank branch only and is the identity in eval mode."""
    # DEVIATION: the summary initialises P_A and P_B with small Gaussians (P ~ P_fr); here P == P_fr exactly
    # at init, so P_B = 0 as in LoRA (P_A random, or no gradient would ever reach P_B).

    def __init__(self, p_init: torch.Tensor, rank: int, dropout: float, init_std: float):
        super().__init__()
        n, d = p_init.shape
        self.register_buffer("P_fr", p_init.clone())                        # (n, d) frozen full-rank branch
        self.P_A = nn.Parameter(torch.randn(n, rank, device=p_init.device) * init_std)    # (n, r)
        self.P_B = nn.Parameter(torch.zeros(rank, d, device=p_init.device))               # (r, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        return self.P_fr + self.dropout(self.P_A @ self.P_B)                 # (n, d)


class CoOpContext(nn.Module):
    """CoOp: a full-rank learnable context P (n, d), n*d tunable parameters."""

    def __init__(self, p_init: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(p_init.clone())                              # (n, d)

    def forward(self) -> torch.Tensor:
        return self.ctx


TEMPLATES = {  # zero-shot CLIP: CoOp's hand-crafted template per dataset (zsclip.CUSTOM_TEMPLATES)
    "shapes_cls": "a photo of a {}.", "imagenet": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.", "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.", "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "sun397": "a photo of a {}.",
    "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}."}


class ClassPrompts(nn.Module):
    """Frozen token embeddings of "[SOS] X..X name. [EOS]" for C classes (CoOp class_token_position='end').
    assemble(ctx) puts a context (n, d) in the n placeholder slots -> (C, L, d); n_ctx=0: the template."""

    def __init__(self, clip: CLIPModel, tok, classnames, template: str, n_ctx: int):
        super().__init__()
        ids, eos = tokenize(tok, [template.format(c.replace("_", " ")) for c in classnames], clip)
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
        ctx = ctx.unsqueeze(0).expand(len(self.prefix), -1, -1).to(self.prefix.dtype)       # (C, n, d)
        return torch.cat([self.prefix, ctx, self.suffix], 1)


def encode_text(clip: CLIPModel, token_embeds: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower from token embeddings (C, L, d) -> projected [EOS] features (C, p): what
    CLIPModel.get_text_features computes after the token lookup, so that a learned context can be put in."""
    tm, L = clip.text_model, token_embeds.shape[1]
    h = token_embeds + tm.embeddings.position_embedding.weight[:L]            # (C, L, d)
    mask = torch.full((L, L), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
    for layer in tm.encoder.layers:                                           # causal self-attention
        out = layer(h, mask)
        h = out[0] if isinstance(out, tuple) else out                          # (C, L, d)
    h = tm.final_layer_norm(h)
    return clip.text_projection(h[torch.arange(len(h), device=h.device), eos.to(h.device)])   # (C, p)


class PromptCLIP(nn.Module):
    """Frozen CLIP + an optional learned context. forward(prompts, img) -> logits (B, C)."""

    def __init__(self, clip: CLIPModel, context: Optional[nn.Module]):
        super().__init__()
        self.clip, self.context = clip, context

    def text_features(self, prompts: ClassPrompts) -> torch.Tensor:
        ctx = self.context() if self.context is not None else None           # (n, d)
        return F.normalize(encode_text(self.clip, prompts.assemble(ctx), prompts.eos), dim=-1)  # (C, p)

    def forward(self, prompts: ClassPrompts, img: torch.Tensor, txt: Optional[torch.Tensor] = None):
        txt = self.text_features(prompts) if txt is None else txt
        return self.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ txt.t()   # tau cos(f(x), w_c), (B, C)


def build_prompt_model(kind: str, clip: CLIPModel, tok, a: Args) -> tuple[PromptCLIP, int]:
    """-> (model, the method's analytic number of tunable parameters). P's init is CoOp's: the embeddings
    of --ctx_init's words (n = their count), or N(0, 0.02^2) with n = --n_ctx."""
    if kind == "zeroshot":
        return PromptCLIP(clip, None), 0
    p_init = torch.randn(a.n_ctx, clip.config.text_config.hidden_size) * 0.02                 # (n, d)
    if a.ctx_init:
        ids, eos = tokenize(tok, [a.ctx_init], clip)
        p_init = clip.text_model.embeddings.token_embedding(ids[0, 1:eos[0]]).detach()   # no [SOS], [EOS]
    (n, d), r, p_init = p_init.shape, a.rank, p_init.to(clip.logit_scale.device)
    if kind == "coop":
        return PromptCLIP(clip, CoOpContext(p_init)), n * d
    return PromptCLIP(clip, RLPContext(p_init, r, a.rlp_dropout, a.rlp_init_std)), n * r + r * d


def tokenize(tok, texts, clip: CLIPModel):
    """-> ids (C, L), eos (C,): "[SOS] words [EOS]" right-padded to the longest text (not to CLIP's 77: the
    [EOS] features are the same, the text tower being causal); eos = the position of [EOS]."""
    enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt",
              max_length=clip.config.text_config.max_position_embeddings)
    return enc["input_ids"], enc["attention_mask"].sum(1) - 1


# ---------------------------------------------------------------------- offline stand-in: a tiny CLIP
# DEVIATION: ViT-B/16 needs the hub. Offline, a 2+2-layer CLIP (width 64; 48x48 images, a 3x3 grid of 16-px
# patches, one per object position) is pre-trained with CLIP's contrastive loss on captioned scenes of world
# data.PRETRAIN_WORLD (the benchmark is world 0: no benchmark image is seen), half of them with one object,
# half with 1-3; the captions include "a photo of ..." so that CoOp's init means something, as in CLIP.
PRETRAIN_WORLD = getattr(data, "PRETRAIN_WORLD", 1000)  # TODO(data.py): data.PRETRAIN_WORLD once it lands
TINY_CLIP = dict(width=64, layers=2, heads=4, image_size=48, patch=16, scenes=2000, steps=1000, batch=64,
                 lr=2e-3, weight_decay=0.05, warmup=50)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SHAPES_TEST_IMAGES = 1920  # 40 per class (data.py's default 500 leaves ~10: one image would be 0.4 points)


def tiny_tokenizer():
    """data.py's word-level tokenizer + the prompt words it lacks, "<s> ... <eot>" around each text. data.py's
    [EOS] is id 2, which HF's CLIPTextModel reads as legacy "pool at argmax(id)"; <eot> has the highest id."""
    tok = data.build_tokenizer(list(data.synthetic_vocab()) + ["photo", "x"])
    tok.add_special_tokens({"eos_token": "<eot>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A <eot>", special_tokens=[("<s>", tok.bos_token_id), ("<eot>", tok.eos_token_id)])
    return tok


def tiny_config(tok, width: int, layers: int, heads: int, image_size: int, patch: int, **_) -> CLIPConfig:
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads, projection_dim=width)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    text = dict(vocab_size=len(tok), max_position_embeddings=48, **tower, **ids)
    vision = dict(image_size=image_size, patch_size=patch, **tower)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def scene_captions(scene: dict) -> list:
    """-> ["a photo of a red circle and a blue star.", "a small red circle and a large blue star.", ...]"""
    where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}
    things = [[f"{o['color']} {o['shape']}", f"{o['size']} {o['color']} {o['shape']}",
               f"{o['color']} {o['shape']} " + where.get(o["pos"], "on the " + o["pos"])]
              for o in scene["objects"]]
    a = [[("an " if t[0] in "aeiou" else "a ") + t for t in ts] for ts in zip(*things)]        # per style
    join = [x[0] if len(x) == 1 else ", ".join(x[:-1]) + " and " + x[-1] for x in a]
    return [f"a photo of {join[0]}.", f"{join[1]}.", f"there is {join[2]}."]


def pretrain_tiny_clip(tok, cfg: CLIPConfig, device) -> CLIPModel:
    """CLIP's symmetric InfoNCE on (image, one of its captions); scenes of the same objects are positives."""
    rc, rng = TINY_CLIP, random.Random(0)
    torch.manual_seed(0)
    kw = dict(world_seed=PRETRAIN_WORLD, image_size=rc["image_size"],
              split_sizes={"train": rc["scenes"] // 2, "val": 1, "test": 1})
    recs = data.load_records("shapes_cls", "train", **kw) + data.load_records("shapes_caption", "train", **kw)
    captions = [scene_captions(r["meta"]["scene"]) + r.get("captions", []) for r in recs]
    objects = [tuple(sorted((o["color"], o["shape"]) for o in r["meta"]["scene"]["objects"])) for r in recs]
    key = torch.from_numpy(np.unique([str(o) for o in objects], return_inverse=True)[1])    # same: positives
    x = torch.from_numpy(np.stack([np.asarray(data.load_image(r, rc["image_size"])) for r in recs])) / 255
    images = ((x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    clip = CLIPModel(cfg).to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=rc["lr"], weight_decay=rc["weight_decay"])
    sched = lr_schedule(opt, rc["warmup"], rc["steps"])
    for _ in tqdm(range(rc["steps"]), desc="pre-train the tiny CLIP", mininterval=10):
        idx = torch.randint(len(recs), (rc["batch"],))
        ids = tokenize(tok, [rng.choice(captions[i]) for i in idx.tolist()], clip)[0].to(device)
        logits = clip(input_ids=ids, pixel_values=images[idx].to(device)).logits_per_image     # (B, B)
        same = (key[idx, None] == key[None, idx]).float().to(device)
        target = same / same.sum(1, keepdim=True)                                               # symmetric
        loss = -((target * logits.log_softmax(1)).sum(1) + (target * logits.log_softmax(0)).sum(0)).mean() / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clip.eval()


def load_clip(a: Args, device, rank: int):
    """-> (CLIP, tokenizer, name): a HF CLIP, or the tiny CLIP, pre-trained once and cached by its recipe."""
    if a.model != "tiny":
        try:
            clip, tok = CLIPModel.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
            return clip.to(device), tok, a.model
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load CLIP model '{a.model}' ({str(e).splitlines()[0]})")
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, **TINY_CLIP)
    key = json.dumps([TINY_CLIP, PRETRAIN_WORLD, data.DATA_VERSION, sorted(tok.get_vocab().items())])
    path = os.path.join(a.cache_dir, "rlp", f"tiny_clip_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {"state_dict": pretrain_tiny_clip(tok, cfg, device).state_dict()})
    if dist.is_initialized():
        dist.barrier()
    clip = CLIPModel(cfg)
    clip.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    return clip.to(device), tok, "rlp-" + Path(path).stem


# ---------------------------------------------------------------------- data -> frozen image features
def load_split(a: Args, split: str, subset: str, seed: int, shots: Optional[int]):
    """-> (records, class names) of one split and class subset ("base" or "new")."""
    kw = dict(seed=seed, num_shots=shots)
    if a.dataset == "shapes_cls" and split == "test":
        kw["split_sizes"] = {"train": 2000, "val": 200, "test": SHAPES_TEST_IMAGES}
    if a.dataset == "shapes_cls" and a.shapes_split == "shape":
        # TODO(data.py): a base/new split option. Base = circles, squares, triangles (labels: base names
        # sorted, then new names sorted); k-shot sampling before the class subset, as data.py does.
        recs = data.load_records(a.dataset, split, **kw)
        order = sorted(data.classnames_of(recs), key=lambda n: (n.split()[1] not in data.SHAPES[:3], n))
        names = order[:24] if subset == "base" else order[24:]
        recs = [dict(r, label=names.index(r["classname"]), meta=dict(r["meta"], classnames=names))
                for r in recs if r["classname"] in names]
    else:
        recs = data.load_records(a.dataset, split, a.data_root, subset=subset, **kw)
    return recs, data.classnames_of(recs)


@dataclass
class Env:
    """What every run of one command shares."""
    clip: CLIPModel
    tok: object
    name: str                                    # the CLIP's name in the feature cache
    device: torch.device
    rank: int
    world: int
    test: dict = field(default_factory=dict)     # "base" / "new" -> (features (N, p), labels (N,), names)


@torch.no_grad()
def image_features(a: Args, env: Env, records, split: str, train: bool):
    """-> (records, frozen projected image features (N, p)) from data.extract_features (cached on disk);
    training records whose image is unreadable are dropped."""
    # DEVIATION: CoOp trains on random-resized-crop + flip views; the features are computed once from the
    # plain image instead, so a training step is a text pass plus a matmul.
    tiny = {"model": copy.deepcopy(env.clip)} if a.model == "tiny" else {}   # data.py sets its device, dtype
    size, cache = env.clip.config.vision_config.image_size, os.path.join(a.cache_dir, "features")
    feats, rows, missing = data.extract_features(records, env.name, dataset=a.dataset, split=split,
                                                 train=train, pooled=True, image_size=size, cache_dir=cache,
                                                 device=str(env.device), progress=False, **tiny)
    if train:
        records, rows = data.drop_missing(records, rows, missing)
    return records, feats[rows, 0].float()                                                    # (N, p)


# ---------------------------------------------------------------------- training and evaluation
def train(a: Args, model: PromptCLIP, prompts: ClassPrompts, feats, labels, seed: int, ckpt: str, env: Env):
    """SGD on the context with cross-entropy over the class logits (CoOp's recipe). -> the steps done."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = data.make_loader(torch.utils.data.TensorDataset(feats, labels), a.batch_size, shuffle=True,
                              seed=seed, num_workers=a.num_workers)
    spe = len(loader)
    total = a.epochs * spe
    stop = total if a.max_steps is None else min(total, a.max_steps)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)              # CoOp's (Dassl's)
    # CoOp: one epoch at a constant 1e-5, then cosine to 0  # DEVIATION: stepped per iteration, not per epoch
    sched = lr_schedule(opt, spe, total, "constant", "cosine", 1e-5 / a.lr)
    step = 0
    if a.resume and os.path.exists(ckpt):
        state = load_checkpoint(ckpt)
        step = restore(model, state, a)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def save():
        if env.rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            trainable = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(ckpt, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step, "rng":
                                   rng_state(), "scheduler": sched.state_dict(), "setting": setting_of(a)})
    net = model if env.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device] if env.device.type == "cuda" else None)
    model.train()
    try:
        while step < stop:
            epoch, skip = divmod(step, spe)
            data.set_epoch(loader, epoch)            # order = f(seed, epoch): a resumed run skips what it saw
            for i, (x, y) in enumerate(loader):
                if i < skip:
                    continue
                with autocast(env.device):
                    logits = net(prompts, x.to(env.device))                                    # (B, C)
                loss = F.cross_entropy(logits.float(), y.to(env.device))
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                        f"{ckpt if os.path.exists(ckpt) else 'none'}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % spe == 0:                  # a checkpoint per epoch
                    save()
                if step == stop:
                    break
    except KeyboardInterrupt:
        save()
        raise
    save()
    return step


def setting_of(a: Args) -> dict:
    """The flags that a checkpoint must agree with, to be resumed or evaluated."""
    return {k: v for k, v in dataclasses.asdict(a).items() if k not in (
        "max_steps", "resume", "overwrite", "eval_only", "device", "num_workers", "out_dir", "cache_dir")}


def restore(model: PromptCLIP, state: dict, a: Args) -> int:
    """Put a checkpoint's context into the model -> its step."""
    if state["setting"] != setting_of(a):
        diff = {k: v for k, v in state["setting"].items() if setting_of(a).get(k) != v}
        raise UsageError(f"the checkpoint was trained with other flags ({diff}); pass the same flags")
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["trainable"][k])
    return state["step"]


@torch.no_grad()
def accuracy(model: PromptCLIP, prompts: ClassPrompts, feats: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    txt = model.text_features(prompts)                                                       # (C, p)
    return data.accuracy(model(prompts, feats.to(txt.device), txt).argmax(1).tolist(), labels.tolist())


def run_one(kind: str, a: Args, seed: int, tag: str, env: Env, log) -> dict:
    """Train (unless zero-shot or --eval_only) and evaluate one prompt learner with one seed."""
    seed_everything(seed)
    model, expected = build_prompt_model(kind, env.clip, env.tok, a)
    count_trainable(model.to(env.device), expected, log)
    recs, x = image_features(a, env, load_split(a, "train", "base", seed, a.shots)[0],
                             f"train-base-{a.shots}shot-seed{seed}", train=True)
    y = torch.tensor([r["label"] for r in recs])
    n_ctx = 0 if model.context is None else len(model.context())
    template = "X " * n_ctx + "{}." if n_ctx else TEMPLATES[a.dataset]          # "X X X X {}.": P's slots
    prompts = {s: ClassPrompts(env.clip, env.tok, env.test[s][2], template, n_ctx) for s in env.test}
    ckpt = os.path.join(a.out_dir, f"seed{seed}", tag, "ckpt.pt")
    steps = 0
    if kind != "zeroshot":
        steps = restore(model, load_checkpoint(ckpt), a) if a.eval_only else train(
            a, model, prompts["base"], x, y, seed, ckpt, env)
    res = {s: accuracy(model, prompts[s], *env.test[s][:2]) for s in env.test}
    return dict(res, train=accuracy(model, prompts["base"], x, y), tunable=expected, steps=steps, seed=seed)


# ---------------------------------------------------------------------- the comparison, the sweep, the table
def settings(a: Args) -> list:
    """[(label, prompt kind, Args)]: the comparison, or the sweep: one factor at a time around the default
    (r, p, epochs x4, shots 1 and 4) and CoOp with n=4 "a photo of a" and n=16 random (CoOp's strongest)."""
    coop = f"CoOp n={a.n_ctx} " + ("init" if a.ctx_init else "rand")
    main = [("zero-shot", "zeroshot", a), (coop, "coop", a), (f"RLP r={a.rank} p={a.rlp_dropout}", "rlp", a)]
    if not a.sweep:
        return [m for m in main if a.prompt in (None, m[1])]
    out = main[:2] + [("CoOp n=16 rand", "coop", dataclasses.replace(a, n_ctx=16, ctx_init=""))] + main[2:]
    trained, r = out[1:], dataclasses.replace
    out += [(f"RLP r={k}", "rlp", r(a, rank=k)) for k in (1, 2, 4) if k != a.rank]
    out += [(f"RLP p={p}", "rlp", r(a, rlp_dropout=p)) for p in (0.0, 0.1, 0.3, 0.5) if p != a.rlp_dropout]
    out += [(f"{lab}, epochs x4", k, r(s, epochs=4 * a.epochs)) for lab, k, s in trained]
    return out + [(f"{lab}, {n} shots", k, r(s, shots=n)) for n in (1, 4) for lab, k, s in trained]


def format_table(rows: list, head: str) -> str:
    """rows: [(label, [one result dict per seed])] -> a table of 'mean ± std' cells, HM of the means."""
    lines = [[head, "base", "new", "HM", "train", "tunable"]]
    for label, rs in rows:
        hm = data.harmonic_mean(np.mean([r["base"] for r in rs]), np.mean([r["new"] for r in rs]))
        lines.append([label] + [mean_std([r[c] for r in rs]) for c in ("base", "new")] + [f"{hm:.2f}"]
                     + [mean_std([r["train"] for r in rs]), str(rs[0]["tunable"])])
    w = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in lines]
    return "\n".join([text[0], "-+-".join("-" * x for x in w)] + text[1:])


# ---------------------------------------------------------------------- command line
def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    dataset: str = arg("shapes_cls", "shapes_cls or a CoOp dataset: imagenet, oxford_pets, dtd, eurosat, ...")
    data_root: Optional[str] = arg(None, "root of the CoOp-layout datasets")
    model: str = arg("auto", "tiny | a HF CLIP id or path; auto: tiny for shapes_cls, else ViT-B/16")
    prompt: Optional[str] = arg(None, "zeroshot | coop | rlp; unset: all three in one table")
    compare: bool = arg(False, "zero-shot, CoOp and RLP in one table (as leaving --prompt unset)")
    sweep: bool = arg(False, "r, p, epochs x4, shots 1 / 4 and CoOp n=16, one at a time")
    shapes_split: str = arg("shape", "shapes_cls base / new classes: shape (new = other shapes) | checker")
    shots: int = arg(16, "training images per base class (CoCoOp: 16)")
    seed: int = arg(1, "seed of a single run")
    seeds: Optional[str] = arg(None, "comma-separated seeds, e.g. 1,2,3 (the paper's): mean ± std")
    n_ctx: int = arg(4, "context length n of a random init (--ctx_init '')")
    ctx_init: str = arg("a photo of a", "words that initialise P (n = their count); '': random")
    rank: int = arg(1, "RLP rank r (not in the summary; 1 gives the paper's 0.5K parameters)")
    rlp_dropout: float = arg(0.1, "RLP dropout ratio p on P_A P_B (not in the summary)")
    rlp_init_std: float = arg(0.5, "std of P_A at init (P_B = 0); 0.5 = 1/sqrt(n): steps as large as CoOp's")
    epochs: Optional[int] = arg(None, "auto: CoOp's 50 for ImageNet, 200 otherwise")
    max_steps: Optional[int] = arg(None, "stop each run after N steps (the schedule still spans --epochs)")
    batch_size: int = arg(32, "batch size per process (CoOp: 32)")
    lr: float = arg(0.002, "SGD learning rate (CoOp: 0.002)")
    device: str = arg("auto", "auto | cpu | cuda")
    out_dir: Optional[str] = arg(None, "auto: runs/rlp/<dataset>-<mode>-<hash of the flags>")
    resume: bool = arg(False, "continue the runs in --out_dir")
    overwrite: bool = arg(False, "replace a finished run in --out_dir")
    eval_only: bool = arg(False, "evaluate the checkpoints in --out_dir without training")
    num_workers: int = arg(0, "DataLoader workers (the features are in memory: 0 is best)")
    cache_dir: Optional[str] = arg(None, "auto: data.cache_dir()")


def resolve(a: Args) -> tuple[Args, list]:
    """Check the flags, fill in the automatic values -> (args, seeds)."""
    coop_names = {k.replace("_", ""): k for k in TEMPLATES} | {"flowers102": "oxford_flowers"}   # OxfordPets
    a.dataset = coop_names.get(a.dataset.lower().replace("_", "").replace("-", ""), a.dataset)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip().isdigit()] if a.seeds else [a.seed]
    valid = {"dataset": a.dataset in TEMPLATES, "prompt": a.prompt in (None, "zeroshot", "coop", "rlp"),
             "shapes_split": a.shapes_split in ("shape", "checker"), "rlp_dropout": 0 <= a.rlp_dropout < 1,
             "seeds": len(set(seeds)) == len((a.seeds or "1").split(",")),
             "max_steps": (a.max_steps or 0) >= 0}
    for k in ("shots", "epochs", "batch_size", "rank", "n_ctx"):
        valid[k] = getattr(a, k) is None or getattr(a, k) >= 1
    for k, ok in valid.items():
        if not ok:
            raise UsageError(f"--{k} {getattr(a, k)}: not a valid value (see --help)")
    if a.model == "auto":
        a.model = "tiny" if a.dataset == "shapes_cls" else "openai/clip-vit-base-patch16"
    if a.model == "tiny" and a.dataset != "shapes_cls":
        raise UsageError("--model tiny knows only the synthetic world's words; use --dataset shapes_cls")
    a.epochs = a.epochs or (50 if a.dataset == "imagenet" else 200)
    a.cache_dir = a.cache_dir or data.cache_dir()
    if a.out_dir is None:
        digest = hashlib.sha1(json.dumps(setting_of(a), sort_keys=True).encode()).hexdigest()[:8]
        a.out_dir = f"runs/rlp/{a.dataset}-{'sweep' if a.sweep else a.prompt or 'compare'}-{digest}"
    return a, seeds


def run(a: Args) -> dict:
    a, seeds = resolve(a)
    device, rank, world = setup_device(a.device)
    pin_threads(a.model == "tiny", device)
    test = {s: load_split(a, "test", s, 0, None) for s in ("base", "new")}   # bad data fails before the model
    for s in ("base", "new"):
        train_names, test_names = load_split(a, "train", s, seeds[0], a.shots)[1], test[s][1]
        if train_names != test_names:
            raise data.DataError(f"class name mismatch: train has {sorted(set(train_names) - set(test_names))} "
                                 f"where test has {sorted(set(test_names) - set(train_names))}")
    if not a.eval_only:
        prepare_out_dir(a.out_dir, a.resume, a.overwrite, rank)
    env = Env(*load_clip(a, device, rank), device, rank, world)
    env.clip.eval().requires_grad_(False)
    for s, (recs, names) in test.items():
        recs, x = image_features(a, env, recs, f"test-{s}", train=False)
        env.test[s] = (x, torch.tensor([r["label"] for r in recs]), names)
    rows = []
    for label, kind, s in settings(a):
        tag, rs = label.lower().replace(" ", "").replace(",", "-") if a.sweep else kind, []
        for seed in seeds:
            log = (lambda msg, lab=label: print(f"{lab}: {msg}")) if rank == 0 and seed == seeds[0] else None
            rs.append(run_one(kind, s, seed, tag, env, log or (lambda msg: None)))
            if rank == 0:
                print(f"{label}, seed {seed}: {json.dumps(rs[-1])}", file=sys.stderr)
        rows.append((label, rs))
    split = f" ({a.shapes_split} split)" if a.dataset == "shapes_cls" else ""
    title = f"{a.dataset} ({a.model}), base-to-new{split}, {a.shots} shots, {a.epochs} epochs, seeds {seeds}"
    table = format_table(rows, "setting" if a.sweep else "method")
    if rank == 0:
        print(f"\n{title}\n{table}")
    if rank == 0 and not a.eval_only:
        write_json(os.path.join(a.out_dir, "results.json"), {"setting": title, "results": dict(rows)})
    return {"args": dataclasses.asdict(a), "results": dict(rows), "table": table}


def main(argv=None) -> dict:
    return run_cli(run, parse_cli(Args, argv, __doc__.split("\n\n")[0]))


# ==============================================================================================
# Infrastructure -- the same text in every method file (tests/test_infrastructure.py checks it)
# ==============================================================================================
class UsageError(Exception):
    """Bad input (a flag, path, model or checkpoint): one 'error: ...' line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: training stops, the last good checkpoint stays, exit code 1."""


def parse_cli(cls, argv=None, description: str = ""):
    """An `Args` dataclass from the command line: one --flag per field; 'auto' or 'none' -> None."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        kind, helptext = str(f.type), f.metadata.get("help", "")
        if kind == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
            continue
        base = {"int": int, "float": float}.get(kind.replace("Optional[", "").rstrip("]"), str)
        conv = (lambda s, b=base: None if s.lower() in ("auto", "none") else b(s)) if "Optional" in kind else base
        p.add_argument(f"--{f.name}", type=conv, default=f.default, help=f"{helptext} (default: {f.default})")
    return cls(**vars(p.parse_args(argv)))


def setup_device(device: str):
    """-> (torch.device, rank, world_size). Under torchrun: DDP process group, nccl on GPU, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else device
        torch.cuda.set_device(torch.device(device))
    return torch.device(device), rank, world


def pin_threads(tiny: bool, device: torch.device) -> None:
    """Tiny models run single-threaded on CPU: the same numbers on every run, whatever the load."""
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, warmup: str = "linear",
                decay: str = "cosine", warmup_factor: float = 0.0):
    """LambdaLR: warm-up ('linear' from 0, or 'constant' at warmup_factor x lr as in CoOp), then
    'cosine' or 'linear' decay to 0 at total_steps ('none': constant)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps if warmup == "linear" else warmup_factor
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1.0 - t, "none": 1.0}[decay]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Keys: trainable, optimizer, scheduler, step, rng (+ the script's own)."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def prepare_out_dir(out_dir: str, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """A finished run (results.json) is kept unless --overwrite, which removes only this script's outputs."""
    if os.path.exists(os.path.join(out_dir, "results.json")) and not (resume or overwrite):
        raise UsageError(f"{out_dir} holds a finished run (results.json); pass --overwrite to replace it")
    if rank == 0 and overwrite and not resume and os.path.isdir(out_dir):
        for p in Path(out_dir).rglob("*"):
            if p.is_file() and (p.name in ("results.json", "metrics.jsonl") or p.suffix == ".pt"):
                p.unlink()
    os.makedirs(out_dir, exist_ok=True)


def count_trainable(model: nn.Module, expected: Optional[int] = None, log=print) -> tuple[int, int]:
    """Print 'trainable: N || all: M || P%' (shared parameters counted once); assert N == expected."""
    params = list(model.parameters())  # de-duplicated by nn.Module
    n, m = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    log(f"trainable: {n:,} || all: {m:,} || {100 * n / m:.4f}%")
    assert expected is None or n == expected, f"{n:,} trainable parameters, the method has {expected:,}"
    return n, m


def mean_std(values) -> str:
    """'mean ± std' over seeds (sample std; '± 0.00' for one seed)."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def run_cli(run, args):
    """run(args) with the exit codes every script shares: bad input 2, non-finite loss 1, Ctrl-C 130."""
    threads = torch.get_num_threads()
    try:
        return run(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted: the checkpoint is saved; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (the tests)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
# ==============================================================================================
# End of infrastructure
# ==============================================================================================


if __name__ == "__main__":
    main()
