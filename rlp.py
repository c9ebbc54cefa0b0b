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

Offline default: stand_ins/tiny-clip (a tiny CLIP, scripts/make_stand_ins.py) stands in for ViT-B/16 on
shapes_cls (48 "colour shape" classes). Base classes: circles, squares, triangles; new: stars, crosses,
diamonds, so each new class name holds a word never seen in tuning, as with real datasets.
  python rlp.py [--seeds 1,2,3]            # zero-shot vs CoOp vs RLP, base-to-new (seed 1, or mean ± std)
  python rlp.py --sweep --seeds 1,2,3      # r, p, epochs, shots, CoOp n=4 / n=16: one at a time
  python rlp.py --dataset OxfordPets --data_root $DATA --seeds 1,2,3      # openai/clip-vit-base-patch16
  torchrun --nproc_per_node 2 rlp.py --prompt rlp --rank 2 --rlp_dropout 0.3
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, CLIPModel

import data
from data import UsageError, arg  # bad input: one 'error: ...' line, exit 2; an Args field


# ---------------------------------------------------------------------- the method: a context for CLIP's text
class RLPContext(nn.Module):
    """P = P_fr + Dropout(P_A @ P_B)  (RLP, Sec. 3): P_fr frozen (CoOp init), P_A (n, r), P_B (r, d) tunable;
    dropout on the low-rank branch only (the identity in eval mode)."""
    # DEVIATION: the summary draws P_A and P_B from small Gaussians (P ~ P_fr); here P_B = 0 as in LoRA, so
    # training starts from the hand-crafted prompt exactly (P_A ~ N(0, std), or no gradient reaches P_B).

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

    def forward(self, prompts: ClassPrompts, img: torch.Tensor) -> torch.Tensor:    # tau cos(f(x), w_c)
        ctx = self.context() if self.context is not None else None           # (n, d)
        w = F.normalize(encode_text(self.clip, prompts.assemble(ctx), prompts.eos), dim=-1)     # (C, p)
        return self.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ w.t()


def build_prompt_model(kind: str, clip: CLIPModel, tok, a: Args) -> tuple[PromptCLIP, int, int]:
    """-> (model, its analytic number of tunable parameters, n). P's init (CoOp's): ctx_init or N(0, .02^2)"""
    if kind == "zeroshot":
        return PromptCLIP(clip, None), 0, 0
    p_init = torch.randn(a.n_ctx, clip.config.text_config.hidden_size) * 0.02                 # (n, d)
    if a.ctx_init:
        ids, eos = tokenize(tok, [a.ctx_init], clip)
        p_init = clip.text_model.embeddings.token_embedding(ids[0, 1:eos[0]]).detach()   # no [SOS], [EOS]
    (n, d), r, p_init = p_init.shape, a.rank, p_init.to(clip.logit_scale.device)
    if kind == "coop":
        return PromptCLIP(clip, CoOpContext(p_init)), n * d, n
    # P_A ~ N(0, 1/n): P_A P_A^T ~ 1 on its span, so an SGD step moves P about as far as CoOp's (chosen)
    return PromptCLIP(clip, RLPContext(p_init, r, a.rlp_dropout, n ** -0.5)), n * r + r * d, n


def tokenize(tok, texts, clip: CLIPModel):
    """-> ids (C, L), eos (C,): "[SOS] words [EOS]" right-padded to the longest text (not to 77: causal).
    A word the tokenizer does not know (a class name or --ctx_init) is an error, not an <unk>."""
    enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt",
              max_length=clip.config.text_config.max_position_embeddings)
    ids, eos = enc["input_ids"], enc["attention_mask"].sum(1) - 1
    for text, row, end in zip(texts, ids, eos):
        if tok.unk_token_id in row[1:end].tolist():
            raise UsageError(f"{text!r}: a word the tokenizer of --model does not know")
    return ids, eos


