"""memvp.py -- Memory-Space Visual Prompting (MemVP) vs input-space prompting + LoRA, and a speed benchmark.

Jie et al., "Memory-Space Visual Prompting for Efficient Vision-Language Fine-Tuning", ICML 2024, arXiv
2405.05615; official code (LLaMA / ScienceQA): github.com/JieShibo/MemVP.

Input-space prompting (LLaVA) puts n projected image tokens before the L text tokens. MemVP keeps the text
alone and appends the visual features to the FFNs of the frozen LM as n extra key-value memory entries,
training only the projector f and the position embeddings p^k, p^v (+ the norms of BART/T5): a layer costs
4ndL more FLOPs (Eq. 15) instead of 4nd(6d+n+2L) (Eq. 14). BART/T5: the encoder FFNs (Sec. 5.1); LLaMA:
every decoder FFN, with one p^k/p^v table for all layers (Sec. 5.2); --memory_layers picks others.

Equation -> code
  Eq. 5       Retrieval(x) = sum_i phi(<x, K(z_i)>) V(z_i)                    visual_memory
  Eq. 7       K, V = lam f(z) + p^k, lam f(z) + p^v (zero-padded to n_pos)   MemVPPrompts.forward, projector
  Eq. 6, 8    FFN with the n entries appended to W1, W2                      MemVPFFN.forward, patch_memvp
  Eq. 9-12    gated FFN (LLaMA SwiGLU, T5 gated-gelu): entries skip the gate  MemVPFFN.forward
  Eq. 13-15   FLOPs of a layer; of the whole LM (memory layers only)          eq13_15, analytic_flops
  Tables 5, 7 hyper-parameters (BART/T5; LLaMA + official code)               FAMILY
  baseline    input-space prompting + LoRA on q/v (Table 7 LLaVA-LoRA)        VLModel.lm_inputs, add_lora

Offline default: VQA on data.py's synthetic world, frozen tiny-cnn grid tokens, stand_ins/tiny-llama (a
tiny LLaMA-style LM pre-trained on another world's questions by scripts/make_stand_ins.py):
  python memvp.py                                 # MemVP vs input-space + LoRA on the tiny LLaMA
  python memvp.py --seeds 0,1,2                   # the same, mean ± std over three seeds
  python memvp.py --model stand_ins/tiny-bart     # tiny BART: memory in the encoder FFNs (Sec. 5.1)
  python memvp.py --model stand_ins/tiny-t5       # tiny T5 with a gated FFN (Eq. 11-12)
  python memvp.py --benchmark                     # speed / memory / FLOPs at SmolLM2-135M's shape
  python memvp.py --dataset scienceqa --data_root $DATA --model $LLAMA   # Table 2 (batch 4 per GPU x 8)
  torchrun --nproc_per_node 8 memvp.py --dataset vqav2 --data_root $DATA --model facebook/bart-base
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import data
from data import UsageError, arg  # bad input: one 'error: ...' line, exit 2; an Args field


# ------------------------------------------------------------------------------------------------ the method
def visual_memory(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, act,
                  dropout=None) -> torch.Tensor:
    """Retrieval(x) = sum_i act(<x, K(z_i)>) V(z_i)   (Eq. 5, the new entries of Eq. 6 / Eq. 12).

    x (B, L, d) queries; keys, values (B, n, d) per-sample memory entries -> (B, L, d). Two batched
    matmuls; equivalent to appending the entries to the FFN weights (Eq. 8) without building them."""
    h = act(torch.matmul(x, keys.transpose(-1, -2).to(x.dtype)))  # (B, L, n) similarity to each visual key
    if dropout is not None:
        h = dropout(h)
    return torch.matmul(h, values.to(h.dtype))  # (B, L, d)


def projector(d_vis: int, d: int, hidden: int = 0) -> nn.Sequential:
    """f: d_v -> d. BART/T5: one Linear (Sec. 5.1). LLaMA: two, with a non-linearity between (Sec. 5.2): SiLU,
    hidden width 128, Xavier weights and zero biases, as in the official code."""
    net = nn.Sequential(*([nn.Linear(d_vis, hidden), nn.SiLU(), nn.Linear(hidden, d)] if hidden
                          else [nn.Linear(d_vis, d)]))
    for lin in net[::2]:
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
    return net


def image_present(z: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1), 0 for a sample without an image (all-zero features: ScienceQA's text-only questions)."""
    return z.ne(0).flatten(1).any(1).to(z.dtype)[:, None, None]


class MemVPPrompts(nn.Module):
    """The visual memory entries, Eq. (7), zero-padded to n_pos (Sec. 4.2): padded entries hold p^k/p^v only,
    as do the entries of a sample without image (Sec. 5.2). One table for all layers (LLaMA) or one each."""

    def __init__(self, d_vis: int, d: int, n_pos: int, n_tables: int, lam: float, proj_hidden: int = 0):
        super().__init__()
        self.projector, self.lam, self.n_pos = projector(d_vis, d, proj_hidden), lam, n_pos
        self.pos_k = nn.Parameter(torch.randn(n_tables, n_pos, d) * 0.02)  # official init: N(0, 0.02)
        self.pos_v = nn.Parameter(torch.zeros(n_tables, n_pos, d))  # official init: zeros

    def forward(self, z: torch.Tensor):  # z (B, n, d_v) -> keys, values (tables, B, n_pos, d)
        if z.shape[1] > self.n_pos:
            raise UsageError(f"{z.shape[1]} visual tokens exceed --n_pos {self.n_pos}")
        vp = F.pad(self.lam * self.projector(z) * image_present(z), (0, 0, 0, self.n_pos - z.shape[1]))
        return vp + self.pos_k[:, None].to(vp.dtype), vp + self.pos_v[:, None].to(vp.dtype)


class MemoryBank:
    """The current images' keys/values, read by every patched FFN: set once per step or per generation."""
    keys = values = None

    @contextlib.contextmanager
    def use(self, keys, values):
        self.keys, self.values = keys, values
        try:
            yield
        finally:
            self.keys = self.values = None


