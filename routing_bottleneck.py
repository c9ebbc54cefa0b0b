"""routing_bottleneck.py -- routing functions inside LoRA / Adapter low-rank bottlenecks.

Paper: T. Qu, T. Tuytelaars, M.-F. Moens, "Introducing Routing Functions to Vision-Language
Parameter-Efficient Fine-Tuning with Low-Rank Bottlenecks", ECCV 2024, arXiv 2403.09377.
Released code (read for facts, nothing copied): github.com/tingyu215/Routing_VLPEFT.

LoRA and Adapter push the LM hidden state x_H through a rank-r bottleneck W_down. For vision-language
tasks the visual feature x_R goes through the *same* W_down, and a parameter-free linear routing
function mixes the two before W_up. The pooled visual feature (N = 1) is also the LM's first input token.

Poster -> code
  x_t = W_down x_H, x_v = W_down x_R                            RoutedLoRA.forward, RoutedAdapter.forward
  x_t | x_t o x'_v | x_t + x'_v | x_t (x_v)^T x_v | x_t x''_v   ROUTINGS, route (one branch each)
  LoRA:    h = W x_H + (alpha / r) W_up route(x_t, x_v)         RoutedLoRA
  Adapter: h = x_H + W_up act(route(x_t, x_v))                  RoutedAdapter, after the sub-layer's dropout
  x_R as the first input token                                  VisualLM.inputs
  LoRA merged into W (routing none only)                        merge_lora

As released: frozen ViT pooled feature; GPT-2 captioning (LoRA on q, v of c_attn; adapters after attention
and MLP; beam search); RoBERTa VQA as classification (frozen pooler on the visual token, 2-layer head, BCE).
Offline (shapes_*): stand_ins/tiny-gpt2 and tiny-roberta (scripts/make_stand_ins.py), data.py's tiny-cnn.

  python routing_bottleneck.py                                  # tiny GPT-2 captions: LoRA none vs x_t o x'_v
  python routing_bottleneck.py --compare --seeds 0,1,2          # LoRA and Adapter x 5 routings, 3 seeds
  python routing_bottleneck.py --dataset shapes_vqa --compare --seeds 0,1,2      # tiny RoBERTa VQA
  python routing_bottleneck.py --dataset coco --data_root DATA --compare         # GPT-2 + ViT-B/16
  torchrun --nproc_per_node 2 routing_bottleneck.py --max_steps 200
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
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

import data
from data import UsageError, arg  # bad input: one 'error: ...' line, exit 2; an Args field


# --- 1. The method: routing functions and the two PEFT modules ----------------------------------------------
Routing = NamedTuple("Routing", [("label", str), ("formula", str)])  # label: table (ASCII), formula: --help
ROUTINGS = {  # name -> routing function; a new one is an entry here and a branch in `route`
    "none": Routing("None", "x_t"),
    "mul": Routing("x_t o x'_v", "x_t∘x'_v"),
    "add": Routing("x_t + x'_v", "x_t+x'_v"),
    "xtxvTxv": Routing("x_t (x_v)^T x_v", "x_t(x_v)^T x_v"),
    "xtxv2": Routing("x_t x''_v", "x_t x''_v"),
}


def route(x_t: torch.Tensor, x_v: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """x_t (B, L, r) = W_down x_H, x_v (B, N, r) = W_down x_R -> routed bottleneck feature (B, L, r).
    GPT-2's fused c_attn holds q and v side by side (r' = 2r): as released, routing spans all 2r dims."""
    if kind == "none":
        return x_t                                       # plain LoRA / Adapter
    if kind == "xtxvTxv":
        # x_t (x_v)^T x_v: (B, L, r) @ (B, r, N) @ (B, N, r); for N = 1 it is <x_t, x_v> x_v.
        # DEVIATION (N > 1 only): released x_v.reshape(B, r, N) is the transpose only for N = 1; we transpose.
        return (x_t @ x_v.transpose(1, 2)) @ x_v
    # x'_v (B, 1, r): the visual row, broadcast over the L text tokens. DEVIATION (N > 1 only): released code
    # runs these with N = 1 only; for grid features we mean-pool the N rows (still linear, parameter-free).
    x_v1 = x_v if x_v.size(1) == 1 else x_v.mean(1, keepdim=True)
    if kind == "mul":
        return x_t * x_v1                                # x_t o x'_v (element-wise)
    if kind == "add":
        return x_t + x_v1                                # x_t + x'_v
    if kind == "xtxv2":
        # x''_v: the r x r matrix whose every row is x'_v, so (x_t x''_v)[l, j] = (sum_k x_t[l, k]) * x'_v[j]
        return x_t @ x_v1.expand(-1, x_t.size(-1), -1)
    raise ValueError(f"route has no branch for the routing function {kind!r}")


class VisualContext:
    """x_R (B, N, d) of the current batch, read by every routed module of one model (set by VisualLM)."""
    x_r: Optional[torch.Tensor] = None


class RoutedLoRA(nn.Module):
    """Frozen layer W + LoRA with routing:  h = W x_H + (alpha / r) W_up route(W_down x_H, W_down x_R).
    `slices`: the output columns LoRA writes to (all, or the q and v thirds of GPT-2's fused c_attn);
    W_down stacks one r x d_in block per slice (routed together), W_up is one d_slice x r block per slice."""

    def __init__(self, base, d_in, slices, r, alpha, kind, ctx, dropout=0.0):
        super().__init__()
        self.base, self.slices, self.r, self.kind, self.ctx = base, slices, r, kind, ctx
        self.scaling, self.drop = alpha / r, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(len(slices) * r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(len(slices), slices[0][1] - slices[0][0], r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's init; W_up = 0: h = W x_H at start

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
    DEVIATION: residual=True for RoBERTa too (released add_res off: W_up act(...) is the output). On the
    tiny RoBERTa (3 seeds) every routing beats the plain adapter by 2.1-4.2 VQA points, without it <= 1.2."""

    def __init__(self, d, r, act, kind, ctx, residual=True):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(d, r), nn.Linear(r, d), transformers.activations.ACT2FN[act]
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
    for name, m in [(n, m) for n, m in lm.named_modules() if isinstance(m, RoutedLoRA)]:
        if m.kind != "none":
            raise UsageError(f"{name}: LoRA with routing {m.kind!r} cannot be merged (it depends on x_R)")
        weight = m.base.weight.t() if isinstance(m.base, Conv1D) else m.base.weight    # (d_out, d_in)
        for i, (a, b) in enumerate(m.slices):
            weight[a:b] += m.scaling * m.lora_B[i] @ m.lora_A[i * m.r:(i + 1) * m.r]  # (d_slice, d_in)
        lm.set_submodule(name, m.base)
    return lm


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
    """Freeze lm; LoRA on q and v (alpha = r, as released) or adapters after the sub-layers -> adapters."""
    fam, shared = lm_family(lm), {}
    lm.requires_grad_(False)
    pattern = (LORA_AT if method == "lora" else ADAPTER_AT)[fam]
    for name, base in [(n, m) for n, m in lm.named_modules() if re.search(pattern, n)]:
        if method == "adapter":   # decoders: ONE adapter per block, after attention and MLP (post_module)
            block = name if fam == "roberta" else re.sub(r"\.(attn|mlp|self_attn)\..*$", "", name)
            if block not in shared:
                act = getattr(lm.config, "activation_function", None) or lm.config.hidden_act
                shared[block] = RoutedAdapter(lm.config.hidden_size, r, act, kind, ctx, residual)
            base.register_forward_hook(lambda _m, _x, out, adapter=shared[block]: adapter(out))  # new output
        else:                     # GPT-2's c_attn computes [q | k | v]: LoRA on q and v (enable_lora=[T,F,T])
            d_out, d_in = base.weight.t().shape if isinstance(base, Conv1D) else base.weight.shape
            slices = [(0, d_out // 3), (2 * d_out // 3, d_out)] if fam == "gpt2" else [(0, d_out)]
            lm.set_submodule(name, RoutedLoRA(base, d_in, slices, r, r, kind, ctx, dropout))
    return nn.ModuleList(shared.values())


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
    """The run's own copy of the frozen LM (built from its config, then loaded) with its PEFT modules."""
    torch.manual_seed(a.seed)                                  # the same PEFT init for every routing kind
    lm, ctx = type(p.lm)(p.lm.config), VisualContext()
    lm.load_state_dict(p.lm.state_dict())
    adapters = patch_lm(lm, method, rank_of(a, method), kind, ctx, a.lora_dropout, a.adapter_residual)
    return VisualLM(lm, p.task, ctx, adapters, len(p.answers))


def expected_trainable(model: VisualLM) -> int:
    """The method's count: LoRA k r (d_in + d_slice) per layer, Adapter 2 d r + r + d, the VQA head."""
    d = model.lm.config.hidden_size
    n = sum(len(m.slices) * m.r * (m.lora_A.size(1) + m.slices[0][1] - m.slices[0][0])
            for m in model.lm.modules() if isinstance(m, RoutedLoRA))
    n += sum(2 * d * m.down.out_features + m.down.out_features + d for m in model.adapters)
    if model.head is not None:                                 # Linear(d, 2d), LayerNorm(2d), Linear(2d, A)
        n += 2 * d * d + 6 * d + (2 * d + 1) * model.head[-1].out_features
    return n


# --- 3. Data: records -> frozen visual features x_R + token ids (data.py) -----------------------------------
FIT_ROWS = 100_000  # the visual map is fitted on at most this many train feature rows


@dataclasses.dataclass
class VisualMap:
    """x_R = feats.float() @ norm - mean (norm (C, d), mean (d,) frozen), batch by batch from the cache."""
    norm: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None

    def __call__(self, feats: torch.Tensor, rows, device) -> torch.Tensor:
        x = feats[rows].float()                                                   # (B, N, C)
        x = x if self.norm is None else x @ self.norm                             # (B, N, d)
        return (x if self.mean is None else x - self.mean).to(device)


def fit_visual_map(feats: torch.Tensor, width: int, center: bool) -> VisualMap:
    """The frozen map, fitted on the train feature rows (a seeded sample of FIT_ROWS if more: bounded)."""
    flat = feats.reshape(-1, feats.size(-1))                                      # (rows, C)
    if len(flat) > FIT_ROWS:
        pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:FIT_ROWS]
        flat = flat[pick.sort().values]
    flat, m = flat.float(), VisualMap()
    if flat.size(1) != width:
        # DEVIATION (C != d only): the paper feeds the ViT pooled output as it is (ViT-B width = GPT-2 width);
        # here its top-d directions (uncentred SVD: the mean feature is kept; random if too few), unit RMS.
        if min(flat.shape) >= width:
            norm = torch.linalg.svd(flat, full_matrices=False)[2][:width].T                   # (C, d)
        else:
            norm = torch.randn(flat.size(1), width, generator=torch.Generator().manual_seed(0))
        m.norm = norm / (flat @ norm).pow(2).mean().sqrt()
    if center:   # --center_visual: x_R minus its train mean
        m.mean = (flat if m.norm is None else flat @ m.norm).mean(0)
    return m


@dataclasses.dataclass
class Prepared:
    """What every run shares: the frozen LM and its tokenizer, token ids, the cached visual features."""
    task: str
    tok: object
    lm: nn.Module                                    # frozen, unpatched (each run patches a copy)
    feats_train: torch.Tensor                        # (train images, N, C), memory-mapped
    train: list                                      # (row of feats_train, token ids, example index)
    feats_eval: torch.Tensor
    rows_eval: torch.Tensor                          # eval record -> row of feats_eval
    eval_records: list
    visual: VisualMap                                # cached feature -> x_R
    answers: list = dataclasses.field(default_factory=list)    # VQA: the answers the classifier outputs
    targets: Optional[torch.Tensor] = None           # VQA: soft scores (train examples, #answers)


def encode(tok, text: str, max_len: int = 50) -> list[int]:
    """<s> text </s> (CLS/SEP or GPT-2's <|endoftext|> where there is no <s>); released max length 50."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return [bos] + tok(text, add_special_tokens=False)["input_ids"][: max_len - 2] + [eos]


def prepare(a: Args, device) -> Prepared:
    """The records, the frozen LM of --model (a hub id or folder, stand_ins/ too), token ids, features."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    task = TASK[a.dataset]
    train = data.load_records(a.dataset, "train", a.data_root, limit=a.train_limit)
    evals = data.load_records(a.dataset, a.eval_split, a.data_root, limit=a.eval_limit)
    transformers.utils.logging.disable_progress_bar()  # stderr: the run's own messages (one line on error)
    try:
        path = data.model_path(a.model)
        tok = AutoTokenizer.from_pretrained(path)
        lm = (AutoModel if task == "vqa" else AutoModelForCausalLM).from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {a.model!r} ({str(e).splitlines()[0]})") from None
    if (task == "vqa") != (lm_family(lm) == "roberta"):
        raise UsageError(f"{a.model} ({lm_family(lm)}) does not fit {a.dataset}: captions: GPT-2/LLaMA, "
                         "VQA: RoBERTa")
    tok.pad_token = tok.pad_token or tok.eos_token
    data.pin_threads(lm, device)
    if task == "caption":
        train = data.caption_pairs(train)                    # one example per (image, caption)
    features = dict(dataset=a.dataset, pooled=a.visual_tokens == "pooled", image_size=a.image_size,
                    device=str(device), cache_dir=os.path.join(a.cache_dir or data.cache_dir(), "features"))
    feats_train, rows, missing = data.extract_features(train, a.vision, split="train", train=True, **features)
    train, rows = data.drop_missing(train, rows, missing)       # unreadable images drop their records
    feats_eval, rows_eval, _ = data.extract_features(evals, a.vision, split=a.eval_split, train=False,
                                                     **features)
    visual = fit_visual_map(feats_train, lm.config.hidden_size, a.center_visual)
    p = Prepared(task, tok, lm.eval(), feats_train, [], feats_eval, rows_eval, evals, visual)
    text = [r["caption"] if task == "caption" else r["question"] for r in train]
    p.train = [(int(rows[i]), encode(tok, t), i) for i, t in enumerate(text)]
    if task == "vqa":
        p.answers = data.answer_vocab(train, min_freq=DEFAULTS[a.dataset]["answer_min_count"])
        p.targets = torch.stack([data.vqa_soft_targets(r, p.answers) for r in train]).float()
    return p


def pad(seqs, value):
    ids = nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=value)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
    return ids, mask


def loss_fn(model, p: Prepared, items: list, device) -> torch.Tensor:
    """Captions: CE on the caption tokens after [x_R, <s>]. VQA: BCE on the soft VQA scores (released)."""
    x_r = p.visual(p.feats_train, [it[0] for it in items], device)          # (B, N, d)
    ids, mask = (t.to(device) for t in pad([it[1] for it in items], p.tok.pad_token_id))
    out = model(x_r, ids, mask)
    if p.task == "vqa":
        return F.binary_cross_entropy_with_logits(out.float(), p.targets[[it[2] for it in items]].to(device))
    logits = out[:, x_r.size(1):-1].float()                                  # positions of [<s>, w1..wn]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                     # predict [w1..wn, </s>]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)


# --- 4. Training and evaluation -----------------------------------------------------------------------------
def train_run(a: Args, p: Prepared, method, kind, device, rank, world):
    """Train one (method, routing) (--resume: continue; --eval_only: load), evaluate -> (results, model)."""
    run_dir = os.path.join(a.out_dir, *([f"seed{a.seed}"] if a.seeds else []), f"{method}-{kind}")
    ckpt, done = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "results.json")
    os.makedirs(run_dir, exist_ok=True)
    if a.resume and os.path.isfile(done) and not a.export_merged:    # a complete run is not repeated
        return json.loads(Path(done).read_text()), None
    transformers.set_seed(a.seed)
    model = build_model(a, p, method, kind).to(device)
    if a.eval_only:
        state = load_checkpoint(ckpt, model)
        return {"method": method, "routing": kind, "seed": a.seed, "trainable": expected_trainable(model),
                "steps": state["step"], **evaluate(model, a, p, device, rank, world)}, model
    log = print if rank == 0 else lambda *_: None                        # only rank 0 prints
    n_train = data.count_trainable(model, expected_trainable(model), log=log)[0]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    loader = data.make_loader(p.train, a.batch_size, shuffle=True, seed=a.seed, num_workers=a.num_workers,
                              collate_fn=list, drop_last=True)
    total = a.epochs * len(loader)
    sched = lr_schedule(opt, int(a.warmup if a.warmup >= 1 else a.warmup * total), total, decay="linear")
    step, loss = 0, torch.zeros(())
    if a.resume and os.path.isfile(ckpt):
        state = load_checkpoint(ckpt, model)                 # the trained tensors and the RNG states
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]

    def save():
        if rank == 0:
            trainable = {n: q.detach().cpu() for n, q in model.named_parameters() if q.requires_grad}
            save_checkpoint(ckpt, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step,
                                   "scheduler": sched.state_dict(), "args": dataclasses.asdict(a)})

    stop, t0 = total if a.max_steps is None else min(total, a.max_steps), time.time()
    bar = tqdm(total=stop, initial=step, desc=f"{method}/{kind} seed {a.seed}", disable=rank > 0, leave=False)
    model.train()
    try:
        while step < stop:
            epoch, skip = divmod(step, len(loader))
            loader.sampler.set_epoch(epoch)    # order = f(seed, epoch): a resumed run skips the seen batches
            for items in itertools.islice(loader, skip, skip + stop - step):
                with whole_step():
                    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                        loss = loss_fn(net, p, items, device)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step + 1}; last good checkpoint: "
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
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()  # the bar's line ends before any message
    res = {"method": method, "routing": kind, "seed": a.seed, "trainable": n_train, "steps": step,
           "final_loss": loss.item(), "train_time": time.time() - t0}
    res.update(evaluate(model, a, p, device, rank, world))
    if rank == 0 and step == total:
        Path(done).write_text(json.dumps(res, indent=2))           # the run is complete: --resume skips it
    return res, model


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
    """On rank 0 (others wait): BLEU-4, CIDEr of beam-search captions, or VQA accuracy of arg-max answers."""
    recs, preds, bs = p.eval_records if rank == 0 else [], [], max(1, a.batch_size)
    model.eval()
    for s in tqdm(range(0, len(recs), bs), desc="eval", leave=False, disable=rank > 0):
        x_r = p.visual(p.feats_eval, p.rows_eval[s: s + bs], device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):  # bf16 on CUDA
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


