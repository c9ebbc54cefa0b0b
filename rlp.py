"""rlp.py -- Re-parameterized Low-rank Prompts (RLP) for CLIP, with CoOp and zero-shot CLIP as baselines.

"Towards Efficient Vision-Language Tuning: More Information Density, More Generalizability" (2312.10813).
CoOp (2109.01134) learns the context P (n x d) that replaces "a photo of a" in "[SOS] a photo of a <class>.
[EOS]", the prompt of a frozen CLIP text encoder. RLP re-parameterises it as P = P_fr + Dropout(P_A P_B), P_fr
the frozen CoOp init, P_A (n x r), P_B (r x d): n*r + r*d tunable parameters (516 at n=4, r=1, d=512) instead
of n*d (2048), and claims better generalisation from the base classes it is tuned on to new classes.
Equation -> code
    P = P_fr + Dropout(P_A P_B)                       RLPContext.forward
    P (n x d), all of it tunable (CoOp)               CoOpContext
    w_c = g([SOS] P name_c . [EOS]), g frozen         ClassPrompts.assemble, encode_text
    p(y = c | x) = softmax_c(tau cos(f(x), w_c))      PromptCLIP.forward
    base-to-new H = 2 B N / (B + N)                   format_table (of the mean accuracies, as the tables)
Unknown (the paper's text is not at hand): r and p, here flags (--rank 1: the paper's 0.5K parameters;
--rlp_dropout 0.1), and whether prompts also enter the image tower (here: text side only, as CoOp).

Offline default: a tiny CLIP pre-trained on captioned scenes of another synthetic world (cached) stands in
for ViT-B/16 on shapes_cls (48 "colour shape" classes). Base classes: circles, squares, triangles; new: stars,
crosses, diamonds, so each new class name holds a word never seen in tuning, as with real datasets
(--shapes_split checker: data.py's split, where new class names recombine the words of base class names).
  python rlp.py [--seeds 1,2,3]            # zero-shot vs CoOp vs RLP, base-to-new (seed 1, or mean ± std)
  python rlp.py --sweep --seeds 1,2,3      # r, p, epochs, shots, CoOp n=4 / n=16: one at a time
  python rlp.py --dataset OxfordPets --data_root $DATA --seeds 1,2,3      # openai/clip-vit-base-patch16
  torchrun --nproc_per_node 2 rlp.py --prompt rlp --rank 2 --rlp_dropout 0.3
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
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
    "shapes_cls": "a photo of a {}.", "imagenet": "a photo of a {}.", "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.", "stanford_cars": "a photo of a {}.", "dtd": "{} texture.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.", "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.", "ucf101": "a photo of a person doing {}."}


class ClassPrompts(nn.Module):
    """Frozen token embeddings of "[SOS] X..X name. [EOS]" for C classes (CoOp class_token_position='end').
    assemble(ctx) puts a context (n, d) in the n placeholder slots -> (C, L, d); n_ctx=0: the template."""
    def __init__(self, clip: CLIPModel, tok, classnames, template: str, n_ctx: int):
        super().__init__()
        ids, eos = tokenize(tok, [template.format(c.replace("_", " ")) for c in classnames], clip)
        if n_ctx and not (ids[:, 1:1 + n_ctx] == ids[0, 1]).all():
            raise UsageError(f"the context placeholder does not tokenize to {n_ctx} single tokens")
        emb = clip.text_model.embeddings.token_embedding(ids.to(clip.logit_scale.device)).detach()  # frozen
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
        h = layer(h, mask)                                                    # (C, L, d)
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

    def forward(self, prompts: ClassPrompts, img: torch.Tensor) -> torch.Tensor:    # tau cos(f(x), w_c)
        return self.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ self.text_features(prompts).t()


def build_prompt_model(kind: str, clip: CLIPModel, tok, a: Args) -> tuple[PromptCLIP, int, int]:
    """-> (model, its analytic number of tunable parameters, n). P's init (CoOp's): ctx_init or N(0, .02^2)"""
    if kind == "zeroshot":
        return PromptCLIP(clip, None), 0, 0
    p_init = torch.randn(a.n_ctx, clip.config.text_config.hidden_size) * 0.02                 # (n, d)
    if a.ctx_init:
        ids, eos = tokenize(tok, [a.ctx_init], clip)
        if tok.unk_token_id in ids[0, 1:eos[0]].tolist():
            raise UsageError(f"--ctx_init {a.ctx_init!r}: a word the tokenizer does not know")
        p_init = clip.text_model.embeddings.token_embedding(ids[0, 1:eos[0]]).detach()   # no [SOS], [EOS]
    (n, d), r, p_init = p_init.shape, a.rank, p_init.to(clip.logit_scale.device)
    if kind == "coop":
        return PromptCLIP(clip, CoOpContext(p_init)), n * d, n
    # P_A ~ N(0, 1/n): P_A P_A^T ~ 1 on its span, so an SGD step moves P about as far as CoOp's (chosen)
    return PromptCLIP(clip, RLPContext(p_init, r, a.rlp_dropout, n ** -0.5)), n * r + r * d, n


def tokenize(tok, texts, clip: CLIPModel):
    """-> ids (C, L), eos (C,): "[SOS] words [EOS]" right-padded to the longest text (not to 77: causal)."""
    enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt",
              max_length=clip.config.text_config.max_position_embeddings)
    return enc["input_ids"], enc["attention_mask"].sum(1) - 1


# DEVIATION: ViT-B/16 needs the hub. Offline, a 2+2-layer CLIP (width 64; 48x48 images, a 3x3 grid of 16-px
# patches) is pre-trained with CLIP's loss on scenes of world data.PRETRAIN_WORLD (the benchmark is world 0),
# half with 1 object, half with 1-3, captioned "a photo of a red circle.", ... (so CoOp's init is meaningful).
TINY_CLIP = dict(width=64, layers=2, heads=4, image_size=48, patch=16, scenes=2000, steps=1000, batch=64,
                 lr=2e-3, weight_decay=0.05, warmup=50)
SHAPES_TEST_IMAGES = 1920  # 40 per class (data.py's default 500 leaves ~10: one image would be 0.4 points)


def scene_captions(scene: dict) -> list:
    """-> ["a photo of a red circle and a blue star.", "an image with a red circle and a blue star.", ...]"""
    where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}
    things = [[f"{o['color']} {o['shape']}", f"{o['size']} {o['color']} {o['shape']}",
               f"{o['color']} {o['shape']} " + where.get(o["pos"], "on the " + o["pos"])]
              for o in scene["objects"]]
    a = [[("an " if t[0] in "aeiou" else "a ") + t for t in ts] for ts in zip(*things)]        # per style
    join = [x[0] if len(x) == 1 else ", ".join(x[:-1]) + " and " + x[-1] for x in a]
    return [f"a photo of {join[0]}.", f"an image with {join[0]}.", f"{join[1]}.", f"there is {join[2]}."]


def pretrain(clip: CLIPModel, tok, seed: int) -> CLIPModel:
    """CLIP's symmetric InfoNCE on (image, one of its captions); scenes of the same objects are positives."""
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
    sched = lr_schedule(opt, rc["warmup"], rc["steps"])
    for _ in tqdm(range(rc["steps"]), desc="pre-train the tiny CLIP", mininterval=10):
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
    return clip