# ---------------------------------------------------------------------- CLIP, data -> frozen features
def load_clip(a: Args, device: torch.device):
    """-> (frozen CLIP, its tokenizer), loaded from a hub id or a folder (the offline stand-in is one)."""
    try:
        path = data.model_path(a.model)
        clip, tok = CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load CLIP model '{a.model}' ({str(e).splitlines()[0]})")
    return clip.to(device).eval().requires_grad_(False), tok


def load_split(a: Args, split: str, subset: str, seed: int, shots: Optional[int]):
    """-> (records, class names) of one split and class subset ("base" or "new")."""
    kw = dict(seed=seed, num_shots=shots, shapes_split=a.shapes_split)  # shapes_split: shapes_cls only
    if a.dataset == "shapes_cls" and split == "test":
        # DEVIATION: 40 test images per class, not data.py's ~10 (where one image moves a subset 0.4 points)
        kw["split_sizes"] = {"train": 2000, "val": 200, "test": 1920}
    recs = data.load_records(a.dataset, split, a.data_root, subset=subset, **kw)
    return recs, data.classnames_of(recs)


@dataclasses.dataclass
class Env:  # what every run of one command shares
    clip: CLIPModel
    tok: object
    device: torch.device
    rank: int
    args: dict                                   # the command's settings, saved in every checkpoint
    test: dict = dataclasses.field(default_factory=dict)  # "base", "new" -> (features, labels, class names)


@torch.no_grad()
def image_features(a: Args, env: Env, records, split: str, train: bool):
    """-> frozen image features (N, p), cached, and labels (N,); unreadable training images are dropped."""
    # DEVIATION: features of the plain image, computed once (CoOp trains on random-crop + flip views)
    size, cache = env.clip.config.vision_config.image_size, os.path.join(a.cache_dir, "features")
    feats, rows, missing = data.extract_features(records, data.model_path(a.model), dataset=a.dataset,
                                                 split=split, train=train, pooled=True, image_size=size,
                                                 cache_dir=cache, device=str(env.device), progress=False)
    if train:
        records, rows = data.drop_missing(records, rows, missing)
    return feats[rows, 0].float(), torch.tensor([r["label"] for r in records])               # (N, p), (N,)


