"""pt_peft_train.py -- Prefix-Tuned PEFT (PT-PEFT): prefix-tuning first, then LoRA / adapters / full FT.

Paper: "Preserving Pre-trained Representation Space: On Effectiveness of Prefix-tuning for Large Multi-modal
Models" (Kim et al., arXiv 2411.00029). Stage 1 (prefix-tuning) comes from prefix_tuning.py.

Idea. Fine-tuning an LMM with LoRA / adapters / full FT collapses the representation space of its last layer
(Sec. 2.3: few singular directions carry the features; Fig. 4, Table 1) and loses pre-trained knowledge;
prefix-tuning keeps the weights, so the space is preserved, but adapts less. PT-PEFT (Sec. 3) trains the
prefix (embeddings + prefix-type embedding + MLP encoder) with the LMM frozen first, then trains the PEFT
parameters *and* the prefix together. Reversed order ("X -> Prefix"), joint ("parallel") training and vanilla
PEFT are the baselines of Tables 2 and 5; the effective rank (Eq. 1-5) measures the space.

Examples:
  python pt_peft_train.py                                   # PT-PEFT (Prefix -> LoRA) on the offline tiny setup
  python pt_peft_train.py --compare                         # Table-2/Table-1 style: Prefix, LoRA, Prefix->LoRA,
                                                            #   LoRA->Prefix, parallel on the same data/budget
  python pt_peft_train.py --order pt_first --peft s_adapter --analyze_rank   # + Fig. 4 curves (CSV)
  python pt_peft_train.py --order none --peft full --ft_epochs 4           # vanilla full FT of the LM side
  python pt_peft_train.py --model Salesforce/blip2-opt-2.7b --dataset coco --data_root $DATA --device cuda
  torchrun --nproc_per_node 2 pt_peft_train.py
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import prefix_tuning as pt

ORDERS = ("pt_first", "peft_first", "parallel", "none", "prefix_only")
PEFTS = ("lora", "s_adapter", "p_adapter", "full")
PEFT_LABEL = {"lora": "LoRA", "s_adapter": "S-Adapter", "p_adapter": "P-Adapter", "full": "Full-FT"}


# ----------------------------------------------------------------------------------
# 2. Args (paper values: BLIP-2 Table 14, App. B.4/B.5; offline tiny values where marked)
# ----------------------------------------------------------------------------------
@dataclass
class Args:
    dataset: str = field(default="shapes_caption", metadata={"help": "downstream dataset: shapes_caption | shapes_vqa (offline) | coco | flickr30k | vqav2"})
    data_root: Optional[str] = field(default=None, metadata={"help": "root of the real datasets (ignored for shapes_*)"})
    model: str = field(default="tiny", metadata={"help": "'tiny' (config-built BLIP-2 pre-trained on the synthetic mix, cached) or a HF Blip2ForConditionalGeneration id/path"})
    order: str = field(default="pt_first", metadata={"help": "pt_first (PT-PEFT) | peft_first (X -> Prefix) | parallel (joint) | none (vanilla PEFT) | prefix_only"})
    peft: str = field(default="lora", metadata={"help": "stage-2 method: lora | s_adapter | p_adapter | full (language model, minus word embeddings/head, App. B.5)"})
    compare: bool = field(default=False, metadata={"help": "run prefix_only, none, pt_first, peft_first, parallel (with --peft) on the same data/budget; print Table-2/1 style"})
    analyze_rank: bool = field(default=False, metadata={"help": "effective rank + cumulative singular-value curves (Fig. 4 CSV) of the pre-trained model, after stage 1 and after stage 2"})
    pt_epochs: int = field(default=-1, metadata={"help": "prefix-tuning stage epochs (BLIP-2 Table 14: 5; -1 = 5 for HF models, tiny default for --model tiny)"})
    ft_epochs: int = field(default=-1, metadata={"help": "PEFT stage epochs (Table 14: 5); one-stage orders train pt_epochs+ft_epochs (same budget)"})
    epochs: int = field(default=-1, metadata={"help": "shorthand: sets both --pt_epochs and --ft_epochs"})
    pt_lr: float = field(default=-1.0, metadata={"help": "prefix LR (Table 14: 5e-5; -1 = tiny default 3e-3 for --model tiny)"})
    lr: float = field(default=-1.0, metadata={"help": "PEFT-stage LR, prefix included (Table 14 LoRA: 1e-4, full FT: 1e-5; -1 = those / tiny default)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (Table 14: 0.05), betas (0.9, 0.99) (B.4)"})
    warmup_steps: int = field(default=-1, metadata={"help": "linear warm-up steps per stage, then linear decay to 0 (Table 14 caption: 5000; -1 = 5000 for HF, 10%% for tiny)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps over all stages (LR schedules still span the epochs); -1 = all"})
    batch_size: int = field(default=-1, metadata={"help": "batch size per process (Table 14: 128; -1 = 128 for HF, 16 for tiny)"})
    num_prefix: int = field(default=16, metadata={"help": "prefix length (App. C.1: saturates at 16)"})
    prefix_mode: str = field(default="auto", metadata={"help": "input (prefix tokens at the LM input, Fig. 5) | kv (Li & Liang per-layer key/value prefixes) | auto = input for HF models, kv for --model tiny (see DEVIATION)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (App. B.5: 16)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha, scaling alpha/r (App. B.5: 32)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (App. B.5: 0.05)"})
    peft_target: str = field(default="language_model", metadata={"help": "where LoRA/adapters go: language_model (issue) | qformer (paper's BLIP-2 Table 8 / B.5 PT-LoRA)"})
    adapter_dim: int = field(default=48, metadata={"help": "adapter bottleneck; 48 = 3*lora_r gives ~LoRA's trainable count (Sec. 4.1 matches budgets)"})
    num_seeds: int = field(default=3, metadata={"help": "--compare: seeds per variant (seed .. seed+n-1); the table shows mean, then std (Tables 3/4 use 3 seeds)"})
    noise_seed: int = field(default=1234, metadata={"help": "seed of the matched-scale noise prefix (Table 5 '-Prefix +Noise')"})
    rank_threshold: float = field(default=0.9, metadata={"help": "effective-rank threshold on the cumulative normalised singular values (Table 1: 0.9)"})
    rank_samples: int = field(default=300, metadata={"help": "evaluation samples used for the effective rank"})
    prefix_hidden: int = field(default=128, metadata={"help": "prefix-encoder MLP width (prefix_tuning.py)"})
    num_beams: int = field(default=-1, metadata={"help": "beam size for captions (App. B.2: 5; -1 = 5 for HF models, 1 (greedy) for --model tiny); VQA is greedy"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation length limit"})
    pretrain_steps: int = field(default=400, metadata={"help": "--model tiny: pre-training steps of prefix_tuning.py's tiny BLIP-2 on the broad mix (cached by settings)"})
    train_limit: int = field(default=-1, metadata={"help": "use the first N downstream train records (-1 = tiny default / all for real data)"})
    eval_limit: int = field(default=-1, metadata={"help": "evaluate on the first N records (-1 = tiny default 100 / all for real data)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (bf16 autocast on cuda)"})
    seed: int = field(default=0, metadata={"help": "seed (init, data order, dropout)"})
    out_dir: str = field(default="", metadata={"help": "default runs/pt_peft_train/<dataset>-<order>-<peft>"})
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/ckpt.pt"})
    overwrite: bool = field(default=False, metadata={"help": "discard previous results in out_dir"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    log_every: int = field(default=20, metadata={"help": "log a training line every N steps"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    cache_dir: str = field(default="cache", metadata={"help": "cache of the pre-trained tiny BLIP-2 / features"})


class UsageError(ValueError):
    """Bad flags: printed as `error: ...`, exit 2."""


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


def resolve(a: Args) -> Args:
    """Fill the -1 sentinels (paper value for HF models, offline value for --model tiny) and validate."""
    a = dataclasses.replace(a)
    tiny = a.model == "tiny"
    if a.order not in ORDERS:
        raise UsageError(f"unknown --order {a.order!r}; choose from {', '.join(ORDERS)}")
    if a.peft not in PEFTS:
        raise UsageError(f"unknown --peft {a.peft!r}; choose from {', '.join(PEFTS)}")
    if a.peft_target not in QKV_NAMES:
        raise UsageError(f"unknown --peft_target {a.peft_target!r}; choose from {', '.join(QKV_NAMES)}")
    if a.dataset not in data.DATASETS:
        raise UsageError(f"unknown dataset {a.dataset!r}; choose from {', '.join(data.DATASETS)}")
    a.prefix_mode = pt.resolve_prefix_mode(a.prefix_mode, a.model)   # auto: kv for tiny (DEVIATION there)
    if a.prefix_mode not in ("input", "kv"):
        raise UsageError(f"unknown --prefix_mode {a.prefix_mode!r}; choose from input, kv")
    if a.epochs > 0:
        a.pt_epochs = a.ft_epochs = a.epochs
    a.pt_epochs = a.pt_epochs if a.pt_epochs >= 0 else (TINY["pt_epochs"] if tiny else 5)
    a.ft_epochs = a.ft_epochs if a.ft_epochs >= 0 else (TINY["ft_epochs"] if tiny else 5)
    a.pt_lr = a.pt_lr if a.pt_lr > 0 else (TINY["pt_lr"] if tiny else 5e-5)
    a.lr = a.lr if a.lr > 0 else (TINY["lr_full" if a.peft == "full" else "lr"] if tiny else (1e-5 if a.peft == "full" else 1e-4))
    a.batch_size = a.batch_size if a.batch_size > 0 else (TINY["batch_size"] if tiny else 128)
    if a.eval_limit < 0 and tiny:
        a.eval_limit = TINY["eval_limit"]
    if a.num_beams < 1:
        a.num_beams = 1 if tiny else 5      # DEVIATION (tiny only): greedy captions keep the default run ~2 min
    if a.train_limit < 0 and tiny:
        a.train_limit = TINY["train_limit"]
    if a.pt_epochs + a.ft_epochs <= 0:
        raise UsageError("nothing to train: --pt_epochs + --ft_epochs must be > 0")
    if a.num_prefix <= 0 and a.order != "none":
        raise UsageError("--num_prefix must be > 0 (use --order none for PEFT without a prefix)")
    if not 0 < a.rank_threshold <= 1:
        raise UsageError(f"--rank_threshold must be in (0, 1], got {a.rank_threshold}")
    if a.num_seeds < 1:
        raise UsageError("--num_seeds must be >= 1")
    if a.lora_r <= 0 or a.adapter_dim <= 0:
        raise UsageError("--lora_r and --adapter_dim must be > 0")
    if not a.out_dir:
        a.out_dir = os.path.join("runs", "pt_peft_train", f"{a.dataset}-{'compare' if a.compare else a.order}-{a.peft}")
    return a


# Offline tiny defaults (paper values cannot run on a CPU in two minutes); tuned in README 'pt_peft_train'.
TINY = dict(pt_epochs=5, ft_epochs=5, pt_lr=1e-2, lr=1e-3, lr_full=3e-4, batch_size=16, eval_limit=300, train_limit=-1)


# ----------------------------------------------------------------------------------
# 3a. Representation analysis (Sec. 2.3, Eq. 1-5, Table 1, Fig. 4)
# ----------------------------------------------------------------------------------
def _as_matrices(features, mask=None) -> list[torch.Tensor]:
    """features: (K, L, d) tensor [+ bool mask (K, L) of the rows to keep] or a list of (L_k, d)."""
    if isinstance(features, torch.Tensor):
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3:
            raise ValueError(f"features must be (K, L, d) or a list of (L_k, d); got {tuple(features.shape)}")
        mats = [f[m.bool()] for f, m in zip(features, mask)] if mask is not None else list(features)
    else:
        mats = list(features)
    mats = [m.detach().double().cpu() for m in mats if m.shape[0] > 0]
    if not mats:
        raise ValueError("effective_rank: no feature rows")
    return mats


def sv_curve(features, mask=None) -> torch.Tensor:
    """Eq. (2)-(5): per-sample SVD F_k = U S V^T, singular values sorted (descending) and normalised to sum 1
    (Eq. 3), averaged over the K samples (Eq. 4), cumulative sum y (Eq. 5). Returns y, shape (M,).

    Different lengths (the paper does not say): sample k has M_k = min(L_k, d) singular values; its normalised
    vector is right-padded with zeros to M = max_k M_k (a shorter sequence has no mass on the extra basis
    vectors), then averaged. For equal lengths this is exactly Eq. (4)."""
    mats = _as_matrices(features, mask)
    M = max(min(m.shape) for m in mats)
    acc = torch.zeros(M, dtype=torch.float64)
    for m in mats:
        s = torch.linalg.svdvals(m)                          # (M_k,) descending, Eq. (2)
        acc[: s.numel()] += s / s.sum().clamp_min(1e-300)    # Eq. (3)
    return torch.cumsum(acc / len(mats), 0)                  # Eq. (4)-(5)


def rank_from_curve(y: torch.Tensor, threshold: float = 0.9) -> float:
    """Table 1: the smallest fraction k/M of basis vectors whose accumulated singular values reach threshold."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    k = int(torch.searchsorted(y, torch.tensor(threshold - 1e-9, dtype=y.dtype)).item()) + 1
    return min(k, y.numel()) / y.numel()