class MemVPFFN(nn.Module):
    """FFN(x) + s Retrieval(x): Eq. (6); for a gated FFN Eq. (12), whose visual entries skip the gate (Eq. 11
    sets their gate keys to x/|x|^2: <x, g> = 1). Wraps a T5 / LLaMA FFN; BART computes its FFN inline, so
    there it wraps fc2 and reads the queries x at fc1. s: the official LLaMA code's adapter_scale."""

    def __init__(self, ffn: nn.Module, act, bank: MemoryBank, table: int, scale: float, dropout: float,
                 fc1: Optional[nn.Module] = None):
        super().__init__()
        self.ffn, self.act, self.bank, self.table, self.scale, self.x = ffn, act, bank, table, scale, None
        self.mem_dropout = nn.Dropout(dropout)  # official: dropout on act(<x, K>)
        if fc1 is not None:
            fc1.register_forward_pre_hook(lambda fc1, inputs: setattr(self, "x", inputs[0]))

    def forward(self, h):  # (B, L, d): the FFN input x (BART: fc2's input act(fc1 x))
        x, self.x = (h if self.x is None else self.x), None
        out = self.ffn(h)
        if self.bank.keys is None:
            return out
        k, v = self.bank.keys[self.table], self.bank.values[self.table]
        return out + self.scale * visual_memory(x, k, v, self.act, self.mem_dropout)


def find_ffns(lm: nn.Module) -> list:
    """[(kind, name, module, activation)] of the FFNs MemVP patches: the encoder FFNs of BART/T5 (Sec. 5.1),
    every decoder FFN of a LLaMA-family LM (Sec. 5.2). UsageError when none is found."""
    root = lm.get_encoder() if lm.config.is_encoder_decoder else lm
    prefix, found = next(n for n, m in lm.named_modules() if m is root), []
    for name, m in root.named_modules(prefix=prefix):
        has = lambda *names: all(isinstance(getattr(m, a, None), nn.Linear) for a in names)  # noqa: E731
        if has("fc1", "fc2") and hasattr(m, "activation_fn"):
            found.append(("bart", name, m, m.activation_fn))
        elif has("wi_0", "wi_1", "wo") or (has("wi", "wo") and hasattr(m, "act")):
            found.append(("t5", name, m, m.act))
        elif has("gate_proj", "up_proj", "down_proj") and hasattr(m, "act_fn"):
            found.append(("llama", name, m, m.act_fn))
    if not found:
        raise UsageError(f"cannot patch {type(lm).__name__}: expected encoder FFNs with fc1/fc2 (BART) or "
                         "wi/wo (T5), or decoder FFNs with gate_proj/up_proj/down_proj (LLaMA family)")
    return found


def patch_memvp(lm: nn.Module, bank: MemoryBank, scale: float, dropout: float, shared: bool,
                layers: Optional[str] = None) -> list:
    """Wrap the FFNs of find_ffns numbered `layers` ("6,7"; default: all of them, the paper's choice) in place
    (BART: its fc2); the k-th patched FFN reads table k (shared: table 0). -> the patched FFNs' names."""
    ffns = find_ffns(lm)
    layers = list(range(len(ffns))) if layers is None else [int(i) for i in layers.split(",")]
    if not all(0 <= i < len(ffns) for i in layers):
        raise UsageError(f"--memory_layers {layers}: {type(lm).__name__} has FFNs 0-{len(ffns) - 1}")
    for table, i in enumerate(layers):
        kind, name, m, act = ffns[i]
        if kind == "bart":
            m.fc2 = MemVPFFN(m.fc2, act, bank, 0 if shared else table, scale, dropout, fc1=m.fc1)
        else:
            lm.set_submodule(name, MemVPFFN(m, act, bank, 0 if shared else table, scale, dropout))
    return [ffns[i][1] for i in layers]


class LoRALinear(nn.Module):
    """base(x) + (alpha/r) B A x (Hu et al., 2022). As peft: A Kaiming-uniform and B = 0, so training starts
    at the frozen LM; alpha/r keeps the update size independent of the rank."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype)) * self.scaling


def add_lora(lm: nn.Module, r: int, alpha: float) -> None:
    """LoRA on every attention query / value projection (self- and cross-attention)."""
    for name, m in list(lm.named_modules()):
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in ("q_proj", "v_proj", "q", "v"):
            lm.set_submodule(name, LoRALinear(m, r, alpha))


def merge_lora(lm: nn.Module) -> nn.Module:
    """Fold every LoRA branch into its weight, W + (alpha/r) B A: a plain HF model again (save_pretrained)."""
    for name, m in list(lm.named_modules()):
        if isinstance(m, LoRALinear):
            m.base.weight.data += m.scaling * (m.lora_B @ m.lora_A).to(m.base.weight.dtype)
            lm.set_submodule(name, m.base)
    return lm


class VLModel(nn.Module):
    """A copy of the frozen LM + a trainable visual bridge: memory space (MemVP) or input space + LoRA on q/v,
    with the settings of `args` (lam, scale, n_pos, proj_hidden, mem_dropout, memory_layers, lora_rank)."""

    def __init__(self, lm: nn.Module, mode: str, d_vis: int, args: Args, bos_first: bool = True):
        super().__init__()
        self.lm, self.mode, self.enc_dec = copy.deepcopy(lm), mode, bool(lm.config.is_encoder_decoder)
        self.lead = int(not self.enc_dec and bos_first)  # decoder-only: the text starts with bos
        d, hidden = lm.get_input_embeddings().embedding_dim, 0 if self.enc_dec else args.proj_hidden
        if mode == "input" and args.lora_rank:
            add_lora(self.lm, args.lora_rank, args.lora_rank)  # DEVIATION: LoRA alpha = r (the paper: only r)
        self.memory_layers = []  # the names of the FFNs that carry the memory
        if mode == "memvp":
            self.bank, shared = MemoryBank(), not self.enc_dec  # LLaMA: one p^k, p^v table (Sec. 5.2)
            self.memory_layers = patch_memvp(self.lm, self.bank, args.scale, args.mem_dropout, shared,
                                             args.memory_layers)
            tables = 1 if shared else len(self.memory_layers)
            self.prompts = MemVPPrompts(d_vis, d, args.n_pos, tables, args.lam, hidden)
        else:
            self.projector = projector(d_vis, d, hidden)

    def lm_inputs(self, feats, ids, mask):
        """-> (LM kwargs, context). MemVP: the text alone, the keys/values in the bank (once per image). Input
        space: inputs_embeds [f(z); text] ([bos; f(z); text] for decoder-only LMs, as LLaVA)."""
        if self.mode == "memvp":
            return {"input_ids": ids, "attention_mask": mask}, self.bank.use(*self.prompts(feats))
        vis = (self.projector(feats) * image_present(feats)).to(self.lm.dtype)  # (B, n, d)
        text, k = self.lm.get_input_embeddings()(ids), self.lead  # (B, L, d)
        emb = torch.cat([text[:, :k], vis, text[:, k:]], 1)  # (B, n + L, d)
        mask = torch.cat([mask[:, :k], mask.new_ones(vis.shape[:2]), mask[:, k:]], 1)
        return {"inputs_embeds": emb, "attention_mask": mask}, contextlib.nullcontext()

    def forward(self, feats, input_ids, attention_mask, labels):
        inputs, ctx = self.lm_inputs(feats, input_ids, attention_mask)
        with ctx:
            return lm_loss(self.lm, inputs, labels)

    @torch.no_grad()
    def generate(self, feats, ids, mask, **gen):
        """Greedy decoding with the KV cache -> the new tokens; MemVP's keys/values: once per generation."""
        inputs, ctx = self.lm_inputs(feats, ids, mask)
        with ctx:
            out = self.lm.generate(**inputs, **gen)
        return out[:, 1:] if self.enc_dec else out[:, ids.shape[1]:] if self.mode == "memvp" else out


