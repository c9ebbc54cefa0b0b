"""routing_bottleneck.py -- routing functions inside LoRA / Adapter low-rank bottlenecks.

Paper: T. Qu, T. Tuytelaars, M.-F. Moens, "Introducing Routing Functions to Vision-Language
Parameter-Efficient Fine-Tuning with Low-Rank Bottlenecks", ECCV 2024, arXiv 2403.09377.
Released code (read for facts, nothing copied): github.com/tingyu215/Routing_VLPEFT.

LoRA and Adapter push the LM hidden state x_H through a rank-r bottleneck W_down. For vision-language
tasks the visual feature x_R goes through the *same* W_down, and a parameter-free linear routing
function mixes the two before W_up. The pooled visual feature (N = 1) is also the LM's first input token.

Poster -> code
  x_t = W_down x_H, x_v = W_down x_R                            RoutedLoRA.forward, RoutedAdapter.forward
  x_t | x_t o x'_v | x_t + x'_v | x_t (x_v)^T x_v | x_t x''_v   route
  LoRA:    h = W x_H + (alpha / r) W_up route(x_t, x_v)         RoutedLoRA
  Adapter: h = x_H + W_up act(route(x_t, x_v))                  RoutedAdapter, after the sub-layer's dropout
  x_R as the first input token                                  VisualLM.inputs
  LoRA merged into W (routing none only)                        merge_lora

As released: frozen ViT pooled feature; GPT-2 captioning (LoRA on q, v of c_attn; adapters after attention
and MLP; beam search); RoBERTa VQA as classification (frozen pooler on the visual token, 2-layer head, BCE).
Offline: tiny GPT-2 / RoBERTa pre-trained on another synthetic world (cached); data.py's tiny-cnn features.

  python routing_bottleneck.py                                  # tiny GPT-2 captions: LoRA none vs x_t o x'_v
  python routing_bottleneck.py --compare --seeds 0,1,2          # LoRA and Adapter x 5 routings, 3 seeds
  python routing_bottleneck.py --dataset shapes_vqa --compare --seeds 0,1,2      # tiny RoBERTa VQA
  python routing_bottleneck.py --dataset coco --data_root DATA --model gpt2 --compare
  torchrun --nproc_per_node 2 routing_bottleneck.py --max_steps 200
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
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
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

ROUTINGS = ("none", "mul", "add", "xtxvTxv", "xtxv2")
LABELS = {"none": "None", "mul": "x_t o x'_v", "add": "x_t + x'_v", "xtxvTxv": "x_t (x_v)^T x_v",
          "xtxv2": "x_t x''_v"}


# --- 1. The method: routing functions and the two PEFT modules ----------------------------------------------
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


class VisualContext:
    """x_R (B, N, d) of the current batch, read by every routed module of one model (set by VisualLM)."""
    x_r: Optional[torch.Tensor] = None


class RoutedLoRA(nn.Module):
    """Frozen layer W + LoRA with routing:  h = W x_H + (alpha / r) W_up route(W_down x_H, W_down x_R).
    `slices`: the output columns LoRA writes to (all, or the q and v thirds of GPT-2's fused c_attn);
    W_down stacks one r x d_in block per slice (routed together), W_up is one d_slice x r block per slice."""

    def __init__(self, base, slices, r, alpha, kind, ctx, dropout=0.0):
        super().__init__()
        self.base, self.slices, self.r, self.kind, self.ctx = base, slices, r, kind, ctx
        self.scaling, self.drop = alpha / r, nn.Dropout(dropout)
        # LoRA's init: W_down kaiming-uniform, W_up = 0, so h = W x_H when training starts.
        self.lora_A = nn.Parameter(torch.empty(len(slices) * r, in_out(base)[0]))
        self.lora_B = nn.Parameter(torch.zeros(len(slices), slices[0][1] - slices[0][0], r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        x_t = self.drop(x) @ self.lora_A.t()                                          # (B, L, k r)
        x_v = None if self.kind == "none" else self.drop(self.ctx.x_r.to(x.dtype)) @ self.lora_A.t()
        h = route(x_t, x_v, self.kind).unflatten(-1, (len(self.slices), self.r))      # (B, L, k, r)
        up = torch.einsum("blkr,kor->blko", h, self.lora_B.to(h.dtype))               # W_up per slice
        out = self.base(x)
        delta = up.new_zeros(*up.shape[:-2], out.size(-1))          # slice i in its columns, zeros elsewhere
        for i, (a, b) in enumerate(self.slices):
            delta[..., a:b] = up[..., i, :]
        return out + self.scaling * delta.to(out.dtype)


class RoutedAdapter(nn.Module):
    """Adapter with routing:  h = x_H + W_up act(route(W_down x_H, W_down x_R))  (W_down, W_up with biases).

    residual=False is the released RoBERTa Adapter (add_res off in the VQA script): h = W_up act(...) replaces
    the sub-layer's output, W_up keeps PyTorch's init. DEVIATION: residual=True for RoBERTa too (as GPT-2),
    chosen by measurement on the pre-trained tiny RoBERTa (3 seeds): with it every routing beats the plain
    adapter by 2.1-4.2 VQA points; without it they shrink to +0.2-1.2 or turn into losses (RESULTS.md).
    """

    def __init__(self, d, r, act, kind, ctx, residual=True):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(d, r), nn.Linear(r, d), ACT2FN[act]
        self.kind, self.ctx, self.residual = kind, ctx, residual
        if residual:   # DEVIATION: W_up = 0, the identity at init (as LoRA); released: PyTorch's init
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x):
        x_t = self.down(x)                                                            # (B, L, r)
        x_v = None if self.kind == "none" else self.down(self.ctx.x_r.to(x.dtype))    # (B, N, r)
        h = self.up(self.act(route(x_t, x_v, self.kind)))
        return x + h if self.residual else h


@torch.no_grad()
def merge_lora(lm: nn.Module) -> nn.Module:
    """A copy of `lm`, each RoutedLoRA folded into its layer: W' = W + (alpha / r) W_up W_down (routing none).
    A routed update depends on the image -- W_up M(x_v) W_down x_H with M = diag(x_v), x_v^T x_v or a rank-1
    matrix of x_v; x_t + x'_v adds the bias W_up x_v -- so no single weight matrix reproduces it."""
    lm = copy.deepcopy(lm)
    for name, m in list(lm.named_modules()):
        if isinstance(m, RoutedLoRA):
            if m.kind != "none":
                raise UsageError(f"{name}: LoRA with routing {m.kind!r} cannot be merged (it depends on x_R)")
            for i, (a, b) in enumerate(m.slices):
                delta = m.scaling * m.lora_B[i] @ m.lora_A[i * m.r:(i + 1) * m.r]     # (d_slice, d_in)
                if isinstance(m.base, Conv1D):                                   # GPT-2: weight is (in, out)
                    m.base.weight[:, a:b] += delta.t()
                else:
                    m.base.weight[a:b] += delta
            parent, child = name.rsplit(".", 1)
            setattr(lm.get_submodule(parent), child, m.base)
    return lm


def in_out(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, or of GPT-2's Conv1D (a Linear with its weight stored as (in, out))."""
    if isinstance(m, Conv1D):
        return m.nx, m.nf
    return m.in_features, m.out_features


# --- 2. Patching a Hugging Face LM (module names as in transformers' sources) -------------------------------
LORA_AT = {"gpt2": r"\.attn\.c_attn$", "llama": r"\.self_attn\.(q_proj|v_proj)$",
           "roberta": r"\.attention\.self\.(query|value)$"}
ADAPTER_AT = {"gpt2": r"\.(attn\.resid_dropout|mlp\.dropout)$",              # after the dropout, as released
              "llama": r"\.(self_attn\.o_proj|mlp\.down_proj)$",             # (LLaMA has none there)
              "roberta": r"\.(attention\.output|layer\.\d+\.output)\.dropout$"}


def lm_family(lm) -> str:
    mt, names = getattr(lm.config, "model_type", ""), [n for n, _ in lm.named_modules()]
    for fam, pattern in LORA_AT.items():
        if any(re.search(pattern, n) for n in names) and (fam != "gpt2" or mt == "gpt2"):
            return fam
    raise UsageError(f"model {lm.config.name_or_path or mt!r} ({mt}) cannot be patched: expected GPT-2 "
                     "'*.attn.c_attn', LLaMA-style '*.self_attn.q_proj'/'v_proj' or RoBERTa "
                     "'*.attention.self.query'")


def patch_lm(lm, method, r, kind, ctx, dropout=0.0, residual=True):
    """Freeze lm; LoRA on q and v (alpha = r, as released) or adapters after the sub-layers.
    -> (family, adapters)"""
    fam, adapters, shared = lm_family(lm), nn.ModuleList(), {}
    lm.requires_grad_(False)
    pattern = (LORA_AT if method == "lora" else ADAPTER_AT)[fam]
    for name in [n for n, _ in lm.named_modules() if re.search(pattern, n)]:
        base = lm.get_submodule(name)
        if method == "adapter":   # decoders: ONE adapter per block, after attention and MLP (post_module)
            block = name if fam == "roberta" else re.sub(r"\.(attn|mlp|self_attn)\..*$", "", name)
            if block not in shared:
                act = getattr(lm.config, "activation_function", None) or lm.config.hidden_act
                shared[block] = RoutedAdapter(lm.config.hidden_size, r, act, kind, ctx, residual)
                adapters.append(shared[block])
            base.register_forward_hook(lambda _m, _x, out, adapter=shared[block]: adapter(out))  # new output
        else:                     # GPT-2's c_attn computes [q | k | v]: LoRA on q and v (enable_lora=[T,F,T])
            d = in_out(base)[1]
            slices = [(0, d // 3), (2 * d // 3, d)] if fam == "gpt2" else [(0, d)]
            parent, child = name.rsplit(".", 1)
            setattr(lm.get_submodule(parent), child, RoutedLoRA(base, slices, r, r, kind, ctx, dropout))
    return fam, adapters


class VisualLM(nn.Module):
    """x_R is the LM's first input token(s) and the x_R of every routed layer (via ctx)."""

    def __init__(self, lm, task, ctx, adapters, n_answers=0):
        super().__init__()
        self.lm, self.task, self.ctx, self.adapters = lm, task, ctx, adapters
        d = lm.config.hidden_size   # released VQA head (classifier_2layer)
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                  nn.Linear(2 * d, n_answers)) if task == "vqa" else None

    def inputs(self, x_r, input_ids, attention_mask):
        self.ctx.x_r = x_r                                                     # (B, N, d)
        # DEVIATION (RoBERTa): the released code passes embeddings(input_ids) (word + position embeddings,
        # LayerNorm) as inputs_embeds, so the text is embedded twice; we pass word embeddings only.
        emb = torch.cat([x_r, self.lm.get_input_embeddings()(input_ids)], 1)  # (B, N+L, d)
        return emb, torch.cat([attention_mask.new_ones(x_r.shape[:2]), attention_mask], 1)

    def forward(self, x_r, input_ids, attention_mask):
        emb, mask = self.inputs(x_r, input_ids, attention_mask)
        out = self.lm(inputs_embeds=emb, attention_mask=mask)
        return out.logits if self.task == "caption" else self.head(out.pooler_output)


def build_model(a: Args, p: Prepared, method: str, kind: str) -> VisualLM:
    from transformers import AutoModel, AutoModelForCausalLM
    torch.manual_seed(a.seed)                                  # the same PEFT init for every routing kind
    hf = AutoModel if p.task == "vqa" else AutoModelForCausalLM
    lm = tiny_lm(a.model, p.tok, a.tiny_hidden, a.tiny_layers) if p.lm_state else from_hf(hf, a.model)
    if p.lm_state:
        lm.load_state_dict(p.lm_state)
    ctx = VisualContext()
    fam, adapters = patch_lm(lm, method, rank_of(a, method), kind, ctx, a.lora_dropout, a.adapter_residual)
    if (p.task == "vqa") != (fam == "roberta"):
        raise UsageError(f"{a.model} ({fam}) does not fit {a.dataset}: captions: GPT-2/LLaMA, VQA: RoBERTa")
    return VisualLM(lm, p.task, ctx, adapters, len(p.answers))


def expected_trainable(model: VisualLM) -> int:
    """The method's count: LoRA k r (d_in + d_slice) per layer, Adapter 2 d r + r + d, the VQA head."""
    d = model.lm.config.hidden_size
    n = sum(len(m.slices) * m.r * (in_out(m.base)[0] + m.slices[0][1] - m.slices[0][0])
            for m in model.lm.modules() if isinstance(m, RoutedLoRA))
    n += sum(2 * d * m.down.out_features + m.down.out_features + d for m in model.adapters)
    if model.head is not None:                                 # Linear(d, 2d), LayerNorm(2d), Linear(2d, A)
        n += 2 * d * d + 6 * d + (2 * d + 1) * model.head[-1].out_features
    return n


# --- 3. The offline stand-ins: tiny GPT-2 / RoBERTa, pre-trained once on another world (cached) -------------
def tiny_lm(name: str, tok, hidden: int, layers: int, mlm: bool = False):
    """Tiny LM: width `hidden`, 16-dim heads, dropout 0, init std d^-0.5; RoBERTa: a last row for <mask>."""
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM, RobertaModel
    kw = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              initializer_range=hidden ** -0.5)
    if name == "tiny-gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=160, n_embd=hidden, n_layer=layers,
                                          n_head=hidden // 16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                          **kw))
    cfg = RobertaConfig(vocab_size=len(tok) + 1, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 16, intermediate_size=4 * hidden, type_vocab_size=1,
                        max_position_embeddings=160, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
                        **kw)
    return RobertaForMaskedLM(cfg) if mlm else RobertaModel(cfg)


def pretrain_texts(task: str, tok, rng) -> list[tuple[list[int], int]]:
    """(ids, #answer tokens) of the pre-training world, the scene described in context: GPT-2 '<scene> <s>
    caption </s>' (a quarter without the scene), RoBERTa '<s> <scene> </s> question answer </s>'."""
    def enc(texts):
        return tok(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if task == "caption":
        recs = data.load_records("shapes_caption", "train", world_seed=data.PRETRAIN_WORLD)
        scene, caption = zip(*[(data.describe_scene(r["meta"]["scene"], rng) if rng.random() < 0.75 else "",
                                c) for r in recs for c in r["captions"]])
        return [(s + [bos] + c + [eos], 0) for s, c in zip(enc(scene), enc(caption))]
    recs = data.load_records("shapes_vqa", "train", world_seed=data.PRETRAIN_WORLD)
    scene = enc(data.describe_scene(r["meta"]["scene"], rng) for r in recs)
    question, answer = enc(r["question"] for r in recs), enc(r["answer"] for r in recs)
    return [([bos] + s + [eos] + q + a + [eos], len(a)) for s, q, a in zip(scene, question, answer)]


def pretrained_tiny_lm(a: Args, task: str, tok, device) -> dict:
    """DEVIATION (offline): stand-in for pre-trained GPT-2 / RoBERTa, trained on the text of another world
    (data.PRETRAIN_WORLD) with the scene described in context -- causal LM, or masked LM with the answer
    always masked -- so that it has learned to read a context; frozen afterwards. Cached by recipe."""
    mlm, steps = task == "vqa", a.tiny_pretrain_steps
    key = hashlib.sha1(f"{data.DATA_VERSION} {sorted(tok.get_vocab())}".encode()).hexdigest()[:8]
    recipe = f"{a.model}-d{a.tiny_hidden}-l{a.tiny_layers}-s{steps}-w{data.PRETRAIN_WORLD}-{key}-v2"
    path = data.stand_in(os.path.join(a.cache_dir or data.cache_dir(), "routing_bottleneck", f"{recipe}.pt"))
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    seed_everything(0)
    lm = tiny_lm(a.model, tok, a.tiny_hidden, a.tiny_layers, mlm=mlm).to(device)
    texts, g = pretrain_texts(task, tok, np.random.default_rng(0)), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.01)
    sched = lr_schedule(opt, steps // 20, steps, decay="cosine")
    for _ in tqdm(range(steps), desc=f"pre-train {a.model} (cached)", leave=False):
        batch = [texts[j] for j in torch.randint(len(texts), (64,), generator=g).tolist()]
        ids, mask = pad([t for t, _ in batch], tok.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        if mlm:   # 15% of the question words and the answer -> <mask> (the last row); the loss on those only
            pos, ends = torch.arange(ids.size(1)), mask.sum(1, keepdim=True) - 1
            answer = (pos < ends) & (pos >= ends - torch.tensor([n for _, n in batch])[:, None])
            question = (ids == tok.eos_token_id).cumsum(1) > 0                  # after the scene's </s>
            pick = ((torch.rand(ids.shape, generator=g) < 0.15) & question & (ids > 3)) | answer
            ids, labels = ids.masked_fill(pick, len(tok)), labels.masked_fill(~pick, -100)
        loss = lm(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"{recipe}: pre-trained, loss {loss.item():.3f}", file=sys.stderr)
    if mlm:   # keep the encoder; the pooler keeps its seeded init (RoBERTa's is not pre-trained either)
        encoder = tiny_lm(a.model, tok, a.tiny_hidden, a.tiny_layers)
        encoder.load_state_dict(lm.roberta.state_dict(), strict=False)
        lm = encoder
    state = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, state)
    return state


def from_hf(cls, name: str):
    try:
        return cls.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {name!r} ({str(e).splitlines()[0]}); offline, use --model tiny")


# --- 4. Data: records -> frozen visual features x_R + token ids (data.py) -----------------------------------
@dataclass
class Prepared:
    """What every run shares: token ids, frozen visual features x_R, the frozen tiny LM's weights."""
    task: str
    tok: object
    x_train: torch.Tensor                            # (train images, N, d)
    train: list                                      # (row of x_train, token ids, example index)
    x_eval: torch.Tensor
    rows_eval: torch.Tensor                          # eval record -> row of x_eval
    eval_records: list
    norm: Optional[torch.Tensor]                     # frozen map of the vision features to width d
    answers: list = field(default_factory=list)      # VQA: the answer strings the classifier outputs
    targets: Optional[torch.Tensor] = None           # VQA: soft scores (train examples, #answers)
    lm_state: Optional[dict] = None                  # tiny LM: pre-trained weights


def visual_features(a: Args, records, split, train, width, device, norm=None):
    """-> (records, x_R (images, N, width), rows, norm); unreadable train images drop their records."""
    kw = dict(dataset=a.dataset, split=split, train=train, pooled=a.visual_tokens == "pooled")
    kw.update({} if a.vision == "tiny-cnn" else dict(image_size=a.image_size, device=str(device)))
    feats, rows, missing = data.extract_features(records, a.vision, cache_dir=os.path.join(
        a.cache_dir or data.cache_dir(), "features"), **kw)
    if train:
        records, rows = data.drop_missing(records, rows, missing)
    x = feats.float()
    if norm is None and x.size(-1) != width:
        # DEVIATION (vision width C != LM width d only): the paper feeds the ViT pooled output as it is (ViT-B
        # width = GPT-2 width); here x is mapped on its top-d directions (SVD of the train features, not
        # centred, so the mean feature is kept; random directions if there are too few), unit RMS; frozen.
        flat = x.reshape(-1, x.size(-1))
        if min(flat.shape) >= width:
            norm = torch.linalg.svd(flat, full_matrices=False)[2][:width].T                   # (C, d)
        else:
            norm = torch.randn(flat.size(1), width, generator=torch.Generator().manual_seed(0))
        norm = norm / (flat @ norm).pow(2).mean().sqrt()
    x = x if norm is None else x @ norm
    return records, x.contiguous(), torch.as_tensor(rows).long(), norm


def encode(tok, text: str, max_len: int = 50) -> list[int]:
    """<s> text </s> (CLS/SEP or GPT-2's <|endoftext|> where there is no <s>); released max length 50."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return [bos] + tok(text, add_special_tokens=False)["input_ids"][: max_len - 2] + [eos]


def prepare(a: Args, device, rank: int) -> Prepared:
    task = "caption" if a.dataset in CAPTION_SETS else "vqa"
    train = data.load_records(a.dataset, "train", a.data_root, limit=a.train_limit)
    evals = data.load_records(a.dataset, a.eval_split, a.data_root, limit=a.eval_limit)
    if a.model.startswith("tiny"):
        tok, width = data.build_tokenizer(), a.tiny_hidden
    else:
        from transformers import AutoConfig, AutoTokenizer
        tok, cfg = from_hf(AutoTokenizer, a.model), from_hf(AutoConfig, a.model)
        width = getattr(cfg, "hidden_size", None)
        if not isinstance(width, int):
            raise UsageError(f"--model {a.model!r} is not a language model (no hidden_size in its config)")
        tok.pad_token = tok.pad_token or tok.eos_token
    if task == "caption":
        train = data.caption_pairs(train)                    # one example per (image, caption)
    train, x_train, rows, norm = visual_features(a, train, "train", True, width, device)
    x_eval, rows_eval = visual_features(a, evals, a.eval_split, False, width, device, norm)[1:3]
    if a.center_visual:
        mean = x_train.reshape(-1, width).mean(0)
        x_train, x_eval = x_train - mean, x_eval - mean
    p = Prepared(task, tok, x_train, [], x_eval, rows_eval, evals, norm)
    text = [r["caption"] if task == "caption" else r["question"] for r in train]
    p.train = [(int(rows[i]), encode(tok, t), i) for i, t in enumerate(text)]
    if task == "vqa":
        p.answers = data.answer_vocab(train, min_freq=1 if a.dataset.startswith("shapes") else 9)
        p.targets = torch.stack([data.vqa_soft_targets(r, p.answers) for r in train]).float()
    if a.model.startswith("tiny"):
        if dist.is_initialized() and rank != 0:
            dist.barrier()                                 # rank 0 pre-trains the tiny LM and caches it first
        p.lm_state = pretrained_tiny_lm(a, task, tok, device)
        if dist.is_initialized() and rank == 0:
            dist.barrier()
    return p


def pad(seqs, value):
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def loss_fn(model, p: Prepared, items: list, device) -> torch.Tensor:
    """Captions: CE on the caption tokens after [x_R, <s>]. VQA: BCE on the soft VQA scores (released)."""
    x_r = p.x_train[[it[0] for it in items]].to(device)                      # (B, N, d)
    ids, mask = (t.to(device) for t in pad([it[1] for it in items], p.tok.pad_token_id))
    out = model(x_r, ids, mask)
    if p.task == "vqa":
        return F.binary_cross_entropy_with_logits(out.float(), p.targets[[it[2] for it in items]].to(device))
    logits = out[:, x_r.size(1):-1].float()                                  # positions of [<s>, w1..wn]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                     # predict [w1..wn, </s>]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)


# --- 5. Training and evaluation -----------------------------------------------------------------------------
def train_run(a: Args, p: Prepared, method, kind, run_dir, device, rank, world):
    """Train one (method, routing) on the shared data and budget (--resume: continue it; --eval_only: load
    its checkpoint), then evaluate it -> (results, model)."""
    ckpt, done = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "results.json")
    setting = setting_of(a, "compare", "method", "kinds", "eval_split", "eval_limit", "num_beams",
                         "export_merged")                         # these change no trained weight
    os.makedirs(run_dir, exist_ok=True)
    if a.resume and os.path.isfile(done) and not a.export_merged:    # a complete run is not repeated
        with open(done) as f:
            res = json.load(f)
        if res.get("setting") != setting:
            raise UsageError(f"{done} is a run with other flags; resume it with them, or pass --overwrite")
        return res, None
    seed_everything(a.seed)
    model = build_model(a, p, method, kind).to(device)
    if a.eval_only:
        state = load_checkpoint(ckpt, model, setting)
        return {"method": method, "routing": kind, "seed": a.seed, "trainable": expected_trainable(model),
                "steps": state["step"], **evaluate(model, a, p, device, rank, world)}, model
    log = print if rank == 0 else lambda *_: None                        # only rank 0 prints
    n_train = count_trainable(model, expected_trainable(model), log=log)[0]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    loader = data.make_loader(p.train, a.batch_size, shuffle=True, seed=a.seed, num_workers=a.num_workers,
                              collate_fn=list, drop_last=True)
    total = a.epochs * len(loader)
    sched = lr_schedule(opt, int(a.warmup if a.warmup >= 1 else a.warmup * total), total, decay="linear")
    step, loss = 0, torch.zeros(())
    if a.resume and os.path.isfile(ckpt):
        state = load_checkpoint(ckpt, model, setting)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]

    def save():
        if rank == 0:
            trainable = {n: q.detach().cpu() for n, q in model.named_parameters() if q.requires_grad}
            save_checkpoint(ckpt, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step,
                                   "scheduler": sched.state_dict(), "rng": rng_state(), "setting": setting})

    stop, t0 = total if a.max_steps is None else min(total, a.max_steps), time.time()
    bar = tqdm(total=stop, initial=step, desc=f"{method}/{kind} seed {a.seed}", disable=rank > 0, leave=False)
    model.train()
    try:
        while step < stop:
            epoch, skip = divmod(step, len(loader))
            data.set_epoch(loader, epoch)      # order = f(seed, epoch): a resumed run skips the seen batches
            for items in itertools.islice(loader, skip, None):
                with whole_step():
                    with autocast(device):
                        loss = loss_fn(net, p, items, device)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                            f"{ckpt if os.path.isfile(ckpt) else 'none'}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    bar.update(1)
                    if rank == 0:
                        rec = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}
                        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                            print(json.dumps(rec), file=f)
                    if step % 500 == 0 or step == stop:
                        save()
                if step == stop:
                    break
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()  # the bar's line ends before any message
    res = {"method": method, "routing": kind, "seed": a.seed, "trainable": n_train, "steps": step,
           "final_loss": loss.item(), "train_time": time.time() - t0}
    res.update(evaluate(model, a, p, device, rank, world))
    if rank == 0 and step == total:
        write_json(done, dict(res, setting=setting))                # the run is complete: --resume skips it
    return res, model


@torch.no_grad()
def generate(model: VisualLM, p: Prepared, x_r, num_beams) -> list[str]:
    """Captions for visual features x_r (B, N, d) from the prefix [x_R, <s>] (at most 30 tokens)."""
    bos, eos = encode(p.tok, "")
    ids = torch.full((x_r.size(0), 1), bos, device=x_r.device)
    emb, mask = model.inputs(x_r, ids, torch.ones_like(ids))
    model.ctx.x_r = x_r.repeat_interleave(num_beams, 0)        # HF expands the inputs the same way for beams
    out = model.lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=30, num_beams=num_beams,
                            do_sample=False, eos_token_id=eos, pad_token_id=p.tok.pad_token_id)
    return [p.tok.decode(s[: s.index(eos)] if eos in s else s, skip_special_tokens=True).strip()
            for s in out.tolist()]


@torch.no_grad()
def evaluate(model: VisualLM, a: Args, p: Prepared, device, rank=0, world=1) -> dict:
    """On rank 0 (the others wait): BLEU-4 and CIDEr of the beam-search captions, or the official VQA
    accuracy of the arg-max answers."""
    recs, preds, bs = p.eval_records if rank == 0 else [], [], max(1, a.batch_size)
    model.eval()
    for s in tqdm(range(0, len(recs), bs), desc="eval", leave=False, disable=rank > 0):
        x_r = p.x_eval[p.rows_eval[s: s + bs]].to(device)
        with autocast(device):
            if p.task == "caption":
                preds += generate(model, p, x_r, a.num_beams)
            else:
                ids, mask = pad([encode(p.tok, r["question"]) for r in recs[s: s + bs]], p.tok.pad_token_id)
                logits = model(x_r, ids.to(device), mask.to(device))                 # (B, #answers)
                preds += [p.answers[j] for j in logits.argmax(-1).tolist()]
    model.train()
    if world > 1:
        dist.barrier()
    if rank > 0:
        return {}
    if p.task == "vqa":
        return {"VQA": data.vqa_accuracy(preds, p.eval_records)["overall"]}
    m = data.caption_metrics({r["image_id"]: c for r, c in zip(p.eval_records, preds)},
                             {r["image_id"]: r["captions"] for r in p.eval_records})
    return {"BLEU-4": m["BLEU-4"], "CIDEr": m["CIDEr"], "example": preds[0]}


def export_merged(model: VisualLM, p: Prepared, out: str) -> None:
    """LoRA (routing none) folded into the LM: a plain Hugging Face checkpoint + tokenizer, and
    visual_prefix.pt (the frozen map of the vision feature to x_R; the VQA head and its answers)."""
    merge_lora(model.lm).save_pretrained(out)
    p.tok.save_pretrained(out)
    head = None if model.head is None else model.head.state_dict()
    torch.save({"norm": p.norm, "head": head, "answers": p.answers}, os.path.join(out, "visual_prefix.pt"))
    print(f"merged LoRA model written to {out}", file=sys.stderr)


# --- 6. Arguments, the runs, the table ----------------------------------------------------------------------
CAPTION_SETS, VQA_SETS = ("shapes_caption", "coco", "flickr30k"), ("shapes_vqa", "vqav2", "gqa")


def opt(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass
class Args:
    dataset: str = opt("shapes_caption", "shapes_caption | coco | flickr30k (captions), shapes_vqa | vqav2 "
                                         "| gqa (VQA)")
    data_root: Optional[str] = opt(None, "root of the official dataset files (not for shapes_*)")
    model: str = opt("tiny", "tiny (GPT-2 for captions, RoBERTa for VQA) | a HF id/path (gpt2, roberta-base)")
    vision: str = opt("auto", "tiny-cnn | HF ViT/CLIP id/path; auto: tiny-cnn if tiny, else ViT-B/16 in21k")
    image_size: int = opt(224, "image side for a HF vision encoder")
    method: str = opt("lora", "lora | adapter | both")
    kinds: str = opt("none,mul", "routing functions: none,mul,add,xtxvTxv,xtxv2")
    compare: bool = opt(False, "both methods x all routings on the same data and budget")
    r_bottleneck: Optional[int] = opt(None, "rank r = LoRA alpha (released 128; RoBERTa VQA adapter 64)")
    lora_dropout: Optional[float] = opt(None, "dropout on the LoRA inputs (released: GPT-2 0, RoBERTa 0.1)")
    adapter_residual: bool = opt(True, "the adapter adds x back (released: GPT-2 yes; RoBERTa VQA no)")
    visual_tokens: str = opt("pooled", "pooled (N = 1, paper) | grid (N > 1 visual tokens)")
    center_visual: bool = opt(False, "ablation: x_R minus its train mean (x_v loses its image-free part)")
    tiny_hidden: int = opt(64, "width of the tiny LMs")
    tiny_layers: int = opt(2, "layers of the tiny LMs")
    tiny_pretrain_steps: Optional[int] = opt(None, "tiny LM pre-training steps (GPT-2 600, RoBERTa 3000)")
    train_limit: Optional[int] = opt(None, "use only the first N train records")
    eval_split: str = opt("test", "split of the final evaluation (Karpathy test for COCO)")
    eval_limit: Optional[int] = opt(None, "evaluate only the first N records")
    num_beams: Optional[int] = opt(None, "beam size for captions (released 5; tiny 3)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = opt(0, "seed of the PEFT init and the data order")
    seeds: Optional[str] = opt(None, "comma list: run each seed (out_dir/seed<N>), table of mean ± std")
    out_dir: Optional[str] = opt(None, "default runs/routing_bottleneck/<dataset>-<model>-<what>")
    resume: bool = opt(False, "continue from the checkpoints in out_dir")
    overwrite: bool = opt(False, "replace a finished run in out_dir")
    eval_only: bool = opt(False, "evaluate the checkpoints in out_dir without training")
    export_merged: Optional[str] = opt(None, "folder: the LoRA (routing none) model merged into the LM")
    epochs: Optional[int] = opt(None, "training epochs (released 20; tiny 2 captions, 3 VQA)")
    max_steps: Optional[int] = opt(None, "stop after N steps (the LR schedule still spans --epochs)")
    batch_size: Optional[int] = opt(None, "batch size per process (released 40 captions, 512 VQA; tiny 32)")
    lr: Optional[float] = opt(None, "AdamW lr (released 3e-5 captions, 3e-4 VQA; tiny 3e-3)")
    warmup: Optional[float] = opt(None, "linear warm-up: steps if >= 1, else a fraction (released 5000, .05)")
    num_workers: int = opt(0, "DataLoader workers")
    cache_dir: Optional[str] = opt(None, "cache of features and tiny LMs (default: data.cache_dir())")


# Released values (official scripts) and the offline tiny overrides, in one place. Tiny (one CPU core): rank 8
# and lr 3e-3 adapt a 64-wide LM in a few hundred steps; 2-3 epochs of batch 32 and beam 3 take ~20 s a run.
RELEASED = {"caption": dict(lr=3e-5, batch_size=40, epochs=20, warmup=5000, num_beams=5, lora_dropout=0.0),
            "vqa": dict(lr=3e-4, batch_size=512, epochs=20, warmup=0.05, num_beams=1, lora_dropout=0.1)}
TINY = {"caption": dict(r_bottleneck=8, lr=3e-3, batch_size=32, epochs=2, warmup=0.05, num_beams=3,
                        lora_dropout=0.0, tiny_pretrain_steps=600),
        "vqa": dict(r_bottleneck=8, lr=3e-3, batch_size=32, epochs=3, warmup=0.05, num_beams=1,
                    lora_dropout=0.0, tiny_pretrain_steps=3000)}


def rank_of(a: Args, method: str) -> int:
    return a.r_bottleneck or (64 if a.dataset in VQA_SETS and method == "adapter" else 128)   # released


def resolve(a: Args) -> Args:
    """Check the flags; fill the defaults (released values, or TINY for --model tiny)."""
    if a.dataset not in CAPTION_SETS + VQA_SETS:
        raise UsageError(f"unknown dataset {a.dataset!r}; choose from {', '.join(CAPTION_SETS + VQA_SETS)}")
    task = "caption" if a.dataset in CAPTION_SETS else "vqa"
    a.model = {"tiny": f"tiny-{'gpt2' if task == 'caption' else 'roberta'}"}.get(a.model, a.model)
    tiny = a.model.startswith("tiny")
    if a.compare:
        a.method, a.kinds = "both", ",".join(ROUTINGS)
    kinds = a.kinds.split(",")
    bad = [k for k in kinds if k not in ROUTINGS] + [k for i, k in enumerate(kinds) if k in kinds[:i]]
    for ok, msg in [(not tiny or a.model in ("tiny-gpt2", "tiny-roberta"), f"unknown tiny model {a.model!r}"),
                    (not tiny or a.model == f"tiny-{'gpt2' if task == 'caption' else 'roberta'}",
                     f"{a.model} does not fit {a.dataset}: captions need tiny-gpt2, VQA tiny-roberta"),
                    (a.method in ("lora", "adapter", "both"), f"unknown --method {a.method!r}"),
                    (not bad, f"--kinds: unknown or repeated {bad}; choose from {','.join(ROUTINGS)}"),
                    (a.visual_tokens in ("pooled", "grid"), f"unknown --visual_tokens {a.visual_tokens!r}"),
                    (all(v is None or v >= 1 for v in (a.epochs, a.batch_size, a.r_bottleneck, a.num_beams)),
                     "--epochs, --batch_size, --r_bottleneck and --num_beams must be >= 1"),
                    (a.max_steps is None or a.max_steps >= 0, f"--max_steps {a.max_steps}: must be >= 0"),
                    (a.warmup is None or 0 <= a.warmup < math.inf, f"--warmup {a.warmup}: must be >= 0"),
                    (not a.export_merged or (a.method != "adapter" and "none" in a.kinds.split(",")),
                     "--export_merged needs a LoRA run with routing none (a routed LoRA cannot be merged)")]:
        if not ok:
            raise UsageError(msg)
    for k, v in (TINY if tiny else RELEASED)[task].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    a.vision = {"auto": "tiny-cnn" if tiny else "google/vit-base-patch16-224-in21k"}.get(a.vision, a.vision)
    what = ("compare" if a.compare else f"{a.method}-{a.kinds.replace(',', '_')}") + (
        f"-seeds{a.seeds.replace(',', '_')}" if a.seeds else "")
    a.out_dir = a.out_dir or f"runs/routing_bottleneck/{a.dataset}-{a.model.split('/')[-1]}-{what}"
    return a


def table(results: list, task: str) -> str:
    keys = ["BLEU-4", "CIDEr"] if task == "caption" else ["VQA"]
    multi = len({r["seed"] for r in results}) > 1
    lines = [f"{'PEFT':8s}{'routing':17s}" + "".join(f"{k:>15s}" for k in keys) + f"{'Δ' + keys[-1]:>9s}"
             f"{'trainable':>11s}"]
    for method, name in (("lora", "LoRA"), ("adapter", "Adapter")):
        base = [r[keys[-1]] for r in results if r["method"] == method and r["routing"] == "none"]
        for kind in ROUTINGS:
            rs = [r for r in results if r["method"] == method and r["routing"] == kind]
            if rs:
                cells = "".join(f"{mean_std([r[k] for r in rs]) if multi else f'{rs[0][k]:.2f}':>15s}"
                                for k in keys)
                delta = f"{np.mean([r[keys[-1]] for r in rs]) - np.mean(base):+.2f}" if base else ""
                lines.append(f"{name:8s}{LABELS[kind]:17s}{cells}{delta if kind != 'none' else '':>9s}"
                             f"{rs[0]['trainable']:>11,d}")
    return "\n".join(lines)


def run(a: Args) -> dict:
    a = resolve(a)
    device, rank, world = setup_device(a.device, tiny=a.model.startswith("tiny"))
    if not a.eval_only:
        prepare_out_dir(a.out_dir, a.resume, a.overwrite, rank)
    t0, p = time.time(), prepare(a, device, rank)
    clear_outputs(a, rank)  # --overwrite: only now that the inputs have loaded
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    methods = ["lora", "adapter"] if a.method == "both" else [a.method]
    results = []
    for seed, method, kind in itertools.product(seeds, methods, a.kinds.split(",")):
        run_dir = os.path.join(a.out_dir, *([f"seed{seed}"] if a.seeds else []), f"{method}-{kind}")
        res, model = train_run(dataclasses.replace(a, seed=seed), p, method, kind, run_dir, device, rank,
                               world)
        results.append(res)
        if a.export_merged and rank == 0 and (method, kind, seed) == ("lora", "none", seeds[0]):
            export_merged(model, p, a.export_merged)
    out = {"task": p.task, "runs": results, "args": dataclasses.asdict(a)}
    if rank == 0:
        if not a.eval_only:
            write_json(os.path.join(a.out_dir, "results.json"), out)
        r = f"{rank_of(a, 'lora')}/{rank_of(a, 'adapter')}" if a.method == "both" else rank_of(a, a.method)
        steps = max(x["steps"] for x in results)
        print(f"{a.dataset}, {a.model} + {a.vision}, r={r}, {steps} steps/run, {len(p.eval_records)} "
              f"{a.eval_split} records, seed(s) {a.seeds or a.seed}")
        print(table(results, p.task))
        print(f"time: {time.time() - t0:.1f}s")
    return out


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