def effective_rank(features, threshold: float = 0.9, mask=None) -> float:
    """Effective-rank ratio of Table 1 (the paper's per-sample average, Eq. 1-5)."""
    return rank_from_curve(sv_curve(features, mask), threshold)


def pooled_effective_rank(features, threshold: float = 0.9, mask=None) -> float:
    """Variant (not in the paper): all tokens of the set stacked into ONE (sum_k L_k, d) matrix. A sample of
    ~12 rows moves in steps of 1/12; the pooled matrix resolves changes of 1/d."""
    return rank_from_curve(sv_curve([torch.cat(_as_matrices(features, mask), 0)]), threshold)


# ----------------------------------------------------------------------------------
# 3b. LoRA (Hu et al. 2022; App. B.5: Q, K, V projections, r=16, alpha=32, dropout 0.05)
# ----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W x + b + (alpha/r) B A dropout(x). lora_A (r, in) Kaiming-uniform, lora_B (out, r) zero: the layout
    of loralib / HF peft, so the weights map one-to-one; merge() folds B A into W for inference."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.05):
        super().__init__()
        self.base, self.r, self.scaling, self.merged = base, r, alpha / r, False
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):                                    # x (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:                  # (out, in)
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


# ----------------------------------------------------------------------------------
# 3c. Adapters (the paper's S-/P-Adapter of Hu et al. 2023; Houlsby et al. 2019; He et al. 2022)
# ----------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """down (d -> m), ReLU, up (m -> d); `up` zero-initialised so the patched model starts equal to the base."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, h):                                    # (B, L, d) -> (B, L, d)
        return self.up(F.relu(self.down(h)))


