"""pt_peft_train.py -- PT-PEFT: prefix-tuning first, then LoRA / adapters / full fine-tuning.

Kim et al., "Preserving Pre-trained Representation Space: On Effectiveness of Prefix-tuning for Large
Multi-modal Models", arXiv 2411.00029. Stage 1 (prefixes on a frozen BLIP-2) is prefix_tuning.py. LoRA,
adapters and full fine-tuning narrow the representation space of an LMM's last layer (Sec. 2.3, Fig. 4, Table
1) and lose pre-trained knowledge; prefix-tuning keeps the space but adapts less. PT-PEFT (Sec. 3) trains the
prefix with the LMM frozen first, then the PEFT parameters and the prefix; on BLIP-2 (Table 8, App. B.5) LoRA
(r=16, alpha=32, dropout 0.05) on the Q-Former self-attention Q, K, V. Equation -> code:
  Sec. 3 two-stage optimisation; Tables 2, 5 orders  -> Stage, stage_plan
  Eq. 1 F_txt per sentence; visual tokens per image  -> rank_matrices
  Eq. 2-5 SVD, normalise, average, cumulative sum    -> sv_curve
  Table 1 effective rank (the curve reaches 0.9)     -> effective_rank
  LoRA W + (alpha/r) B A (Hu et al.; App. B.5)       -> LoRALinear, add_lora, merged_lmm
  S-/P-Adapter (Hu et al. 2023)                      -> Adapter, add_adapters
  Table 5 "-Prefix" (prefix removed at inference)   -> evaluate_model (Table 1 on <= --rank_images images)

  python pt_peft_train.py                            # PT-LoRA (Q-Former LoRA), offline tiny BLIP-2
  python pt_peft_train.py --compare --seeds 0,1,2    # Tables 2 and 1: all orders, full FT of LM and Q-Former
  python pt_peft_train.py --model /ckpt/blip2-opt-2.7b --dataset coco --data_root /data --device cuda
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import transformers

import data
import prefix_tuning as pt
from data import UsageError, arg


# === The method: stage orders (Sec. 3 "Two-stage Optimization"; Tables 2 and 5) ===
@dataclasses.dataclass
class Stage:
    train: tuple          # parameter groups that train: ("prefix",), ("peft",), ("prefix", "peft")
    epochs: int
    lrs: dict             # group -> max learning rate
    use_prefix: bool      # whether the prefix is in the forward pass during this stage


def stage_plan(a: Args) -> list[Stage]:
    """pt_first: prefix (LMM frozen) -> PEFT + prefix (Sec. 3: 'we adjust the parameters, including prefixes')
    peft_first: PEFT without prefix -> prefix-tuning of the adapted, now frozen model ('X -> Prefix').
    parallel: prefix and PEFT jointly from the start. none / prefix_only: one method alone.
    One-stage orders train pt_epochs + ft_epochs epochs, so every order has the same budget."""
    # DEVIATION (interpretation): the paper does not say whether the PEFT weights keep training in the second
    # stage of "X -> Prefix"; that stage is prefix-tuning (LMM frozen, B.5), so they are frozen there. In
    # PT-PEFT's second stage the prefix trains with the stage-2 LR (Table 13: one LR, "PT-LoRA (2nd stage)").
    P, E, tot = a.pt_lr, a.lr, a.pt_epochs + a.ft_epochs
    plans = {
        "pt_first": [Stage(("prefix",), a.pt_epochs, {"prefix": P}, True),
                     Stage(("prefix", "peft"), a.ft_epochs, {"prefix": E, "peft": E}, True)],
        "peft_first": [Stage(("peft",), a.ft_epochs, {"peft": E}, False),
                       Stage(("prefix",), a.pt_epochs, {"prefix": P}, True)],
        "parallel": [Stage(("prefix", "peft"), tot, {"prefix": P, "peft": E}, True)],
        "none": [Stage(("peft",), tot, {"peft": E}, False)],
        "prefix_only": [Stage(("prefix",), tot, {"prefix": P}, True)],
    }
    return [s for s in plans[a.order] if s.epochs > 0]


# === The method: representation-space analysis (Sec. 2.3, Eq. 1-5, Fig. 4, Table 1) ===
def rank_matrices(feats: dict, batch: dict) -> tuple[list, list]:
    """Eq. (1): one matrix per sentence and one per image, from the LM's LAST layer with the prefix and the
    visual tokens in context, as the model runs (feats = PrefixBlip2.features(batch)). Image: the Q
    visual-token rows. Text: [sos, w_1..w_N, eos] = the [bos] row and the caption (VQA: answer) rows, eos
    included; the fixed task prompt between them ("caption :") is left out."""
    mask = feats["text_mask"].bool().cpu()
    rows = (batch["labels"] != -100) | (mask.cumsum(1) == 1) & mask          # targets | first non-pad ([bos])
    text = [h[r].float().cpu() for h, r in zip(feats["text"], rows)]          # (L_k, d) each
    return text, [h.float().cpu() for h in feats["image"]]                   # (Q, d) each


def sv_curve(mats: list) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (2)-(5) per sample on a common relative axis: mats = K matrices (L_k, d) -> (x, y), y(x) = averaged
    cumulative normalised singular values at x = k/M. Lengths differ (M_k = min(L_k, d)): sample k's curve is
    the piecewise-linear function through (0, 0) and (j/M_k, y_kj), averaged exactly at the union of the
    breakpoints (= cumulating the averaged spectrum; equal lengths give Eq. (4)-(5) exactly)."""
    xs, ys = [], []
    for F_k in mats:
        s = torch.linalg.svdvals(F_k.double())                            # Eq. (2), descending
        s_hat = s / s.sum().clamp_min(1e-300)                             # Eq. (3)
        ys.append(np.concatenate([[0.0], torch.cumsum(s_hat, 0).numpy()]))
        xs.append(np.linspace(0.0, 1.0, len(s) + 1))
    x = np.unique(np.concatenate(xs))
    y = np.mean([np.interp(x, x_k, y_k) for x_k, y_k in zip(xs, ys)], 0)  # Eq. (4) + (5) on the k/M axis
    return x, y


