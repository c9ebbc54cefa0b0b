"""routing_bottleneck.py -- routing functions inside LoRA / Adapter low-rank bottlenecks.

Paper: T. Qu, T. Tuytelaars, M.-F. Moens, "Introducing Routing Functions to Vision-Language
Parameter-Efficient Fine-Tuning with Low-Rank Bottlenecks", ECCV 2024, arXiv 2403.09377.
Released code (read for facts, nothing copied): github.com/tingyu215/Routing_VLPEFT.

Idea. LoRA and Adapter push the LM hidden state x_H through a rank-r bottleneck W_down. For
vision-language tasks the visual feature x_R goes through the *same* W_down, and a parameter-free
linear "routing function" mixes the two bottleneck features before W_up:
    x_t = W_down x_H  (B, L, r)          x_v = W_down x_R  (B, N, r)
    LoRA:    h = W x_H + (alpha / r) * W_up route(x_t, x_v)
    Adapter: h = x_H + W_up act(route(x_t, x_v))
    route: x_t (plain PEFT) | x_t o x'_v | x_t + x'_v | x_t (x_v)^T x_v | x_t x''_v
Routing adds no parameters. The pooled visual feature (N = 1) is also the LM's first input token.

Setting (as in the released code): frozen vision encoder, pooled feature; GPT-2 captioning with LoRA
on the q and v parts of the fused c_attn (adapters after the attention and MLP outputs), CE on
caption tokens, beam search; RoBERTa VQA as classification over the answer vocabulary (frozen pooler
on token 0 = the visual token, trainable 2-layer head, BCE on soft scores). LLaMA-family causal LMs
are patched at q_proj/v_proj (LoRA) and o_proj/down_proj (Adapter). Offline (--model tiny on shapes_*),
the frozen LM is a tiny GPT-2 pre-trained text-only on the captions and the frozen vision encoder a small
CNN pre-trained to name objects in images of another synthetic world (both cached; see DEVIATIONs).

Examples
  python routing_bottleneck.py                      # tiny GPT-2, synthetic captions, LoRA: none vs x_t o x'_v
  python routing_bottleneck.py --compare            # none + 4 routings x {LoRA, Adapter}, poster-like table
  python routing_bottleneck.py --dataset shapes_vqa # tiny RoBERTa, synthetic VQA
  python routing_bottleneck.py --model tiny-llama --method adapter --kinds none,xtxvTxv
  python routing_bottleneck.py --dataset coco --data_root DATA --model gpt2 \
      --vision google/vit-base-patch16-224-in21k --compare
  torchrun --nproc_per_node 2 routing_bottleneck.py --max_steps 200
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

import data

CAPTION_SETS = ("shapes_caption", "coco", "flickr30k")
VQA_SETS = ("shapes_vqa", "vqav2", "gqa")
ROUTINGS = ("none", "mul", "add", "xtxvTxv", "xtxv2")
LABELS = {"none": "None", "mul": "x_t o x'_v", "add": "x_t + x'_v",
          "xtxvTxv": "x_t (x_v)^T x_v", "xtxv2": "x_t x''_v"}


# ---------------------------------------------------------------------------------------------
# 1. Arguments. None = "resolved in resolve()": the paper/released value for a real model, a small
#    tuned value for --model tiny* (the paper values cannot run offline on a CPU in minutes).
# ---------------------------------------------------------------------------------------------
@dataclass
class Args:
    dataset: str = field(default="shapes_caption", metadata={"help": "shapes_caption|coco|flickr30k (captioning) or shapes_vqa|vqav2|gqa (VQA)"})
    data_root: Optional[str] = field(default=None, metadata={"help": "root of the official dataset files (not needed for shapes_*)"})
    model: str = field(default="tiny", metadata={"help": "tiny (=tiny-gpt2 for captions, tiny-roberta for VQA) | tiny-gpt2 | tiny-llama | tiny-roberta | HF id/path (gpt2, roberta-base, a LLaMA)"})
    vision: str = field(default="auto", metadata={"help": "auto | tiny-cnn (offline: small CNN pre-trained on a different synthetic world, frozen; cached) | patches (raw-pixel patches) | a HF ViT/CLIP id/path whose pooled feature is used (paper: google/vit-base-patch16-224-in21k); auto = tiny-cnn for tiny models on shapes_*, patches for tiny models on real data, else the paper's ViT"})
    vision_pretrain_steps: int = field(default=1000, metadata={"help": "tiny-cnn: supervised pre-training steps (cached by settings in --cache_dir)"})
    cache_dir: str = field(default="cache", metadata={"help": "cache of the pre-trained tiny vision encoder"})
    method: str = field(default="lora", metadata={"help": "lora | adapter | both"})
    kinds: str = field(default="none,mul", metadata={"help": "comma list of routing functions to train: none,mul,add,xtxvTxv,xtxv2"})
    compare: bool = field(default=False, metadata={"help": "train none + all 4 routings for LoRA and Adapter on the same data/budget, print a poster-like table"})
    # (not "--r": torchrun's argparse rejects it as an ambiguous abbreviation of its --rdzv*/--role/... options)
    r_bottleneck: Optional[int] = field(default=None, metadata={"help": "bottleneck rank r of LoRA and Adapter (paper 64/128; released scripts 128); tiny: 8"})
    alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (scaling alpha/r); default = r_bottleneck as in the paper"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA inputs (released GPT-2 scripts: 0)"})
    train_ln: bool = field(default=False, metadata={"help": "also train the blocks' LayerNorms (the released GPT-2 code does unless --freeze_ln)"})
    visual_tokens: str = field(default="pooled", metadata={"help": "pooled (N=1, paper) | grid (N>1 visual tokens; formulas as written, see DEVIATION in route)"})
    pool_grid: int = field(default=0, metadata={"help": "patches only: average-pool the s x s patch grid to g x g cells (0: g = s, no averaging)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "image side for the vision encoder (224 real; 48 for patches)"})
    patch_size: int = field(default=8, metadata={"help": "patch side for the 'patches' encoder"})
    tiny_hidden: int = field(default=64, metadata={"help": "hidden width of the tiny LMs"})
    tiny_layers: int = field(default=2, metadata={"help": "layers of the tiny LMs"})
    tiny_pretrain_steps: int = field(default=400, metadata={"help": "tiny causal LMs: text-only LM pre-training on the train captions (no images) before freezing, standing in for pretrained GPT-2; 0 = frozen random LM"})
    train_limit: Optional[int] = field(default=None, metadata={"help": "use only the first N train records"})
    eval_split: str = field(default="test", metadata={"help": "split used for the final evaluation (Karpathy test for COCO)"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "evaluate only the first N records of eval_split"})
    num_beams: Optional[int] = field(default=None, metadata={"help": "beam size for caption generation (released test script: 5); 1 = greedy"})
    max_len: int = field(default=50, metadata={"help": "max text tokens (caption or question)"})
    max_gen_len: int = field(default=30, metadata={"help": "max generated caption tokens"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed for the tiny LM init, PEFT init and data order"})
    out_dir: Optional[str] = field(default=None, metadata={"help": "default runs/routing_bottleneck/<dataset>-<model>"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoints in out_dir"})
    overwrite: bool = field(default=False, metadata={"help": "overwrite existing results in out_dir"})
    epochs: Optional[int] = field(default=None, metadata={"help": "training epochs (released: 20)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "if set, train exactly this many optimizer steps (overrides epochs)"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "per-process batch size (released: 40 captioning, 512 VQA)"})
    lr: Optional[float] = field(default=None, metadata={"help": "AdamW lr (released: 3e-5 GPT-2 captioning, 3e-4 RoBERTa VQA)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (released: 0)"})
    warmup: Optional[float] = field(default=None, metadata={"help": "linear warmup: steps if >= 1 else fraction of all steps (released: 5000 steps captioning, 0.05 VQA)"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip grad norm (0 = off, as released)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    log_every: int = field(default=50, metadata={"help": "log a line every N steps"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    stop_at_step: int = field(default=0, metadata={"help": "debug: stop like an interruption after N steps (keeps the full schedule); 0 = off"})


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        h = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", action="store_true", help=h)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f"{h} (default: {f.default})")
    return Args(**vars(p.parse_args(argv)))


def resolve(a: Args) -> Args:
    """Fill the None defaults: paper/released values for real models, tuned tiny values otherwise."""
    if a.dataset not in CAPTION_SETS + VQA_SETS:
        raise ValueError(f"unknown dataset {a.dataset!r}; this method supports captioning {CAPTION_SETS} and VQA {VQA_SETS}")
    task = "caption" if a.dataset in CAPTION_SETS else "vqa"
    if a.model == "tiny":
        a.model = "tiny-gpt2" if task == "caption" else "tiny-roberta"
    if a.model.startswith("tiny") and a.model not in ("tiny-gpt2", "tiny-llama", "tiny-roberta"):
        raise ValueError(f"unknown tiny model {a.model!r}; choose tiny, tiny-gpt2, tiny-llama, tiny-roberta or a HF id/path")
    if a.method not in ("lora", "adapter", "both"):
        raise ValueError(f"unknown --method {a.method!r}; choose lora, adapter or both")
    if a.visual_tokens not in ("pooled", "grid"):
        raise ValueError(f"unknown --visual_tokens {a.visual_tokens!r}; choose pooled or grid")
    if a.compare:
        a.method, a.kinds = "both", ",".join(ROUTINGS)
    bad = [k for k in a.kinds.split(",") if k not in ROUTINGS]
    if bad or not a.kinds:
        raise ValueError(f"unknown routing kind(s) {bad}; choose from {','.join(ROUTINGS)}")
    tiny = a.model.startswith("tiny")
    real = {"caption": dict(r_bottleneck=128, lr=3e-5, batch_size=40, epochs=20, warmup=5000, num_beams=5),
            "vqa": dict(r_bottleneck=128, lr=3e-4, batch_size=512, epochs=20, warmup=0.05, num_beams=1)}[task]
    # DEVIATION (tiny models only): rank 8, lr 3e-3, batch 32, 2-3 epochs, 5% warmup, beam 3, so that the
    # offline default trains in ~1 minute on one CPU thread; the released values above are for real models.
    small = {"caption": dict(r_bottleneck=8, lr=3e-3, batch_size=32, epochs=2, warmup=0.05, num_beams=3),
             "vqa": dict(r_bottleneck=8, lr=3e-3, batch_size=32, epochs=3, warmup=0.05, num_beams=1)}[task]
    for k, v in (small if tiny else real).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.alpha = float(a.r_bottleneck) if a.alpha is None else a.alpha
    if a.vision == "auto":
        a.vision = ("tiny-cnn" if a.dataset.startswith("shapes") else "patches") if tiny \
            else "google/vit-base-patch16-224-in21k"
    a.image_size = a.image_size or (48 if a.vision in ("patches", "tiny-cnn") else 224)
    if a.out_dir is None:
        what = "compare" if a.compare else f"{a.method}-{a.kinds.replace(',', '_')}"
        a.out_dir = os.path.join("runs", "routing_bottleneck", f"{a.dataset}-{a.model.replace('/', '_')}-{what}")
    return a


# ---------------------------------------------------------------------------------------------
# 2. The routing functions (Sec. 3, Table 1 of the paper): pure, parameter-free, linear in x_t.
# ---------------------------------------------------------------------------------------------
def route(x_t: torch.Tensor, x_v: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """x_t (B, L, r) = W_down x_H, x_v (B, N, r) = W_down x_R -> routed bottleneck feature (B, L, r).

    For N = 1 (pooled visual feature) this matches the released code exactly. For the fused GPT-2
    c_attn the bottleneck holds the q and v parts side by side (r' = 2r) and, as in the released
    code, the routing runs over that whole 2r-dim bottleneck.
    """
    if kind == "none":
        return x_t                                       # plain LoRA / Adapter
    if kind not in ROUTINGS:
        raise ValueError(f"unknown routing kind {kind!r}; choose from {ROUTINGS}")
    if kind == "xtxvTxv":
        # x_t (x_v)^T x_v: (B, L, r) @ (B, r, N) @ (B, N, r); for N = 1 it is <x_t, x_v> x_v.
        # DEVIATION (N > 1 only): the released code uses x_v.reshape(B, r, N), which equals the
        # transpose only for N = 1; we use the transpose, i.e. the formula as written.
        return (x_t @ x_v.transpose(1, 2)) @ x_v
    # x'_v: the visual bottleneck row broadcast over the L text tokens, (B, 1, r).
    # DEVIATION (N > 1 only): the released code only runs these with N = 1; for grid features we
    # mean-pool the N visual rows inside the bottleneck (still linear and parameter-free).
    x_v1 = x_v if x_v.size(1) == 1 else x_v.mean(1, keepdim=True)
    if kind == "mul":
        return x_t * x_v1                                # x_t o x'_v (element-wise)
    if kind == "add":
        return x_t + x_v1                                # x_t + x'_v
    # x_t x''_v: x''_v is the r x r matrix whose every row is x'_v, so
    # (x_t x''_v)[l, j] = (sum_k x_t[l, k]) * x'_v[j].
    return x_t @ x_v1.expand(-1, x_t.size(-1), -1)


# ---------------------------------------------------------------------------------------------
# 3. PEFT modules with routing. x_R reaches every routed layer through a shared VisualContext,
#    filled by VisualLM.forward (so HF forward/generate code needs no changes).
# ---------------------------------------------------------------------------------------------
class VisualContext:
    """Holds x_R (B, N, d) of the current batch for every routed module of one model."""
    def __init__(self):
        self.x_r: Optional[torch.Tensor] = None


def in_out(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):                            # GPT-2: weight stored (in, out)
        return m.nx, m.nf
    raise ValueError(f"cannot put LoRA on {type(m).__name__}")


class RoutedLoRA(nn.Module):
    """Frozen base layer + LoRA on the output `slices` (q and v of a fused c_attn, or the whole layer).

    out = base(x) + (alpha / r) * W_up route(W_down x, W_down x_R)     (Eq. LoRA with routing)
    W_down (lora_A) stacks one r x d_in block per slice; W_up (lora_B) is one d_slice x r per slice.
    """

    def __init__(self, base, slices, r, alpha, kind, ctx, dropout=0.0):
        super().__init__()
        d_in, self.d_out = in_out(base)
        self.base, self.slices, self.r, self.kind, self.ctx = base, list(slices), r, kind, ctx
        self.scaling = alpha / r
        self.drop = nn.Dropout(dropout)
        width = slices[0][1] - slices[0][0]
        self.lora_A = nn.Parameter(torch.empty(len(slices) * r, d_in))   # W_down: kaiming, as LoRA
        self.lora_B = nn.Parameter(torch.zeros(len(slices), width, r))   # W_up: zeros -> identity at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        out = self.base(x)                                               # (B, L, d_out)
        x_t = self.drop(x) @ self.lora_A.t()                              # (B, L, k*r)
        x_v = None if self.kind == "none" else self.drop(self.ctx.x_r.to(x.dtype)) @ self.lora_A.t()  # (B, N, k*r)
        h = route(x_t, x_v, self.kind).unflatten(-1, (len(self.slices), self.r))         # (B, L, k, r)
        up = torch.einsum("blkr,kor->blko", h, self.lora_B.to(h.dtype)) * self.scaling  # (B, L, k, width)
        delta = up.new_zeros(*out.shape[:-1], self.d_out)                 # zero-pad the untouched parts (k of qkv)
        for i, (a, b) in enumerate(self.slices):
            delta[..., a:b] = up[..., i, :]
        return out + delta.to(out.dtype)


class RoutedAdapter(nn.Module):
    """Adapter with routing: x + W_up act(route(W_down x, W_down x_R)); W_down/W_up carry biases."""

    def __init__(self, d, r, act, kind, ctx):
        super().__init__()
        self.down, self.up, self.act, self.kind, self.ctx = nn.Linear(d, r), nn.Linear(r, d), ACT2FN[act], kind, ctx
        # DEVIATION: W_up starts at zero (adapter = identity at init, like LoRA's B = 0); the released
        # code keeps PyTorch's default Linear init.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        x_t = self.down(x)                                               # (B, L, r)
        x_v = None if self.kind == "none" else self.down(self.ctx.x_r.to(x.dtype))  # (B, N, r)
        return x + self.up(self.act(route(x_t, x_v, self.kind)))


class AdapterAfter(nn.Module):
    """base sub-layer output projection, then the adapter (owned by VisualLM.adapters, maybe shared)."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base, self._adapter = base, [adapter]       # list: do not register the adapter twice

    def forward(self, x):
        return self._adapter[0](self.base(x))


# Where the released code puts the modules (module names from HF transformers' sources).
LORA_AT = {"gpt2": r"\.attn\.c_attn$", "llama": r"\.self_attn\.(q_proj|v_proj)$",
           "roberta": r"\.attention\.self\.(query|value)$"}
ADAPTER_AT = {"gpt2": r"\.(attn|mlp)\.c_proj$", "llama": r"\.(self_attn\.o_proj|mlp\.down_proj)$",
              "roberta": r"(\.attention\.output|layer\.\d+\.output)\.dense$"}
EXPECTED = ("GPT-2 '*.attn.c_attn' (Conv1D), LLaMA-style '*.self_attn.q_proj'/'v_proj' (nn.Linear) "
            "or RoBERTa '*.attention.self.query'/'value' (nn.Linear)")


def lm_family(lm) -> str:
    mt = getattr(lm.config, "model_type", "")
    names = [n for n, _ in lm.named_modules()]
    for fam in ("gpt2", "llama", "roberta"):
        if any(re.search(LORA_AT[fam], n) for n in names) and (fam != "gpt2" or mt == "gpt2"):
            return fam
    raise ValueError(f"model {lm.config.name_or_path or mt!r} (type {mt!r}) cannot be patched: expected {EXPECTED}")


def patch_lm(lm, family, method, r, alpha, kind, ctx, dropout=0.0) -> tuple[nn.ModuleList, list[str]]:
    """Freeze lm, insert LoRA (q, v) or Adapters; returns (adapters, names of the patched modules)."""
    for p in lm.parameters():
        p.requires_grad_(False)
    adapters, targets = nn.ModuleList(), []
    pattern = (LORA_AT if method == "lora" else ADAPTER_AT)[family]
    names = [n for n, _ in lm.named_modules() if re.search(pattern, n)]
    shared = {}
    for name in names:
        base = lm.get_submodule(name)
        parent_name, child = name.rsplit(".", 1)
        if method == "lora":
            d_in, d_out = in_out(base)
            # GPT-2's fused c_attn: LoRA on the query and value thirds only (enable_lora=[T, F, T]).
            slices = [(0, d_out // 3), (2 * d_out // 3, d_out)] if family == "gpt2" else [(0, d_out)]
            new = RoutedLoRA(base, slices, r, alpha, kind, ctx, dropout)
        else:
            d = in_out(base)[1]
            act = getattr(lm.config, "activation_function", None) or lm.config.hidden_act
            # Decoders: ONE adapter per block, applied after the attention output and after the MLP
            # output (released GPT-2 code, adapt_pos="post_module"). RoBERTa: one per sub-layer.
            block = re.sub(r"\.(attn|mlp|self_attn)\..*$", "", name) if family != "roberta" else name
            if block not in shared:
                shared[block] = RoutedAdapter(d, r, act, kind, ctx)
                adapters.append(shared[block])
            new = AdapterAfter(base, shared[block])
        setattr(lm.get_submodule(parent_name), child, new)
        targets.append(name)
    if not targets:
        raise ValueError(f"model cannot be patched: no module matches {pattern!r}; expected {EXPECTED}")
    return adapters, targets


# ---------------------------------------------------------------------------------------------
# 4. Model: LM (tiny from config or pretrained) + visual prefix + (VQA) classifier head.
# ---------------------------------------------------------------------------------------------
def tiny_lm(name, tok, hidden, layers):
    """Tiny randomly initialised LMs with the data.py word-level tokenizer (no hub access)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              RobertaConfig, RobertaModel)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    heads = max(1, hidden // 16)
    if name == "tiny-roberta":
        return RobertaModel(RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=4 * hidden, max_position_embeddings=160, type_vocab_size=1,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ids))
    if name == "tiny-gpt2":   # DEVIATION (tiny only): dropout 0 for a deterministic CPU demo
        lm = GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=hidden, n_layer=layers, n_head=heads,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    else:
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=heads, max_position_embeddings=128, **ids))
    return lm


def load_lm(a: Args, task, tok):
    if a.model.startswith("tiny"):
        if (task == "vqa") != (a.model == "tiny-roberta"):
            raise ValueError(f"{a.model} does not fit {a.dataset}: captioning needs a causal LM (tiny-gpt2, tiny-llama), VQA an encoder (tiny-roberta)")
        return tiny_lm(a.model, tok, a.tiny_hidden, a.tiny_layers)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    try:
        cfg = AutoConfig.from_pretrained(a.model)
        if task == "vqa":
            return AutoModel.from_pretrained(a.model, add_pooling_layer=True) if cfg.model_type in ("roberta", "bert") \
                else AutoModel.from_pretrained(a.model)
        return AutoModelForCausalLM.from_pretrained(a.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {a.model!r} ({str(e).splitlines()[0]}); offline, use --model tiny") from None


class VisualLM(nn.Module):
    """x_R is the LM's prefix token(s) and the x_R of every routed layer (via ctx)."""

    def __init__(self, lm, task, ctx, adapters, n_answers=0):
        super().__init__()
        self.lm, self.task, self.ctx, self.adapters = lm, task, ctx, adapters
        d = lm.config.hidden_size
        # Released VQA head (classifier_2layer): Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, #answers).
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                  nn.Linear(2 * d, n_answers)) if task == "vqa" else None

    def inputs(self, x_r, input_ids, attention_mask):
        self.ctx.x_r = x_r                                                     # (B, N, d)
        emb = self.lm.get_input_embeddings()(input_ids)                        # (B, L, d)
        emb = torch.cat([x_r.to(emb.dtype), emb], 1)                           # (B, N+L, d)
        mask = torch.cat([attention_mask.new_ones(x_r.shape[:2]), attention_mask], 1)
        return emb, mask

    def forward(self, x_r, input_ids, attention_mask):
        emb, mask = self.inputs(x_r, input_ids, attention_mask)
        out = self.lm(inputs_embeds=emb, attention_mask=mask)
        if self.task == "caption":
            return out.logits                                                  # (B, N+L, V)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return self.head(pooled)                                               # (B, #answers)


def build_model(a: Args, prep, method, kind):
    torch.manual_seed(a.seed)                 # same frozen tiny LM and same PEFT init for every routing kind
    lm = load_lm(a, prep.task, prep.tok)
    if getattr(prep, "lm_state", None) is not None:
        lm.load_state_dict(prep.lm_state)
    fam = lm_family(lm)
    if (prep.task == "vqa") != (fam == "roberta"):
        raise ValueError(f"model {a.model!r} ({fam}) does not fit {a.dataset}: captioning needs a causal LM, VQA an encoder (RoBERTa)")
    ctx = VisualContext()
    adapters, targets = patch_lm(lm, fam, method, a.r_bottleneck, a.alpha, kind, ctx, a.lora_dropout)
    model = VisualLM(lm, prep.task, ctx, adapters, len(prep.answers))
    ln = []
    if a.train_ln:
        ln = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and n.startswith("lm.")
              and not re.search(r"(ln_f|embeddings)", n)]
        for n in ln:
            model.get_submodule(n).requires_grad_(True)
    # The method's parameters, named independently of requires_grad -> assert nothing else trains.
    expect = {f"lm.{t}.lora_{w}" for t in targets for w in "AB"} if method == "lora" else \
        {f"adapters.{i}.{m}.{w}" for i in range(len(adapters)) for m in ("down", "up") for w in ("weight", "bias")}
    expect |= {n for n, _ in model.named_parameters() if n.startswith("head.")}
    expect |= {f"{n}.{w}" for n in ln for w in ("weight", "bias")}
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == expect, f"unexpected trainable set: extra {sorted(got - expect)[:5]}, missing {sorted(expect - got)[:5]}"
    return model, fam


def count_params(model):
    ps = list(model.parameters())                        # de-duplicated (shared adapters count once)
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


# ---------------------------------------------------------------------------------------------
# 5. Data: records, frozen visual features x_R, tokenised text.
# ---------------------------------------------------------------------------------------------
class Prep:
    pass


def frozen_projection(x: torch.Tensor, width: int):
    """Frozen map of train tokens x (M, d) to the LM width, fitted once: top-`width` PCA directions
    (SVD of the centred data, cheap for M << d) when there are enough tokens and d > width, else a
    fixed seeded Gaussian embedding; scaled so the projected train tokens have unit RMS per dimension.
    -> (mean (d,), P (d, width))."""
    mu = x.mean(0)
    xc = x - mu
    if x.size(1) > width and x.size(0) > width:
        P = torch.linalg.svd(xc.double(), full_matrices=False)[2][:width].T.float()   # (d, width)
    else:
        P = torch.randn(x.size(1), width, generator=torch.Generator().manual_seed(1234)) / math.sqrt(x.size(1))
    return mu, P / (xc @ P).pow(2).mean().sqrt()


class TinyVisionEncoder(nn.Module):
    """Offline stand-in for the paper's frozen ImageNet-21k ViT: a small CNN whose pooled output has the LM's width.
    pixels (B, 3, S, S) -> grid tokens (B, 9, w), pooled feature (B, w)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(64, width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3))
        self.pool = nn.Linear(9 * width, width)

    def forward(self, px):
        g = self.conv(px).flatten(2).transpose(1, 2)                         # (B, 9, w)
        return g, self.pool(g.flatten(1))                                    # (B, 9, w), (B, w)


def _pixels(records, size):
    return torch.stack([torch.from_numpy(np.asarray(data.load_image(r, size), np.float32) / 255).permute(2, 0, 1)
                        for r in records])                                   # (B, 3, S, S)


def tiny_vision_encoder(a: Args, width: int) -> TinyVisionEncoder:
    """DEVIATION (offline only): the paper's x_R comes from a ViT pre-trained on ImageNet-21k classification. Raw
    pixels are a poor stand-in (a linear probe on their PCA barely beats chance at naming the colours in an image),
    so we pre-train a small CNN, supervised, to name the colours, shapes, positions and the (colour, shape),
    (size, shape) and (shape, position) pairs in images of a DIFFERENT synthetic world (world_seed 1; downstream data is world 0), then freeze it. Cached."""
    key = f"w{width}-s{a.image_size}-n{a.vision_pretrain_steps}-d{data.DATA_VERSION}"
    path = os.path.join(a.cache_dir, "routing_bottleneck", f"tiny_cnn_{key}.pt")
    enc = TinyVisionEncoder(width)
    if os.path.exists(path):
        enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return enc.eval().requires_grad_(False)
    recs = data.load_records("shapes_caption", "train", world_seed=1)
    objs = [r["meta"]["scene"]["objects"] for r in recs]
    names = lambda o: [o["color"], o["shape"], o["pos"], f"{o['color']} {o['shape']}", f"{o['size']} {o['shape']}",
                       f"{o['shape']} {o['pos']}"]
    vocab = sorted({n for os_ in objs for o in os_ for n in names(o)})
    y = torch.zeros(len(recs), len(vocab))                                   # multi-hot attribute pairs
    for i, os_ in enumerate(objs):
        for o in os_:
            y[i, [vocab.index(n) for n in names(o)]] = 1
    x = _pixels(recs, a.image_size)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc, head = TinyVisionEncoder(width), nn.Linear(width, len(vocab))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=2e-3)
    for _ in tqdm(range(a.vision_pretrain_steps), desc="pre-train tiny vision encoder (cached)", leave=False):
        idx = torch.randint(len(recs), (64,), generator=g)
        loss = F.binary_cross_entropy_with_logits(head(enc(x[idx])[1]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"tiny vision encoder pre-trained for {a.vision_pretrain_steps} steps on world 1 "
          f"({len(vocab)} attribute pairs, final BCE {loss.item():.3f})", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(enc.state_dict(), tmp)
    os.replace(tmp, path)                                                    # atomic; same bytes from every rank
    return enc.eval().requires_grad_(False)


def visual_features(a: Args, records, split, width, proj=None):
    """-> (x_R table (num_images, N, width) float32, rows (len(records),), proj) via data.extract_features.

    patches (offline): the (s x s) raw-pixel patch grid is average-pooled to g x g cells (g = s by
    default: no averaging); pooled mode flattens them into ONE vector (N = 1, standing in for the ViT
    pooled feature), grid mode keeps the g*g cells as tokens. When the widths differ, a FROZEN
    projection (frozen_projection, fitted on the train split and reused for eval) maps to the LM width.
    DEVIATION: the paper feeds a frozen ViT's pooled output directly (ViT-B width = GPT-2 width).
    """
    pooled = a.visual_tokens == "pooled"
    if a.vision == "tiny-cnn":
        enc, ids = tiny_vision_encoder(a, width), {}
        rows = [ids.setdefault(r["image_id"], len(ids)) for r in records]
        first = {i: r for r, i in zip(records, rows)}
        with torch.no_grad():
            out = [enc(_pixels([first[i] for i in range(j, min(j + 256, len(ids)))], a.image_size))
                   for j in range(0, len(ids), 256)]
        tok = torch.cat([o[1][:, None] if pooled else o[0] for o in out])   # (I, 1, w) or (I, 9, w)
    elif a.vision == "patches":
        feats, rows = data.extract_features(records, "patches", dataset=a.dataset, split=split,
                                            image_size=a.image_size, patch_size=a.patch_size)
        f = feats.float()                                                      # (I, s*s, 3p^2)
        s = int(round(math.sqrt(f.size(1))))
        g = F.adaptive_avg_pool2d(f.reshape(len(f), s, s, -1).permute(0, 3, 1, 2), a.pool_grid or s)  # (I, d, g, g)
        tok = g.flatten(1)[:, None] if pooled else g.flatten(2).transpose(1, 2)                        # (I, N, d')
    else:
        feats, rows = data.extract_features(records, a.vision, dataset=a.dataset, split=split, image_size=a.image_size,
                                            pooled=pooled, device=str(a.device_obj))
        tok = feats.float()
    if tok.size(-1) != width:
        proj = proj or frozen_projection(tok.reshape(-1, tok.size(-1)), width)
        tok = (tok - proj[0]) @ proj[1]
    return tok.contiguous(), torch.as_tensor(rows).long(), proj


def words_of(records):
    texts = [c for r in records for c in r.get("captions", [])] + [r.get("question", "") for r in records]
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


def encode(tok, text, max_len):
    return tok(text, add_special_tokens=False)["input_ids"][: max_len - 2]


def prepare(a: Args, rank=0) -> Prep:
    p = Prep()
    p.task = "caption" if a.dataset in CAPTION_SETS else "vqa"
    train = data.load_records(a.dataset, "train", a.data_root, seed=a.seed, limit=a.train_limit)
    evals = data.load_records(a.dataset, a.eval_split, a.data_root, seed=a.seed, limit=a.eval_limit)
    if not train or not evals:
        raise data.DataError(f"no records for {a.dataset} (train: {len(train)}, {a.eval_split}: {len(evals)})")
    if a.model.startswith("tiny"):
        p.tok = data.build_tokenizer() if a.dataset.startswith("shapes") else data.build_tokenizer(words_of(train))
    else:
        from transformers import AutoTokenizer
        try:
            p.tok = AutoTokenizer.from_pretrained(a.model)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load tokenizer of {a.model!r} ({str(e).splitlines()[0]})") from None
        if p.tok.pad_token_id is None:
            p.tok.pad_token = p.tok.eos_token or p.tok.unk_token
    t = p.tok
    p.bos = t.bos_token_id if t.bos_token_id is not None else (t.cls_token_id if t.cls_token_id is not None else t.eos_token_id)
    p.eos = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
    width = a.tiny_hidden if a.model.startswith("tiny") else _hf_width(a.model)
    p.x_train, rows_tr, proj = visual_features(a, train, "train", width)
    p.x_eval, p.rows_eval, _ = visual_features(a, evals, a.eval_split, width, proj)
    p.eval_records, p.answers = evals, []
    if p.task == "caption":
        p.train = [(int(rows_tr[i]), [p.bos] + encode(t, c, a.max_len) + [p.eos])
                   for i, r in enumerate(train) for c in r["captions"]]              # one item per (image, caption)
    else:
        p.answers = data.answer_vocab(train, min_freq=1 if a.dataset.startswith("shapes") else 9)
        index = {ans: i for i, ans in enumerate(p.answers)}
        p.targets = torch.stack([data.vqa_soft_targets(r, index) for r in train]).float()   # (n, #answers)
        p.train = [(int(rows_tr[i]), [p.bos] + encode(t, r["question"], a.max_len) + [p.eos], i)
                   for i, r in enumerate(train)]
        p.eval_ids = [[p.bos] + encode(t, r["question"], a.max_len) + [p.eos] for r in evals]
    p.lm_state = None
    if p.task == "caption" and a.model.startswith("tiny") and a.tiny_pretrain_steps > 0:
        p.lm_state = pretrain_tiny_lm(a, p, rank)
    return p


def pretrain_tiny_lm(a: Args, p: Prep, rank=0):
    """DEVIATION (tiny only): the paper adapts a *pretrained* LM. A random frozen LM knows no language,
    so every PEFT variant would mostly spend its budget learning grammar. We therefore pre-train the
    tiny causal LM text-only (no image, no prefix) on the train captions, then freeze it."""
    g = torch.Generator().manual_seed(a.seed + 1)
    torch.manual_seed(a.seed)
    lm = load_lm(a, p.task, p.tok).to(a.device_obj)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.0)
    texts = [ids for _, ids in p.train]
    lm.train()
    for _ in tqdm(range(a.tiny_pretrain_steps), desc="text-only LM pre-training", disable=rank != 0, leave=False):
        ids, mask = pad([texts[j] for j in torch.randint(len(texts), (a.batch_size,), generator=g).tolist()],
                        p.tok.pad_token_id)
        ids, mask = ids.to(a.device_obj), mask.to(a.device_obj)
        logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        print(f"tiny LM pre-trained text-only for {a.tiny_pretrain_steps} steps (final LM loss {loss.item():.3f})", flush=True)
    return {k: v.detach().cpu().clone() for k, v in lm.state_dict().items()}


def _hf_width(name):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name).hidden_size
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r} ({str(e).splitlines()[0]}); offline, use --model tiny") from None


def pad(seqs, value):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


class Collate:
    def __init__(self, prep):
        self.p = prep

    def __call__(self, items):
        ids, mask = pad([it[1] for it in items], self.p.tok.pad_token_id)
        b = {"rows": torch.tensor([it[0] for it in items]), "input_ids": ids, "attention_mask": mask}
        if self.p.task == "vqa":
            b["target"] = self.p.targets[torch.tensor([it[2] for it in items])]
        return b


def loss_fn(model, p: Prep, b, x_table, device):
    x_r = x_table[b["rows"]].to(device)                                       # (B, N, d)
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    out = model(x_r, ids, mask)
    if p.task == "vqa":                                                       # BCE on soft VQA scores (released)
        return F.binary_cross_entropy_with_logits(out.float(), b["target"].to(device))
    n = x_r.size(1)
    logits = out[:, n:-1].float()                                              # positions of [bos, w1..wn]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                       # predict [w1..wn, eos]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------
# 6. Infrastructure (repeated per script by design): device/DDP, seeding, schedule, checkpoints.
# ---------------------------------------------------------------------------------------------
def setup_device(a: Args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if a.device.startswith("cuda") and world > 1:
        a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(a.device)
    a.device_obj = torch.device(a.device)
    return rank, world


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup, total):
    w = int(warmup if warmup >= 1 else warmup * total)
    return lambda s: (s + 1) / max(1, w) if s < w else max(0.0, (total - s) / max(1, total - w))


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class NonFinite(Exception):
    pass


def train_run(a: Args, p: Prep, method, kind, run_dir, rank, world, log):
    """Train one (method, routing kind) and evaluate it; returns its metrics dict (None if stopped)."""
    seed_everything(a.seed)
    model, fam = build_model(a, p, method, kind)
    n_train, n_all = count_params(model)
    if rank == 0:
        print(f"[{method}/{kind}] trainable: {n_train} || all: {n_all} || {100 * n_train / n_all:.4f}%", flush=True)
    model.to(a.device_obj)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    loader = data.make_loader(p.train, a.batch_size, shuffle=True, seed=a.seed, collate_fn=Collate(p),
                              num_workers=a.num_workers, drop_last=len(p.train) >= a.batch_size * world)
    total = a.max_steps or a.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a.warmup, total))
    ckpt, step, last_loss = os.path.join(run_dir, "checkpoint.pt"), 0, None
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    if a.resume and os.path.exists(ckpt):
        s = torch.load(ckpt, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in s["trainable"]:
                    q.copy_(s["trainable"][n])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        step, last_loss = s["step"], s.get("loss")
        random.setstate(s["rng"]["python"])
        np.random.set_state(s["rng"]["numpy"])
        torch.set_rng_state(s["rng"]["torch"])
        if rank == 0:
            print(f"[{method}/{kind}] resumed from {ckpt} at step {step}", flush=True)

    def save():
        if rank == 0:
            atomic_save({"trainable": {n: q.detach().cpu() for n, q in model.named_parameters() if n in names},
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                         "epoch": step // len(loader), "loss": last_loss,
                         "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
                        ckpt)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if a.device_obj.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=total, initial=step, desc=f"train {method}/{kind}", disable=rank != 0, leave=False)
    model.train()
    t0 = time.time()
    try:
        while step < total:
            epoch, skip = divmod(step, len(loader))
            data.set_epoch(loader, epoch)        # data order = f(seed, epoch): resume = same epoch, skip seen batches
            for i, b in enumerate(loader):
                if i < skip:
                    continue
                with autocast:
                    loss = loss_fn(net, p, b, p.x_train, a.device_obj)
                if not torch.isfinite(loss):
                    raise NonFinite(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                    f"{ckpt if os.path.exists(ckpt) else 'none'}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if a.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, a.grad_clip)
                opt.step()
                sched.step()
                step += 1
                last_loss = loss.item()
                bar.update(1)
                if rank == 0 and (step % a.log_every == 0 or step == total):
                    rec = {"run": f"{method}/{kind}", "step": step, "epoch": epoch, "loss": round(last_loss, 5),
                           "lr": sched.get_last_lr()[0], "time_s": round(time.time() - t0, 1)}
                    tqdm.write(json.dumps(rec))
                    log(rec)
                if step % a.save_every == 0 or step == total or step == a.stop_at_step:
                    save()
                if step >= total or step == a.stop_at_step:
                    break
            if step == a.stop_at_step and step < total:
                bar.close()
                if rank == 0:
                    print(f"[{method}/{kind}] stopped at step {step} (--stop_at_step); resume with --resume", flush=True)
                return None
    except KeyboardInterrupt:
        save()
        if rank == 0:
            print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt}; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    bar.close()
    metrics = {}
    if rank == 0:
        metrics = evaluate(model, a, p, tag=f"{method}/{kind}")
    if world > 1:
        dist.barrier()
    return {"method": method, "routing": kind, "trainable": n_train, "all": n_all, "steps": step,
            "final_loss": None if last_loss is None else round(last_loss, 5),
            "train_time_s": round(time.time() - t0, 1), **metrics}


# ---------------------------------------------------------------------------------------------
# 7. Evaluation: beam/greedy captions -> BLEU-4 / CIDEr; VQA argmax answer -> official VQA accuracy.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: VisualLM, p: Prep, x_r, num_beams, max_new):
    """Captions for a batch of visual features x_r (B, N, d): prefix = [x_R, <bos>]."""
    B = x_r.size(0)
    bos = torch.full((B, 1), p.bos, dtype=torch.long, device=x_r.device)
    emb, mask = model.inputs(x_r, bos, torch.ones_like(bos))
    model.ctx.x_r = x_r.repeat_interleave(num_beams, 0)     # HF expands the inputs the same way for beams
    out = model.lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new, num_beams=num_beams,
                            do_sample=False, eos_token_id=p.eos, pad_token_id=p.tok.pad_token_id)
    caps = []
    for seq in out.tolist():
        seq = seq[: seq.index(p.eos)] if p.eos in seq else seq
        caps.append(p.tok.decode(seq, skip_special_tokens=True).strip())
    return caps


@torch.no_grad()
def evaluate(model: VisualLM, a: Args, p: Prep, tag="") -> dict:
    model.eval()
    dev, recs, bs = a.device_obj, p.eval_records, max(1, a.batch_size)
    if p.task == "caption":
        preds, refs, seen = {}, {}, set()
        rows = [(int(p.rows_eval[i]), r) for i, r in enumerate(recs)]
        rows = [(row, r) for row, r in rows if not (r["image_id"] in seen or seen.add(r["image_id"]))]
        for s in tqdm(range(0, len(rows), bs), desc=f"eval {tag}", leave=False):
            chunk = rows[s: s + bs]
            caps = generate(model, p, p.x_eval[[c[0] for c in chunk]].to(dev), a.num_beams, a.max_gen_len)
            for (row, r), c in zip(chunk, caps):
                preds[r["image_id"]], refs[r["image_id"]] = c, r["captions"]
        m = data.caption_metrics(preds, refs)
        res = {"BLEU-4": round(m["BLEU-4"], 2), "CIDEr": round(m["CIDEr"], 2)}
        res["examples"] = {k: preds[k] for k in list(preds)[:3]}
    else:
        preds = []
        for s in tqdm(range(0, len(recs), bs), desc=f"eval {tag}", leave=False):
            ids, mask = pad(p.eval_ids[s: s + bs], p.tok.pad_token_id)
            logits = model(p.x_eval[p.rows_eval[s: s + bs]].to(dev), ids.to(dev), mask.to(dev))
            preds += [p.answers[j] for j in logits.argmax(-1).tolist()]
        acc = data.vqa_accuracy(preds, recs)
        res = {"VQA": acc["overall"], **{f"VQA/{k}": v for k, v in acc.items() if k != "overall"}}
    model.train()
    return res


# ---------------------------------------------------------------------------------------------
# 8. main: one or several (method, routing) runs on the same data and budget, then the table.
# ---------------------------------------------------------------------------------------------
def table(results, task) -> str:
    keys = ["BLEU-4", "CIDEr"] if task == "caption" else ["VQA"]
    lines = [f"{'PEFT':8s} {'routing':16s} " + " ".join(f"{k:>15s}" for k in keys) + f" {'trainable':>11s}"]
    for method in ("lora", "adapter"):
        rs = [r for r in results if r["method"] == method]
        base = next((r for r in rs if r["routing"] == "none"), None)
        for r in rs:
            cells = []
            for k in keys:
                d = "" if base is None or r is base else f" ({r[k] - base[k]:+.2f})"
                cells.append(f"{r[k]:.2f}{d}".rjust(15))
            lines.append(f"{'LoRA' if method == 'lora' else 'Adapter':8s} {LABELS[r['routing']]:16s} " + " ".join(cells)
                         + f" {r['trainable']:>11,d}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)   # _main() may lower it; main() may run inside a larger process (tests)


def _main(argv=None) -> dict:
    try:
        a = resolve(parse_args(argv))
        if a.model.startswith("tiny") and (a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available())):
            torch.set_num_threads(1)     # tiny ops: 1 thread is as fast idle and many times faster on a busy CPU
        rank, world = setup_device(a)
        res_path = os.path.join(a.out_dir, "results.json")
        if os.path.exists(res_path) and not (a.resume or a.overwrite):
            raise ValueError(f"results exist in {a.out_dir}; pass --overwrite (or --resume)")
        if a.overwrite and rank == 0 and os.path.isdir(a.out_dir):
            for root, _, files in os.walk(a.out_dir):
                for f in files:
                    if f in ("results.json", "checkpoint.pt", "metrics.jsonl"):
                        os.remove(os.path.join(root, f))
        if world > 1:
            dist.barrier()
        os.makedirs(a.out_dir, exist_ok=True)
        p = prepare(a, rank)
    except (data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)

    def log(rec):
        with open(os.path.join(a.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    methods = ["lora", "adapter"] if a.method == "both" else [a.method]
    results, t0 = [], time.time()
    for method in methods:
        for kind in a.kinds.split(","):
            run_dir = os.path.join(a.out_dir, f"{method}-{kind}")
            os.makedirs(run_dir, exist_ok=True)
            done = os.path.join(run_dir, "results.json")
            if a.resume and os.path.exists(done):
                with open(done) as f:
                    results.append(json.load(f))
                continue
            try:
                r = train_run(a, p, method, kind, run_dir, rank, world, log)
            except NonFinite as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(1)
            except (data.DataError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2)
            if r is None:                       # --stop_at_step
                return {"stopped": True}
            if rank == 0:
                log({"final": r})
                atomic_json(r, done)
            results.append(r)
    out = {"task": p.task, "dataset": a.dataset, "model": a.model, "runs": results,
           "total_time_s": round(time.time() - t0, 1),
           "args": {k: v for k, v in asdict(a).items()}}
    if rank == 0:
        atomic_json(out, res_path)
        print(f"\nrouting functions in {'LoRA/Adapter' if a.method == 'both' else a.method} bottlenecks -- "
              f"{a.dataset}, {a.model}, r={a.r_bottleneck}, eval on {a.eval_split} ({len(p.eval_records)} records)")
        print(table(results, p.task))
        print(f"results: {res_path}  ({out['total_time_s']} s)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def atomic_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