class AdapterHook:
    """Attach a Bottleneck to the FFN of one decoder layer with forward hooks (OPT keeps fc1 -> act -> fc2 inline
    in the layer; LLaMA/T5 have an `mlp`/`DenseReluDense` module -- one mechanism covers both):
      sequential (S-Adapter, Houlsby):  y = FFN(x);  y <- y + adapter(y)
      parallel   (P-Adapter, He et al.): y = FFN(x);  y <- y + adapter(x)   (x: the FFN input)"""

    def __init__(self, ffn_in: nn.Module, ffn_out: nn.Module, adapter: Bottleneck, parallel: bool):
        self.adapter, self.parallel, self._x = adapter, parallel, None
        self.handles = [ffn_out.register_forward_hook(self._post)]
        if parallel:
            self.handles.append(ffn_in.register_forward_pre_hook(self._pre))

    def _pre(self, module, args):
        self._x = args[0]

    def _post(self, module, args, out):
        if self.parallel:
            x, self._x = self._x, None
            return out + self.adapter(x)
        return out + self.adapter(out)


# ----------------------------------------------------------------------------------
# 4. Patching the LMM
# ----------------------------------------------------------------------------------
QKV_NAMES = {"language_model": ("q_proj", "k_proj", "v_proj", "q", "k", "v"),   # OPT / LLaMA / T5
             "qformer": ("query", "key", "value")}                            # Blip2 Q-Former (BERT)
FFN_NAMES = (("fc1", "fc2"), ("mlp", "mlp"), ("DenseReluDense", "DenseReluDense"))   # OPT, LLaMA, T5
FROZEN_IN_FULL = ("embed_tokens", "lm_head", "shared")        # B.5: word embeddings + head stay frozen