def load_clip(a: Args, device, rank: int):
    """-> (CLIP, tokenizer, name): a HF CLIP, or the tiny CLIP, pre-trained once (on CPU) and cached."""
    if a.model != "tiny":
        try:
            clip, tok = CLIPModel.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
            return clip.to(device).eval().requires_grad_(False), tok, a.model
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load CLIP model '{a.model}' ({str(e).splitlines()[0]})")
    # the tiny CLIP's tokenizer puts "<s> ... <eot>" around each text: data.py's [EOS] is id 2, which HF's
    # CLIPTextModel reads as legacy "pool at argmax(id)"; <eot> is the last id
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
    torch.manual_seed(a.clip_seed)                                   # the tiny CLIP's init and batches
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=w))
    key = json.dumps([TINY_CLIP, a.clip_seed, data.PRETRAIN_WORLD, data.DATA_VERSION, sorted(tok.vocab)])
    name = f"tiny_clip_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    path = data.stand_in(os.path.join(a.cache_dir, "rlp", name))  # the shipped copy, else the cache
    if rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {"state_dict": pretrain(clip, tok, a.clip_seed).state_dict()})
    if dist.is_initialized():
        dist.barrier()
    clip.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    return clip.to(device).eval().requires_grad_(False), tok, "rlp-" + Path(path).stem