# --- 5. Arguments: the released values and the synthetic datasets' own, the runs, the table -----------------
TASK = {"shapes_caption": "caption", "shapes_vqa": "vqa", "coco": "caption", "flickr30k": "caption",
        "vqav2": "vqa", "gqa": "vqa"}
VIT = "google/vit-base-patch16-224-in21k"
RELEASED = {  # the official scripts: GPT-2 COCO captioning, RoBERTa-base VQAv2 (r: LoRA, adapter)
    "caption": dict(model="gpt2", vision=VIT, r=(128, 128), lr=3e-5, batch_size=40, epochs=20, warmup=5000,
                    num_beams=5, lora_dropout=0.0, answer_min_count=9),
    "vqa": dict(model="roberta-base", vision=VIT, r=(128, 64), lr=3e-4, batch_size=512, epochs=20,
                warmup=0.05, num_beams=1, lora_dropout=0.1, answer_min_count=9)}
SYNTHETIC = {  # the synthetic datasets: a 64-wide LM on one CPU core, ~20 s a run
    "shapes_caption": dict(
        model="stand_ins/tiny-gpt2",  # DEVIATION: a tiny GPT-2 pre-trained on another synthetic world
        vision="tiny-cnn",            # DEVIATION: data.py's frozen CNN, trained on another world, not a ViT
        r=(8, 8), lr=3e-3,            # DEVIATION: rank 8, lr 3e-3: a 64-wide LM adapts in a few hundred steps
        batch_size=32, epochs=2,      # DEVIATION: 624 steps a run
        warmup=0.05,                  # DEVIATION: 5% (released 5000 steps, more than a whole run here)
        num_beams=3),                 # DEVIATION: beam 3 (released 5), faster
    "shapes_vqa": dict(
        model="stand_ins/tiny-roberta", vision="tiny-cnn", r=(8, 8), lr=3e-3,   # DEVIATION: as shapes_caption
        batch_size=32, epochs=3,         # DEVIATION: 1056 steps a run
        lora_dropout=0.0,                # DEVIATION: no LoRA dropout in 3 epochs (released 0.1 in 20)
        answer_min_count=1)}             # every answer of the small world (released: seen 9 times)
