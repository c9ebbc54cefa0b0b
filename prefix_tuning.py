"""prefix_tuning.py -- prefix-tuning a frozen BLIP-2 (stage 1 of PT-PEFT).

Kim, Lee, Shim, Shim, "Preserving Pre-trained Representation Space: On Effectiveness of Prefix-tuning for
Large Multi-modal Models", arXiv 2411.00029 (Sec. 3, Fig. 5-6, App. B, Tables 8 and 14).

The LMM stays frozen; only prefixes are learned. A prefix encoder (Fig. 6) maps P prefix embeddings plus a
prefix-type embedding through an MLP (Li & Liang's re-parameterisation); after training its output is kept
as a plain tensor (App. B.1). Table 8 puts BLIP-2's prefixes in two places, P = 8 (captioning) or 16 (VQA):
  Q-Former  key/value prefixes of every self-attention layer: the queries also attend to P learned keys and
            values (Eq. 7, App. D.3), so the LM still receives num_query_tokens visual tokens;
  OPT       input prefixes: the LM reads [prefix; visual tokens; text] (Fig. 5).
--lm_prefix kv gives Li & Liang's per-layer key/value prefixes in the LM instead; none, no LM prefix.

  Fig. 6  prefix encoder                   PrefixEncoder.forward
  Eq. 7   attention over [P; X]            QFormerPrefixAttention.forward, kv_cache (--lm_prefix kv)
  Fig. 5  [prefix; visual tokens; text]    PrefixBlip2.lm_inputs
  B.1     prefix kept as a plain tensor    PrefixBlip2.export_prefix
  B.2     captions by beam search (5)      beam_search
  B.4     AdamW (0.9, 0.99), linear warm-up and decay, Table 14 values   train, PAPER

Offline (the default --model stand_ins/tiny-blip2): a tiny BLIP-2 pre-trained on four caption styles and four
VQA question families of another synthetic world (scripts/make_stand_ins.py). Held out of that mix:
shapes_caption (a fifth caption style), shapes_vqa (position and relation questions). "mix" = the
pre-training tasks on the benchmark world.

  python prefix_tuning.py                            # tiny BLIP-2, shapes_caption, Table 8 prefixes
  python prefix_tuning.py --compare --seeds 0,1,2    # Table 8 vs LM input / LM kv / Q-Former alone
  python prefix_tuning.py --dataset coco --data_root /data --model /ckpt/blip2-opt-2.7b --device cuda
  torchrun --nproc_per_node 2 prefix_tuning.py --max_steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections import OrderedDict
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


# ---- The method: prefix encoder (Fig. 6), Q-Former key/value prefixes (Eq. 7), prefixed BLIP-2 (Fig. 5) ----
class PrefixEncoder(nn.Module):
    """Fig. 6: P prefix embeddings + a prefix-type embedding -> Linear-Tanh-Linear (Li & Liang 2021).
    n_layers = 0: input prefixes (P, d); else key/value prefixes (n_layers, 2, P, d_kv), peft's layout."""

    def __init__(self, num_prefix: int, d: int, hidden: int, n_layers: int = 0, d_kv: Optional[int] = None):
        super().__init__()
        self.shape = (num_prefix, d) if n_layers == 0 else (num_prefix, n_layers, 2, d_kv or d)
        self.embedding = nn.Parameter(torch.randn(num_prefix, d) * 0.02)      # (P, d)
        self.type_embedding = nn.Parameter(torch.zeros(1, d))                # one type, cf. token types
        out = math.prod(self.shape[1:])
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        h = self.mlp(self.embedding + self.type_embedding).view(self.shape)  # (P, d) or (P, L, 2, d_kv)
        return h if h.dim() == 2 else h.permute(1, 2, 0, 3)                   # (L, 2, P, d_kv)

    def num_params(self) -> int:
        """Analytic count: P d + d + (d + 1) hidden + (hidden + 1) out."""
        (P, d), h, out = self.embedding.shape, self.mlp[0].out_features, self.mlp[2].out_features
        return P * d + d + (d + 1) * h + (h + 1) * out