def load_split(a: Args, split: str, subset: str, seed: int, shots: Optional[int]):
    """-> (records, class names) of one split and class subset ("base" or "new")."""
    kw = dict(seed=seed, num_shots=shots, shapes_split=a.shapes_split)  # shapes_split: shapes_cls only
    if a.dataset == "shapes_cls" and split == "test":
        kw["split_sizes"] = {"train": 2000, "val": 200, "test": SHAPES_TEST_IMAGES}
    recs = data.load_records(a.dataset, split, a.data_root, subset=subset, **kw)
    return recs, data.classnames_of(recs)


@dataclasses.dataclass
class Env:  # what every run of one command shares
    clip: CLIPModel
    tok: object
    name: str                                    # the CLIP's name in the feature cache
    device: torch.device
    rank: int
    test: dict = dataclasses.field(default_factory=dict)  # "base", "new" -> (features, labels, class names)


@torch.no_grad()
def image_features(a: Args, env: Env, records, split: str, train: bool):
    """-> frozen image features (N, p), cached, and labels (N,); unreadable training images are dropped."""
    # DEVIATION: features of the plain image, computed once (CoOp trains on random-crop + flip views)
    tiny = {"model": copy.deepcopy(env.clip)} if a.model == "tiny" else {}   # data.py sets its device, dtype
    size, cache = env.clip.config.vision_config.image_size, os.path.join(a.cache_dir, "features")
    feats, rows, missing = data.extract_features(records, env.name, dataset=a.dataset, split=split,
                                                 train=train, pooled=True, image_size=size, cache_dir=cache,
                                                 device=str(env.device), progress=False, **tiny)
    if train:
        records, rows = data.drop_missing(records, rows, missing)
    return feats[rows, 0].float(), torch.tensor([r["label"] for r in records])               # (N, p), (N,)


IN_PATH = ("prompt", "seed")  # a checkpoint's folder names its prompt kind and seed: not in its setting


def train(a: Args, model: PromptCLIP, prompts: ClassPrompts, feats, labels, seed: int, ckpt: str, env: Env):
    """SGD on the context with cross-entropy over the class logits (CoOp's recipe). -> the steps done."""
    loader = data.make_loader(torch.utils.data.TensorDataset(feats, labels), a.batch_size, shuffle=True,
                              seed=seed, num_workers=a.num_workers)
    spe, total = len(loader), a.epochs * len(loader)
    stop = total if a.max_steps is None else min(total, a.max_steps)
    params, setting = [p for p in model.parameters() if p.requires_grad], setting_of(a, *IN_PATH)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)              # CoOp's (Dassl's)
    # CoOp: one epoch at a constant 1e-5, then cosine to 0  # DEVIATION: stepped per iteration, not per epoch
    sched = lr_schedule(opt, spe, total, "constant", "cosine", 1e-5 / a.lr)
    state = load_checkpoint(ckpt, model, setting) if a.resume and os.path.exists(ckpt) else None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    step = state["step"] if state is not None else 0

    def save():
        if env.rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            trainable = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(ckpt, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step, "rng":
                                   rng_state(), "scheduler": sched.state_dict(), "setting": setting})
    net = model if not dist.is_initialized() else nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device] if env.device.type == "cuda" else None)
    model.train()
    try:
        while step < stop:
            epoch, skip = divmod(step, spe)
            data.set_epoch(loader, epoch)            # order = f(seed, epoch): a resumed run skips what it saw
            for x, y in itertools.islice(loader, skip, None):
                with whole_step():
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