def effective_rank(x: np.ndarray, y: np.ndarray, threshold: float = 0.9) -> float:
    """Table 1: the k/M at which the (piecewise-linear) averaged curve reaches `threshold`."""
    i = min(int(np.searchsorted(y, threshold - 1e-12)), len(y) - 1)       # first point with y >= threshold
    return float(x[i - 1] + (x[i] - x[i - 1]) * (threshold - y[i - 1]) / max(y[i] - y[i - 1], 1e-300))


GRID = np.linspace(0.0, 1.0, 101)       # the k/M axis of the Fig. 4 CSV


def rank_report(text: list, image: list) -> dict:
    """Table 1 (%) of text, image and pooled (not in the paper: all caption rows in ONE matrix); Fig. 4."""
    out = {}
    for name, mats in (("text", text), ("image", image), ("pooled", [torch.cat(text)])):
        x, y = sv_curve(mats)
        out[name] = round(100 * effective_rank(x, y), 2)
        out[f"curve_{name}"] = np.interp(GRID, x, y).round(6).tolist()
    return out


# === The method: LoRA (Hu et al. 2022; App. B.5) and S-/P-Adapters (Hu et al. 2023) ===
class LoRALinear(nn.Module):
    """y = W x + b + (alpha/r) B A dropout(x); peft's layout and init (A (r, in) Kaiming, B (out, r) zero)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scaling, self.dropout, w = base, alpha / r, nn.Dropout(dropout), base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):                                    # (..., in) -> (..., out)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


class Adapter(nn.Module):
    """Bottleneck down (d -> m), ReLU, up (m -> d) hooked to one layer's FFN; up = 0 at the start.
      sequential (S-Adapter, Houlsby):  y = FFN(x);  y <- y + up(relu(down(y)))
      parallel   (P-Adapter, He et al.): y = FFN(x);  y <- y + up(relu(down(x)))   (x: the FFN input)"""

    def __init__(self, ffn_in: nn.Module, ffn_out: nn.Module, d: int, m: int, parallel: bool):
        super().__init__()
        self.down, self.up, self.x = nn.Linear(d, m), nn.Linear(m, d), None
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        ffn_out.register_forward_hook(lambda mod, args, y: y + self(self.x if parallel else y))
        if parallel:
            ffn_in.register_forward_pre_hook(lambda mod, args: setattr(self, "x", args[0]))

    def forward(self, h):                                    # (B, L, d) -> (B, L, d)
        return self.up(torch.relu(self.down(h)))


LORA_TARGETS = {   # --peft_target -> the nn.Linear modules of a Hugging Face BLIP-2 that get LoRA
    "qformer": r"qformer\.encoder\.layer\.\d+\.attention\.attention\.(query|key|value)",   # self-attn (B.2)
    "language_model": r"language_model\..*\.(q_proj|k_proj|v_proj)",                     # OPT / LLaMA
    "vision": r"vision_model\..*\.self_attn\.qkv"}                                       # ViT: fused Q, K, V
FULL_TARGETS = {"qformer": ("qformer.", "query_tokens"), "language_model": ("language_model.",),
                "vision": ("vision_model.",)}
FROZEN_IN_FULL = ("embed_tokens", "lm_head")                  # App. B.5: word embeddings + head stay frozen
FFN_NAMES = (("fc1", "fc2"), ("gate_proj", "down_proj"), ("intermediate_query", "output_query"))  # OPT/ViT...


def add_lora(lmm: nn.Module, target: str, r: int, alpha: float, dropout: float) -> list[str]:
    """Wrap the target's Q/K/V projections (LORA_TARGETS) in LoRALinear; returns their names."""
    # DEVIATION (ViT only): BLIP-2's ViT fuses Q, K, V in one `qkv` Linear, which gets one LoRA (as in peft).
    hits = [(n, m) for n, m in lmm.named_modules()
            if re.fullmatch(LORA_TARGETS[target], n) and isinstance(m, nn.Linear)]
    if not hits:
        raise UsageError(f"cannot patch {type(lmm).__name__}: no nn.Linear matches {LORA_TARGETS[target]!r}")
    for n, m in hits:
        lmm.set_submodule(n, LoRALinear(m, r, alpha, dropout))
    return [n for n, _ in hits]