def _root(model: nn.Module, target: str) -> nn.Module:
    """model.<target> or, inside a wrapper, the shallowest submodule named <target>."""
    hits = sorted((n.count("."), n) for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == target)
    root = model.get_submodule(hits[0][1]) if hits else None
    if not isinstance(root, nn.Module):
        raise UsageError(f"cannot patch {type(model).__name__}: expected a submodule `{target}`")
    return root


def add_lora(model: nn.Module, target: str, r: int, alpha: float, dropout: float) -> list[str]:
    """Wrap every nn.Linear named like a Q/K/V projection under model.<target> in a LoRALinear."""
    # DEVIATION: for BLIP-2 the paper's Table 8 lists LoRA on the ViT / Q-Former Q,K,V (and B.5 trains only the
    # Q-Former in PT-LoRA); the issue asks for the language model's q/k/v. Default language_model; --peft_target
    # qformer gives the paper's placement for the Q-Former.
    root, names = _root(model, target), QKV_NAMES[target]
    hits = [(n, m) for n, m in root.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear)]
    if not hits:
        raise UsageError(f"cannot patch {target} ({type(root).__name__}): expected nn.Linear modules named "
                         f"{'/'.join(names)}")
    for n, m in hits:
        parent = root.get_submodule(n.rsplit(".", 1)[0]) if "." in n else root
        setattr(parent, n.rsplit(".", 1)[-1], LoRALinear(m, r, alpha, dropout))
    return [f"{target}.{n}" for n, _ in hits]


def merge_lora(model: nn.Module) -> int:
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.merge()
    return len(mods)


def add_adapters(model: nn.Module, target: str, dim: int, parallel: bool) -> list[AdapterHook]:
    """One bottleneck adapter per decoder layer after (S) / beside (P) its FFN, registered as `<layer>.adapter`."""
    # DEVIATION: Houlsby et al. put two adapters per layer (after attention and after the FFN); we follow the
    # paper's cited S-/P-Adapter implementation (Hu et al. 2023, LLM-Adapters: one adapter at the FFN), and size
    # the bottleneck so the trainable count matches LoRA's (Sec. 4.1 "we matched the number of trainable parameters").
    root, hooks = _root(model, target), []
    for _, layer in list(root.named_modules()):
        for fin, fout in FFN_NAMES:
            a, b = getattr(layer, fin, None), getattr(layer, fout, None)
            if isinstance(a, nn.Module) and isinstance(b, nn.Module) and not isinstance(layer, Bottleneck):
                lin = a if isinstance(a, nn.Linear) else next(m for m in a.modules() if isinstance(m, nn.Linear))
                ref = lin.weight
                layer.adapter = Bottleneck(lin.in_features, dim).to(ref.device, ref.dtype)
                hooks.append(AdapterHook(a, b, layer.adapter, parallel))
                break
    if not hooks:
        raise UsageError(f"cannot patch {target} ({type(root).__name__}): expected decoder layers with an FFN "
                         "named fc1/fc2 (OPT), mlp (LLaMA) or DenseReluDense (T5)")
    return hooks


def add_peft(model: nn.Module, a: Args) -> list:
    """Stage-2 parameters (returned: hooks to keep alive). full: nothing is added."""
    if a.peft == "lora":
        add_lora(model, a.peft_target, a.lora_r, a.lora_alpha, a.lora_dropout)
        return []
    if a.peft in ("s_adapter", "p_adapter"):
        return add_adapters(model, a.peft_target, a.adapter_dim, parallel=a.peft == "p_adapter")
    _root(model, "language_model")
    return []


def is_peft_param(name: str, a: Args) -> bool:
    if a.peft == "lora":
        return ".lora_A" in name or ".lora_B" in name
    if a.peft in ("s_adapter", "p_adapter"):
        return ".adapter." in name
    return ".language_model." in f".{name}" and not any(f".{k}." in f".{name}" for k in FROZEN_IN_FULL)


# ----------------------------------------------------------------------------------
# 4c. The prefix-tuned LMM: everything here is delegated to prefix_tuning.py (stage 1 of PT-PEFT)
# ----------------------------------------------------------------------------------
def pt_context(a: Args, device) -> dict:
    """Pre-trained LMM (cached), tokenizer, records: downstream train/eval and the pre-training-mix eval set."""
    return pt.setup(a, device)


def pt_build(a: Args, ctx: dict, device, with_prefix: bool) -> nn.Module:
    return pt.build(ctx, a.num_prefix if with_prefix else 0).to(device)


def pt_is_prefix_param(name: str) -> bool:
    return name.startswith("prefix_encoder.")


def pt_set_prefix(model: nn.Module, state):
    """"on" (learned prefix) | "off" (no prefix tokens at all) | a tensor shaped like pt_export_prefix()."""
    model.prefix_state = state


def pt_export_prefix(model: nn.Module) -> torch.Tensor:
    """App. B.1: the encoder's output as a plain tensor (input mode (P, d); kv mode (layers, 2, P, d_kv))."""
    return model.prefix_encoder.export()


@torch.no_grad()
def pt_evaluate(model: nn.Module, recs: list, a: Args, ctx: dict, desc: str) -> dict:
    """Generation scores from prefix_tuning.evaluate + the teacher-forced CE of the targets ("loss"): on ~100 tiny
    eval samples CIDEr swings with whether one or all objects are named; the CE is the steadier forgetting signal."""
    r = dict(pt.evaluate(model, recs, ctx, show=False))
    model.eval()
    tot = n = 0.0
    for i in range(0, len(recs), 32):
        b = ctx["collate"](recs[i:i + 32])
        k = (b["labels"] != -100).sum().item()
        tot, n = tot + model(b).item() * k, n + k
    r["loss"] = round(tot / max(n, 1), 4)
    return r


