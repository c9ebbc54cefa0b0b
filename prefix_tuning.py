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

Offline (--model tiny, the default): a tiny BLIP-2 pre-trained once (cached) on four caption styles and four
VQA question families of another synthetic world. Held out of that mix: shapes_caption (a fifth caption
style), shapes_vqa (position and relation questions). "mix" = the pre-training tasks on the benchmark world.

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
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data


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


PREFIX_PARAMS = "prefix_encoders."   # the name of every trainable parameter of PrefixBlip2 starts with it


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
        dtype = vit.embeddings.patch_embedding.weight.dtype
        pixels = batch["pixel_values"].to(lmm.query_tokens.device, dtype)
        img = self.vision_cache(vit, pixels, batch["image_ids"])                       # (B, N, d_vit)
        for layer, attn in enumerate(self.qformer_attn):
            attn.prefix = None if qformer_prefix is None else qformer_prefix[layer]   # (2, P, d_q)
        try:
            q = lmm.qformer(query_embeds=lmm.query_tokens.expand(len(img), -1, -1), encoder_hidden_states=img)
        finally:
            for attn in self.qformer_attn:
                attn.prefix = None
        return lmm.language_projection(q.last_hidden_state)                            # (B, Q, d)

    def lm_inputs(self, batch: dict, ids: torch.Tensor, mask: torch.Tensor):
        """Fig. 5: [prefix (input mode); visual tokens; text] -> (embeddings, attention mask, positions, KV
        cache holding a kv-mode prefix or None). Text is left-padded; positions skip the pads."""
        P = self.prefix_state
        if not isinstance(P, dict):
            P = {} if P == "off" else {k: enc() for k, enc in self.prefix_encoders.items()}
        vis = self.visual_tokens(batch, P.get("qformer"))                              # (B, Q, d)
        B, ids, mask = len(vis), ids.to(vis.device), mask.to(vis.device)
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
        out, _ = call_lm(self.lmm.language_model, *self.lm_inputs(batch, batch["input_ids"],
                                                                  batch["attention_mask"]))
        logits = out.logits[:, -T - 1:-1].float()             # position t predicts text token t
        labels = batch["labels"].to(logits.device)            # -100 except target + eos
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def features(self, batch: dict) -> dict:
        """LM last-layer states at the visual-token and text positions, prefixes in context (as forward)."""
        x, am, pos, cache = self.lm_inputs(batch, batch["input_ids"], batch["attention_mask"])
        h = call_lm(self.lmm.language_model, x, am, pos, cache, hidden=True)[0].hidden_states[-1]
        T, Q = batch["input_ids"].shape[1], self.lmm.config.num_query_tokens
        mask = batch["attention_mask"].to(h.device)
        return {"image": h[:, -T - Q:-T], "text": h[:, -T:], "text_mask": mask}


class VisionCache:
    """Outputs of the frozen ViT per image id, at most max_mb MB, least recently used dropped first: memory
    does not grow with the dataset. Valid only while the ViT is frozen: a forward with a trainable ViT
    parameter bypasses and empties it (call clear() after changing ViT weights any other way)."""

    def __init__(self, max_mb: float):
        self.max_bytes, self.bytes, self.items = int(max_mb * 2 ** 20), 0, OrderedDict()

    def clear(self):
        self.bytes = 0
        self.items.clear()

    def __call__(self, vit: nn.Module, pixels: torch.Tensor, ids: list) -> torch.Tensor:
        if any(p.requires_grad for p in vit.parameters()):
            self.clear()
            return vit(pixel_values=pixels).last_hidden_state
        miss = [i for i, k in enumerate(ids) if k not in self.items]
        with torch.no_grad():
            computed = vit(pixel_values=pixels[miss]).last_hidden_state if miss else []
        new = dict(zip([ids[i] for i in miss], computed))
        out = torch.stack([new[k] if k in new else self.items[k] for k in ids])        # (B, N, d_vit)
        for k, v in new.items():
            self.items[k] = v.clone()                      # a copy: a view would keep the whole batch alive
            self.bytes += v.nbytes
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
    from transformers import DynamicCache
    kv = prefix.view(*prefix.shape[:3], heads, -1).transpose(2, 3)                     # (L, 2, H, P, d_h)
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v in kv])