def lm_loss(lm, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on the labelled target tokens (decoder-only: logits of the text positions only)."""
    if lm.config.is_encoder_decoder:
        return lm(**inputs, labels=labels).loss
    logits = lm(**inputs, logits_to_keep=labels.shape[1]).logits  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def freeze(model: VLModel) -> list:
    """Train f + p^k, p^v (MemVP) or f + LoRA (input space), and for BART/T5 the LM's norms on both sides
    (Sec. 5.1 unfreezes the layer norms; the official LLaMA code trains none). -> their names."""
    norms = {id(p) for m in model.lm.modules() if "norm" in type(m).__name__.lower()
             for p in m.parameters(False)}
    names = [n for n, p in model.named_parameters() if n.startswith(("prompts.", "projector."))
             or n.endswith(("lora_A", "lora_B")) or (model.enc_dec and id(p) in norms)]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def method_parameters(model: VLModel) -> int:
    """What the method added, from those modules' shapes (not from requires_grad): freeze's check."""
    added = list((model.prompts if model.mode == "memvp" else model.projector).parameters())
    added += [t for m in model.lm.modules() if isinstance(m, LoRALinear) for t in (m.lora_A, m.lora_B)]
    norms = [p for m in model.lm.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)]
    return sum(p.numel() for p in added + (norms if model.enc_dec else []))


def load_lm(model: str):
    """An LM (fp32 weights; bf16 autocast on GPU) and its tokenizer, by hub id or folder (data.model_path)."""
    path = data.model_path(model)
    try:
        seq2seq = transformers.AutoConfig.from_pretrained(path).is_encoder_decoder
        auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
        lm = auto.from_pretrained(path, dtype=torch.float32)
        return lm, transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load --model {model!r}: {str(e).splitlines()[0]}") from None


# ------------------------------------------ data -> batches (data.py: records, frozen features, metrics)
TASKS = {"shapes_vqa": "vqa", "vqav2": "vqa", "gqa": "vqa", "shapes_caption": "caption", "coco": "caption",
         "scienceqa": "mcq"}
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # Table 6


def texts(rec: dict, task: str, train: bool) -> tuple:
    """(source, target) as Table 6. ScienceQA: the official QCM-A prompt (data.scienceqa_prompt), evaluated by
    the letter after 'The answer is'. DEVIATION: the image captions (captions.json, if present) are in the
    context for training too; the official script uses them only in evaluation."""
    if task == "vqa":
        return rec["question"], rec["answer"] if train else ""
    if task == "caption":
        return CAPTION_PROMPT, rec["caption"] if train else ""
    src, tgt = data.scienceqa_prompt(rec)
    return (src, tgt) if train else (src + "The answer is", "")  # scored on the raw generated text


@dataclasses.dataclass
class Split:
    """Records, their frozen visual features and their tokenized (record index, source ids, target ids)."""
    records: list
    feats: torch.Tensor  # (num_images, n, d_v) float16, memory-mapped from data.py's cache
    rows: torch.Tensor  # (len(records),) the row of each record's image in feats
    items: list
    post: Optional[nn.Module] = None  # frozen map of a batch of features (CLIP's ln_post)


def load_split(args: Args, split: str, recs: list, tok, train: bool, llama: bool, device) -> Split:
    task = TASKS[args.dataset]
    recs = data.caption_pairs(recs) if train and task == "caption" else recs  # evaluation: one item per image
    # LLaMA: the penultimate layer's patch tokens (as LLaVA) through CLIP's ln_post (official code); BART/T5:
    # the last layer's grid. DEVIATION: no ViT adapters (App. A.2): the tower is frozen, its features cached
    kw = {} if args.vision == "tiny-cnn" else dict(image_size=args.image_size, layer=-2 if llama else -1,
                                                   device=str(device))
    if args.dataset == "scienceqa" and kw:  # official: 224 x 224 resize (no crop), ImageNet mean/std
        kw["preprocess"] = "imagenet-resize"
    cache = os.path.join(args.cache_dir, "features")
    feats, rows, missing = data.extract_features(recs, args.vision, dataset=args.dataset, split=split,
                                                 train=train, cache_dir=cache, **kw)
    if train:
        recs, rows = data.drop_missing(recs, rows, missing)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    sep = "" if task == "mcq" else " "  # Table 6: "[Question] [Answer]"; official ScienceQA: "Response:The"
    n, items, cut = args.max_text_len - (not train), [], 0
    for i, (s, t) in enumerate(texts(r, task, train) for r in recs):
        src = enc(s)  # decoder-only: the target's tokens as in the whole text (as the official code)
        tgt = enc(s + sep + t)[len(src):] if t and llama else enc(t)
        # official: the first 512 tokens of prompt + answer (training), the first 511 of the prompt (test).
        # DEVIATION: bos / eos are not counted (the official 512 include them): the same for short prompts
        kept = (src[:n], tgt[:n - len(src[:n])] if llama else tgt[:n])
        cut += len(kept[0]) + len(kept[1]) < len(src) + len(tgt)
        items.append((i, *kept))
    if cut:
        print(f"{args.dataset} {split}: {cut} of {len(items)} texts cut to their first {n} tokens")
    post = None
    if llama and args.vision != "tiny-cnn":
        kind = transformers.AutoConfig.from_pretrained(args.vision).model_type
        if kind not in ("clip", "clip_vision_model"):
            raise UsageError(f"--vision {args.vision}: the LLaMA recipe reads a CLIP tower (its ln_post)")
        tower = transformers.CLIPVisionModel.from_pretrained(args.vision).requires_grad_(False)
        post = next(m for n, m in tower.named_modules() if n.endswith("post_layernorm"))
    return Split(recs, feats, rows, items, post)


def pad(seqs, value: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (max(map(len, seqs)) - len(s)) for s in seqs])


class Collator:
    """Items -> batch. Encoder-decoder: source + eos -> target + eos. Decoder-only: bos + source + target +
    eos, labels on target + eos (training); generation: bos + source, left-padded behind bos."""

    def __init__(self, split: Optional[Split], enc_dec: bool, tok, generate: bool):
        self.split, self.enc_dec, self.generate = split, enc_dec, generate
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.bos, self.eos = [] if tok.bos_token_id is None else [tok.bos_token_id], tok.eos_token_id

    def __call__(self, items):
        idx, src, tgt = zip(*items)
        out = {"index": idx, "feats": None}
        if self.split is not None:
            z = self.split.feats[self.split.rows[torch.tensor(idx)]].float()  # (B, n, d_v)
            out["feats"] = z if self.split.post is None else self.split.post(z) * image_present(z)
        if self.enc_dec:
            seqs = [s + [self.eos] for s in src]
            out["labels"] = pad([t + [self.eos] for t in tgt], -100)
        elif self.generate:
            seqs = [self.bos + [None] * (max(map(len, src)) - len(s)) + s for s in src]  # None: a masked hole
        else:
            seqs = [self.bos + s + t + [self.eos] for s, t in zip(src, tgt)]
            out["labels"] = pad([[-100] * len(self.bos + s) + t + [self.eos] for s, t in zip(src, tgt)], -100)
        out["attention_mask"] = pad([[int(i is not None) for i in q] for q in seqs], 0)
        out["input_ids"] = pad([[self.pad_id if i is None else i for i in q] for q in seqs], self.pad_id)
        return out


# ------------------------------------------------------------------------------------------ train, evaluate
def train(args: Args, model: VLModel, trainset: Split, tok, device, rank: int, world: int, out_dir: str):
    """One plain loop, exactly resumable from its checkpoint; --eval_only: load it and take no step."""
    ckpt, params = os.path.join(out_dir, "checkpoint.pt"), [p for p in model.parameters() if p.requires_grad]
    # official LLaMA recipe: AdamW betas (0.9, 0.95), no weight decay on biases and norms (timm param groups)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    loader = data.make_loader(trainset.items, args.batch_size, shuffle=True, seed=args.seed, drop_last=True,
                              collate_fn=Collator(trainset, model.enc_dec, tok, False),
                              num_workers=args.num_workers)
    if len(loader) == 0:
        raise UsageError(f"{len(trainset.items)} training items give no batch of {args.batch_size} x {world}")
    total = args.epochs * len(loader)  # the schedule spans --epochs; --max_steps only stops early
    target = total if args.max_steps < 0 else min(args.max_steps, total)
    sched = lr_schedule(opt, int(args.warmup_ratio * total), total)  # official: linear warm-up, cosine to 0
    step, spent, recent = 0, 0.0, []
    if args.eval_only or (args.resume and os.path.exists(ckpt)):
        state = load_checkpoint(ckpt, model)  # the trained tensors, and the RNG states restored
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, spent, recent = state["step"], state["train_time_s"], state["recent_losses"]
        target = step if args.eval_only else target
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    t0, losses = time.perf_counter(), []

    def save():
        if rank == 0:
            trained = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(ckpt, {"trainable": trained, "step": step, "args": dataclasses.asdict(args),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "train_time_s": spent + time.perf_counter() - t0, "recent_losses": recent})
    bar = tqdm(total=target, initial=step, desc=f"train {model.mode}", disable=rank != 0, file=sys.stderr,
               position=int(model.mode == "input"))  # one line per side: they may train side by side
    model.train()
    try:
        while step < target:
            loader.sampler.set_epoch(step // len(loader))  # the order depends on (seed, epoch) only
            skip = step % len(loader)  # resumed mid-epoch: skip what was seen
            for batch in itertools.islice(loader, skip, skip + target - step):  # to the end or --max_steps
                with whole_step():
                    with autocast(device):
                        loss = ddp(*(batch[k].to(device) for k in ("feats", "input_ids", "attention_mask",
                                                                    "labels")))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                                 f"{ckpt if os.path.exists(ckpt) else 'none'}")
                    loss.backward()
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step, losses = step + 1, losses + [loss.item()]
                    recent = (recent + losses[-1:])[-len(loader):]  # the last epoch's losses
                    bar.update(1)
                    if rank == 0 and (step % args.log_every == 0 or step == target):
                        rec = {"step": step, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
                        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        losses = []
                    if step % args.ckpt_every == 0 or step == target:
                        save()
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()  # the bar's line ends before any message
    return {"steps": step, "train_time_s": spent + time.perf_counter() - t0,
            "train_loss": float(np.mean(recent))}


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(args: Args, model: VLModel, evalset: Split, tok, device) -> dict:
    """Greedy answers / captions / ScienceQA letters, scored by data.py's official metrics."""
    model.eval()
    collate, preds = Collator(evalset, model.enc_dec, tok, True), [""] * len(evalset.records)
    gen = transformers.GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=tok.eos_token_id, pad_token_id=collate.pad_id)
    bs = args.eval_batch_size
    for s in tqdm(range(0, len(evalset.items), bs), desc=f"eval {model.mode}", file=sys.stderr):
        b = collate(evalset.items[s:s + bs])
        with autocast(device):
            out = model.generate(*(b[k].to(device) for k in ("feats", "input_ids", "attention_mask")),
                                 generation_config=gen)
        for i, seq in zip(b["index"], out.tolist()):
            preds[i] = tok.decode(seq, skip_special_tokens=True).strip()
    return score(TASKS[args.dataset], preds, evalset.records)