DEFAULTS = {ds: {**RELEASED[task], **SYNTHETIC.get(ds, {})} for ds, task in TASK.items()}


def by_dataset(key: str, show=str) -> str:
    """'default: <value> <datasets>; ...' of DEFAULTS, for the help of a flag whose default is per dataset."""
    groups: dict = {}
    for ds, values in DEFAULTS.items():
        groups.setdefault(show(values[key]), []).append(ds)
    text = "; ".join(f"{value} {'/'.join(names)}" for value, names in groups.items())
    for names, short in {"shapes_caption/shapes_vqa": "shapes_*", "coco/flickr30k": "captions",
                         "vqav2/gqa": "VQA"}.items():
        text = text.replace(names, short)
    return "default: " + text


@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_caption", "; ".join(f"{task}: {' | '.join(d for d in TASK if TASK[d] == task)}"
                                                   for task in RELEASED))
    data_root: Optional[str] = arg(None, "root of the official dataset files (not for shapes_*)")
    model: Optional[str] = arg(None, f"the LM, a HF id or folder ({by_dataset('model')})")
    vision: Optional[str] = arg(None, f"vision tower, tiny-cnn or a HF ViT/CLIP ({by_dataset('vision')})")
    image_size: Optional[int] = arg(None, "image side of a HF vision tower (default: 224; tiny-cnn: its own)")
    method: str = arg("lora", "the runs: lora | adapter | both", eval_only=True)
    kinds: str = arg("none,mul", f"routings: {', '.join(f'{k}={r.formula}' for k, r in ROUTINGS.items())}",
                     eval_only=True)
    compare: bool = arg(False, "the runs: both methods x all routings, one data and budget", eval_only=True)
    r_bottleneck: Optional[int] = arg(None, "rank r = LoRA alpha (" + by_dataset(
        "r", lambda r: f"{r[0]}" if r[0] == r[1] else f"{r[0]} LoRA/{r[1]} adapter") + ")")
    lora_dropout: Optional[float] = arg(None, f"dropout on the LoRA inputs ({by_dataset('lora_dropout')})")
    adapter_residual: bool = arg(True, "the adapter adds x back (released: GPT-2 yes; RoBERTa VQA no)")
    visual_tokens: str = arg("pooled", "pooled (N = 1, paper) | grid (N > 1 visual tokens)")
    center_visual: bool = arg(False, "ablation: x_R minus its train mean (x_v loses its image-free part)")
    train_limit: Optional[int] = arg(None, "use only the first N train records")
    eval_split: str = arg("test", "split of the final evaluation (Karpathy test for COCO)", eval_only=True)
    eval_limit: Optional[int] = arg(None, "evaluate only the first N records", eval_only=True)
    num_beams: Optional[int] = arg(None, f"caption beam size ({by_dataset('num_beams')})", eval_only=True)
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    seed: int = arg(0, "seed of the PEFT init and the data order")
    seeds: Optional[str] = arg(None, "comma list: run each seed (out_dir/seed<N>), table of mean ± std")
    out_dir: Optional[str] = arg(None, "default: runs/routing_bottleneck/<dataset>-<model>-<runs>")
    resume: bool = arg(False, "continue from the checkpoints in out_dir")
    overwrite: bool = arg(False, "replace a finished run in out_dir")
    eval_only: bool = arg(False, "evaluate the checkpoints in out_dir without training")
    export_merged: Optional[str] = arg(None, "folder: LoRA (routing none) merged into the LM", eval_only=True)
    epochs: Optional[int] = arg(None, f"training epochs ({by_dataset('epochs')})")
    max_steps: Optional[int] = arg(None, "stop after N steps (the LR schedule still spans --epochs)")
    batch_size: Optional[int] = arg(None, f"batch size per process ({by_dataset('batch_size')})")
    lr: Optional[float] = arg(None, f"AdamW lr ({by_dataset('lr')})")
    warmup: Optional[float] = arg(None, f"linear warm-up: steps if >= 1, else a fraction "
                                        f"({by_dataset('warmup')})")
    num_workers: int = arg(0, "DataLoader workers")
    cache_dir: Optional[str] = arg(None, "cache of the frozen features (default: data.cache_dir())")

    def __post_init__(self):
        kinds = self.kinds.split(",")
        bad = [k for k in kinds if k not in ROUTINGS] + [k for i, k in enumerate(kinds) if k in kinds[:i]]
        positive = (">= 1", lambda v: v >= 1)
        data.check_values(self, {
            "dataset": (f"one of {', '.join(TASK)}", lambda v: v in TASK),
            "method": ("lora, adapter or both", lambda v: v in ("lora", "adapter", "both")),
            "kinds": (f"distinct names of {','.join(ROUTINGS)}; unknown or repeated: {bad}",
                      lambda v: not bad),
            "visual_tokens": ("pooled or grid", lambda v: v in ("pooled", "grid")),
            "epochs": positive, "batch_size": positive, "r_bottleneck": positive, "num_beams": positive,
            "max_steps": (">= 0", lambda v: v >= 0), "num_workers": (">= 0", lambda v: v >= 0),
            "warmup": ("a number >= 0", lambda v: 0 <= v < math.inf),
            "export_merged": ("given with a LoRA run with routing none (a routed LoRA cannot be merged)",
                              lambda v: self.compare or self.method != "adapter" and "none" in kinds)})