def run_one(kind: str, a: Args, seed: int, tag: str, env: Env, log) -> dict:
    """Train (unless zero-shot or --eval_only) and evaluate one prompt learner with one seed."""
    seed_everything(seed)
    model, expected, n_ctx = build_prompt_model(kind, env.clip, env.tok, a)
    count_trainable(model.to(env.device), expected, log)
    x, y = image_features(a, env, load_split(a, "train", "base", seed, a.shots)[0],
                          f"train-base-{a.shots}shot-seed{seed}", train=True)
    template = "X " * n_ctx + "{}." if n_ctx else TEMPLATES[a.dataset]          # "X X X X {}.": P's slots
    ckpt = os.path.join(a.out_dir, f"seed{seed}", tag, "ckpt.pt")
    res = dict(seed=seed, tunable=expected, steps=0)
    if kind != "zeroshot" and a.eval_only:
        res["steps"] = load_checkpoint(ckpt, model, setting_of(a, *IN_PATH))["step"]
    elif kind != "zeroshot":
        prompts = ClassPrompts(env.clip, env.tok, env.test["base"][2], template, n_ctx)
        res["steps"] = train(a, model, prompts, x, y, seed, ckpt, env)
    with torch.no_grad():                                  # accuracy on the test classes and the train shots
        for s, (feats, labels, names) in dict(env.test, train=(x, y, env.test["base"][2])).items():
            prompts = ClassPrompts(env.clip, env.tok, names, template, n_ctx)
            logits = model.eval()(prompts, feats.to(env.device))
            res[s] = data.accuracy(logits.argmax(1).tolist(), labels.tolist())
    return res


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
    return out + [(f"{lab}, shots={n}", k, r(s, shots=n)) for n in (1, 4) for lab, k, s in trained]


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