def add_adapters(lmm: nn.Module, target: str, dim: int, parallel: bool) -> list[Adapter]:
    """One adapter per layer of the target after (S) / beside (P) its FFN, registered as `<layer>.adapter`."""
    # DEVIATION: Houlsby et al. put two adapters per layer; we follow the paper's cited S-/P-Adapter code
    # (Hu et al. 2023: one adapter at the FFN), sized so the trainable count is close to LoRA's (Sec. 4.1).
    root, adapters = lmm.get_submodule(FULL_TARGETS[target][0].rstrip(".")), []
    for layer in list(root.modules()):
        pair = next(((a, b) for a, b in FFN_NAMES if hasattr(layer, a) and hasattr(layer, b)), None)
        if pair is not None:
            ffn_in, ffn_out = getattr(layer, pair[0]), getattr(layer, pair[1])
            lin = next(m for m in ffn_in.modules() if isinstance(m, nn.Linear))
            layer.adapter = Adapter(ffn_in, ffn_out, lin.in_features, dim, parallel)
            adapters.append(layer.adapter.to(lin.weight.device, lin.weight.dtype))
    if not adapters:
        raise UsageError(f"cannot patch {target} ({type(root).__name__}): expected layers with an FFN pair "
                         f"named {' or '.join('/'.join(p) for p in FFN_NAMES)}")
    return adapters


def is_peft_param(name: str, a: Args) -> bool:
    """Stage-2 parameters, by name inside the BLIP-2 model."""
    if a.peft != "full":
        return any(k in name for k in ((".lora_A", ".lora_B") if a.peft == "lora" else (".adapter.",)))
    return name.startswith(FULL_TARGETS[a.peft_target]) and not any(k in name for k in FROZEN_IN_FULL)