def with_defaults(a: Args) -> Args:
    """The per-dataset defaults (DEFAULTS) of the flags left out; --compare: every method and routing."""
    filled = {k: v for k, v in DEFAULTS[a.dataset].items() if getattr(a, k, "not a flag") is None}
    if a.compare:
        filled.update(method="both", kinds=",".join(ROUTINGS))
    a = dataclasses.replace(a, **filled)
    runs = ("compare" if a.compare else f"{a.method}-{a.kinds}") + (f"-seeds{a.seeds}" if a.seeds else "")
    return dataclasses.replace(a, out_dir=a.out_dir or f"runs/routing_bottleneck/{a.dataset}-"
                                                       f"{a.model.split('/')[-1]}-{runs.replace(',', '_')}")


def rank_of(a: Args, method: str) -> int:
    return a.r_bottleneck or DEFAULTS[a.dataset]["r"][method == "adapter"]


def table(results: list, task: str) -> str:
    keys = ["BLEU-4", "CIDEr"] if task == "caption" else ["VQA"]
    multi, width = len({r["seed"] for r in results}) > 1, 2 + max(len(r.label) for r in ROUTINGS.values())
    lines = [f"{'PEFT':8s}{'routing':{width}s}" + "".join(f"{k:>15s}" for k in keys)
             + f"{'Δ' + keys[-1]:>9s}{'trainable':>11s}"]
    for method, name in (("lora", "LoRA"), ("adapter", "Adapter")):
        base = [r[keys[-1]] for r in results if r["method"] == method and r["routing"] == "none"]
        for kind, routing in ROUTINGS.items():
            rs = [r for r in results if r["method"] == method and r["routing"] == kind]
            if rs:
                cells = "".join(f"{data.mean_std([r[k] for r in rs]) if multi else f'{rs[0][k]:.2f}':>15s}"
                                for k in keys)
                delta = f"{np.mean([r[keys[-1]] for r in rs]) - np.mean(base):+.2f}" if base else ""
                lines.append(f"{name:8s}{routing.label:{width}s}{cells}{delta if kind != 'none' else '':>9s}"
                             f"{rs[0]['trainable']:>11,d}")
    return "\n".join(lines)