def score(task: str, preds: list, recs: list) -> dict:
    if task == "vqa":
        return data.vqa_accuracy(preds, recs)
    if task == "caption":
        refs = {r["id"]: r["captions"] for r in recs}
        return data.caption_metrics({r["id"]: p for p, r in zip(preds, recs)}, refs)
    return data.scienceqa_accuracy(preds, recs)  # official: the first capital letter, if one of the choices


def answer_prior(task: str, train_recs: list, eval_recs: list) -> Optional[dict]:
    """No image: the commonest training answer per question type (VQA) or letter (ScienceQA)."""
    if task == "caption":
        return None
    key, top = (lambda r: r["question_type"]) if task == "vqa" else (lambda r: ""), {}  # noqa: E731
    for r in train_recs:
        top.setdefault(key(r), Counter())[r["answer"]] += 1
    guess = {k: c.most_common(1)[0][0] for k, c in top.items()}
    return score(task, [guess.get(key(r), next(iter(guess.values()))) for r in eval_recs], eval_recs)


# -------------------------------- benchmark: MemVP vs input-space prompting + LoRA on one LM of a real shape
def eq13_15(d: int, n: int, L: int) -> dict:
    """FLOPs of a layer: LM 4Ld(6d+L) (Eq. 13), + 4nd(6d+n+2L) input space (Eq. 14), + 4ndL MemVP (Eq. 15)."""
    lm = 4 * L * d * (6 * d + L)
    return {"lm": lm, "input": lm + 4 * n * d * (6 * d + n + 2 * L), "memvp": lm + 4 * n * d * L}


