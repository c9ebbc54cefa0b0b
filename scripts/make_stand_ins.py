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
MEMVP_WORDS = ["Provide a one-sentence caption for the provided image.",  # memvp.CAPTION_PROMPT (Table 6)
               "question context options response answer is n / a"]  # ScienceQA's QCM-A prompt words


def tiny_lm(arch: str, vocab: int, d: int, layers: int, ffn: int, heads: int, kv_heads: int = 0,
            t5_ffn: str = "relu", max_pos: int = 1024):
    """Config-built LM, random weights (pad 0, bos 1, eos 2, as data.build_tokenizer). DEVIATION (tiny LMs):
    init std d^-0.5 (T5's own) for BART and LLaMA too, not HF's 0.02: with 0.02 a width-64 LM barely moves its
    first layers in pre-training and never learns to read its context."""
    import transformers
    ids, std = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), d ** -0.5
    if arch == "bart":
        return transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn, encoder_attention_heads=heads, decoder_attention_heads=heads, dropout=0.0,
            max_position_embeddings=max_pos, decoder_start_token_id=2, forced_eos_token_id=None, init_std=std,
            **ids))
    if arch == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ffn, num_layers=layers, num_heads=heads,
            dropout_rate=0.0, feed_forward_proj=t5_ffn, decoder_start_token_id=0, **ids))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_pos,
        tie_word_embeddings=True, initializer_range=std, **ids))


def pretrain_texts(task: str, n_images: int) -> list:
    """(source, target) texts of data.PRETRAIN_WORLD (never the benchmark's world), half of them after a
    description of the scene, so that the LM learns to read its context as a real LM can."""
    import numpy as np
    sizes, rng = {"train": n_images}, np.random.default_rng(0)
    dataset = "shapes_caption" if task == "caption" else "shapes_vqa"
    recs = data.load_records(dataset, "train", world_seed=data.PRETRAIN_WORLD, split_sizes=sizes)
    recs = data.caption_pairs(recs) if task == "caption" else recs
    return [((data.describe_scene(r["meta"]["scene"], rng) + " " if rng.random() < 0.5 else "")
             + (MEMVP_WORDS[0] if task == "caption" else r["question"]), r.get("caption", r.get("answer")))
            for r in recs]


def pretrain_memvp_lm(folder: Path, steps: Optional[int], arch: str, task: str = "vqa", t5_ffn: str = "relu",
                      tok=None, texts: Optional[Callable] = None, d: int = 64, layers: int = 2) -> None:
    """A tiny LM (all weights, seed 0, one LM for every seed of memvp.py) pre-trained on pretrain_texts with
    memvp.py's own collator and loss, saved with its word-level tokenizer of the synthetic world.
    DEVIATION: the paper starts from BART-base / T5-base / LLaMA-7B (no download offline)."""
    import transformers
    import memvp
    from tqdm import tqdm
    steps = 1000 if steps is None else steps
    tok = tok or data.build_tokenizer(data.synthetic_vocab() + MEMVP_WORDS)
    transformers.set_seed(0)
    lm = tiny_lm(arch, len(tok), d, layers, 4 * d, max(1, d // 16), max(1, d // 32), t5_ffn).train()
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = (texts or pretrain_texts)(task, min(4000, max(64, 8 * steps)))
    items = [(0, enc(s), enc(t)) for s, t in pairs]
    collate = memvp.Collator(None, lm.config.is_encoder_decoder, tok, generate=False)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    sched, g = memvp.lr_schedule(opt, steps // 10, steps), torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc=f"pre-train {folder.name}", file=sys.stderr):
        b = collate([items[i] for i in torch.randint(len(items), (64,), generator=g).tolist()])
        inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
        memvp.lm_loss(lm, inputs, b["labels"]).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    lm.eval().save_pretrained(folder)
    tok.save_pretrained(folder)


@recipe("tiny-llama")
def make_tiny_llama(folder: Path, steps: Optional[int]) -> None:
    """memvp.py's default LM: LLaMA-style, width 64, 2 layers, pre-trained on VQA texts."""
    pretrain_memvp_lm(folder, steps, "llama")


@recipe("tiny-bart")
def make_tiny_bart(folder: Path, steps: Optional[int]) -> None:
    """BART, width 64, 2 + 2 layers, pre-trained on VQA texts (memory in the encoder FFNs, Sec. 5.1)."""
    pretrain_memvp_lm(folder, steps, "bart")


@recipe("tiny-t5")
def make_tiny_t5(folder: Path, steps: Optional[int]) -> None:
    """T5 with a gated-GELU FFN (T5 v1.1; MemVP's Eq. 11-12), width 64, 2 + 2 layers, VQA texts."""
    pretrain_memvp_lm(folder, steps, "t5", t5_ffn="gated-gelu")


def scienceqa_texts(task: str, n_images: int) -> list:
    """VQA questions of data.PRETRAIN_WORLD as ScienceQA problems in the official QCM-A format
    (data.scienceqa_prompt): the answer and 1-4 other answers of its question type as options A-E, half of
    them with a description of the scene as the context; target "The answer is X."."""
    import numpy as np
    rng, pool, out = np.random.default_rng(0), {}, []
    sizes = {"train": n_images}
    recs = data.load_records("shapes_vqa", "train", world_seed=data.PRETRAIN_WORLD, split_sizes=sizes)
    for r in recs:
        pool.setdefault(r["question_type"], set()).add(r["answer"])
    for r in recs:
        others = sorted(pool[r["question_type"]] - {r["answer"]})
        choices = [str(c) for c in rng.permutation(others)[:int(rng.integers(1, 5))]] + [r["answer"]]
        choices = [choices[i] for i in rng.permutation(len(choices))]
        context = data.describe_scene(r["meta"]["scene"], rng) if rng.random() < 0.5 else ""
        problem = {"question": r["question"], "context": context, "choices": choices, "meta": {"caption": ""},
                   "answer": "ABCDE"[choices.index(r["answer"])]}
        out.append(data.scienceqa_prompt(problem))
    return out


@recipe("tiny-llama-scienceqa")
def make_tiny_llama_scienceqa(folder: Path, steps: Optional[int]) -> None:
    """The tiny LLaMA for --dataset scienceqa offline: its tokenizer keeps the option letters A-E upper-case
    (the official scorer reads the first capital letter) and it is pre-trained on scienceqa_texts."""
    from tokenizers import AddedToken
    tok = data.build_tokenizer(data.synthetic_vocab() + MEMVP_WORDS + ["( )"])
    tok.add_tokens([AddedToken(letter, single_word=True, normalized=False) for letter in "ABCDE"])
    pretrain_memvp_lm(folder, steps, "llama", tok=tok, texts=scienceqa_texts)


@recipe("tiny-llama-caption")
def make_tiny_llama_caption(folder: Path, steps: Optional[int]) -> None:
    """The tiny LLaMA pre-trained on captions instead (--dataset shapes_caption)."""
    pretrain_memvp_lm(folder, steps, "llama", task="caption")



# ------------------------------------------------------------------------ routing_bottleneck.py's tiny LMs


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