def run(a: Args) -> dict:
    held = sorted(Path(with_defaults(a).out_dir).rglob("checkpoint.pt")) if a.resume or a.eval_only else []
    if held:   # --resume / --eval_only: the settings the runs were trained with
        a = from_checkpoint(a, load_checkpoint(str(held[0])))
    a = with_defaults(a)
    device, rank, world = setup_device(a.device)
    prepare_out_dir(a, rank)
    t0, p = time.time(), prepare(a, device)
    prepare_out_dir(a, rank, inputs_loaded=True)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    methods = ["lora", "adapter"] if a.method == "both" else [a.method]
    results = []
    for seed, method, kind in itertools.product(seeds, methods, a.kinds.split(",")):
        res, model = train_run(dataclasses.replace(a, seed=seed), p, method, kind, device, rank, world)
        results.append(res)
        if a.export_merged and rank == 0 and (method, kind, seed) == ("lora", "none", seeds[0]):
            merge_lora(model.lm).save_pretrained(a.export_merged)
            p.tok.save_pretrained(a.export_merged)
            head = None if model.head is None else model.head.state_dict()
            torch.save({"norm": p.visual.norm, "mean": p.visual.mean, "head": head, "answers": p.answers},
                       os.path.join(a.export_merged, "visual_prefix.pt"))
            print(f"merged LoRA model written to {a.export_merged}", file=sys.stderr)
    out = {"task": p.task, "runs": results, "args": dataclasses.asdict(a)}
    if rank == 0:
        if not a.eval_only:
            Path(a.out_dir, "results.json").write_text(json.dumps(out, indent=2))
        r = f"{rank_of(a, 'lora')}/{rank_of(a, 'adapter')}" if a.method == "both" else rank_of(a, a.method)
        print(f"{a.dataset}, {a.model} + {a.vision}, r={r}, {max(x['steps'] for x in results)} steps/run, "
              f"{len(p.eval_records)} {a.eval_split} records, seed(s) {a.seeds or a.seed}")
        print(table(results, p.task))
        print(f"time: {time.time() - t0:.1f}s")
    return out


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