def analytic_flops(cfg, mode: str, n: int, n_mem: int, L: int, tgt: int, r: int = 0, head: int = -1,
                   memory_layers: int = 0) -> float:
    """Forward FLOPs of the whole LM per sample (2 per multiply-add): Eq. 13-15 with the real layer shapes
    (GQA, gated FFN), MemVP's n_mem entries (padding included) in `memory_layers` FFNs, LoRA r on every q/v
    (decoders too), the LM head on `head` positions (-1: every text / target position; 1: prefill). Causal
    self-attention (LLaMA, BART/T5 decoders): the T(T+1)/2 pairs of a causal kernel, not Eq. 13's T x T."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    dq = h * (getattr(cfg, "head_dim", None) or d // h)
    dkv = dq // h * (getattr(cfg, "num_key_value_heads", None) or h)
    D = next(getattr(cfg, a) for a in ("intermediate_size", "d_ff", "encoder_ffn_dim") if hasattr(cfg, a))
    ffn = 2 * d * D * (3 if getattr(cfg, "is_gated_act", not cfg.is_encoder_decoder) else 2)  # per token
    attn = lambda q, k, causal: 4 * dq * (q * (q + 1) // 2 if causal else q * k)  # noqa: E731  QK^T and AV
    r, T = (r, L + n) if mode == "input" else (0, L)  # T: tokens through the encoder / decoder-only layers
    layer = T * (4 * d * dq + 4 * d * dkv + ffn + 2 * r * (2 * d + dq + dkv))
    layer += attn(T, T, not cfg.is_encoder_decoder)
    total = cfg.num_hidden_layers * layer + (memory_layers * 4 * n_mem * d * L if mode == "memvp" else 0)
    if cfg.is_encoder_decoder:  # decoder: self-attention, cross-attention over the T encoder states, FFN
        dec = tgt * (12 * d * dq + ffn) + 4 * T * d * dq + attn(tgt, tgt, True) + attn(tgt, T, False)
        total += getattr(cfg, "decoder_layers", getattr(cfg, "num_decoder_layers", 0)) * (
            dec + 4 * r * d * (3 * tgt + T))  # LoRA on self-attention q, v and cross-attention q (tgt), v (T)
    return total + 2 * ((tgt if cfg.is_encoder_decoder else L) if head < 0 else head) * d * cfg.vocab_size


def saved_activations_mb(fn) -> float:
    """MiB of the non-parameter tensors autograd saves for the backward while fn() runs (allocator-free)."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2 ** 20