def merged_lmm(lmm: nn.Module) -> nn.Module:
    """A copy with every LoRALinear folded into its Linear (W + (alpha/r) B A): a plain Hugging Face model."""
    out = copy.deepcopy(lmm)
    for n, m in [(n, m) for n, m in out.named_modules() if isinstance(m, LoRALinear)]:
        m.base.weight.data += (m.lora_B @ m.lora_A).data * m.scaling
        out.set_submodule(n, m.base)
    return out


# === Training: prefix_tuning.py's prefixed BLIP-2 + the stage-2 modules, all stages in one loop ===
def attach_method(model: nn.Module, a: Args) -> tuple[dict, int]:
    """Stage-2 modules into model.lmm -> ({"prefix": names, "peft": names}, analytic trainable count)."""
    peft = a.peft if a.order != "prefix_only" else None
    if peft == "lora":
        add_lora(model.lmm, a.peft_target, a.lora_r, a.lora_alpha, a.lora_dropout)
    elif peft in ("s_adapter", "p_adapter"):
        add_adapters(model.lmm, a.peft_target, a.adapter_dim, parallel=peft == "p_adapter")
    params, mods = dict(model.named_parameters()), list(model.modules())
    groups = {"prefix": [n for n in params if n.startswith("prefix_encoders.")],
              "peft": [n for n in params if peft and n.startswith("lmm.") and is_peft_param(n[4:], a)]}
    return groups, (sum(params[n].numel() for n in groups["prefix"] + groups["peft"] * (peft == "full"))
                    + sum(a.lora_r * (m.base.in_features + m.base.out_features)      # A (r, in) + B (out, r)
                          for m in mods if isinstance(m, LoRALinear))
                    + sum((2 * m.up.out_features + 1) * a.adapter_dim + m.up.out_features   # down + up
                          for m in mods if isinstance(m, Adapter)))