@torch.no_grad()
def pt_features(model: nn.Module, recs: list, a: Args, ctx: dict) -> list:
    """Last-layer LM features of each sample's whole LM sequence except the prefix (visual tokens + text)."""
    model.eval()
    out = []
    for i in range(0, len(recs), 32):
        h, m = model.features(ctx["collate"](recs[i:i + 32]))       # (B, L, d), (B, L); text left-padded
        out += [hh[mm.bool()].float().cpu() for hh, mm in zip(h, m)]
    return out


def pt_zero_shot(a: Args, ctx: dict, device) -> dict:
    """The pre-trained model, no prefix / PEFT: its downstream and pre-training-mix scores and effective rank."""
    model = pt_build(a, ctx, device, with_prefix=False)
    return {"trainable_pct": 0.0, "downstream": pt_evaluate(model, ctx["records"]["eval"], a, ctx, "zero-shot"),
            "pretrain_mix": pt_evaluate(model, ctx["records"]["mix"], a, ctx, "zero-shot mix"),
            "rank": {k: v for k, v in rank_report(pt_features(model, ctx["records"]["eval"][: a.rank_samples], a, ctx),
                                                  a.rank_threshold).items() if not k.startswith("curve")}}


# ----------------------------------------------------------------------------------
# 4b. Stages (Sec. 3 "Two-stage Optimization"; Table 2 / Table 5 / Table 6 variants)
# ----------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str             # "prefix" | "peft" | "joint"
    train: tuple          # parameter groups that train: ("prefix",), ("peft",), ("prefix", "peft")
    epochs: int
    lrs: dict             # group -> learning rate
    use_prefix: bool      # whether the prefix is in the forward pass during this stage


def stage_plan(a: Args) -> list[Stage]:
    """pt_first: prefix (LMM frozen) -> PEFT + prefix (Sec. 3: 'we adjust the parameters, including prefixes').
    peft_first: PEFT without prefix -> prefix-tuning of the adapted, now frozen model ('X -> Prefix').
    parallel: prefix and PEFT jointly from the start. none / prefix_only: one method alone.
    One-stage orders train pt_epochs + ft_epochs epochs, so every order has the same budget."""
    # DEVIATION (interpretation): the paper does not say whether the PEFT weights keep training in the second stage
    # of "X -> Prefix"; as that stage is *prefix-tuning* (LMM frozen, B.5), they are frozen there. In PT-PEFT's
    # second stage the prefix trains with the stage-2 LR (Table 13 gives one LR for "PT-LoRA (2nd stage)").
    P, E, tot = a.pt_lr, a.lr, a.pt_epochs + a.ft_epochs
    plans = {
        "pt_first": [Stage("prefix", ("prefix",), a.pt_epochs, {"prefix": P}, True),
                     Stage("peft", ("prefix", "peft"), a.ft_epochs, {"prefix": E, "peft": E}, True)],
        "peft_first": [Stage("peft", ("peft",), a.ft_epochs, {"peft": E}, False),
                       Stage("prefix", ("prefix",), a.pt_epochs, {"prefix": P}, True)],
        "parallel": [Stage("joint", ("prefix", "peft"), tot, {"prefix": P, "peft": E}, True)],
        "none": [Stage("peft", ("peft",), tot, {"peft": E}, False)],
        "prefix_only": [Stage("prefix", ("prefix",), tot, {"prefix": P}, True)],
    }
    return [s for s in plans[a.order] if s.epochs > 0]


def param_groups(model: nn.Module, a: Args) -> dict[str, list[str]]:
    """Names of the method's parameters: 'prefix' (embeddings, type embedding, MLP) and 'peft'."""
    g = {"prefix": [], "peft": []}
    for n, _ in model.named_parameters():
        if pt_is_prefix_param(n):
            g["prefix"].append(n)
        elif a.order != "prefix_only" and is_peft_param(n, a):
            g["peft"].append(n)
    if a.order != "none" and not g["prefix"]:
        raise UsageError("no prefix parameters found after attaching the prefix encoder")
    if a.order != "prefix_only" and not g["peft"]:
        raise UsageError(f"no {a.peft} parameters found under {a.peft_target}")
    return g