def run_benchmark(args: Args, device) -> dict:
    """Both sides on one LM (random weights of SmolLM2-135M's shape, or --bench_model), its family's n_pos
    and LoRA rank, CLIP ViT-L/14 features (d_v 1024): FLOPs, training step, prefill, decoding, activations."""
    from torch.utils.flop_counter import FlopCounterMode
    transformers.set_seed(args.seed)
    if args.bench_model:
        lm = load_lm(args.bench_model)[0]
    else:  # a random-weight LLaMA of SmolLM2-135M's shape (9 heads, 3 key/value heads), init std d^-0.5
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.bench_layers,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
            initializer_range=576 ** -0.5, pad_token_id=0))  # LlamaConfig's bos 1, eos 2, 2048 positions
    resolve_family(args, lm.requires_grad_(False), 1, synthetic=False)
    B, n, L, cfg = args.bench_batch, args.bench_n, args.bench_L, lm.config
    n_mem, tgt, dv, gen = max(args.n_pos, n), (16 if cfg.is_encoder_decoder else L), 1024, 8
    g = torch.Generator().manual_seed(args.seed)
    z, ids = torch.randn(B, n, dv, generator=g), torch.randint(4, cfg.vocab_size, (B, L), generator=g)
    labels = torch.randint(4, cfg.vocab_size, (B, tgt), generator=g) if cfg.is_encoder_decoder else ids
    batch = [t.to(device) for t in (z, ids, torch.ones_like(ids), labels)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sides = {}
    for mode in ("memvp", "input"):
        m = VLModel(lm, mode, dv, dataclasses.replace(args, n_pos=n_mem)).to(device)
        freeze(m)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        with FlopCounterMode(display=False) as fc, torch.no_grad(), autocast(device):
            m(*batch)
        k, r = len(m.memory_layers), args.lora_rank
        s = sides[mode] = {"params": sum(p.numel() for p in m.parameters() if p.requires_grad),
                           "counted": fc.get_total_flops() / B,
                           "analytic": analytic_flops(cfg, mode, n, n_mem, L, tgt, r, -1, k),
                           "prefill_analytic": analytic_flops(cfg, mode, n, n_mem, L, 1, r, 1, k),
                           "model": m, "opt": opt, "train": [], "prefill": [], "decode": []}
        s["act_mb"] = saved_activations_mb(lambda: bench_call(s, batch, device))
    for _ in range(args.bench_iters + 1):  # the sides alternate, so drifting machine load hits both
        for s in sides.values():
            for key, new_tokens in (("train", 0), ("prefill", 1), ("decode", 1 + gen)):
                sync()
                t0 = time.perf_counter()
                bench_call(s, batch, device, new_tokens)
                sync()
                s[key].append(time.perf_counter() - t0)
    for s in sides.values():  # medians; the first round warms up
        s.update({k: float(np.median(s[k][1:])) for k in ("train", "prefill", "decode")})
        s["decode"] = (s["decode"] - s["prefill"]) / gen
        del s["model"], s["opt"]
    res = {"sides": sides, "eq13_15": eq13_15(cfg.hidden_size, n, L), "title": (
        f"benchmark: {type(lm).__name__} {cfg.num_hidden_layers}x{cfg.hidden_size}, batch {B}, n={n} "
        f"(MemVP memory: {n_mem}), L={L}, LoRA r={args.lora_rank}, {device.type}")}
    print(format_benchmark(res))
    Path(args.out_dir, "results.json").write_text(json.dumps(res, indent=2))
    return res


def bench_call(s: dict, batch: list, device, new_tokens: int = 0):
    """A training step (fwd + bwd + AdamW), or the greedy generation of `new_tokens` tokens."""
    with autocast(device):
        if new_tokens:
            return s["model"].eval().generate(*batch[:3], min_new_tokens=new_tokens,
                                              max_new_tokens=new_tokens, do_sample=False)
        loss = s["model"].train()(*batch)
    loss.backward()
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)


def format_benchmark(r: dict) -> str:
    m, i = ({**r["sides"][side], "layer": r["eq13_15"][side]} for side in ("memvp", "input"))
    rows = [("trainable parameters", f"{m['params']:,}", f"{i['params']:,}", "")]
    for key, name, fmt, unit in (("layer", "GFLOPs of a layer, Eq. 13-15", "{:.3f}", 1e9),
                                 ("analytic", "GFLOPs/sample, whole LM, analytic", "{:.3f}", 1e9),
                                 ("prefill_analytic", "  the same, prefill (1 position)", "{:.3f}", 1e9),
                                 ("counted", "GFLOPs/sample, whole LM, counted (torch)", "{:.3f}", 1e9),
                                 ("train", "training step (fwd + bwd + AdamW)", "{:.3f}s", 1),
                                 ("prefill", "prefill (first token)", "{:.3f}s", 1),
                                 ("decode", "decoding, per further token", "{:.4f}s", 1),
                                 ("act_mb", "activations saved for backward, MiB", "{:.1f}", 1)):
        rows.append((name, fmt.format(m[key] / unit), fmt.format(i[key] / unit), f"{i[key] / m[key]:.2f}x"))
    w = max(len(x[0]) for x in rows)
    head = f"{'':{w}}  {'MemVP':>10}  {'input+LoRA':>10}  {'input/MemVP':>11}"
    return "\n".join([r["title"], head] + [f"{a:{w}}  {b:>10}  {c:>10}  {d:>11}" for a, b, c, d in rows])


# --------------------------------------------------------------------------------------- Args, CLI, main
# The paper's values per LM family: (BART/T5: Sec. 5.1, Table 5; LLaMA: Sec. 5.2, Table 7, the official code)
FAMILY = {
    "batch_size": (64, 4),  # per GPU, x 8 GPUs = 512 / 32
    "epochs": (20, 20),
    "lr": (1e-3, 9e-3),  # LLaMA: Table 7's 9e-3 is the official --blr: lr = blr x total batch / 256
    "lam": (0.01, 0.01),
    "scale": (1.0, 0.1),  # s: not in the paper; official LLaMA adapter_scale 0.1 (BART/T5 code unreleased: 1)
    "mem_dropout": (0.1, 0.1),  # official LLaMA code (BART/T5: the same)
    "n_pos": (240, 320),
    "lora_rank": (40, 6),  # Table 5 LoRA; Table 7 LLaVA-LoRA
    # DEVIATION: CLIP ViT-B/32 grid tokens stand in for the CLIP RN101 grid of Sec. 5.1 (no RN101 tower in HF)
    "vision": ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14"),
}
SYNTHETIC = {  # DEVIATION: the defaults of the synthetic datasets (shapes_*), each with its reason
    "vision": "tiny-cnn",  # data.py's frozen CNN pre-trained on another synthetic world: 3x3 grid tokens
    "batch_size": 32,  # Table 7's total batch, on one process
    "n_pos": 0,  # = n: nothing to pad
}
NEW_TOKENS = {"vqa": 8, "caption": 30, "mcq": 1}  # greedy tokens per task
NEW_TOKENS_HELP = ", ".join(f"{v} {task}" for task, v in NEW_TOKENS.items())


def family(text: str, name: str, source: str = "", llama: str = "") -> str:
    """Help text that shows what a per-family default resolves to (FAMILY, SYNTHETIC) and its source."""
    bart_t5, llama_value = (str(v).rpartition("/")[2] for v in FAMILY[name])  # hub ids: without owner
    synthetic = f", {SYNTHETIC[name]} on shapes_*" if name in SYNTHETIC else ""
    source = f"; {source}" if source else ""
    return f"{text} (default: {bart_t5} BART/T5, {llama_value}{llama} LLaMA{synthetic}{source})"