def call_lm(lm: nn.Module, x, am, pos, cache=None, use_cache: bool = False, hidden: bool = False):
    """The LM on embeddings -> (output, KV cache). The cache argument (and output field) is `cache` from
    transformers 5.24 on, `past_key_values` before."""
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(inputs_embeds=x, attention_mask=am, position_ids=pos, use_cache=use_cache or cache is not None,
             output_hidden_states=hidden, return_dict=True, **{name: cache})
    return out, getattr(out, name)


# ---- The offline stand-in: a tiny BLIP-2 pre-trained once on another synthetic world (cached) -------------
PT_FAMILIES, DOWN_FAMILIES = ("color", "shape", "count", "exist"), ("position", "relation")
PT_STYLES, DOWN_STYLE = (0, 1, 2, 3), 4                  # caption templates of data.ShapesWorld.captions
WORLD = {"train": 1200, "val": 200, "test": 300}         # images per split of a synthetic world
TINY_PRETRAIN = dict(batch_size=32, lr=2e-3, warmup=50)       # steps: Args.pretrain_steps


def tiny_blip2(vocab: int, init: str = "scaled"):
    """ViT 2x48 (32 px images, 8 px patches), Q-Former 2x48 with 8 queries, OPT 2x64. init "hf": transformers'
    BLIP-2 initialisation, made to be overwritten by a checkpoint (ViT std 1e-10, query tokens 0, std 0.02
    elsewhere); "scaled": weights N(0, 1/d), query tokens N(0, 1).
    DEVIATION (tiny only): "scaled" by default. From "hf" the queries are all equal (the model barely
    sees the image) and the width-64 OPT ends pre-training attending almost uniformly: input prefixes do
    not train."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    vit_std, qformer_std, lm_std = (1e-10, 0.02, 0.02) if init == "hf" else (48 ** -.5, 48 ** -.5, 64 ** -.5)
    layers = dict(num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=48, intermediate_size=96, image_size=32, patch_size=8,
                  initializer_range=vit_std)
    qformer = dict(hidden_size=48, intermediate_size=96, encoder_hidden_size=48, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, vocab_size=vocab, initializer_range=qformer_std)
    text = dict(model_type="opt", vocab_size=vocab, hidden_size=64, ffn_dim=128, max_position_embeddings=128,
                word_embed_proj_dim=64, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                init_std=lm_std)
    cfg = Blip2Config(vision_config=vision | layers, qformer_config=qformer | layers,
                      text_config=text | layers, num_query_tokens=8, initializer_range=qformer_std)
    model = Blip2ForConditionalGeneration(cfg).float()
    if init == "scaled":
        nn.init.normal_(model.query_tokens)              # distinct queries (a LayerNorm follows: any scale)
    return model


def pretrain_tiny(tok, steps: int, init: str, cache_dir: str, device, log=print):
    """ALL weights of the tiny BLIP-2 trained on the mix of tasks of another world (data.PRETRAIN_WORLD);
    cached, keyed by the recipe."""
    torch.manual_seed(0)
    model, r = tiny_blip2(len(tok), init), dict(TINY_PRETRAIN, steps=steps)
    recipe = json.dumps([r, model.config.to_dict(), tok.get_vocab(), data.DATA_VERSION], sort_keys=True,
                        default=str)
    key = hashlib.sha1(recipe.encode()).hexdigest()[:12]
    path = data.stand_in(os.path.join(cache_dir, "prefix_tuning", f"tiny_blip2_{key}.pt"))
    ddp = dist.is_available() and dist.is_initialized()
    if not os.path.exists(path) and (not ddp or dist.get_rank() == 0):
        recs = mix_records("train", data.PRETRAIN_WORLD)
        col, g = Collate(tok, 32, PROMPTS["tiny"]), torch.Generator().manual_seed(0)
        net = PrefixBlip2(model.to(device).train(), 0, "none", False, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.99), weight_decay=0.01)
        sched = lr_schedule(opt, r["warmup"], r["steps"], decay="linear")
        for _ in tqdm(range(r["steps"]), desc="pre-training the tiny BLIP-2", leave=False, file=sys.stderr):
            idx = torch.randint(len(recs), (r["batch_size"],), generator=g).tolist()
            loss = net(col([recs[i] for i in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {k: v.cpu() for k, v in model.state_dict().items()})
        log(f"pre-trained the tiny BLIP-2: {r['steps']} steps, last loss {loss.item():.3f}, cached in {path}")
    if ddp:
        dist.barrier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.cpu()


# ---- Data -> batches --------------------------------------------------------------------------------------
PROMPTS = {"tiny": {"caption": "caption :", "vqa": "question : {q} answer :"},
           "hf": {"caption": "a photo of", "vqa": "Question: {q} Short answer:"}}    # BLIP-2's prompts


def shapes_records(task: str, split: str, world: int, keep: tuple) -> list:
    """One synthetic world's VQA records of the question families `keep`, or captions of the styles `keep`."""
    recs = data.load_records(f"shapes_{task}", split, image_size=32, split_sizes=WORLD, world_seed=world)
    if task == "vqa":
        return [r for r in recs if r["question_type"] in keep]
    return [dict(r, captions=[r["captions"][s] for s in keep]) for r in recs]