def arg(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_cls", "shapes_cls or a CoOp dataset: imagenet, oxford_pets, dtd, eurosat, ...")
    data_root: Optional[str] = arg(None, "root of the CoOp-layout datasets")
    model: str = arg("auto", "tiny | a HF CLIP id or path; auto: tiny for shapes_cls, else ViT-B/16")
    prompt: Optional[str] = arg(None, "zeroshot | coop | rlp; unset: all three in one table")
    sweep: bool = arg(False, "r, p, epochs x4, shots 1 / 4 and CoOp n=16, one at a time")
    shapes_split: str = arg("shape", "shapes_cls base / new classes: shape (new = other shapes) | checker")
    shots: int = arg(16, "training images per base class (CoCoOp: 16)")
    seed: int = arg(1, "seed of a single run")
    seeds: Optional[str] = arg(None, "comma-separated seeds, e.g. 1,2,3 (the paper's): mean ± std")
    n_ctx: Optional[int] = arg(None, "context length n; auto: the words of --ctx_init, else 4 (random P)")
    ctx_init: str = arg("a photo of a", "words that initialise P (n = their count); '': random")
    rank: int = arg(1, "RLP rank r (not in the summary; 1 gives the paper's 0.5K parameters)")
    rlp_dropout: float = arg(0.1, "RLP dropout ratio p on P_A P_B (not in the summary)")
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
    clip_seed: int = arg(0, "--model tiny: seed of its pre-training (another seed, another stand-in)")


def resolve(a: Args) -> tuple[Args, list]:
    """Check the flags, fill in the automatic values -> (args, seeds)."""
    a.dataset = {k.replace("_", ""): k for k in TEMPLATES}.get(a.dataset.lower().replace("_", ""), a.dataset)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    valid = {"dataset": a.dataset in TEMPLATES, "prompt": a.prompt in (None, "zeroshot", "coop", "rlp"),
             "shapes_split": a.shapes_split in ("shape", "checker")}
    for k in ("shots", "epochs", "batch_size", "rank", "n_ctx"):
        valid[k] = getattr(a, k) is None or getattr(a, k) >= 1
    for k in [k for k, ok in valid.items() if not ok][:1]:                    # the first bad flag
        raise UsageError(f"--{k} {getattr(a, k)}: not a valid value (see --help)")
    a.ctx_init, words = a.ctx_init.strip(), len(a.ctx_init.split())
    if a.n_ctx is not None and words and a.n_ctx != words:
        raise UsageError(f"--n_ctx {a.n_ctx}: --ctx_init has {words} words; add --ctx_init '' for a random P")
    a.n_ctx = a.n_ctx or words or 4
    if a.model == "auto":
        a.model = "tiny" if a.dataset == "shapes_cls" else "openai/clip-vit-base-patch16"
    if a.model == "tiny" and a.dataset != "shapes_cls":
        raise UsageError("--model tiny knows only the synthetic world's words; use --dataset shapes_cls")
    a.epochs = a.epochs or (50 if a.dataset == "imagenet" else 200)
    a.cache_dir = a.cache_dir or data.cache_dir()
    if a.out_dir is None:
        flags = dict(setting_of(a), data_root=a.data_root, seeds=a.seeds)   # a folder per setting and seeds
        digest = hashlib.sha1(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]
        a.out_dir = f"runs/rlp/{a.dataset}-{'sweep' if a.sweep else a.prompt or 'compare'}-{digest}"
    return a, seeds


def run(a: Args) -> dict:
    a, seeds = resolve(a)
    device, rank, _ = setup_device(a.device, tiny=a.model == "tiny")
    test = {s: load_split(a, "test", s, 0, None) for s in ("base", "new")}   # bad data fails before the model
    for s in ("base", "new"):
        tr, te = load_split(a, "train", s, seeds[0], a.shots)[1], test[s][1]
        if tr != te:
            raise data.DataError(f"class name mismatch: train has {sorted(set(tr) - set(te))} where test has "
                                 f"{sorted(set(te) - set(tr))}")
    prepare_out_dir(a.out_dir, a.resume or a.eval_only, a.overwrite, rank)
    env = Env(*load_clip(a, device, rank), device, rank)
    for s, (recs, names) in test.items():
        env.test[s] = (*image_features(a, env, recs, f"test-{s}", train=False), names)
    clear_outputs(a, rank)  # --overwrite: only now that the inputs have loaded
    rows = []
    for label, kind, s in settings(a):
        tag = label.lower().replace(" ", "").replace(",", "-") if a.sweep else kind
        log = (lambda msg, lab=label: print(f"{lab}: {msg}")) if rank == 0 else (lambda msg: None)
        rows.append((label, [run_one(kind, s, seed, tag, env, log) for seed in seeds]))
    model = f"tiny CLIP {a.clip_seed}, {a.shapes_split} split" if a.model == "tiny" else a.model
    title = f"{a.dataset} ({model}), base-to-new, {a.shots} shots, {a.epochs} epochs, seeds {seeds}"
    table = format_table(rows, "setting" if a.sweep else "method")
    if rank == 0:
        print(f"\n{title}\n{table}")
    if rank == 0 and not a.eval_only:
        write_json(os.path.join(a.out_dir, "results.json"), {"setting": title, "results": dict(rows)})
    return {"args": dataclasses.asdict(a), "results": dict(rows), "table": table}


def main(argv=None) -> dict:
    return run_cli(run, parse_cli(Args, argv, __doc__.split("\n\n")[0]))


# Infrastructure -- the same text in every method file (tests/test_infrastructure.py checks it) ==============
UsageError = data.UsageError  # bad input -> one 'error: ...' line, exit 2, in every script (DataError too)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf: training stops, the last good checkpoint stays, exit code 1."""


def parse_cli(cls, argv=None, description: str = ""):
    """An `Args` dataclass from the command line: one --flag per field; 'auto' or 'none' -> None."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        kind, text = str(f.type), f.metadata.get("help", "")
        if kind == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=text)
            continue
        conv = {"int": int, "float": float}.get(kind.replace("Optional[", "").rstrip("]"), str)
        if "Optional" in kind:
            conv = lambda s, b=conv: None if s.lower() in ("auto", "none") else b(s)  # noqa: E731
        p.add_argument(f"--{f.name}", type=conv, default=f.default, help=f"{text} (default: {f.default})")
    return cls(**vars(p.parse_args(argv)))


def setup_device(device: str, tiny: bool = False):
    """-> (torch.device, rank, world_size). Under torchrun: DDP process group, nccl on GPU, gloo on CPU.
    Tiny models run single-threaded on CPU: the same numbers on every run, whatever the load."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:<index>")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 else device
        torch.cuda.set_device(torch.device(device))
    elif tiny:
        torch.set_num_threads(1)
    return torch.device(device), dist.get_rank() if world > 1 else 0, world


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
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