@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_vqa", f"{' | '.join(TASKS)}")
    data_root: Optional[str] = arg(None, "root of the real datasets")
    model: str = arg("stand_ins/tiny-llama", "a HF id or folder of the BART, T5 or LLaMA family")
    vision: Optional[str] = arg(None, family("image tower", "vision"))
    image_size: Optional[int] = arg(None, "CLIP input size (default: its image processor's)")
    prompting: str = arg("both", "both (the comparison) | memvp | input (+ LoRA)", eval_only=True)
    lam: Optional[float] = arg(None, family("λ of Eq. 7", "lam", "Tables 5, 7"))
    scale: Optional[float] = arg(None, family("output scale s of the retrieval", "scale", "official code"))
    n_pos: Optional[int] = arg(None, family("position embeddings, >= n", "n_pos", "Tables 5, 7"))
    proj_hidden: int = arg(128, "hidden width of the LLaMA projector (official code)")
    mem_dropout: Optional[float] = arg(None, family("dropout on act(<x, K>)", "mem_dropout", "official code"))
    memory_layers: Optional[str] = arg(None, "FFNs with the memory, e.g. 6,7 (default: all, Sec. 5.1, 5.2)")
    lora_rank: Optional[int] = arg(None, family("input side: LoRA rank on q, v", "lora_rank", "Tables 5, 7"))
    epochs: Optional[int] = arg(None, family("epochs", "epochs", "Tables 5, 7"))
    max_steps: int = arg(-1, "stop after N steps; the LR schedule still spans --epochs")
    batch_size: Optional[int] = arg(None, family("per process", "batch_size", "Tables 5, 7 (x 8 GPUs)"))
    lr: Optional[float] = arg(None, family("AdamW LR", "lr", "Tables 5, 7", " x total batch / 256"))
    weight_decay: float = arg(0.02, "AdamW weight decay (official LLaMA script)")
    warmup_ratio: float = arg(0.1, "linear warm-up fraction, then cosine decay (official: 2 of 20 epochs)")
    max_text_len: int = arg(512, "max tokens of source + target (official: 512)")
    max_new_tokens: Optional[int] = arg(None, f"greedy tokens (default: {NEW_TOKENS_HELP})", eval_only=True)
    eval_batch_size: int = arg(128, "evaluation batch size", eval_only=True)
    train_limit: Optional[int] = arg(None, "use the first N training records")
    eval_limit: Optional[int] = arg(None, "evaluate the first N records", eval_only=True)
    eval_split: str = arg("test", "val | test", eval_only=True)
    log_every: int = arg(50, "log to <mode>/metrics.jsonl every N steps", eval_only=True)
    export_merged: bool = arg(False, "save input/merged_lm: the input side's LM, LoRA merged", eval_only=True)
    ckpt_every: int = arg(500, "checkpoint every N steps (and at the end)", eval_only=True)
    device: str = arg("auto", "auto | cpu | cuda")
    seed: int = arg(0, "random seed")
    seeds: Optional[str] = arg(None, "comma-separated seeds (out_dir/seed<N>), one table of mean ± std")
    eval_only: bool = arg(False, "evaluate the checkpoints in --out_dir")
    out_dir: Optional[str] = arg(None, "default: runs/memvp/<dataset>-<model>")
    resume: bool = arg(False, "continue from the checkpoints in --out_dir")
    overwrite: bool = arg(False, "replace the results in --out_dir")
    num_workers: int = arg(0, "DataLoader workers")
    cache_dir: Optional[str] = arg(None, "frozen features (default: data.cache_dir())")
    benchmark: bool = arg(False, "measure speed / memory / FLOPs instead of training")
    bench_model: Optional[str] = arg(None, "benchmark LM (default: random weights of SmolLM2-135M's shape)")
    bench_layers: int = arg(12, "benchmark layers of the random LM")
    bench_n: int = arg(256, "visual tokens n (CLIP ViT-L/14: 256)")
    bench_L: int = arg(64, "text tokens L")
    bench_batch: int = arg(4, "benchmark batch (Table 3: 4 per GPU)")
    bench_iters: int = arg(5, "timed repetitions (median)")

    def __post_init__(self):
        one_of = lambda *ok: (f"one of {', '.join(ok)}", lambda v: v in ok)  # noqa: E731
        at_least = lambda low: (f">= {low}", lambda v: v >= low)  # noqa: E731
        data.check_values(self, {
            "dataset": one_of(*TASKS), "prompting": one_of("both", "memvp", "input"),
            "eval_split": one_of("val", "test"), "warmup_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
            "memory_layers": ("comma-separated FFN indices", lambda v: re.fullmatch(r"\d+(,\d+)*", v)),
            "seeds": ("left out with --benchmark (it measures once)", lambda v: not self.benchmark),
            "lora_rank": at_least(0), "num_workers": at_least(0),
            **{k: at_least(1) for k in ("epochs", "batch_size", "eval_batch_size", "log_every", "ckpt_every",
                                        "proj_hidden", "max_text_len", "max_new_tokens", "image_size",
                                        "bench_layers", "bench_n", "bench_L", "bench_batch", "bench_iters")}})
        # the defaults that do not depend on the LM (those that do: resolve_family)
        self.cache_dir = self.cache_dir or data.cache_dir()
        seeds = f"-seeds{self.seeds.replace(',', '_')}" if self.seeds else ""  # its own folder
        name = os.path.basename(self.model.rstrip("/"))
        self.out_dir = self.out_dir or os.path.join("runs", "memvp", "benchmark" if self.benchmark
                                                    else f"{self.dataset}-{name}{seeds}")


def resolve_family(args: Args, lm, world: int, synthetic: bool) -> None:
    """The values left out: FAMILY, or SYNTHETIC on a synthetic dataset; the task's greedy tokens."""
    args.max_new_tokens = args.max_new_tokens or NEW_TOKENS[TASKS[args.dataset]]  # --eval_only: the run's
    llama = not lm.config.is_encoder_decoder
    for name, vals in FAMILY.items():
        if getattr(args, name) is None:
            value = SYNTHETIC[name] if synthetic and name in SYNTHETIC else vals[llama]
            setattr(args, name, value * args.batch_size * world / 256 if name == "lr" and llama else value)