def set_trainable(model: nn.Module, names: set) -> tuple[int, int]:
    """requires_grad exactly on `names`; asserts on the set of names (CONVENTIONS)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == set(names), f"trainable set mismatch: {sorted(got ^ set(names))[:5]}"
    n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_tr, sum(p.numel() for p in model.parameters())


def fmt_trainable(n: int, m: int) -> str:
    return f"trainable: {n} || all: {m} || {100 * n / m:.4f}%"


# ----------------------------------------------------------------------------------
# 5. Infrastructure (deliberately repeated per script)
# ----------------------------------------------------------------------------------
def setup_dist(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    rank = 0
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        if device_arg.startswith("cuda"):
            torch.cuda.set_device(local)
            device_arg = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_arg.startswith("cuda") else "gloo")
    return torch.device(device_arg), rank, world


def seed_all(seed: int):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict):
    random.setstate(s["python"]), np.random.set_state(s["numpy"]), torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def linear_warmup_decay(opt, warmup: int, total: int):
    """B.4: linear warm-up from 0 to the max LR, then linear decay to 0."""
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def method_state(model: nn.Module, names: set) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in names}


class NonFinite(RuntimeError):
    pass


# ----------------------------------------------------------------------------------
# 6. Training (all stages, one checkpoint format, exact resume also across the stage boundary)
# ----------------------------------------------------------------------------------
def train(a: Args, model: nn.Module, groups: dict, plan: list[Stage], train_recs: list, collate, device,
          rank: int, world: int, ckpt_path: str, log, on_stage_end=None) -> dict:
    all_names = set(groups["prefix"]) | set(groups["peft"])
    start_stage, start_step, gstep = 0, 0, 0
    ck = None
    if a.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing = all_names - set(ck["params"])
        if missing:
            raise UsageError(f"checkpoint {ckpt_path} does not match this configuration (missing {sorted(missing)[:3]})")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ck["params"]:
                    p.copy_(ck["params"][n].to(p.device, p.dtype))
        start_stage, start_step, gstep = ck["stage"], ck["step"], ck["global_step"]
        log(f"resumed from {ckpt_path}: stage {start_stage + 1}, step {start_step}, global step {gstep}")
    loader = data.make_loader(train_recs, a.batch_size, shuffle=True, seed=a.seed, collate_fn=collate,
                              num_workers=a.num_workers, drop_last=len(train_recs) >= a.batch_size * world)
    spe = len(loader)
    if spe == 0:
        raise UsageError(f"no training batches ({len(train_recs)} records, batch size {a.batch_size} x {world} procs)")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    history = []

    def save(stage_i, step_i, opt=None, sched=None, done=False):
        if rank == 0:
            atomic_save({"stage": stage_i, "step": step_i, "global_step": gstep, "done": done,
                         "params": method_state(model, all_names), "optim": opt.state_dict() if opt else None,
                         "sched": sched.state_dict() if sched else None, "rng": rng_state(),
                         "args": dataclasses.asdict(a)}, ckpt_path)
        return ckpt_path

    last_good = ckpt_path if ck is not None else "none"
    for si, st in enumerate(plan):
        if si < start_stage:
            continue
        names = {n for g in st.train for n in groups[g]}
        n_tr, n_all = set_trainable(model, names)
        pt_set_prefix(model, "on" if st.use_prefix else "off")
        log(f"[stage {si + 1}/{len(plan)} {st.name}] {fmt_trainable(n_tr, n_all)} | epochs {st.epochs} lrs {st.lrs}")
        total = st.epochs * spe
        warm = a.warmup_steps if a.warmup_steps >= 0 else (max(1, total // 10) if a.model == "tiny" else 5000)
        pg = [{"params": [p for n, p in model.named_parameters() if n in groups[g]], "lr": st.lrs[g]} for g in st.train]
        pg = [g for g in pg if g["params"]]
        opt = torch.optim.AdamW(pg, betas=(0.9, 0.99), weight_decay=a.weight_decay)
        sched = linear_warmup_decay(opt, min(warm, total - 1), total)
        step = 0
        if ck is not None and si == start_stage and start_step > 0:
            opt.load_state_dict(ck["optim"]), sched.load_state_dict(ck["sched"])
            step = start_step
        if ck is not None and si == start_stage:
            set_rng_state(ck["rng"])
        net = DDP(model, find_unused_parameters=False) if world > 1 else model
        model.train()
        bar = tqdm(total=total, initial=step, desc=f"stage {si + 1} {st.name}", disable=rank != 0, leave=False)
        try:
            while step < total and (a.max_steps < 0 or gstep < a.max_steps):
                epoch, skip = divmod(step, spe)
                data.set_epoch(loader, epoch)
                for bi, batch in enumerate(loader):
                    if bi < skip:
                        continue
                    if step >= total or (0 <= a.max_steps <= gstep):
                        break
                    with amp:
                        loss = net(batch)
                    if not torch.isfinite(loss):
                        raise NonFinite(f"non-finite loss at step {gstep}; last good checkpoint: {last_good}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step(), sched.step()
                    step, gstep = step + 1, gstep + 1
                    bar.update(1)
                    if gstep % a.log_every == 0 or step == total:
                        rec = {"stage": si + 1, "stage_name": st.name, "step": step, "global_step": gstep,
                               "epoch": epoch, "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0]}
                        history.append(rec)
                        log(json.dumps(rec), metrics=rec)
                    if gstep % a.save_every == 0 and step < total:
                        last_good = save(si, step, opt, sched)
        except KeyboardInterrupt:
            bar.close()
            save(si, step, opt, sched)
            log(f"interrupted: checkpoint saved to {ckpt_path} (continue with --resume)")
            raise
        bar.close()
        if step < total:        # stopped by --max_steps: final checkpoint of this partial run
            last_good = save(si, step, opt, sched)
            return {"history": history, "finished": False, "global_step": gstep}
        last_good = save(si + 1, 0, done=si + 1 == len(plan))
        if on_stage_end is not None:
            on_stage_end(si, st)
    pt_set_prefix(model, "on" if any(s.use_prefix for s in plan) else "off")
    return {"history": history, "finished": True, "global_step": gstep}


# ----------------------------------------------------------------------------------
# 7. Evaluation: task score, Table-5 prefix ablation, score on the pre-training mix, effective rank
# ----------------------------------------------------------------------------------
def matched_noise(prefix: torch.Tensor, seed: int) -> torch.Tensor:
    """Table 5 '-Prefix +Noise': Gaussian vectors rescaled to the norms of the learned prefix vectors (last dim)."""
    # DEVIATION: the paper says only "random noise"; we match each prefix vector's norm so the scale is comparable.
    g = torch.randn(prefix.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    g = g.to(prefix.device, prefix.dtype)
    return g * (prefix.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def rank_report(feats: list, threshold: float) -> dict:
    y = sv_curve(feats)
    yp = sv_curve([torch.cat(_as_matrices(feats), 0)])
    return {"eff_rank": round(100 * rank_from_curve(y, threshold), 2),
            "eff_rank_pooled": round(100 * rank_from_curve(yp, threshold), 2),
            "curve": y.tolist(), "curve_pooled": yp.tolist()}


def write_curves(path: str, curves: dict):
    """Fig. 4 data: one row per basis-vector index, one column per model/checkpoint."""
    cols = sorted(curves)
    n = max(len(curves[c]) for c in cols)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "fraction"] + cols)
        for i in range(n):
            w.writerow([i + 1] + [None] + [curves[c][i] if i < len(curves[c]) else "" for c in cols])
    # fraction column (k / M) of the longest curve, filled after the fact for readability
    rows = list(csv.reader(open(path)))
    for i, r in enumerate(rows[1:]):
        r[1] = f"{(i + 1) / n:.5f}"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def final_eval(a: Args, model, recs: dict, ctx, log, prefix_used: bool) -> dict:
    res = {}
    merged = merge_lora(model)      # inference with W + (alpha/r) B A folded in (App. B.5 / Hu et al.)
    if merged:
        log(f"merged {merged} LoRA layers for inference")
    pt_set_prefix(model, "on" if prefix_used else "off")
    res["downstream"] = pt_evaluate(model, recs["eval"], a, ctx, "downstream")
    res["pretrain_mix"] = pt_evaluate(model, recs["mix"], a, ctx, "pretrain mix")
    if prefix_used:                  # Table 5: w/ Prefix, -Prefix, -Prefix +Noise
        P = pt_export_prefix(model)
        pt_set_prefix(model, "off")
        res["downstream_no_prefix"] = pt_evaluate(model, recs["eval"], a, ctx, "-prefix")
        pt_set_prefix(model, matched_noise(P, a.noise_seed))
        res["downstream_noise_prefix"] = pt_evaluate(model, recs["eval"], a, ctx, "-prefix +noise")
        pt_set_prefix(model, "off")      # what the *weights* kept of the pre-training mix, without the task prefix
        res["pretrain_mix_no_prefix"] = pt_evaluate(model, recs["mix"], a, ctx, "mix -prefix")
        pt_set_prefix(model, "on")
    res["rank"] = rank_report(pt_features(model, recs["eval"][: a.rank_samples], a, ctx), a.rank_threshold)
    return res


# ----------------------------------------------------------------------------------
# 8. One run / the comparison / main
# ----------------------------------------------------------------------------------
def run_one(a: Args, device, rank: int, world: int, log, shared=None) -> dict:
    """Build the pre-trained LMM, attach prefix / PEFT, train the stages, evaluate. Returns the results dict."""
    ctx = shared or pt_context(a, device)
    recs = ctx["records"]
    seed_all(a.seed)
    model = pt_build(a, ctx, device, with_prefix=a.order != "none")
    curves, ranks = {}, {}
    if a.analyze_rank:
        pt_set_prefix(model, "off")
        r = rank_report(pt_features(model, recs["eval"][: a.rank_samples], a, ctx), a.rank_threshold)
        curves["pretrained"], curves["pretrained_pooled"] = r["curve"], r["curve_pooled"]
        ranks["pretrained"] = {k: r[k] for k in ("eff_rank", "eff_rank_pooled")}
    hooks = add_peft(model, a) if a.order != "prefix_only" else []
    seed_all(a.seed)
    groups = param_groups(model, a)
    plan = stage_plan(a)
    n_all = sum(p.numel() for p in model.parameters())
    n_tr = sum(p.numel() for n, p in model.named_parameters() if n in set(groups["prefix"]) | set(groups["peft"]))
    log(fmt_trainable(n_tr, n_all))

    def on_stage_end(si, st):
        if a.analyze_rank and rank == 0:
            r = rank_report(pt_features(model, recs["eval"][: a.rank_samples], a, ctx), a.rank_threshold)
            tag = f"after_stage{si + 1}_{st.name}"
            curves[tag], curves[tag + "_pooled"] = r["curve"], r["curve_pooled"]
            ranks[tag] = {k: r[k] for k in ("eff_rank", "eff_rank_pooled")}
            log(f"[rank] {tag}: per-sample {r['eff_rank']}% pooled {r['eff_rank_pooled']}%")
            model.train()

    tr = train(a, model, groups, plan, recs["train"], ctx["collate"], device, rank, world,
               os.path.join(a.out_dir, "ckpt.pt"), log, on_stage_end)
    out = {"order": a.order, "peft": a.peft if a.order != "prefix_only" else None,
           "trainable": n_tr, "all": n_all, "trainable_pct": round(100 * n_tr / n_all, 4),
           "global_step": tr["global_step"], "finished": tr["finished"],
           "final_loss": tr["history"][-1]["loss"] if tr["history"] else None}
    if rank == 0:
        out.update(final_eval(a, model, recs, ctx, log, prefix_used=any(s.use_prefix for s in plan)))
        if a.analyze_rank:
            curves["final"], curves["final_pooled"] = out["rank"]["curve"], out["rank"]["curve_pooled"]
            ranks["final"] = {k: out["rank"][k] for k in ("eff_rank", "eff_rank_pooled")}
            write_curves(os.path.join(a.out_dir, "rank_curves.csv"), curves)
            out["rank_analysis"] = ranks
    if world > 1:
        dist.barrier()
    for h in hooks:
        for hd in h.handles:
            hd.remove()
    return out


def _reduce(runs: list, fn):
    """Apply fn (mean / std) leaf-wise over the result dicts of several seeds (non-numbers: first run's)."""
    x = runs[0]
    if isinstance(x, dict):
        return {k: _reduce([r[k] for r in runs], fn) for k in x if all(isinstance(r, dict) and k in r for r in runs)}
    if isinstance(x, (int, float)) and not isinstance(x, bool) and all(isinstance(r, (int, float)) for r in runs):
        return round(float(fn(runs)), 4)
    return x


def table_row(name: str, r: dict) -> str:
    d, m = r["downstream"], r["pretrain_mix"]
    np_ = r.get("downstream_no_prefix", {}).get("score")
    nz = r.get("downstream_noise_prefix", {}).get("score")
    f = lambda v: f"{v:7.2f}" if isinstance(v, (int, float)) else "      -"
    mn = r.get("pretrain_mix_no_prefix", {})
    return (f"| {name:<26} | {r['trainable_pct']:8.3f}% | {f(d['score'])} | {f(np_)} | {f(nz)} | {f(d['loss'])} "
            f"| {f(m['score'])} | {f(mn.get('score'))} | {f(m['loss'])} | {f(mn.get('loss'))} "
            f"| {f(r['rank']['eff_rank'])} | {f(r['rank']['eff_rank_pooled'])} |")


def print_table(rows: list, metric: str, mix_metric: str, extra: list = ()):
    hdr = (f"| {'method':<26} | trainable | {metric[:7]:>7} | -prefix | +noise  |   CE    |   mix   "
           f"| mix -pf | mix CE  | mCE -pf | effrank | pooled  |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for name, r in rows:
        print(table_row(name, r))
    for line in extra:
        print(line)


def variant_name(order: str, peft: str) -> str:
    p = PEFT_LABEL[peft]
    return {"pt_first": f"Prefix -> {p}", "peft_first": f"{p} -> Prefix", "parallel": f"Prefix + {p} (parallel)",
            "none": p, "prefix_only": "Prefix-tuning"}[order]


def main(argv=None) -> dict:
    try:
        a = resolve(parse_args(argv))
        device, rank, world = setup_dist(a.device)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    logf, threads = None, torch.get_num_threads()
    if a.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)   # tiny ops: 1 thread is as fast idle and many times faster on a busy CPU

    def log(msg, metrics=None):
        if rank != 0:
            return
        tqdm.write(msg)
        if metrics is not None and logf is not None:
            logf.write(json.dumps(metrics) + "\n"), logf.flush()

    try:
        res_path = os.path.join(a.out_dir, "results.json")
        if os.path.exists(res_path) and not (a.resume or a.overwrite):
            raise UsageError(f"results exist in {a.out_dir}; pass --overwrite (or --resume)")
        if rank == 0:
            if a.overwrite and os.path.isdir(a.out_dir):
                for f in ("ckpt.pt", "metrics.jsonl", "results.json", "rank_curves.csv"):
                    if os.path.exists(os.path.join(a.out_dir, f)):
                        os.remove(os.path.join(a.out_dir, f))
            os.makedirs(a.out_dir, exist_ok=True)
            logf = open(os.path.join(a.out_dir, "metrics.jsonl"), "a")
        if world > 1:
            dist.barrier()
        t0 = time.time()
        ctx = pt_context(a, device)
        if not a.compare:
            r = run_one(a, device, rank, world, log, ctx)
            results = {"args": dataclasses.asdict(a), "result": r, "seconds": round(time.time() - t0, 1)}
            rows = [(variant_name(a.order, a.peft), r)]
        else:
            results, rows, std_rows = {"args": dataclasses.asdict(a), "variants": {}}, [], []
            for order in ("prefix_only", "none", "pt_first", "peft_first", "parallel"):
                runs = []
                for sd in range(a.seed, a.seed + a.num_seeds):
                    sub = dataclasses.replace(a, order=order, seed=sd, compare=False,
                                              out_dir=os.path.join(a.out_dir, order, f"seed{sd}"))
                    if rank == 0:
                        os.makedirs(sub.out_dir, exist_ok=True)
                    log(f"=== {variant_name(order, a.peft)} (seed {sd}) ===")
                    runs.append(run_one(sub, device, rank, world, log, ctx))
                    for k in ("curve", "curve_pooled"):
                        runs[-1].get("rank", {}).pop(k, None)
                results["variants"][order] = runs
                rows.append((variant_name(order, a.peft), _reduce(runs, np.mean)))
                std_rows.append((variant_name(order, a.peft), _reduce(runs, np.std)))
            results["seconds"] = round(time.time() - t0, 1)
        if rank == 0:
            for _, r in rows:
                for k in ("curve", "curve_pooled"):
                    r.get("rank", {}).pop(k, None)
            zs = pt_zero_shot(a, ctx, device)
            results["pretrained"] = zs
            print(f"\nPT-PEFT on {a.dataset} ({ctx['task']}; score = {ctx['metric']}; mix = pre-training "
                  f"mix, {ctx['mix_metric']}; effrank = Table-1 effective rank %, per-sample / pooled), {results['seconds']}s")
            print_table([("pre-trained (zero-shot)", zs)] + rows, ctx["metric"], ctx["mix_metric"])
            if a.compare and a.num_seeds > 1:
                print(f"\nstd over {a.num_seeds} seeds ({a.seed}..{a.seed + a.num_seeds - 1}); the table above is the mean")
                print_table(std_rows, ctx["metric"], ctx["mix_metric"])
            if a.analyze_rank and not a.compare:
                print("effective rank along training:", json.dumps(rows[0][1].get("rank_analysis")))
            atomic_save_json(results, res_path)
        if world > 1:
            dist.barrier()
        return results
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    finally:
        torch.set_num_threads(threads)   # main() may run inside a larger process (tests)
        if logf is not None:
            logf.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def atomic_save_json(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