# ---------------------------------------------------------------------- training and evaluation
def train(a: Args, model: PromptCLIP, prompts: ClassPrompts, feats, labels, seed: int, ckpt: str, env: Env):
    """SGD on the context with cross-entropy over the class logits (CoOp's recipe). -> the steps done."""
    loader = data.make_loader(torch.utils.data.TensorDataset(feats, labels), a.batch_size, shuffle=True,
                              seed=seed, num_workers=a.num_workers)
    spe, total = len(loader), a.epochs * len(loader)
    stop = total if a.max_steps is None else min(total, a.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)              # CoOp's (Dassl's)
    # CoOp: one epoch at a constant 1e-5, then cosine to 0  # DEVIATION: stepped per iteration, not per epoch
    sched = lr_schedule(opt, spe, total, constant_warmup=1e-5 / a.lr)
    state = load_checkpoint(ckpt, model) if a.resume and os.path.exists(ckpt) else {}   # tensors, RNG
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    step = state.get("step", 0)

    def save():
        if env.rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            trainable = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(ckpt, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step,
                                   "scheduler": sched.state_dict(), "args": env.args})
    net = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    model.train()
    try:
        while step < stop:
            epoch, skip = divmod(step, spe)
            loader.sampler.set_epoch(epoch)          # order = f(seed, epoch): a resumed run skips what it saw
            for x, y in itertools.islice(loader, skip, skip + stop - step):  # to the end or --max_steps
                with whole_step():
                    with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda"):
                        logits = net(prompts, x.to(env.device))                                    # (B, C)
                    loss = F.cross_entropy(logits.float(), y.to(env.device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                                 f"{ckpt if os.path.exists(ckpt) else 'none'}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    if step % spe == 0:                  # a checkpoint per epoch
                        save()
    except KeyboardInterrupt:
        save()
        raise
    save()
    return step


def run_one(kind: str, a: Args, seed: int, tag: str, env: Env, log) -> dict:
    """Train (unless zero-shot or --eval_only) and evaluate one prompt learner with one seed."""
    transformers.set_seed(seed)
    model, expected, n_ctx = build_prompt_model(kind, env.clip, env.tok, a)
    data.count_trainable(model.to(env.device), expected, log)
    x, y = image_features(a, env, load_split(a, "train", "base", seed, a.shots)[0],
                          f"train-base-{a.shots}shot-seed{seed}", train=True)
    template = "X " * n_ctx + "{}." if n_ctx else TEMPLATES[a.dataset]          # "X X X X {}.": P's slots
    ckpt = os.path.join(a.out_dir, f"seed{seed}", tag, "ckpt.pt")
    res = dict(seed=seed, tunable=expected, steps=0)
    if kind != "zeroshot" and a.eval_only:
        res["steps"] = load_checkpoint(ckpt, model)["step"]
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
        lines.append([label] + [data.mean_std([r[c] for r in rs]) for c in ("base", "new")] + [f"{hm:.2f}"]
                     + [data.mean_std([r["train"] for r in rs]), str(rs[0]["tunable"])])
    w = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in lines]
    return "\n".join([text[0], "-+-".join("-" * x for x in w)] + text[1:])


def seed_pairs(coop: list, rlp: list) -> str:
    """Paired by seed (the same shots drawn): in how many runs RLP's new-class accuracy beats CoOp's."""
    wins = sum(r["new"] > c["new"] for c, r in zip(coop, rlp))
    return f"RLP > CoOp on new classes in {wins} of {len(coop)} seed pairs"


# ---------------------------------------------------------------------- flags and the run
MODELS = {"shapes_cls": "stand_ins/tiny-clip"}  # DEVIATION: the synthetic world's CLIP (ViT-B/16 elsewhere)
VIT_B16 = "openai/clip-vit-base-patch16"


@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_cls", "shapes_cls or a CoOp dataset: imagenet, oxford_pets, dtd, eurosat, ...")
    data_root: Optional[str] = arg(None, "root of the CoOp-layout datasets")
    model: Optional[str] = arg(None, f"a HF CLIP id or folder (default: {MODELS['shapes_cls']} on "
                                     f"shapes_cls, else {VIT_B16})")
    prompt: Optional[str] = arg(None, "zeroshot | coop | rlp (default: all three in one table)")
    sweep: bool = arg(False, "r, p, epochs x4, shots 1 / 4 and CoOp n=16, one at a time")
    shapes_split: str = arg("shape", "shapes_cls base / new classes: shape (new = other shapes) | checker")
    shots: int = arg(16, "training images per base class (CoCoOp: 16)")
    seed: int = arg(1, "seed of a single run")
    seeds: Optional[str] = arg(None, "comma-separated seeds, e.g. 1,2,3 (the paper's): mean ± std")
    n_ctx: Optional[int] = arg(None, "context length n (default: the words of --ctx_init, else 4: random P)")
    ctx_init: str = arg("a photo of a", "words that initialise P (n = their count); '': random")
    rank: int = arg(1, "RLP rank r (not in the summary; 1 gives the paper's 0.5K parameters)")
    rlp_dropout: float = arg(0.1, "RLP dropout ratio p on P_A P_B (not in the summary)")
    epochs: Optional[int] = arg(None, "epochs (default: CoOp's 50 for imagenet, 200 otherwise)")
    max_steps: Optional[int] = arg(None, "stop each run after N steps (the schedule still spans --epochs)")
    batch_size: int = arg(32, "batch size per process (CoOp: 32)")
    lr: float = arg(0.002, "SGD learning rate (CoOp: 0.002)")
    device: str = arg("auto", "auto | cpu | cuda[:index]")
    out_dir: Optional[str] = arg(None, "output folder (default: runs/rlp/<dataset>-<mode>-<flags' hash>)")
    resume: bool = arg(False, "continue the runs in --out_dir")
    overwrite: bool = arg(False, "replace a finished run in --out_dir")
    eval_only: bool = arg(False, "evaluate the checkpoints in --out_dir without training")
    num_workers: int = arg(0, "DataLoader workers (the features are in memory: 0 is best)")
    cache_dir: Optional[str] = arg(None, "cache folder (default: data.cache_dir())")

    def __post_init__(self):
        """Check every flag, then fill in the values that default per dataset."""
        self.dataset = {k.replace("_", ""): k for k in TEMPLATES}.get(self.dataset.lower().replace("_", ""),
                                                                   self.dataset)
        one_of = lambda *ok: (f"one of {', '.join(map(str, ok))}", lambda v: v in ok)  # noqa: E731
        at_least = lambda low: (f">= {low}", lambda v: v >= low)  # noqa: E731
        data.check_values(self, {
            "dataset": one_of(*TEMPLATES), "prompt": one_of("zeroshot", "coop", "rlp"),
            "shapes_split": one_of("shape", "checker"), "num_workers": at_least(0), "max_steps": at_least(0),
            **{k: at_least(1) for k in ("shots", "epochs", "batch_size", "rank", "n_ctx")}})
        words = len(self.ctx_init.split())
        if self.n_ctx is not None and words and self.n_ctx != words:
            raise UsageError(f"--n_ctx {self.n_ctx}: --ctx_init has {words} words; add --ctx_init '' for a "
                             "random P")
        self.ctx_init, self.n_ctx = self.ctx_init.strip(), self.n_ctx or words or 4
        self.model = self.model or MODELS.get(self.dataset, VIT_B16)
        self.epochs = self.epochs or (50 if self.dataset == "imagenet" else 200)
        self.cache_dir = self.cache_dir or data.cache_dir()
        if self.out_dir is None:                  # a folder per setting, data and seeds
            flags = {k: v for k, v in dataclasses.asdict(self).items()
                     if k not in data.RUN_CONTROLS or k in ("data_root", "seeds")}
            digest = hashlib.sha1(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]
            mode = "sweep" if self.sweep else self.prompt or "compare"
            self.out_dir = f"runs/rlp/{self.dataset}-{mode}-{digest}"


def run(a: Args) -> dict:
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    device, rank, _ = setup_device(a.device)
    prepare_out_dir(a, rank)
    found = sorted(Path(a.out_dir).rglob("ckpt.pt")) if a.resume or a.eval_only else []
    if found:                               # nanoGPT's way: the settings of the run in --out_dir
        a = from_checkpoint(a, load_checkpoint(str(found[0])))
    test = {s: load_split(a, "test", s, 0, None) for s in ("base", "new")}   # bad data fails before the model
    for s in ("base", "new"):
        tr, te = load_split(a, "train", s, seeds[0], a.shots)[1], test[s][1]
        if tr != te:
            raise data.DataError(f"class name mismatch: train has {sorted(set(tr) - set(te))} where test has "
                                 f"{sorted(set(te) - set(tr))}")
    env = Env(*load_clip(a, device), device, rank, dataclasses.asdict(a))
    data.pin_threads(env.clip, device)
    for s, (recs, names) in test.items():
        env.test[s] = (*image_features(a, env, recs, f"test-{s}", train=False), names)
    prepare_out_dir(a, rank, inputs_loaded=True)
    rows, first = [], {}
    for label, kind, s in settings(a):
        tag = label.lower().replace(" ", "").replace(",", "-") if a.sweep else kind
        log = (lambda msg, lab=label: print(f"{lab}: {msg}")) if rank == 0 else (lambda msg: None)
        rows.append((label, [run_one(kind, s, seed, tag, env, log) for seed in seeds]))
        first.setdefault(kind, rows[-1][1])
    model = a.model + (f", {a.shapes_split} split" if a.dataset == "shapes_cls" else "")
    title = f"{a.dataset} ({model}), base-to-new, {a.shots} shots, {a.epochs} epochs, seeds {seeds}"
    table = format_table(rows, "setting" if a.sweep else "method")
    if len(seeds) > 1 and {"coop", "rlp"} <= set(first):
        table += "\n" + seed_pairs(first["coop"], first["rlp"])
    if rank == 0:
        print(f"\n{title}\n{table}")
    if rank == 0 and not a.eval_only:
        results = {"setting": title, "results": dict(rows)}
        Path(a.out_dir, "results.json").write_text(json.dumps(results, indent=2))
    return {"args": dataclasses.asdict(a), "results": dict(rows), "table": table}


def main(argv=None) -> dict:
    return run_cli(run, Args, argv, __doc__)


# Infrastructure -- the same text in every method file (tests/test_infrastructure.py checks it) ==============
def from_checkpoint(args, state: dict):  # nanoGPT's way: a resumed or evaluated run keeps its own settings
    keep = {f.name for f in dataclasses.fields(args) if f.metadata["help"].endswith(data.EVAL_ONLY)}
    saved = {k: v for k, v in state["args"].items() if k not in keep.union(data.RUN_CONTROLS)}
    ignored = [f"--{k} {getattr(args, k)}" for k, v in saved.items()
               if v != getattr(args, k) != getattr(type(args)(), k)]  # given on the command line, overridden
    if ignored:
        print(f"the checkpoint's settings are used, ignored: {', '.join(ignored)}")
    return dataclasses.replace(args, **saved)


def setup_device(device: str):  # -> (torch.device, rank, world size); under torchrun a DDP process group
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or device != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: expected auto, cpu or cuda[:index] on a machine with CUDA")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(device), 0, 1
    if not dist.is_initialized():  # once per process, also when a script sets up each seed's run
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
    if device != "cpu":
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
        torch.cuda.set_device(device)
    return torch.device(device), dist.get_rank(), dist.get_world_size()


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, decay="cosine", constant_warmup=None):
    def factor(step: int) -> float:  # warm-up: linear, or CoOp's constant (constant_warmup x lr)
        if step < warmup_steps:
            return (step + 1) / warmup_steps if constant_warmup is None else constant_warmup
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t  # decay to 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def whole_step():  # a Ctrl-C inside a training step takes effect at its end: its checkpoint resumes exactly
    held = []
    old = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt


def save_checkpoint(path: str, state: dict) -> None:  # + torch's RNG states, the only ones drawn from
    rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all()}  # [] without CUDA
    torch.save({**state, **rng}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)  # atomic: an interrupted save leaves the last checkpoint whole


def load_checkpoint(path: str, model: Optional[nn.Module] = None) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if model is not None:  # --resume: the trained tensors and the RNG states (exactly where the run stopped)
        model.load_state_dict(state["trainable"], strict=False)  # the frozen weights are not saved
        torch.set_rng_state(state["rng"])
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def prepare_out_dir(args, rank: int = 0, inputs_loaded: bool = False) -> None:
    held = [p for p in Path(args.out_dir).rglob("*") if p.name == "results.json" or p.suffix == ".pt"]
    if held and not (args.resume or args.eval_only or args.overwrite):
        raise UsageError(f"{args.out_dir} holds a run ({held[0].relative_to(args.out_dir)}): pass --resume "
                         "to continue it or --overwrite to replace it")
    os.makedirs(args.out_dir, exist_ok=True)
    if inputs_loaded and args.overwrite and not (args.resume or args.eval_only) and rank == 0:
        for p in held + list(Path(args.out_dir).rglob("metrics.jsonl")):  # bad input never deletes a run
            p.unlink()


def run_cli(run, cls, argv=None, doc: str = ""):  # exit 2 on bad input, 1 on a non-finite loss, 130 on Ctrl-C
    parser = transformers.HfArgumentParser(cls, description=doc.split("\n\n")[0], exit_on_error=False,
                                           allow_abbrev=False, formatter_class=argparse.HelpFormatter)
    try:
        args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        return run(args)
    except (UsageError, argparse.ArgumentError, FloatingPointError, OSError) as e:  # OSError: a bad path
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, FloatingPointError) else 2)
    except KeyboardInterrupt:
        print("interrupted: the steps done are checkpointed; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
# End of infrastructure ======================================================================================


if __name__ == "__main__":
    main()