def run(args: Args) -> dict:
    if args.seeds is not None:  # one run per seed (out_dir/seed<N>), then one table of mean ± std
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = [run(dataclasses.replace(args, seed=s, seeds=None,
                                        out_dir=os.path.join(args.out_dir, f"seed{s}"))) for s in seeds]
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(format_table(runs))
        return {"seeds": seeds, "runs": runs}
    device, rank, world = setup_device(args.device)
    prepare_out_dir(args, rank)
    if args.benchmark:
        return run_benchmark(args, device)
    modes = ("memvp", "input") if args.prompting == "both" else (args.prompting,)
    saved = [os.path.join(args.out_dir, mode, "checkpoint.pt") for mode in modes]
    found = [p for p in saved if os.path.isfile(p)]
    if args.eval_only or (args.resume and found):  # the run's settings come from its checkpoint
        args = from_checkpoint(args, load_checkpoint((found or saved)[0]))
    transformers.set_seed(args.seed)
    task, recs = TASKS[args.dataset], {}
    for split, n in (("train", args.train_limit), (args.eval_split, args.eval_limit)):
        # synthetic world: build only the first n images (each has >= 1 question), not the whole split
        sizes = {split: n} if n and args.dataset.startswith("shapes_") else None
        recs[split] = data.load_records(args.dataset, split, args.data_root, limit=n, split_sizes=sizes)
    lm, tok = load_lm(args.model)
    data.pin_threads(lm, device)
    find_ffns(lm)  # fail early on an LM whose FFN the patcher does not know
    resolve_family(args, lm.requires_grad_(False), world, synthetic=args.dataset.startswith("shapes_"))
    llama = not lm.config.is_encoder_decoder
    trainset = load_split(args, "train", recs["train"], tok, True, llama, device)
    evalset = load_split(args, args.eval_split, recs[args.eval_split], tok, False, llama, device)
    prepare_out_dir(args, rank, inputs_loaded=True)  # --overwrite: only now that the inputs have loaded
    args.n_pos = max(args.n_pos, trainset.feats.shape[1])
    res = {"task": task, "enc_dec": not llama, "args": dataclasses.asdict(args),
           "answer_prior": answer_prior(task, trainset.records, evalset.records),
           "setting": f"{args.dataset} {args.eval_split}, frozen {args.model}, {args.vision}: {args.epochs} "
                      f"epochs, batch {args.batch_size * world}, lr {args.lr:.2g}"}
    jobs = [(args, mode, lm, tok, trainset, evalset, device, rank, world) for mode in modes]
    cores = os.cpu_count() or 1
    if len(jobs) > 1 and device.type == "cpu" and torch.get_num_threads() == 1 and world == 1 and cores > 1:
        # the two sides are independent and the LM runs on one thread: one process (and core) per side
        spawn = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(jobs), spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            res["modes"] = dict(zip(modes, pool.map(run_mode, *zip(*jobs))))
    else:
        res["modes"] = {mode: run_mode(*job) for mode, job in zip(modes, jobs)}
    if rank == 0:
        print(format_table([res]))
        Path(args.out_dir, "results.json").write_text(json.dumps(res, indent=2))
    return res


def run_mode(args: Args, mode: str, lm, tok, trainset: Split, evalset: Split, device, rank, world) -> dict:
    """Train one side of the comparison (--eval_only: load it), then evaluate it."""
    out_dir = os.path.join(args.out_dir, mode)
    os.makedirs(out_dir, exist_ok=True)
    transformers.set_seed(args.seed)
    model = VLModel(lm, mode, trainset.feats.shape[-1], args, tok.bos_token_id is not None).to(device)
    freeze(model)
    log = (lambda line: print(f"[{mode}] {line}")) if rank == 0 else (lambda line: None)
    trainable = data.count_trainable(model, method_parameters(model), log)[0]  # asserted: the method's own
    res = {**train(args, model, trainset, tok, device, rank, world, out_dir), "trainable_params": trainable}
    if rank == 0:
        res["metrics"] = evaluate(args, model, evalset, tok, device)
        Path(out_dir, "results.json").write_text(json.dumps(res, indent=2))
        if args.export_merged and mode == "input":
            merge_lora(model.lm).save_pretrained(os.path.join(out_dir, "merged_lm"))
    return res


METRICS = {"vqa": ["overall", "yes/no", "number", "other"], "caption": ["BLEU-4", "CIDEr"],
           "mcq": ["average", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]}


def format_table(runs: list) -> str:
    """One row per side (mean ± std over seeds); columns that do not fit in 100 characters continue below."""
    r0 = runs[0]
    cols = [c for c in METRICS[r0["task"]] if any(c in m["metrics"] for m in r0["modes"].values())]
    cell = lambda v: f"{v[0]:.2f}" if len(v) == 1 else data.mean_std(v)  # noqa: E731
    norms = ", norms" if r0["enc_dec"] else ""
    label = {"memvp": f"MemVP: f, p_k, p_v{norms}",
             "input": f"input: f, LoRA q,v r={r0['args']['lora_rank']}{norms}"}
    rows = [["trains", "params", "train", "loss"] + cols]
    if r0["answer_prior"]:
        prior = [cell([r["answer_prior"].get(c, math.nan) for r in runs]) for c in cols]
        rows.append(["answer prior (no image)", "-", "-", "-"] + prior)
    time_s = {}
    for mode in r0["modes"]:
        ms = [r["modes"][mode] for r in runs]
        time_s[mode] = np.mean([m["train_time_s"] for m in ms])
        loss = np.mean([m["train_loss"] for m in ms])  # the mean training loss of the last epoch
        rows.append([label[mode], f"{ms[0]['trainable_params']:,}", f"{time_s[mode]:.1f}s", f"{loss:.3f}"]
                    + [cell([m["metrics"][c] for m in ms]) for c in cols])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fit = next((j for j in range(len(w)) if sum(w[:j + 1]) + 2 * j > 100), len(w))
    lines = [f"{r0['setting']}, seed{'s' * (len(runs) > 1)} {','.join(str(r['args']['seed']) for r in runs)}"]
    for part in [range(fit)] + ([[0, *range(fit, len(w))]] if fit < len(w) else []):
        lines += ["  ".join(r[i].rjust(w[i]) if i else r[i].ljust(w[i]) for i in part) for r in rows]
    if len(time_s) == 2:
        lines.append(f"training time, input space / MemVP: {time_s['input'] / time_s['memvp']:.2f}x")
    return "\n".join(lines)


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