class QFormerPrefixAttention(nn.Module):
    """Eq. 7: Q-Former self-attention over [P; X], softmax(q [P_k; k]^T / sqrt(d_h)) [P_v; v]. Replaces HF's
    module, keeping its query/key/value Linears under their names (LoRA can wrap them). `prefix` (2, P, d)
    is set by PrefixBlip2 for one forward; None gives the original attention."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.query, self.key, self.value = attn.query, attn.key, attn.value
        self.heads, self.dropout, self.prefix = attn.num_attention_heads, attn.attention_dropout, None

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, L, d = hidden_states.shape
        q, k, v = (f(hidden_states).view(B, L, self.heads, -1).transpose(1, 2)          # (B, H, L, d_h)
                   for f in (self.query, self.key, self.value))
        if self.prefix is not None:
            p = self.prefix.to(k.dtype).view(2, 1, -1, self.heads, k.shape[-1]).transpose(2, 3)
            k = torch.cat([p[0].expand(B, -1, -1, -1), k], 2)                           # (B, H, P + L, d_h)
            v = torch.cat([p[1].expand(B, -1, -1, -1), v], 2)
            if attention_mask is not None:                                              # prefixes: visible
                attention_mask = F.pad(attention_mask, (k.shape[2] - L, 0),
                                       value=attention_mask.dtype == torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, L, d), None


class PrefixBlip2(nn.Module):
    """A frozen Blip2ForConditionalGeneration (`lmm`) with Table 8's prefixes: key/value prefixes in every
    Q-Former self-attention layer and input (or kv) prefixes in the LM. forward(batch) -> LM loss.
    prefix_state: "on" (the encoders' output), "off" (exactly the base LMM) or a dict like export_prefix()."""

    def __init__(self, lmm, num_prefix: int, lm_prefix: str, qformer_prefix: bool, hidden: int, cache_mb=0.0):
        super().__init__()
        self.lmm, self.lm_mode, self.prefix_state = lmm, lm_prefix, "on"
        tc, qc = lmm.config.text_config, lmm.config.qformer_config
        self.kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        d_kv = self.kv_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        self.prefix_encoders, self.qformer_attn = nn.ModuleDict(), []
        if num_prefix > 0 and lm_prefix != "none":
            layers = tc.num_hidden_layers if lm_prefix == "kv" else 0
            self.prefix_encoders["lm"] = PrefixEncoder(num_prefix, tc.hidden_size, hidden, layers, d_kv)
        if num_prefix > 0 and qformer_prefix:
            self.prefix_encoders["qformer"] = PrefixEncoder(num_prefix, qc.hidden_size, hidden,
                                                            qc.num_hidden_layers)
            self.qformer_attn = patch_qformer(lmm.qformer)
        self.vision_cache = VisionCache(cache_mb)

    @torch.no_grad()
    def export_prefix(self) -> dict:
        """App. B.1: {"lm": ..., "qformer": ...} as plain tensors; no encoder is needed at inference."""
        return {k: enc().detach().clone() for k, enc in self.prefix_encoders.items()}

    def visual_tokens(self, batch: dict, qformer_prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """ViT (frozen: outputs cached) -> Q-Former with its key/value prefixes -> projection: (B, Q, d)."""
        lmm, vit = self.lmm, self.lmm.vision_model
        pixels = batch["pixel_values"].to(lmm.query_tokens.device, vit.dtype)
        img = self.vision_cache(vit, pixels, batch["image_ids"])                       # (B, N, d_vit)
        for layer, attn in enumerate(self.qformer_attn):
            attn.prefix = None if qformer_prefix is None else qformer_prefix[layer]   # (2, P, d_q)
        q = lmm.qformer(query_embeds=lmm.query_tokens.expand(len(img), -1, -1), encoder_hidden_states=img)
        for attn in self.qformer_attn:                                         # prefixes: this forward only
            attn.prefix = None
        return lmm.language_projection(q.last_hidden_state)                            # (B, Q, d)

    def lm_inputs(self, batch: dict):
        """Fig. 5: [prefix (input mode); visual tokens; text] -> (embeddings, attention mask, positions, KV
        cache holding a kv-mode prefix or None). Text is left-padded; positions skip the pads."""
        P = self.prefix_state
        if not isinstance(P, dict):
            P = {} if P == "off" else {k: enc() for k, enc in self.prefix_encoders.items()}
        vis = self.visual_tokens(batch, P.get("qformer"))                              # (B, Q, d)
        B, ids, mask = len(vis), batch["input_ids"].to(vis.device), batch["attention_mask"].to(vis.device)
        x = torch.cat([vis, self.lmm.language_model.get_input_embeddings()(ids).to(vis.dtype)], 1)
        am = torch.cat([mask.new_ones(vis.shape[:2]), mask], 1)                        # (B, Q + T)
        if "lm" in P and self.lm_mode == "input":
            x = torch.cat([P["lm"].to(x.dtype).expand(B, -1, -1), x], 1)               # (B, P + Q + T, d)
            am = torch.cat([mask.new_ones(B, len(P["lm"])), am], 1)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        if "lm" in P and self.lm_mode == "kv":                                         # mask covers the past
            kv = P["lm"].to(x.dtype)
            return x, torch.cat([mask.new_ones(B, kv.shape[2]), am], 1), pos, kv_cache(kv, B, self.kv_heads)
        return x, am, pos, None

    def forward(self, batch: dict) -> torch.Tensor:
        T = batch["labels"].shape[1]
        out, _ = call_lm(self.lmm.language_model, *self.lm_inputs(batch))
        logits = out.logits[:, -T - 1:-1].float()             # position t predicts text token t
        labels = batch["labels"].to(logits.device)            # -100 except target + eos
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def features(self, batch: dict) -> dict:
        """LM last-layer states at the visual-token and text positions, prefixes in context (as forward)."""
        h = call_lm(self.lmm.language_model, *self.lm_inputs(batch), hidden=True)[0].hidden_states[-1]
        T, Q = batch["input_ids"].shape[1], self.lmm.config.num_query_tokens
        mask = batch["attention_mask"].to(h.device)
        return {"image": h[:, -T - Q:-T], "text": h[:, -T:], "text_mask": mask}


class VisionCache:
    """Frozen-ViT outputs per image id, at most max_mb MB, least recently used dropped first. A forward
    with a trainable ViT parameter bypasses and empties it; other changes to ViT weights need a new cache."""

    def __init__(self, max_mb: float):
        self.max_bytes, self.bytes, self.items = int(max_mb * 2 ** 20), 0, OrderedDict()

    def __call__(self, vit: nn.Module, pixels: torch.Tensor, ids: list) -> torch.Tensor:
        if any(p.requires_grad for p in vit.parameters()):
            self.bytes, self.items = 0, OrderedDict()
            return vit(pixel_values=pixels).last_hidden_state
        miss = [i for i, k in enumerate(ids) if k not in self.items]
        with torch.no_grad():
            computed = vit(pixel_values=pixels[miss]).last_hidden_state if miss else []
        for k, v in dict(zip([ids[i] for i in miss], computed)).items():
            self.items[k] = v.clone()                      # a copy: a view would keep the whole batch alive
            self.bytes += v.nbytes
        out = torch.stack([self.items[k] for k in ids])                                 # (B, N, d_vit)
        for k in ids:
            self.items.move_to_end(k)
        while self.bytes > self.max_bytes:
            self.bytes -= self.items.popitem(last=False)[1].nbytes
        return out


# ---- Patching the Hugging Face model (and one transformers-version difference) ----------------------------
def patch_qformer(qformer: nn.Module) -> list:
    """Replace every self-attention `encoder.layer.<i>.attention.attention` by QFormerPrefixAttention."""
    layers = getattr(getattr(qformer, "encoder", None), "layer", [])
    attns = [getattr(getattr(layer, "attention", None), "attention", None) for layer in layers]
    if not attns or not all(isinstance(getattr(a, n, None), nn.Linear) for a in attns
                                   for n in ("query", "key", "value")):
        raise UsageError(f"cannot patch {type(qformer).__name__}: expected encoder.layer.<i>.attention."
                         "attention with nn.Linear query/key/value (the BLIP-2 Q-Former)")
    for layer, attn in zip(layers, attns):
        layer.attention.attention = QFormerPrefixAttention(attn)
    return [layer.attention.attention for layer in layers]


def kv_cache(prefix: torch.Tensor, batch: int, heads: int):
    """--lm_prefix kv: the prefix (L, 2, P, d_kv) as every LM layer's past keys/values (a DynamicCache)."""
    kv = prefix.view(*prefix.shape[:3], heads, -1).transpose(2, 3)                     # (L, 2, H, P, d_h)
    return transformers.DynamicCache(
        ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def call_lm(lm: nn.Module, x, am, pos, cache=None, use_cache: bool = False, hidden: bool = False):
    """The LM on embeddings -> (output, KV cache). The cache argument (and output field) is `cache` from
    transformers 5.24 on, `past_key_values` before."""
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(inputs_embeds=x, attention_mask=am, position_ids=pos, use_cache=use_cache or cache is not None,
             output_hidden_states=hidden, return_dict=True, **{name: cache})
    return out, getattr(out, name)


# ---- Data -> batches --------------------------------------------------------------------------------------
PRETRAIN_MIX = {"vqa": ("color", "shape", "count", "exist"), "caption": (0, 1, 2, 3)}  # question families,
HELD_OUT = {"shapes_vqa": ("position", "relation"), "shapes_caption": (4,)}  # caption styles (ShapesWorld)
WORLD = {"train": 1200, "val": 200, "test": 300}         # images per split of a synthetic world
DATASETS = ("shapes_caption", "shapes_vqa", "coco", "flickr30k", "vqav2")
PAPER = dict(epochs=5, batch_size=128, lr=5e-5, warmup_steps=5000, prefix_hidden=512,   # BLIP-2, Table 14
             prompts={"caption": "a photo of", "vqa": "Question: {q} Short answer:"})     # BLIP-2's prompts
SYNTHETIC = dict(PAPER, batch_size=16,   # shapes_*: 375 steps on 1200 images, a minute on one CPU core
                 lr=1e-2,                # DEVIATION: 5e-5 barely moves a 128-wide encoder in 375 steps
                 warmup_steps=30, prefix_hidden=128,  # DEVIATION: scaled to the 375 steps and a 64-wide LM
                 eval_limit=300,         # the whole test split of captions; the first 300 questions
                 prompts={"caption": "caption :", "vqa": "question : {q} answer :"})  # the stand-in's own
DEFAULTS = {"shapes_caption": SYNTHETIC, "shapes_vqa": SYNTHETIC,   # any other dataset: PAPER
            "vqav2": dict(PAPER, warmup_steps=0)}                  # VQAv2: no warm-up (Table 14)


def shapes_records(task: str, split: str, world: int, keep: tuple) -> list:
    """One synthetic world's VQA records of the question families `keep`, or captions of the styles `keep`."""
    recs = data.load_records(f"shapes_{task}", split, image_size=32, split_sizes=WORLD, world_seed=world)
    if task == "vqa":
        return [r for r in recs if r["question_type"] in keep]
    return [dict(r, captions=[r["captions"][s] for s in keep]) for r in recs]


def mix_records(split: str, world: int, limit: Optional[int] = None) -> list:
    """The stand-in's pre-training mix: VQA and captions interleaved (caption pairs for training)."""
    vqa, caps = (shapes_records(task, split, world, PRETRAIN_MIX[task]) for task in ("vqa", "caption"))
    caps = data.caption_pairs(caps) if split == "train" else caps
    return ([r for pair in zip(vqa, caps) for r in pair] + vqa[len(caps):] + caps[len(vqa):])[:limit]


def task_records(dataset: str, split: str, data_root: Optional[str], limit: Optional[int]) -> list:
    """Downstream records, one per image or question (captions: all references); synthetic ones held out."""
    if dataset in HELD_OUT:
        return shapes_records(dataset.removeprefix("shapes_"), split, 0, HELD_OUT[dataset])[:limit]
    return data.load_records(dataset, split, data_root)[:limit]


class Collate:
    """Records -> batch: pixels (the model's size, mean/std); [bos] prompt (+ target + eos) left-padded,
    labels on target + eos; the prompt alone for generation. Target: "caption" (a caption pair) or "answer"
    (VQA). An unreadable image: record dropped in training, pixels 0 in evaluation (batch["unreadable"])."""

    def __init__(self, tok, image_size: int, prompts: dict, mean, std):
        self.tok, self.size, self.prompts = tok, image_size, prompts
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, recs: list, train: bool = True) -> dict:
        pixels = {}
        for i, r in enumerate(recs):
            try:
                img = data.load_image(r, self.size).convert("RGB").resize((self.size, self.size))
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
                pixels[i] = (x - self.mean) / self.std
            except data.UnreadableImage as e:                  # the policy of data.py's feature path
                print(f"warning: unreadable image {e}: " + ("its training record is dropped" if train else
                                                            "evaluated with pixel values 0"), file=sys.stderr)
        if train:
            recs, pixels = [recs[i] for i in pixels], dict(enumerate(pixels.values()))
            if not recs:
                raise data.DataError("every image of a training batch is unreadable")
        zeros = torch.zeros(3, self.size, self.size)
        ids = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]             # noqa: E731
        prompts, targets = [], []
        for r in recs:
            prompts.append([self.tok.bos_token_id] + ids(self.prompts[r["task"]].format(q=r.get("question"))))
            target = r.get("caption" if r["task"] == "caption" else "answer")
            targets.append(ids(target) + [self.tok.eos_token_id] if target else [])
        B, T, Tp = len(recs), max(len(p) + len(t) for p, t in zip(prompts, targets)), max(map(len, prompts))
        pad = self.tok.pad_token_id
        b = {"input_ids": torch.full((B, T), pad), "attention_mask": torch.zeros(B, T).long(),
             "labels": torch.full((B, T), -100), "prompt_ids": torch.full((B, Tp), pad),
             "prompt_mask": torch.zeros(B, Tp).long(), "image_ids": [r["image_id"] for r in recs],
             "pixel_values": torch.stack([pixels.get(i, zeros) for i in range(B)]),
             "unreadable": B - len(pixels)}
        for i, (p, t) in enumerate(zip(prompts, targets)):
            b["input_ids"][i, T - len(p + t):] = torch.tensor(p + t)
            b["attention_mask"][i, T - len(p + t):] = 1
            b["labels"][i, T - len(t):] = torch.tensor(t, dtype=torch.long)
            b["prompt_ids"][i, Tp - len(p):], b["prompt_mask"][i, Tp - len(p):] = torch.tensor(p), 1
        return b


# ---- One setting: the frozen LMM, its records and collate (pt_peft_train.py uses it too) -------------------
@dataclasses.dataclass
class Setup:
    args: Args                   # the resolved settings (prefixes, decoding, limits)
    tokenizer: object
    base: nn.Module              # the frozen pre-trained Blip2ForConditionalGeneration (build() copies it)
    records: dict                # train: caption pairs or questions; eval: one per image; mix: shapes_* only
    collate: Collate
    task: str                    # caption | vqa
    FIELDS = ("dataset", "data_root", "model", "num_prefix", "lm_prefix", "qformer_prefix", "prefix_hidden",
              "num_beams", "max_new_tokens", "train_limit", "eval_limit", "vision_cache_mb")  # the Args read


def setup(a: Args, device) -> Setup:
    """The records, frozen LMM (a BLIP-2 folder or hub id) and collate of a setting (Setup.FIELDS of Args)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration
    a = resolve(a)
    split = "val" if a.dataset == "vqav2" else "test"                    # Karpathy test; VQAv2 val
    recs = {"train": task_records(a.dataset, "train", a.data_root, a.train_limit),
            "eval": task_records(a.dataset, split, a.data_root, a.eval_limit),
            "mix": mix_records("test", 0, a.eval_limit) if a.dataset.startswith("shapes_") else []}
    if not recs["train"] or not recs["eval"]:
        raise UsageError(f"{a.dataset}: no records to train or evaluate (--train_limit, --eval_limit)")
    path = data.model_path(a.model)
    try:
        kind = AutoConfig.from_pretrained(path).model_type
        if kind != "blip-2":
            raise ValueError(f"{kind}; expected BLIP-2")
        tok, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        raise UsageError(f"--model {a.model}: its tokenizer has no pad token")
    base = Blip2ForConditionalGeneration.from_pretrained(path).eval().requires_grad_(False)
    data.pin_threads(base, torch.device(device))
    prompts = DEFAULTS.get(a.dataset, PAPER)["prompts"]
    col = Collate(tok, processor.size["height"], prompts, processor.image_mean, processor.image_std)
    task = recs["eval"][0]["task"]
    recs["train"] = data.caption_pairs(recs["train"]) if task == "caption" else recs["train"]
    return Setup(a, tok, base, recs, col, task)


def build(s: Setup, with_prefix: bool = True, a: Optional[Args] = None) -> PrefixBlip2:
    """A fresh copy of the frozen LMM with the prefixes of `a` (default s.args; or none); only they train."""
    a = a or s.args
    return PrefixBlip2(copy.deepcopy(s.base), a.num_prefix if with_prefix else 0, a.lm_prefix,
                       a.qformer_prefix, a.prefix_hidden, a.vision_cache_mb).eval()


# ---- Training: one loop, prefix parameters only -----------------------------------------------------------
def train(a: Args, model: PrefixBlip2, s: Setup, device, rank: int, world: int, log, resume: bool) -> dict:
    """AdamW (0.9, 0.99), linear warm-up and linear decay over all epochs (App. B.4); --max_steps stops early
    on the same schedule, so --resume continues exactly. Checkpoint: <out_dir>/ckpt.pt."""
    recs = s.records["train"]
    loader = data.make_loader(recs, a.batch_size, shuffle=True, seed=a.seed, collate_fn=s.collate,
                              num_workers=a.num_workers, drop_last=len(recs) >= a.batch_size * world)
    total = len(loader) * a.epochs
    stop = total if a.max_steps is None else min(total, a.max_steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.99),
                            weight_decay=0.05)                                          # Table 14
    sched = lr_schedule(opt, min(a.warmup_steps, total - 1), total, decay="linear")
    path, step, loss = os.path.join(a.out_dir, "ckpt.pt"), 0, torch.tensor(float("nan"))

    def save():
        if rank == 0:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(path, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step,
                                   "scheduler": sched.state_dict(), "train_loss": loss.item(),
                                   "args": dataclasses.asdict(a)})

    if resume:
        state = load_checkpoint(path, model)             # the trained prefixes and the RNG states
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, loss = state["step"], torch.tensor(state["train_loss"])
    last_good = path if os.path.exists(path) else "none"
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net.train()
    bar = tqdm(total=stop, initial=step, desc="prefix-tuning", disable=rank != 0, file=sys.stderr)
    t0 = time.time()
    try:
        while step < stop:
            loader.sampler.set_epoch(step // len(loader))
            for batch in itertools.islice(loader, step % len(loader), None):    # resumed: skip what it saw
                if step >= stop:
                    break
                with whole_step():
                    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                        loss = net(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                                 f"{last_good}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    bar.update(1)
                    if step % 50 == 0 or step == stop:
                        rec = {"step": step, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0]}
                        log(json.dumps(rec), file=sys.stderr)
                    if step % 500 == 0 or step == stop:
                        save()
                        last_good = path
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()  # the bar's line ends before any message
    model.eval()
    return {"steps": step, "train_loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)}


# ---- Evaluation: captions by beam search (App. B.2), VQA greedy; metrics from data.py ---------------------
@torch.no_grad()
def beam_search(model: PrefixBlip2, batch: dict, num_beams: int, max_new_tokens: int, eos_id: int,
                pad_id: int, use_cache: bool = True) -> list:
    """Beam search (num_beams = 1: greedy), the final pick by sum log-prob / length (HF length_penalty 1) ->
    each sample's token ids. use_cache: one forward over [prefix; visual; prompt], then one token per step on
    the KV cache (a kv-mode prefix in it too), beams reordered in it; False re-runs the whole sequence."""
    K, B, lm = num_beams, len(batch["prompt_ids"]), model.lmm.language_model
    dev = model.lmm.query_tokens.device
    bb = {"image_ids": [i for i in batch["image_ids"] for _ in range(K)],
          "pixel_values": batch["pixel_values"].repeat_interleave(K, 0)}
    pids, pm = (batch[k].repeat_interleave(K, 0).to(dev) for k in ("prompt_ids", "prompt_mask"))
    seqs, gm = pids[:, :0], pm[:, :0]                                                  # generated ids, mask
    score = torch.full((B, K), float("-inf"), device=dev)
    score[:, 0] = 0                                                                  # one live beam at first
    done, lens = torch.zeros(B * K, dtype=torch.bool, device=dev), torch.zeros(B * K, device=dev)
    if use_cache:
        x, am, pos, cache = model.lm_inputs(dict(bb, input_ids=pids, attention_mask=pm))
        out, cache = call_lm(lm, x, am, pos, cache, use_cache=True)
        pos = pos[:, -1:]
    for _ in range(max_new_tokens):
        if not use_cache:
            ids, mask = torch.cat([pids, seqs], 1), torch.cat([pm, gm], 1)
            out, _ = call_lm(lm, *model.lm_inputs(dict(bb, input_ids=ids, attention_mask=mask)))
        lp = out.logits[:, -1].float().log_softmax(-1)                                 # (B K, V)
        lp[done] = float("-inf")
        lp[done, pad_id] = 0.0                                                         # finished: score kept
        V = lp.shape[-1]
        score, idx = (score.view(-1, 1) + lp).view(B, K * V).topk(K, -1)               # (B, K)
        beam, tok = (idx // V + torch.arange(B, device=dev)[:, None] * K).view(-1), (idx % V).view(-1)
        seqs, done, lens, gm = torch.cat([seqs[beam], tok[:, None]], 1), done[beam], lens[beam], gm[beam]
        live = (~done).long()[:, None]                                               # pads after eos: masked
        gm, lens, done = torch.cat([gm, live], 1), lens + live[:, 0], done | (tok == eos_id)
        if done.all():
            break
        if use_cache:                                                                  # feed the new token
            cache.reorder_cache(beam)
            am, pos = torch.cat([am[beam], live], 1), pos[beam] + live
            out, cache = call_lm(lm, lm.get_input_embeddings()(tok[:, None]), am, pos, cache, use_cache=True)
    best = (score.view(-1) / lens.clamp(min=1)).view(B, K).argmax(-1) + torch.arange(B, device=dev) * K
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs[best].tolist()]


@torch.no_grad()
def evaluate(model: PrefixBlip2, records: list, s: Setup, batch_size: int = 32) -> dict:
    """caption -> CIDEr, BLEU-4 (beam s.args.num_beams); vqa -> VQA acc (greedy); "score": the task's metric,
    or (VQA acc + BLEU-4) / 2 on the mix of both. Every record is scored (unreadable images: pixels 0)."""
    tok, preds, res, unreadable = s.tokenizer, {}, {}, 0
    model.eval()
    by_task = {t: [r for r in records if r["task"] == t] for t in ("caption", "vqa")}
    for task, recs in by_task.items():
        for i in range(0, len(recs), batch_size):
            chunk, beams = recs[i:i + batch_size], s.args.num_beams if task == "caption" else 1
            batch = s.collate(chunk, train=False)
            unreadable += batch["unreadable"]
            out = beam_search(model, batch, beams, s.args.max_new_tokens, tok.eos_token_id, tok.pad_token_id)
            preds.update({r["id"]: tok.decode(o, skip_special_tokens=True).strip()
                          for r, o in zip(chunk, out)})
    if unreadable:
        print(f"warning: {unreadable} of {len(records)} evaluation records have an unreadable image: kept "
              "with pixel values 0, as the official evaluation counts every one", file=sys.stderr)
    if by_task["caption"]:
        m = data.caption_metrics({r["id"]: preds[r["id"]] for r in by_task["caption"]},
                                 {r["id"]: r["captions"] for r in by_task["caption"]})
        res.update({"CIDEr": round(m["CIDEr"], 2), "BLEU-4": round(m["BLEU-4"], 2)})
    if by_task["vqa"]:
        acc = data.vqa_accuracy([preds[r["id"]] for r in by_task["vqa"]], by_task["vqa"])["overall"]
        res["VQA acc"] = round(acc, 2)
    res["score"] = res.get("CIDEr", res.get("VQA acc"))
    if by_task["caption"] and by_task["vqa"]:
        res["score"] = round((res["VQA acc"] + res["BLEU-4"]) / 2, 2)
    return dict(res, unreadable=unreadable, example=preds[records[0]["id"]] if records else "")


# ---- Config, one run, the results table, main ----
@dataclasses.dataclass
class Args:
    dataset: str = arg("shapes_caption", " | ".join(DATASETS))
    data_root: Optional[str] = arg(None, "root of the real datasets (default: none, offline)")
    model: str = arg("stand_ins/tiny-blip2", "a BLIP-2 folder or hub id (offline: the tiny stand-in)")
    device: str = arg("auto", "auto | cpu | cuda[:index]")
    seed: int = arg(0, "random seed (prefix init, data order)")
    seeds: Optional[str] = arg(None, "e.g. 0,1,2: one run per seed, mean ± std (default: one run, --seed)")
    out_dir: Optional[str] = arg(None, "output folder (default: runs/prefix_tuning/<dataset>...)")
    resume: bool = arg(False, "continue <out_dir>/ckpt.pt with its settings")
    overwrite: bool = arg(False, "replace a run in out_dir")
    eval_only: bool = arg(False, "evaluate <out_dir>/ckpt.pt with its settings, no training")
    compare: bool = arg(False, "Table 8 vs LM input, LM kv, Q-Former alone", eval_only=True)
    epochs: Optional[int] = arg(None, f"epochs (default: {PAPER['epochs']}, Table 14)")
    max_steps: Optional[int] = arg(None, "stop after N steps, same LR schedule (default: no limit)")
    batch_size: Optional[int] = arg(None, f"per process (default: {PAPER['batch_size']}, Table 14; "
                                          f"shapes_*: {SYNTHETIC['batch_size']})")
    lr: Optional[float] = arg(None, f"max LR (default: {PAPER['lr']}, Table 14; shapes_*: {SYNTHETIC['lr']})")
    warmup_steps: Optional[int] = arg(None, f"warm-up steps (default: {PAPER['warmup_steps']}, VQAv2 0, "
                                            f"Table 14; shapes_*: {SYNTHETIC['warmup_steps']})")
    num_workers: int = arg(0, "DataLoader workers")
    num_prefix: Optional[int] = arg(None, "P (default: 8 for captions, 16 for VQA, Table 8)")
    lm_prefix: str = arg("input", "LM prefixes: input (Fig. 5) | kv (Li & Liang) | none")
    qformer_prefix: bool = arg(True, "Q-Former key/value prefixes (Table 8)")
    prefix_hidden: Optional[int] = arg(None, f"prefix MLP width (default: {PAPER['prefix_hidden']}, "
                                             f"Li & Liang; shapes_*: {SYNTHETIC['prefix_hidden']})")
    num_beams: int = arg(5, "beam size for captions (App. B.2); VQA is greedy", eval_only=True)
    max_new_tokens: int = arg(30, "generation length limit", eval_only=True)
    train_limit: Optional[int] = arg(None, "the first N training images / questions (default: all)")
    eval_limit: Optional[int] = arg(None, "the first N evaluation images / questions (default: all; "
                                          f"shapes_*: {SYNTHETIC['eval_limit']})", eval_only=True)
    vision_cache_mb: float = arg(1024.0, "bound of the frozen-ViT output cache (MB)", eval_only=True)

    def __post_init__(self):
        minimum = dict(num_prefix=1, epochs=1, batch_size=1, num_beams=1, max_new_tokens=1, prefix_hidden=1,
                       max_steps=0, warmup_steps=0, vision_cache_mb=0, num_workers=0, train_limit=1,
                       eval_limit=1)
        rules = {k: (f">= {n}", lambda v, n=n: v >= n) for k, n in minimum.items()}
        rules["lm_prefix"] = ("input, kv or none", lambda v: v in ("input", "kv", "none"))
        rules["dataset"] = (", ".join(DATASETS), lambda v: v in DATASETS)
        data.check_values(self, rules)
        if self.lm_prefix == "none" and not self.qformer_prefix and not self.compare:
            raise UsageError("no prefix to train: --lm_prefix none and --no_qformer_prefix")


VARIANTS = {"qformer_lm": ("Q-Former + LM input (Table 8)", "input", True),
            "lm_input": ("LM input only", "input", False), "lm_kv": ("LM kv only (Li & Liang)", "kv", False),
            "qformer": ("Q-Former only", "none", True)}


def resolve(a: Args) -> Args:
    """None -> the dataset's default (PAPER, or SYNTHETIC for shapes_*); P by task (Table 8)."""
    table = DEFAULTS.get(a.dataset, PAPER)
    unset = {k: table[k] for k, v in dataclasses.asdict(a).items() if v is None and k in table}
    name = a.dataset + "-compare" * a.compare + (f"-seeds{a.seeds.replace(',', '_')}" if a.seeds else "")
    return dataclasses.replace(a, **unset, out_dir=a.out_dir or os.path.join("runs", "prefix_tuning", name),
                               num_prefix=a.num_prefix or (16 if "vqa" in a.dataset else 8))


def runs_of(a: Args) -> list:
    """[(row name, Args of one run)]: every prefix placement (--compare) or one, for every seed."""
    variants = VARIANTS if a.compare else {"": ("prefix-tuned", a.lm_prefix, a.qformer_prefix)}
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    return [(name, dataclasses.replace(a, seed=seed, lm_prefix=lm_prefix, qformer_prefix=qformer_prefix,
                                       out_dir=os.path.join(a.out_dir, key, f"seed{seed}" * bool(a.seeds))))
            for key, (name, lm_prefix, qformer_prefix) in variants.items() for seed in seeds]


def run_one(a: Args, s: Setup, device, rank: int, world: int, log) -> dict:
    """Prefix-tune one model (--eval_only: load it) and evaluate its exported prefixes. --resume and
    --eval_only take the run's settings (its own prefix placement too) from its checkpoint."""
    path = os.path.join(a.out_dir, "ckpt.pt")
    resume = a.eval_only or a.resume and os.path.exists(path)
    a = from_checkpoint(a, load_checkpoint(path)) if resume else a
    os.makedirs(a.out_dir, exist_ok=True)
    transformers.set_seed(a.seed)
    model = build(s, a=a).to(device)
    data.count_trainable(model, sum(e.num_params() for e in model.prefix_encoders.values()), log)
    if a.eval_only:
        state = load_checkpoint(path, model)
        res = {"steps": state["step"], "train_loss": round(state["train_loss"], 4)}
    else:
        res = train(a, model, s, device, rank, world, log, resume)
    if rank == 0:
        model.prefix_state = model.export_prefix()                    # App. B.1: plain tensors at inference
        torch.save(model.prefix_state, os.path.join(a.out_dir, "prefix.pt"))
        res["downstream"] = evaluate(model, s.records["eval"], s)
        res["mix"] = evaluate(model, s.records["mix"], s) if s.records["mix"] else {}
        Path(a.out_dir, "results.json").write_text(json.dumps(res, indent=2))
    return res


def print_table(a: Args, s: Setup, rows: dict) -> None:
    """One row per model; with --seeds every cell is `mean ± std`."""
    def cell(v):
        return "-" if None in v else data.mean_std(v) if a.seeds and len(v) > 1 else f"{v[0]:.2f}"
    decoding = f"captions by beam {a.num_beams}" if s.task == "caption" else "greedy answers"
    print(f"\nprefix-tuning a frozen {Path(a.model).name} on {a.dataset}: P = {a.num_prefix}, {decoding},",
          f"seeds {a.seeds}" if a.seeds else f"seed {a.seed}")
    row = "| {:<29} | {:>14} | {:>14} | {:>14} | {:>6} |"
    print(row.format("model", "CIDEr" if s.task == "caption" else "VQA acc", "mix", "train CE", "time"))
    print(f"|{'-' * 31}|{'-' * 16}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
    for name, rs in rows.items():
        t = [r["seconds"] for r in rs if "seconds" in r]
        columns = zip(*[(r["downstream"]["score"], r["mix"].get("score"), r.get("train_loss")) for r in rs])
        print(row.format(name, *map(cell, columns), f"{sum(t) / len(t):.1f}s" if t else "-"))


def run(cli: Args) -> dict:
    device, rank, world = setup_device(cli.device)
    a = resolve(cli)
    log = print if rank == 0 else (lambda *_, **__: None)
    prepare_out_dir(a, rank)
    first = os.path.join(runs_of(a)[0][1].out_dir, "ckpt.pt")                 # the settings of the run
    if a.eval_only or a.resume and os.path.exists(first):                    # flags as given, then resolved
        a = resolve(from_checkpoint(dataclasses.replace(cli, out_dir=a.out_dir), load_checkpoint(first)))
    s = setup(a, device)
    prepare_out_dir(a, rank, inputs_loaded=True)
    rows = {"pre-trained, no prefix": []}
    if rank == 0:
        base = build(s, with_prefix=False).to(device)
        mix = evaluate(base, s.records["mix"], s) if s.records["mix"] else {}
        rows["pre-trained, no prefix"] = [{"downstream": evaluate(base, s.records["eval"], s), "mix": mix}]
    for name, one in runs_of(a):
        rows.setdefault(name, []).append(run_one(one, s, device, rank, world, log))
    if rank == 0:
        print_table(a, s, rows)
        Path(a.out_dir, "results.json").write_text(json.dumps({"args": dataclasses.asdict(a), "rows": rows},
                                                              indent=2))
    if world > 1:
        dist.barrier()
    return rows


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