def mix_records(split: str, world: int, limit: Optional[int] = None) -> list:
    """The tiny pre-training mix: VQA and captions interleaved (caption pairs for training)."""
    vqa = shapes_records("vqa", split, world, PT_FAMILIES)
    caps = shapes_records("caption", split, world, PT_STYLES)
    caps = data.caption_pairs(caps) if split == "train" else caps
    return ([r for pair in zip(vqa, caps) for r in pair] + vqa[len(caps):] + caps[len(vqa):])[:limit]


def task_records(dataset: str, split: str, data_root: Optional[str], limit: Optional[int]) -> list:
    """Downstream records, one per image or question (captions: all references); synthetic ones held out."""
    if dataset == "shapes_caption":
        return shapes_records("caption", split, 0, (DOWN_STYLE,))[:limit]
    if dataset == "shapes_vqa":
        return shapes_records("vqa", split, 0, DOWN_FAMILIES)[:limit]
    if dataset not in ("coco", "flickr30k", "vqav2"):
        raise UsageError(f"unknown --dataset {dataset!r}; choose from shapes_caption, shapes_vqa, coco, "
                         "flickr30k, vqav2")
    return data.load_records(dataset, split, data_root)[:limit]


class Collate:
    """Records -> batch: pixels; [bos] prompt (+ target + eos) left-padded, labels on target + eos;
    the prompt alone for generation. Target: "caption" (a caption pair) or "answer" (VQA), if present.
    Keeps no per-image state, so its memory does not depend on the dataset."""

    def __init__(self, tok, image_size: int, prompts: dict, mean=(0.5,) * 3, std=(0.5,) * 3):
        self.tok, self.size, self.prompts = tok, image_size, prompts
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def pixels(self, rec: dict) -> torch.Tensor:
        try:
            img = data.load_image(rec, self.size).convert("RGB").resize((self.size, self.size))
        except data.UnreadableImage as e:
            raise data.DataError(f"unreadable image {e}") from None
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)    # (3, H, W)
        return (x - self.mean) / self.std

    def __call__(self, recs: list) -> dict:
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
             "pixel_values": torch.stack([self.pixels(r) for r in recs])}
        for i, (p, t) in enumerate(zip(prompts, targets)):
            b["input_ids"][i, T - len(p + t):] = torch.tensor(p + t)
            b["attention_mask"][i, T - len(p + t):] = 1
            b["labels"][i, T - len(t):] = torch.tensor(t, dtype=torch.long)
            b["prompt_ids"][i, Tp - len(p):], b["prompt_mask"][i, Tp - len(p):] = torch.tensor(p), 1
        return b