def train(a: Args, model: nn.Module, groups: dict, plan: list, setup, device, rank: int, world: int,
          state: Optional[dict]) -> dict:
    """AdamW (0.9, 0.99), per stage linear warm-up + decay (B.4); exact resume across stages from `state`."""
    path, names = os.path.join(a.out_dir, "ckpt.pt"), groups["prefix"] + groups["peft"]
    params, stop = dict(model.named_parameters()), math.inf if a.max_steps is None else a.max_steps
    si0, step0, gstep = (state["stage"], state["step"], state["global_step"]) if state else (0, 0, 0)
    if a.eval_only or si0 >= len(plan):                   # nothing (more) to train: the trained tensors
        pt.load_checkpoint(path, model)
        return {"finished": si0 >= len(plan), "global_step": gstep}
    loader = data.make_loader(setup.records["train"], a.batch_size, shuffle=True, seed=a.seed,
                              collate_fn=setup.collate, num_workers=a.num_workers)

    def save(si, step, opt=None, sched=None):
        if rank == 0:
            pt.save_checkpoint(path, {"trainable": {n: params[n].detach().cpu().clone() for n in names},
                                   "optimizer": opt and opt.state_dict(), "stage": si, "step": step,
                                   "scheduler": sched and sched.state_dict(), "global_step": gstep,
                                   "args": dataclasses.asdict(a)})
        return path

    last_good = path if state else "none"
    for si, st in enumerate(plan[si0:], si0):
        for n, p in params.items():        # prefix_tuning uses its ViT cache only while the ViT is frozen
            p.requires_grad_(n in {m for g in st.train for m in groups[g]})
        model.prefix_state = "on" if st.use_prefix else "off"
        total, step = st.epochs * len(loader), step0 if si == si0 else 0
        opt = torch.optim.AdamW([{"params": [params[n] for n in groups[g]], "lr": st.lrs[g]}
                                 for g in st.train], betas=(0.9, 0.99), weight_decay=0.05)  # Table 14
        warm = a.warmup_steps if a.warmup_steps is not None else max(1, total // 10)
        sched = pt.lr_schedule(opt, min(warm, total), total, decay="linear")
        if state is not None and si == si0:
            pt.load_checkpoint(path, model)          # the trained tensors and the RNG states
            if step0 > 0:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        model.train()
        try:
            while step < total and gstep < stop:
                loader.sampler.set_epoch(step // len(loader))                 # resumed: skip what it saw
                for batch in itertools.islice(loader, step % len(loader), None):
                    if gstep >= stop:
                        break
                    with pt.whole_step():
                        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                            loss = net(batch)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"non-finite loss at step {gstep + 1}; last good "
                                                     f"checkpoint: {last_good}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        step, gstep = step + 1, gstep + 1
                        if rank == 0 and step % len(loader) == 0:                    # one line per epoch
                            print(f"stage {si + 1} step {step} loss {loss.item():.4f}", file=sys.stderr)
                        if gstep % a.save_every == 0 and step < total:
                            last_good = save(si, step, opt, sched)
        except KeyboardInterrupt:
            save(si, step, opt, sched)
            raise
        if step < total:                                   # stopped by --max_steps
            save(si, step, opt, sched)
            return {"finished": False, "global_step": gstep}
        last_good = save(si + 1, 0)
    return {"finished": True, "global_step": gstep}


def rank_sample(records: list, n: int) -> list:
    """At most n evaluation images (all, or a fixed seeded sample): bounded memory and pooled SVD."""
    images = list(dict.fromkeys(r["image_id"] for r in records))
    keep = set(images if len(images) <= n else random.Random(0).sample(images, n))
    return [r for r in records if r["image_id"] in keep]


def evaluate_model(model: nn.Module, setup, prefix_used: bool, rank_images: int) -> dict:
    """Task and pre-training-mix scores with / without (Table 5) the prefix; Table 1, prefix in context."""
    recs, text, image, res = setup.records, [], {}, {}
    for name, state in [("", "on" if prefix_used else "off")] + [("no_prefix_", "off")] * prefix_used:
        model.prefix_state = state
        for key, split in (("downstream", "eval"), ("mix", "mix")):
            res[name + key] = pt.evaluate(model, recs[split], setup) if recs[split] else None
    model.prefix_state = "on" if prefix_used else "off"
    sample = rank_sample(recs["eval"], rank_images)
    pairs = data.caption_pairs(sample) if setup.task == "caption" else sample       # every reference
    for i in range(0, len(pairs), 32):
        batch = setup.collate(pairs[i:i + 32], train=False)
        t, im = rank_matrices(model.features(batch), batch)
        text += t
        image.update(zip(batch["image_ids"], im))                         # one matrix per image
    return dict(res, rank=dict(rank_report(text, list(image.values())), images=len(image)))


# === Args: the paper's values (BLIP-2 Table 14, App. B.4/B.5, Table 8); None = the dataset's default ===
PAPER = dict(epochs=5, pt_lr=5e-5, lr=1e-4, lr_full=1e-5, batch_size=128, warmup_steps=5000, num_beams=5)
SYNTHETIC = dict(PAPER, pt_lr=1e-2, lr=1e-3, lr_full=3e-4,  # DEVIATION: a 64-wide model takes larger steps
                 batch_size=16,                             # shapes_*: minutes on one CPU core
                 num_beams=1,                               # DEVIATION: greedy captions, for time
                 warmup_steps=None)                         # 10% of each stage (5000 steps outlast the run)
ORDERS = ("pt_first", "peft_first", "parallel", "none", "prefix_only")
PEFTS = ("lora", "s_adapter", "p_adapter", "full")


@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_caption", " | ".join(pt.DATASETS))
    data_root: Optional[str] = arg(None, "root of the real datasets (default: none, offline)")
    model: str = arg("stand_ins/tiny-blip2", "a BLIP-2 folder or hub id (offline: the tiny stand-in)")
    order: str = arg("pt_first", " | ".join(ORDERS) + " (Tables 2 and 5)")
    peft: str = arg("lora", "stage 2: " + " | ".join(PEFTS))
    peft_target: str = arg("qformer", "qformer (Table 8) | language_model | vision")
    compare: bool = arg(False, "Tables 2 and 1: every order, full FT of LM and Q-Former", eval_only=True)
    seeds: Optional[str] = arg(None, "e.g. 0,1,2: a run per seed, cells mean ± std (default: one, --seed)")
    seed: int = arg(0, "seed of a single run")
    epochs: Optional[int] = arg(None, f"epochs per stage (default: {PAPER['epochs']}, Table 14)")
    pt_epochs: Optional[int] = arg(None, "prefix-stage epochs (default: --epochs)")
    ft_epochs: Optional[int] = arg(None, "PEFT-stage epochs (default: --epochs)")
    pt_lr: Optional[float] = arg(None, f"prefix LR (default: {PAPER['pt_lr']}, Table 14; "
                                       f"shapes_*: {SYNTHETIC['pt_lr']})")
    lr: Optional[float] = arg(None, f"stage-2 LR (default: {PAPER['lr']}, full FT {PAPER['lr_full']}, "
                                    f"Table 14; shapes_*: {SYNTHETIC['lr']}, {SYNTHETIC['lr_full']})")
    warmup_steps: Optional[int] = arg(None, f"warm-up steps per stage (default: {PAPER['warmup_steps']}, "
                                            "Table 14; shapes_*: 10% of a stage)")
    batch_size: Optional[int] = arg(None, f"per process (default: {PAPER['batch_size']}, Table 14; "
                                          f"shapes_*: {SYNTHETIC['batch_size']})")
    max_steps: Optional[int] = arg(None, "stop after N steps in all, same schedules (default: no limit)")
    num_prefix: Optional[int] = arg(None, "P (default: 8 for captions, 16 for VQA, Table 8)")
    lora_r: int = arg(16, "LoRA rank (App. B.5)")
    lora_alpha: float = arg(32.0, "LoRA alpha, scaling alpha/r (App. B.5)")
    lora_dropout: float = arg(0.05, "LoRA dropout (App. B.5)")
    adapter_dim: int = arg(48, "adapter bottleneck (about LoRA's count, Sec. 4.1)")
    num_beams: Optional[int] = arg(None, f"caption beam size (default: {PAPER['num_beams']}, App. B.2; "
                                         f"shapes_*: {SYNTHETIC['num_beams']})", eval_only=True)
    train_limit: Optional[int] = arg(None, "the first N training images (default: all)")
    eval_limit: Optional[int] = arg(None, f"the first N evaluation images (default: all; "
                                          f"shapes_*: {pt.SYNTHETIC['eval_limit']})", eval_only=True)
    rank_images: int = arg(1000, "Table 1 / Fig. 4 on a fixed seeded sample of <= N images", eval_only=True)
    device: str = arg("auto", "auto | cpu | cuda[:index]")
    out_dir: Optional[str] = arg(None, "output folder (default: runs/pt_peft_train/<dataset>...)")
    resume: bool = arg(False, "continue the checkpoints in --out_dir with their settings")
    overwrite: bool = arg(False, "replace a run in --out_dir")
    eval_only: bool = arg(False, "evaluate the checkpoints in --out_dir with their settings")
    export_merged: bool = arg(False, "save the BLIP-2 with LoRA merged + the prefix", eval_only=True)
    num_workers: int = arg(0, "DataLoader workers")
    save_every: int = arg(200, "checkpoint every N steps")

    def __post_init__(self):
        # num_prefix, num_beams and the limits: prefix_tuning.Args checks them (the setup is built with it)
        minimum = dict(lora_r=1, adapter_dim=1, batch_size=1, save_every=1, rank_images=1, epochs=0,
                       pt_epochs=0, ft_epochs=0, max_steps=0, warmup_steps=0, num_workers=0)
        rules = {k: (f">= {n}", lambda v, n=n: v >= n) for k, n in minimum.items()}
        for flag, choices in (("order", ORDERS), ("peft", PEFTS), ("peft_target", tuple(LORA_TARGETS)),
                              ("dataset", pt.DATASETS)):
            rules[flag] = (", ".join(choices), lambda v, c=choices: v in c)
        data.check_values(self, rules)
        epochs = [self.epochs if e is None else e for e in (self.pt_epochs, self.ft_epochs)]
        if None not in epochs and sum(epochs) == 0:
            raise UsageError("no epochs to train: --pt_epochs and --ft_epochs (default: --epochs) are 0")
        if self.export_merged and self.peft.endswith("adapter"):
            raise UsageError("--export_merged: adapters have no merged form (LoRA and full FT have)")


COMPARE = [(o, None, None) for o in ("prefix_only", "none", "pt_first", "peft_first", "parallel")] + [
    ("none", "full", "language_model"), ("none", "full", "qformer"), ("pt_first", "full", "language_model")]
SHORT = {"lora": "LoRA", "s_adapter": "S-Adapter", "p_adapter": "P-Adapter", "full": "Full-FT",
         "qformer": "QF", "language_model": "LM", "vision": "ViT"}


def variants(a: Args) -> list[tuple[str, Args]]:
    """[(row name, Args)]: one run, or --compare's, for each seed (flags as given: see resolve)."""
    out, seeds = [], [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    for order, peft, target in COMPARE if a.compare else [(a.order, None, None)]:
        peft, target = peft or a.peft, target or a.peft_target
        x = f"{SHORT[peft]}-{SHORT[target]}"
        name = {"pt_first": f"Prefix -> {x}", "peft_first": f"{x} -> Prefix", "parallel": f"Prefix + {x}",
                "none": x, "prefix_only": "Prefix-tuning"}[order]
        sub = os.path.join(a.out_dir, f"{order}-{peft}-{target}") if a.compare else a.out_dir
        out += [(name, dataclasses.replace(a, order=order, peft=peft, peft_target=target, seed=seed,
                                           out_dir=os.path.join(sub, f"seed{seed}" if a.seeds else "")))
                for seed in seeds]
    return out


def resolve(a: Args) -> Args:
    """None -> the dataset's default (PAPER, or SYNTHETIC for shapes_*), stage epochs: --epochs."""
    table = SYNTHETIC if a.dataset.startswith("shapes_") else PAPER
    a = dataclasses.replace(a, **{k: table[k] for k in ("epochs", "pt_lr", "batch_size", "warmup_steps",
                                                         "num_beams") if getattr(a, k) is None})
    epochs = {k: a.epochs for k in ("pt_epochs", "ft_epochs") if getattr(a, k) is None}
    return dataclasses.replace(a, **epochs, lr=a.lr or table["lr_full" if a.peft == "full" else "lr"])


def run_variant(a: Args, setup, device, rank: int, world: int) -> dict:
    """Build the pre-trained LMM, attach prefix / PEFT, train the stages (--eval_only: load), evaluate.
    --resume and --eval_only take the run's settings from its checkpoint."""
    path = os.path.join(a.out_dir, "ckpt.pt")
    state = pt.load_checkpoint(path) if a.eval_only or a.resume and os.path.exists(path) else None
    a = resolve(pt.from_checkpoint(a, state) if state else a)
    os.makedirs(a.out_dir, exist_ok=True)
    transformers.set_seed(a.seed)
    model = pt.build(setup, with_prefix=a.order != "none").to(device)
    groups, expected = attach_method(model, a)
    for n, p in model.named_parameters():
        p.requires_grad_(n in groups["prefix"] + groups["peft"])
    data.count_trainable(model, expected, log=lambda s: print(s, file=sys.stderr) if rank == 0 else None)
    out = train(a, model, groups, stage_plan(a), setup, device, rank, world, state)
    if rank == 0:
        prefix_used = any(s.use_prefix for s in stage_plan(a))
        out.update(evaluate_model(model, setup, prefix_used, a.rank_images), trainable=expected)
        Path(a.out_dir, "results.json").write_text(json.dumps(out, indent=2))
        if a.export_merged:           # a plain BLIP-2 (LoRA folded into W) + the prefix as tensors (App. B.1)
            merged_lmm(model.lmm).save_pretrained(os.path.join(a.out_dir, "merged"))
            torch.save(model.export_prefix() if a.order != "none" else {}, f"{a.out_dir}/merged/prefix.pt")
    return out


def print_table(title: str, metric: str, rows: dict) -> None:
    """A row per model; a cell: the value or mean ± std over seeds. mix -pf: pre-training mix, no prefix."""
    columns = {metric: ("downstream", "score"), "-prefix": ("no_prefix_downstream", "score"),
               "mix -pf": ("no_prefix_mix", "score"), **{f"rank {k}": ("rank", k) for k in ("text", "image",
                                                                                           "pooled")}}
    table = [["method", *columns]]
    for name, runs in rows.items():
        runs = [dict(r, no_prefix_mix=r.get("no_prefix_mix", r["mix"])) for r in runs]    # no prefix: mix
        vals = [[(r.get(k) or {}).get(key) for r in runs] for k, key in columns.values()]
        table.append([name] + ["-" if v[0] is None else data.mean_std(v) if len(v) > 1 else f"{v[0]:.2f}"
                               for v in vals])
    width = [max(len(row[i]) for row in table) for i in range(len(columns) + 1)]
    print(title)
    for row in table:
        print(f"{row[0]:<{width[0]}}" + "".join(f"{c:>{w + 1}}" for c, w in zip(row[1:], width[1:])))


def write_fig4(out_dir: str, rows: dict) -> str:
    """Fig. 4: every model's averaged cumulative curves (text, image) as CSV, and as PNG with matplotlib."""
    curves = {f"{name} ({kind})": np.mean([r["rank"][f"curve_{kind}"] for r in runs], 0)
              for name, runs in rows.items() for kind in ("text", "image")}
    np.savetxt(os.path.join(out_dir, "fig4_curves.csv"), np.column_stack([GRID, *curves.values()]), "%.5f",
               ",", header=",".join(["k/M", *curves]), comments="")
    try:
        import matplotlib.pyplot as plt                # optional dependency
    except ImportError:
        return os.path.join(out_dir, "fig4_curves.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, ("text", "image")):
        for name in rows:
            ax.plot(GRID, curves[f"{name} ({kind})"], label=name)
        ax.set(title=f"{kind}, LM last layer", xlabel="k / M", ylabel="accumulated normalised s.v.")
    axes[1].legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, "fig4.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return os.path.join(out_dir, "fig4.png")


def run(a: Args) -> dict:
    tag = ("-compare" if a.compare else "") + ("-seeds" + a.seeds.replace(",", "_") if a.seeds else "")
    a = dataclasses.replace(a, out_dir=a.out_dir or os.path.join("runs", "pt_peft_train", a.dataset + tag))
    device, rank, world = pt.setup_device(a.device)
    pt.prepare_out_dir(a, rank)
    first = os.path.join(variants(a)[0][1].out_dir, "ckpt.pt")
    if a.eval_only or a.resume and os.path.exists(first):     # the data and LMM of the checkpointed runs
        saved = pt.load_checkpoint(first)["args"]
        a = dataclasses.replace(a, **{k: saved[k] for k in ("dataset", "model", "num_prefix", "train_limit")})
    runs, t0 = variants(a), time.time()
    shared = {k: v for k, v in dataclasses.asdict(resolve(runs[0][1])).items() if k in pt.Setup.FIELDS}
    setup = pt.setup(pt.Args(**shared), device)                            # one LMM + data for all runs
    pt.prepare_out_dir(a, rank, inputs_loaded=True)
    rows = {}
    for name, v in runs:
        rows.setdefault(name, []).append(run_variant(v, setup, device, rank, world))
    if rank == 0:
        decoding = "greedy" if setup.args.num_beams == 1 else f"beam {setup.args.num_beams}"
        zero = evaluate_model(pt.build(setup, with_prefix=False).to(device), setup, False, a.rank_images)
        rows = {f"zero-shot ({decoding})": [zero] * len(next(iter(rows.values()))), **rows}
        print_table(f"PT-PEFT on {a.dataset}, {Path(a.model).name}, {decoding}, seeds {a.seeds or a.seed}; "
                    f"rank = Table 1 rank % on {zero['rank']['images']} images; "
                    f"{time.time() - t0:.0f}s", "CIDEr" if setup.task == "caption" else "VQA acc", rows)
        print(f"Fig. 4: {write_fig4(a.out_dir, rows)}")
        Path(a.out_dir, "results.json").write_text(json.dumps({"args": dataclasses.asdict(a), "rows": rows},
                                                              indent=2))
    if world > 1:
        torch.distributed.barrier()
    return rows


def main(argv=None) -> dict:
    return pt.run_cli(run, Args, argv, __doc__)


if __name__ == "__main__":
    main()
