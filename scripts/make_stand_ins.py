"""Make the offline stand-ins in stand_ins/: tiny pre-trained backbones saved as Hugging Face checkpoint
folders (save_pretrained), which the method files load with --model exactly as they load a hub id.

Every recipe lives here (configuration, pre-training texts of data.PRETRAIN_WORLD, objective, steps, seed);
the method files and data.py only load the folders. Pre-training is seeded and single-threaded, so the same
kind of CPU makes the same weights; another CPU (other kernels) makes slightly other ones, which is why the
folders ship with the repository.

  python scripts/make_stand_ins.py --list                       # the stand-ins and their folders
  python scripts/make_stand_ins.py --check --only tiny-llama    # re-make into a temporary folder, compare
  python scripts/make_stand_ins.py --only tiny-llama --overwrite
  python scripts/make_stand_ins.py --only tiny-llama --out /tmp/si --steps 20   # a quick re-make
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402

RECIPES: dict[str, Callable[[Path, Optional[int]], None]] = {}  # name -> make(folder, steps or None)


def recipe(name: str):
    """Register make(folder, steps): pre-train the stand-in `name` (steps: None = the recipe's) and save it."""
    def register(make):
        RECIPES[name] = make
        return make
    return register


# ------------------------------------------------------------------------------ the frozen tiny CNN (data.py)


# ------------------------------------------------------------------------------------- memvp.py's tiny LMs


# ------------------------------------------------------------------------ routing_bottleneck.py's tiny LMs
def tiny_gpt2_or_roberta(name: str, tok, hidden: int = 64, layers: int = 2, mlm: bool = False):
    """Tiny GPT-2 or RoBERTa: width `hidden`, 16-dim heads, dropout 0, init std d^-0.5; RoBERTa: a last row
    for <mask>, and RobertaForMaskedLM for pre-training (`mlm`) or RobertaModel (with its pooler)."""
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


def routing_pretrain_texts(task: str, tok, rng) -> list[tuple[list[int], int]]:
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


def pretrain_routing_lm(name: str, steps: int, tok):
    """DEVIATION (offline): stand-in for pre-trained GPT-2 / RoBERTa, trained on the text of another world
    (data.PRETRAIN_WORLD) with the scene described in context -- causal LM, or masked LM with the answer
    always masked -- so that it has learned to read a context. AdamW 1e-3, batch 64, 5% warm-up, cosine."""
    import numpy as np
    import transformers
    from tqdm import tqdm
    from routing_bottleneck import lr_schedule, pad
    mlm = name == "tiny-roberta"
    transformers.set_seed(0)
    lm = tiny_gpt2_or_roberta(name, tok, mlm=mlm)
    texts = routing_pretrain_texts("vqa" if mlm else "caption", tok, np.random.default_rng(0))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.01)
    sched = lr_schedule(opt, steps // 20, steps, decay="cosine")
    for _ in tqdm(range(steps), desc=f"pre-train {name}", leave=False):
        batch = [texts[j] for j in torch.randint(len(texts), (64,), generator=g).tolist()]
        ids, mask = pad([t for t, _ in batch], tok.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        if mlm:   # 15% of the question words and the answer -> <mask> (the last row); the loss on those only
            pos, ends = torch.arange(ids.size(1)), mask.sum(1, keepdim=True) - 1
            answer = (pos < ends) & (pos >= ends - torch.tensor([n for _, n in batch])[:, None])
            question = (ids == tok.eos_token_id).cumsum(1) > 0                  # after the scene's </s>
            pick = ((torch.rand(ids.shape, generator=g) < 0.15) & question & (ids > 3)) | answer
            ids, labels = ids.masked_fill(pick, len(tok)), labels.masked_fill(~pick, -100)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"{name}: pre-trained {steps} steps, loss {loss.item():.3f}", file=sys.stderr)
    if mlm:   # keep the encoder; the pooler keeps its seeded init (RoBERTa's is not pre-trained either)
        encoder = tiny_gpt2_or_roberta(name, tok)
        encoder.load_state_dict(lm.roberta.state_dict(), strict=False)
        lm = encoder
    return lm


@recipe("tiny-gpt2")
def make_tiny_gpt2(folder: Path, steps: Optional[int] = None) -> None:
    """routing_bottleneck.py's captioning LM: tiny GPT-2 (64 wide, 2 layers), causal LM, 600 steps."""
    tok = data.build_tokenizer()
    pretrain_routing_lm("tiny-gpt2", 600 if steps is None else steps, tok).save_pretrained(folder)
    tok.save_pretrained(folder)


@recipe("tiny-roberta")
def make_tiny_roberta(folder: Path, steps: Optional[int] = None) -> None:
    """routing_bottleneck.py's VQA encoder: tiny RoBERTa (64 wide, 2 layers), masked LM, 3000 steps."""
    tok = data.build_tokenizer()
    pretrain_routing_lm("tiny-roberta", 3000 if steps is None else steps, tok).save_pretrained(folder)
    tok.save_pretrained(folder)


# ------------------------------------------------------- prefix_tuning.py / pt_peft_train.py's tiny BLIP-2


# ---------------------------------------------------------------------------------- rlp.py's tiny CLIPs


# ------------------------------------------------------------------------------------------------- the CLI
def largest_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two stand-in folders (same tensor names)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated names (default: all)")
    p.add_argument("--out", default=str(REPO / "stand_ins"), help="where the folders go (default: stand_ins/)")
    p.add_argument("--steps", type=int, help="pre-training steps instead of the recipe's (a quick re-make)")
    p.add_argument("--check", action="store_true", help="re-make into a temporary folder and compare")
    p.add_argument("--overwrite", action="store_true", help="replace existing folders")
    p.add_argument("--list", action="store_true", help="list the stand-ins")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown stand-in {', '.join(unknown)}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    if a.list:
        print("\n".join(f"{n:24s} {REPO / 'stand_ins' / n}" for n in names))
        return 0
    torch.set_num_threads(1)  # the same weights on every run of the same kind of CPU
    for name in names:
        if a.check:
            with tempfile.TemporaryDirectory() as tmp:
                RECIPES[name](Path(tmp, name), a.steps)
                diff = largest_difference(Path(tmp, name), REPO / "stand_ins" / name)
            print(f"{name}: largest weight difference to stand_ins/{name}: {diff:.3g}")
            continue
        folder = Path(a.out, name)
        if folder.exists() and not a.overwrite:
            print(f"error: {folder} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        RECIPES[name](folder, a.steps)
        print(f"{name}: written to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