# ---- One setting: the frozen LMM, its records and collate (pt_peft_train.py uses it too) -------------------
@dataclass
class Setup:
    args: Args                   # the resolved settings (prefixes, decoding, limits, caches)
    tokenizer: object
    base: nn.Module              # the frozen pre-trained Blip2ForConditionalGeneration (build() copies it)
    records: dict                # train: caption pairs or questions; eval: one per image; mix: tiny only
    collate: Collate
    task: str                    # caption | vqa


SETUP_FIELDS = ("dataset", "data_root", "model", "num_prefix", "lm_prefix", "qformer_prefix", "prefix_hidden",
                "num_beams", "max_new_tokens", "train_limit", "eval_limit", "cache_dir", "vision_cache_mb",
                "pretrain_steps", "tiny_init")


def setup(a, device) -> Setup:
    """`a`: this file's Args or pt_peft_train's; SETUP_FIELDS are read by name (Args defaults if absent)."""
    a = resolve(Args(**{k: getattr(a, k) for k in SETUP_FIELDS if hasattr(a, k)}))
    split = "val" if a.dataset == "vqav2" else "test"                    # Karpathy test; VQAv2 val
    recs = {"train": task_records(a.dataset, "train", a.data_root, a.train_limit),
            "eval": task_records(a.dataset, split, a.data_root, a.eval_limit), "mix": []}
    if not recs["train"] or not recs["eval"]:
        raise UsageError(f"{a.dataset}: no records to train or evaluate (--train_limit, --eval_limit)")
    if a.model == "tiny":
        tok = data.build_tokenizer(data.synthetic_vocab() + ["question", "answer", "caption", ":"])
        base = pretrain_tiny(tok, a.pretrain_steps, a.tiny_init, a.cache_dir or data.cache_dir(), device)
        col = Collate(tok, 32, PROMPTS["tiny"])
        recs["mix"] = mix_records("test", 0, a.eval_limit)
    elif os.path.isdir(a.model):
        from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration
        try:
            kind, tok = AutoConfig.from_pretrained(a.model).model_type, AutoTokenizer.from_pretrained(a.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from None
        if kind != "blip-2" or tok.pad_token_id is None:
            raise UsageError(f"--model {a.model}: {kind}; expected BLIP-2 with its tokenizer (pad token)")
        base = Blip2ForConditionalGeneration.from_pretrained(a.model)
        col = Collate(tok, base.config.vision_config.image_size, PROMPTS["hf"], data.CLIP_MEAN, data.CLIP_STD)
    else:
        raise UsageError(f"--model {a.model!r}: neither 'tiny' nor a local Blip2 checkpoint folder")
    task = recs["eval"][0]["task"]
    recs["train"] = data.caption_pairs(recs["train"]) if task == "caption" else recs["train"]
    return Setup(a, tok, base.eval().requires_grad_(False), recs, col, task)


def build(s: Setup, with_prefix: bool = True) -> PrefixBlip2:
    """A fresh copy of the frozen LMM with the prefixes of s.args (or none); only the prefixes train."""
    a = s.args
    model = PrefixBlip2(copy.deepcopy(s.base), a.num_prefix if with_prefix else 0, a.lm_prefix,
                        a.qformer_prefix, a.prefix_hidden, a.vision_cache_mb)
    assert all(n.startswith(PREFIX_PARAMS) for n, p in model.named_parameters() if p.requires_grad)
    return model.eval()


# ---- Training: one loop, prefix parameters only -----------------------------------------------------------
def train(a: Args, model: PrefixBlip2, s: Setup, device, rank: int, world: int, log) -> dict:
    """AdamW (0.9, 0.99), linear warm-up and linear decay over all epochs (App. B.4); --max_steps stops early
    on the same schedule, so --resume continues exactly. Checkpoint: <out_dir>/ckpt.pt."""
    recs = s.records["train"]
    loader = data.make_loader(recs, a.batch_size, shuffle=True, seed=a.seed, collate_fn=s.collate,
                              num_workers=a.num_workers, drop_last=len(recs) >= a.batch_size * world)
    if len(loader) == 0:
        raise UsageError(f"no training batches ({len(recs)} records, --batch_size {a.batch_size})")
    total = len(loader) * a.epochs
    stop = total if a.max_steps is None else min(total, a.max_steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.99),
                            weight_decay=0.05)                                          # Table 14
    sched = lr_schedule(opt, min(a.warmup_steps, total - 1), total, warmup="linear", decay="linear")
    path, step, loss = os.path.join(a.out_dir, "ckpt.pt"), 0, torch.tensor(float("nan"))
    setting = setting_of(a, *EVAL_FLAGS)

    def save():
        if rank == 0:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(path, {"trainable": trainable, "optimizer": opt.state_dict(), "step": step,
                                   "scheduler": sched.state_dict(), "rng": rng_state(),
                                   "train_loss": loss.item(), "setting": setting})

    if a.resume and os.path.exists(path):
        ck = load_checkpoint(path, model, setting)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        step, loss = ck["step"], torch.tensor(ck["train_loss"])
    last_good = path if os.path.exists(path) else "none"
    net = DDP(model) if world > 1 else model
    net.train()
    bar = tqdm(total=stop, initial=step, desc="prefix-tuning", disable=rank != 0, file=sys.stderr)
    t0 = time.time()
    try:
        while step < stop:
            epoch, skip = divmod(step, len(loader))
            data.set_epoch(loader, epoch)
            for batch in itertools.islice(loader, skip, None):       # a resumed epoch skips what it has seen
                if step >= stop:
                    break
                with whole_step():
                    with autocast(device):
                        loss = net(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"non-finite loss at step {step + 1}; last good checkpoint: "
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
    """Beam search (num_beams = 1: greedy), the final pick by sum log-prob / length (HF length_penalty 1).
    use_cache: one forward over [prefix; visual; prompt], then one token per step on the KV cache, beams
    reordered in it (a kv-mode prefix sits in the same cache); use_cache=False re-runs the whole sequence
    every step (the tests' reference). Returns the generated token ids of each sample."""
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
        x, am, pos, cache = model.lm_inputs(bb, pids, pm)
        out, cache = call_lm(lm, x, am, pos, cache, use_cache=True)
        pos = pos[:, -1:]
    for _ in range(max_new_tokens):
        if not use_cache:
            out, _ = call_lm(lm, *model.lm_inputs(bb, torch.cat([pids, seqs], 1), torch.cat([pm, gm], 1)))
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
    or (VQA acc + BLEU-4) / 2 on the mix of both."""
    tok, preds, res = s.tokenizer, {}, {}
    model.eval()
    by_task = {t: [r for r in records if r["task"] == t] for t in ("caption", "vqa")}
    for task, recs in by_task.items():
        for i in range(0, len(recs), batch_size):
            chunk, beams = recs[i:i + batch_size], s.args.num_beams if task == "caption" else 1
            out = beam_search(model, s.collate(chunk), beams, s.args.max_new_tokens, tok.eos_token_id,
                              tok.pad_token_id)
            preds.update({r["id"]: tok.decode(o, skip_special_tokens=True).strip()
                          for r, o in zip(chunk, out)})
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
    return dict(res, example=preds[records[0]["id"]] if records else "")


# ---- Config, one run, the results table, main -------------------------------------------------------------
@dataclass
class Args:
    dataset: str = field(default="shapes_caption", metadata={"help": "shapes_caption | shapes_vqa | coco | "
                                                                     "flickr30k | vqav2"})
    data_root: Optional[str] = field(default=None, metadata={"help": "root of the real datasets"})
    model: str = field(default="tiny", metadata={"help": "tiny (offline stand-in) or a local Blip2 folder"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "random seed (prefix init, data order)"})
    seeds: Optional[str] = field(default=None, metadata={"help": "e.g. 0,1,2: one run per seed, mean ± std"})
    out_dir: Optional[str] = field(default=None, metadata={"help": "default runs/prefix_tuning/<dataset>..."})
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/ckpt.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in out_dir"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate out_dir's checkpoint, no training"})
    compare: bool = field(default=False, metadata={"help": "Table 8 vs LM input, LM kv, Q-Former alone"})
    epochs: Optional[int] = field(default=None, metadata={"help": "epochs (Table 14: 5)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after N steps (same LR schedule)"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "per process (Table 14: 128)"})
    lr: Optional[float] = field(default=None, metadata={"help": "peak learning rate (Table 14: 5e-5)"})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "warm-up (Table 14: 5000; VQA 0)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    num_prefix: Optional[int] = field(default=None, metadata={"help": "Table 8: 8 captions, 16 VQA"})
    lm_prefix: str = field(default="input", metadata={"help": "input (Fig. 5) | kv (Li & Liang) | none"})
    qformer_prefix: bool = field(default=True, metadata={"help": "Q-Former kv prefixes (Table 8)"})
    prefix_hidden: Optional[int] = field(default=None, metadata={"help": "MLP width (Li & Liang: 512)"})
    num_beams: int = field(default=5, metadata={"help": "beam size for captions (App. B.2); VQA is greedy"})
    max_new_tokens: int = field(default=30, metadata={"help": "generation length limit"})
    train_limit: Optional[int] = field(default=None, metadata={"help": "first N training images/questions"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "first N evaluation images/questions"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "caches (default: data.cache_dir())"})
    pretrain_steps: int = field(default=2000, metadata={"help": "--model tiny: pre-training steps (cached)"})
    tiny_init: str = field(default="scaled", metadata={"help": "tiny: scaled N(0, 1/d) | hf"})
    vision_cache_mb: float = field(default=1024.0, metadata={"help": "frozen-ViT output cache bound (MB)"})


PAPER = dict(epochs=5, batch_size=128, lr=5e-5, warmup_steps=5000, prefix_hidden=512)    # BLIP-2, Table 14
TINY = dict(epochs=5, batch_size=16,         # 375 steps on 1200 images: a minute on one CPU core
            lr=1e-2,                         # DEVIATION: 5e-5 barely moves a 128-wide encoder in 375 steps
            warmup_steps=30, prefix_hidden=128, eval_limit=300)
VARIANTS = {"qformer_lm": ("Q-Former + LM input (Table 8)", "input", True),
            "lm_input": ("LM input only", "input", False), "lm_kv": ("LM kv only (Li & Liang)", "kv", False),
            "qformer": ("Q-Former only", "none", True)}


EVAL_FLAGS = ("compare", "eval_limit", "num_beams", "max_new_tokens", "vision_cache_mb")  # no trained weight


def resolve(a: Args) -> Args:
    """None -> the paper's value (TINY's for --model tiny); P by task (Table 8); flags checked."""
    vqa = a.dataset in ("shapes_vqa", "vqav2")
    table = TINY if a.model == "tiny" else dict(PAPER, warmup_steps=0 if vqa else 5000)
    a = dataclasses.replace(a, **{k: v for k, v in table.items() if getattr(a, k) is None})
    if a.tiny_init not in ("scaled", "hf"):
        raise UsageError(f"unknown --tiny_init {a.tiny_init!r}; choose from scaled, hf")
    if a.lm_prefix not in ("input", "kv", "none"):
        raise UsageError(f"unknown --lm_prefix {a.lm_prefix!r}; choose from input, kv, none")
    if a.lm_prefix == "none" and not a.qformer_prefix and not a.compare:
        raise UsageError("no prefix to train: --lm_prefix none and --no-qformer_prefix")
    least = dict(num_prefix=1, epochs=1, batch_size=1, num_beams=1, max_new_tokens=1, prefix_hidden=1,
                 pretrain_steps=1, max_steps=0, warmup_steps=0, vision_cache_mb=0)
    for k, v in ((k, getattr(a, k)) for k in least):
        if v is not None and not v >= least[k]:
            raise UsageError(f"--{k} {v}: must be >= {least[k]}")
    name = a.dataset + "-compare" * a.compare + "-hf_init" * (a.tiny_init == "hf") + (
        f"-seeds{a.seeds.replace(',', '_')}" if a.seeds else "")
    return dataclasses.replace(a, num_prefix=a.num_prefix or (16 if vqa else 8),
                               out_dir=a.out_dir or os.path.join("runs", "prefix_tuning", name))


def run_one(a: Args, s: Setup, device, rank: int, world: int, log) -> dict:
    """Prefix-tune one model (--eval_only: load it) and evaluate its exported prefixes."""
    seed_everything(a.seed)
    model = build(s).to(device)
    count_trainable(model, sum(e.num_params() for e in model.prefix_encoders.values()), log)
    if a.eval_only:
        ck = load_checkpoint(os.path.join(a.out_dir, "ckpt.pt"), model, setting_of(a, *EVAL_FLAGS))
        res = {"steps": ck["step"], "train_loss": round(ck["train_loss"], 4)}
    else:
        res = train(a, model, s, device, rank, world, log)
    if rank == 0:
        model.prefix_state = model.export_prefix()                    # App. B.1: plain tensors at inference
        torch.save(model.prefix_state, os.path.join(a.out_dir, "prefix.pt"))
        res["downstream"] = evaluate(model, s.records["eval"], s)
        res["mix"] = evaluate(model, s.records["mix"], s) if s.records["mix"] else {}
        write_json(os.path.join(a.out_dir, "results.json"), res)
    return res


def print_table(a: Args, s: Setup, rows: dict) -> None:
    """One row per model; with --seeds every cell is `mean ± std`."""
    def cell(v):
        return "-" if None in v else mean_std(v) if a.seeds and len(v) > 1 else f"{v[0]:.2f}"
    model = "BLIP-2" if a.model != "tiny" else "tiny BLIP-2" + (" (HF init)" if a.tiny_init == "hf" else "")
    decoding = f"captions by beam {a.num_beams}" if s.task == "caption" else "greedy answers"
    seeds = f"seeds {a.seeds}" if a.seeds else f"seed {a.seed}"
    print(f"\nprefix-tuning a frozen {model} on {a.dataset}: P = {a.num_prefix}, {decoding}, {seeds}")
    row = "| {:<29} | {:>14} | {:>14} | {:>14} | {:>6} |"
    print(row.format("model", "CIDEr" if s.task == "caption" else "VQA acc", "mix", "train CE", "time"))
    print(f"|{'-' * 31}|{'-' * 16}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
    for name, rs in rows.items():
        t = [r["seconds"] for r in rs if "seconds" in r]
        cells = [cell([r["downstream"]["score"] for r in rs]), cell([r["mix"].get("score") for r in rs]),
                 cell([r.get("train_loss") for r in rs]), f"{sum(t) / len(t):.1f}s" if t else "-"]
        print(row.format(name, *cells))


def run(a: Args) -> dict:
    device, rank, world = setup_device(a.device, tiny=a.model == "tiny")
    a = resolve(a)
    log = print if rank == 0 else (lambda *_, **__: None)
    prepare_out_dir(a.out_dir, a.resume or a.eval_only, a.overwrite, rank)
    s = setup(a, device)
    clear_outputs(a, rank)  # --overwrite: only now that the inputs have loaded
    rows = {"pre-trained, no prefix": []}
    if rank == 0:
        base = build(s, with_prefix=False).to(device)
        mix = evaluate(base, s.records["mix"], s) if s.records["mix"] else {}
        rows["pre-trained, no prefix"].append({"downstream": evaluate(base, s.records["eval"], s),
                                                "mix": mix})
    variants = VARIANTS if a.compare else {"": ("prefix-tuned", a.lm_prefix, a.qformer_prefix)}
    for key, (name, lm_prefix, qformer_prefix) in variants.items():
        s.args.lm_prefix, s.args.qformer_prefix, rows[name] = lm_prefix, qformer_prefix, []
        for seed in [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]:
            sub = os.path.join(a.out_dir, key, f"seed{seed}" if a.seeds else "")
            os.makedirs(sub, exist_ok=True)
            one = dataclasses.replace(a, seed=seed, out_dir=sub, lm_prefix=lm_prefix,  # the variant's flags
                                      qformer_prefix=qformer_prefix)
            rows[name].append(run_one(one, s, device, rank, world, log))
    if rank == 0:
        print_table(a, s, rows)
        write_json(os.path.join(a.out_dir, "results.json"), {"args": dataclasses.asdict(a), "rows": rows})
    if world > 1:
        dist.barrier()
    return rows


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