@contextlib.contextmanager
def whole_step():
    """A Ctrl-C inside a training step takes effect at its end: the checkpoint then saved resumes exactly."""
    held, old = [], signal.getsignal(signal.SIGINT)
    hold = old is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if hold:
        signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        if hold:
            signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(state, f"{path}.tmp-{os.getpid()}")
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def setting_of(args, *ignore: str) -> dict:
    """The flags a checkpoint must agree with: all but the run controls and `ignore` (a script's flags that
    change only the evaluation or the logging)."""
    skip = ("max_steps", "resume", "overwrite", "eval_only", "device", "num_workers", "out_dir", "cache_dir",
            "data_root", "seeds", *ignore)
    return {k: v for k, v in vars(args).items() if k not in skip}


def load_checkpoint(path: str, model: Optional[nn.Module] = None, setting: Optional[dict] = None) -> dict:
    """Keys: trainable, optimizer, scheduler, step, rng, setting (+ the script's own). With `model` and its
    `setting` (setting_of): a checkpoint of the same flags and tensor sizes only, loaded into `model`."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if model is not None:
        old, trained = state.get("setting", {}), {n: t.shape for n, t in state["trainable"].items()}
        diff = [f"--{k} {old.get(k)} (now {setting.get(k)})" for k in sorted({**old, **setting})
                if old.get(k) != setting.get(k)]
        if diff or trained != {n: p.shape for n, p in model.named_parameters() if p.requires_grad}:
            raise UsageError(f"{path} was trained with other flags: {', '.join(diff[:3]) or 'other sizes'}")
        model.load_state_dict(state["trainable"], strict=False)  # the frozen weights are not saved
    return state


def write_json(path: str, obj) -> None:
    Path(f"{path}.tmp-{os.getpid()}").write_text(json.dumps(obj, indent=2))
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def prepare_out_dir(out_dir: str, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """A run in out_dir (a results.json or checkpoint in it) is kept unless --resume or --overwrite."""
    held = [p for p in Path(out_dir).rglob("*") if p.name == "results.json" or p.suffix == ".pt"]
    if held and not (resume or overwrite):
        raise UsageError(f"{out_dir} holds a run ({held[0].relative_to(out_dir)}); pass --resume to continue "
                         "it or --overwrite to replace it")
    os.makedirs(out_dir, exist_ok=True)


def clear_outputs(args, rank: int = 0) -> None:
    """--overwrite (not with --resume / --eval_only), called once the inputs have loaded (bad input loses
    nothing): this script's outputs in args.out_dir go."""
    clear = args.overwrite and not (args.resume or args.eval_only) and rank == 0
    for p in Path(args.out_dir).rglob("*") if clear else []:
        if p.is_file() and (p.name in ("results.json", "metrics.jsonl") or p.suffix == ".pt"):
            p.unlink()


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
    """run(args) after the flag rules all scripts share; exit: bad input 2, non-finite loss 1, Ctrl-C 130."""
    threads, seeds = torch.get_num_threads(), (getattr(args, "seeds", None) or "0").split(",")
    try:
        rules = {"lr": ("> 0", lambda v: v > 0), "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
                 "num_workers": (">= 0", lambda v: v >= 0)}  # by the end of a flag's name
        for k, v in vars(args).items():
            rule = next((r for end, r in rules.items() if k.endswith(end)), None)
            if rule and v is not None and not rule[1](v):
                raise UsageError(f"--{k} {v}: must be {rule[0]}")
        if not all(s.isdigit() for s in seeds) or len(set(map(int, seeds))) < len(seeds):
            raise UsageError(f"--seeds {args.seeds!r}: expected distinct integers, e.g. 0,1,2")
        return run(args)
    except (UsageError, NonFiniteLoss, OSError) as e:  # OSError: a path it cannot use
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, NonFiniteLoss) else 2)
    except KeyboardInterrupt:
        print("interrupted: the steps done are checkpointed; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (the tests)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
# End of infrastructure ======================================================================================


if __name__ == "__main__":
    main()
