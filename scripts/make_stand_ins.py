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
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402

RECIPES: dict[str, Callable[[Path, Optional[int]], None]] = {}  # name -> make(folder, steps or None)


def recipe(name: str):
    """Register make(folder, steps): pre-train the stand-in `name` (steps None: the recipe's), save it."""
    def register(make):
        RECIPES[name] = make
        return make
    return register


# --------------------------------------------------------- the synthetic world as text, the tiny tokenizer
TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # = tokenizers' Whitespace pre-tokenizer
CAPTION_WORDS = "there is an image with object objects the a and , . :"
DESCRIBE = ("{objs}.", "there is {objs}.", "the image shows {objs}.", "{n}: {objs}.", "{sentences}.")


def describe_scene(scene: dict, rng: Optional[np.random.Generator] = None) -> str:
    """Every object's size, colour, shape and position, e.g. "a large red circle on the left and a small
    blue square at the top."; with rng in varied order and wording. The tiny LMs read it as context."""
    objs = list(scene["objects"])
    form = 0
    if rng is not None:
        objs = [objs[i] for i in rng.permutation(len(objs))]
        form = int(rng.integers(len(DESCRIBE)))
    n, where = len(objs), data.WHERE
    return DESCRIBE[form].format(
        objs=data._join([data._a(f"{o['size']} {o['color']} {o['shape']} {where[o['pos']]}") for o in objs]),
        n=f"{data.NUMWORD[n]} object{'s' if n > 1 else ''}",
        sentences=data._join([f"the {o['size']} {o['color']} {o['shape']} is {where[o['pos']]}"
                              for o in objs]))


def synthetic_vocab() -> list[str]:
    """Every word the synthetic world can produce (questions, answers, captions, descriptions), sorted."""
    texts = [t for ts in data.Q_TEMPLATES.values() for t in ts] + list(data.WHERE.values())
    texts += [*data.RELATIONS, CAPTION_WORDS, *DESCRIBE, " ".join(data.PLURAL.values()),
              " ".join(data.SHAPES + data.COLORS + data.SIZES + data.POSITIONS + data.NUMWORD),
              "yes no 0 1 2 3 4 5 6 7 8 9"]
    words = {w for t in texts for w in TOKEN_RE.findall(re.sub(r"\{\w+\}", " ", t).lower())}
    return sorted(words)


def build_tokenizer(words: Iterable[str] = None):
    """Lower-case word-level PreTrainedTokenizerFast over the words of `words` (texts, any order; default
    synthetic_vocab()), split on whitespace and punctuation; pad "<pad>" = 0, bos "<s>" = 1, eos "</s>" = 2,
    unk "<unk>" = 3, none added automatically (like GPT-2). decode() joins tokens with spaces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = synthetic_vocab() if words is None else words
    found = {w for text in words for w in TOKEN_RE.findall(text.lower())}
    vocab = {w: i for i, w in enumerate(specials + sorted(found - set(specials)))}  # ids independent of order
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=512)


# ------------------------------------------------------------------------------ the frozen tiny CNN (data.py)
# DEVIATION (offline only): the papers' frozen towers (CLIP, an ImageNet-21k ViT) are pre-trained on real
# images; the synthetic world's stand-in is a small CNN trained, supervised, to name the objects of scenes of
# world PRETRAIN_WORLD (no benchmark uses it), so that its frozen features already say what an image holds.
TINY_CNN_RECIPE = {"images": 4000, "steps": 600, "batch": 32, "lr": 1e-2, "world": data.PRETRAIN_WORLD}
CELL = {"top": 1, "left": 3, "center": 4, "right": 5, "bottom": 7}  # grid cell (row-major) of a position


@recipe("tiny-cnn")
def make_tiny_cnn(folder: Path, steps: Optional[int]) -> None:
    """data.TinyCNN (width 96, 48 x 48 images) pre-trained on world PRETRAIN_WORLD, seed 0."""
    torch.manual_seed(0)
    model = data.TinyCNN(data.TINY_CNN_WIDTH, data.TINY_CNN_IMAGE_SIZE)
    pretrain_tiny_cnn(model, **dict(TINY_CNN_RECIPE, steps=steps or TINY_CNN_RECIPE["steps"]))
    save_tiny_cnn(model, folder)


def save_tiny_cnn(model: data.TinyCNN, folder) -> None:
    """The folder data.TinyCNN.from_pretrained reads: config.json + model.safetensors."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              Path(folder, "model.safetensors"))


def pretrain_tiny_cnn(model: data.TinyCNN, *, images, steps, batch, lr, world) -> None:
    """Supervised pre-training: cross-entropy naming the colour / shape / size (or nothing) in each grid
    cell from its token, plus binary cross-entropy naming the scene's colours, shapes, positions and pairs
    from the pooled vector, both through linear heads (so the names are linearly readable)."""
    import torch.nn.functional as F
    size, width = model.config["image_size"], model.config["width"]
    w = data.ShapesWorld(seed=world, split_sizes={"train": images})
    scenes = [w.scene("train", i) for i in range(images)]
    px = data.tiny_cnn_pixels([w.render(sc, size) for sc in scenes], size)            # (N, 3, S, S)
    cells, names = tiny_cnn_targets(scenes)                                           # (N, 9, 3), (N, K)
    sizes = [1 + len(data.COLORS), 1 + len(data.SHAPES), 1 + len(data.SIZES)]
    cell_head = torch.nn.Linear(width, sum(sizes))
    name_head = torch.nn.Linear(width, names.shape[1])
    opt = torch.optim.Adam([*model.parameters(), *cell_head.parameters(), *name_head.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(px), (batch,), generator=gen)
        grid, pooled = model(px[idx])
        logits = cell_head(grid).split(sizes, -1)                                      # colour, shape, size
        loss = sum(F.cross_entropy(lg.flatten(0, 1), cells[idx, :, k].flatten())
                   for k, lg in enumerate(logits)) / 3
        loss = loss + F.binary_cross_entropy_with_logits(name_head(pooled), names[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():  # unit scale: each output divided by its RMS on 1000 pre-training images
        grid, pooled = model(px[:1000])
        model.scale.copy_(torch.stack([grid.pow(2).mean().sqrt(), pooled.pow(2).mean().sqrt()]))


def tiny_cnn_targets(scenes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> cells (N, 9, 3): 1 + colour / shape / size index of each grid cell's object, 0 = none; names (N, K):
    multi-hot of the scene's colours, shapes, positions and the pairs of names_of."""
    def names_of(o):
        return [o["color"], o["shape"], o["pos"], f"{o['size']} {o['shape']}", f"{o['color']} {o['shape']}",
                f"{o['shape']} {o['pos']}", f"{o['color']} {o['pos']}"]
    every = [{"color": c, "shape": s, "size": z, "pos": p} for c in data.COLORS for s in data.SHAPES
             for z in data.SIZES for p in data.POSITIONS]
    index = {n: i for i, n in enumerate(sorted({n for o in every for n in names_of(o)}))}
    cells, names = torch.zeros(len(scenes), 9, 3, dtype=torch.long), torch.zeros(len(scenes), len(index))
    for i, sc in enumerate(scenes):
        for o in sc["objects"]:
            kinds = (data.COLORS.index(o["color"]), data.SHAPES.index(o["shape"]),
                     data.SIZES.index(o["size"]))
            cells[i, CELL[o["pos"]]] = 1 + torch.tensor(kinds)
            names[i, [index[n] for n in names_of(o)]] = 1
    return cells, names



# ------------------------------------------------------------------------------------- memvp.py's tiny LMs
MEMVP_WORDS = ["Provide a one-sentence caption for the provided image.",  # memvp.CAPTION_PROMPT (Table 6)
               "question context options response answer is n / a"]  # ScienceQA's QCM-A prompt words


def tiny_lm(arch: str, vocab: int, d: int, layers: int, ffn: int, heads: int, kv_heads: int = 0,
            t5_ffn: str = "relu", max_pos: int = 1024):
    """Config-built LM, random weights (pad 0, bos 1, eos 2, as build_tokenizer). DEVIATION (tiny LMs):
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
    return [((describe_scene(r["meta"]["scene"], rng) + " " if rng.random() < 0.5 else "")
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
    tok = tok or build_tokenizer(synthetic_vocab() + MEMVP_WORDS)
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
        context = describe_scene(r["meta"]["scene"], rng) if rng.random() < 0.5 else ""
        problem = {"question": r["question"], "context": context, "choices": choices, "meta": {"caption": ""},
                   "answer": "ABCDE"[choices.index(r["answer"])]}
        out.append(data.scienceqa_prompt(problem))
    return out


@recipe("tiny-llama-scienceqa")
def make_tiny_llama_scienceqa(folder: Path, steps: Optional[int]) -> None:
    """The tiny LLaMA for --dataset scienceqa offline: its tokenizer keeps the option letters A-E upper-case
    (the official scorer reads the first capital letter) and it is pre-trained on scienceqa_texts."""
    from tokenizers import AddedToken
    tok = build_tokenizer(synthetic_vocab() + MEMVP_WORDS + ["( )"])
    tok.add_tokens([AddedToken(letter, single_word=True, normalized=False) for letter in "ABCDE"])
    pretrain_memvp_lm(folder, steps, "llama", tok=tok, texts=scienceqa_texts)


@recipe("tiny-llama-caption")
def make_tiny_llama_caption(folder: Path, steps: Optional[int]) -> None:
    """The tiny LLaMA pre-trained on captions instead (--dataset shapes_caption)."""
    pretrain_memvp_lm(folder, steps, "llama", task="caption")



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
        scene, caption = zip(*[(describe_scene(r["meta"]["scene"], rng) if rng.random() < 0.75 else "",
                                c) for r in recs for c in r["captions"]])
        return [(s + [bos] + c + [eos], 0) for s, c in zip(enc(scene), enc(caption))]
    recs = data.load_records("shapes_vqa", "train", world_seed=data.PRETRAIN_WORLD)
    scene = enc(describe_scene(r["meta"]["scene"], rng) for r in recs)
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
    tok = build_tokenizer()
    pretrain_routing_lm("tiny-gpt2", 600 if steps is None else steps, tok).save_pretrained(folder)
    tok.save_pretrained(folder)


@recipe("tiny-roberta")
def make_tiny_roberta(folder: Path, steps: Optional[int] = None) -> None:
    """routing_bottleneck.py's VQA encoder: tiny RoBERTa (64 wide, 2 layers), masked LM, 3000 steps."""
    tok = build_tokenizer()
    pretrain_routing_lm("tiny-roberta", 3000 if steps is None else steps, tok).save_pretrained(folder)
    tok.save_pretrained(folder)


# ------------------------------------------------------- prefix_tuning.py / pt_peft_train.py's tiny BLIP-2
BLIP2_PRETRAIN = dict(batch_size=32, lr=2e-3, warmup=50, steps=2000)
BLIP2_PROMPT_WORDS = ["question", "answer", "caption", ":"]  # prefix_tuning.SYNTHETIC["prompts"]


def tiny_blip2(vocab: int, init: str = "scaled"):
    """ViT 2x48 (32 px images, 8 px patches), Q-Former 2x48 with 8 queries, OPT 2x64. init "hf": transformers'
    BLIP-2 initialisation, made to be overwritten by a checkpoint (ViT std 1e-10, query tokens 0, std 0.02
    elsewhere); "scaled": weights N(0, 1/d), query tokens N(0, 1).
    DEVIATION: "scaled" for tiny-blip2. From "hf" (tiny-blip2-hf-init) the queries are all equal (the model
    barely sees the image) and the width-64 OPT ends pre-training attending almost uniformly: input prefixes
    do not train."""
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
        torch.nn.init.normal_(model.query_tokens)        # distinct queries (a LayerNorm follows: any scale)
    return model


def blip2_image_processor():
    """32 px, mean = std = 0.5 per channel: the pixels prefix_tuning.Collate feeds the tiny ViT."""
    from transformers import BlipImageProcessor
    return BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def save_blip2(model, tok, folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    blip2_image_processor().save_pretrained(folder)


def pretrain_tiny_blip2(folder: Path, steps: Optional[int], init: str) -> None:
    """ALL weights of the tiny BLIP-2 trained on four caption styles and four VQA families of
    data.PRETRAIN_WORLD (prefix_tuning.mix_records), interleaved; AdamW, linear warm-up and decay."""
    import prefix_tuning as pt
    tok = build_tokenizer(synthetic_vocab() + BLIP2_PROMPT_WORDS)
    torch.manual_seed(0)
    model, r = tiny_blip2(len(tok), init), dict(BLIP2_PRETRAIN, steps=steps or BLIP2_PRETRAIN["steps"])
    recs = pt.mix_records("train", data.PRETRAIN_WORLD)
    processor = blip2_image_processor()
    col = pt.Collate(tok, 32, pt.SYNTHETIC["prompts"], processor.image_mean, processor.image_std)
    g = torch.Generator().manual_seed(0)
    net = pt.PrefixBlip2(model.train(), 0, "none", False, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    sched = pt.lr_schedule(opt, r["warmup"], r["steps"], decay="linear")
    for _ in range(r["steps"]):
        idx = torch.randint(len(recs), (r["batch_size"],), generator=g).tolist()
        loss = net(col([recs[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"pre-trained the tiny BLIP-2 ({init} init): {r['steps']} steps, last loss {loss.item():.3f}")
    save_blip2(model.eval(), tok, folder)


@recipe("tiny-blip2")
def make_tiny_blip2(folder: Path, steps: Optional[int]) -> None:
    pretrain_tiny_blip2(folder, steps, "scaled")


@recipe("tiny-blip2-hf-init")
def make_tiny_blip2_hf_init(folder: Path, steps: Optional[int]) -> None:
    pretrain_tiny_blip2(folder, steps, "hf")


# ---------------------------------------------------------------------------------- rlp.py's tiny CLIPs
# DEVIATION: ViT-B/16 needs the hub. Offline, a 2+2-layer CLIP (width 64; 48x48 images, a 3x3 grid of 16-px
# patches) is pre-trained with CLIP's loss on scenes of world data.PRETRAIN_WORLD (the benchmark is world 0),
# half with 1 object, half with 1-3, captioned "a photo of a red circle.", ... (so CoOp's init is meaningful).
# Three pre-training seeds, three stand-ins: tiny-clip (seed 0), tiny-clip-seed1, tiny-clip-seed2.
TINY_CLIP = dict(width=64, layers=2, heads=4, image_size=48, patch=16, scenes=2000, steps=1000, batch=64,
                 lr=2e-3, weight_decay=0.05, warmup=50)


def scene_captions(scene: dict) -> list:
    """-> ["a photo of a red circle and a blue star.", "an image with a red circle and a blue star.", ...]"""
    where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}
    things = [[f"{o['color']} {o['shape']}", f"{o['size']} {o['color']} {o['shape']}",
               f"{o['color']} {o['shape']} " + where.get(o["pos"], "on the " + o["pos"])]
              for o in scene["objects"]]
    a = [[("an " if t[0] in "aeiou" else "a ") + t for t in ts] for ts in zip(*things)]        # per style
    join = [x[0] if len(x) == 1 else ", ".join(x[:-1]) + " and " + x[-1] for x in a]
    return [f"a photo of {join[0]}.", f"an image with {join[0]}.", f"{join[1]}.", f"there is {join[2]}."]


def pretrain_clip(clip, tok, seed: int, steps: int):
    """CLIP's symmetric InfoNCE on (image, one of its captions); scenes of the same objects are positives."""
    import numpy as np
    import random
    from tqdm import tqdm
    from rlp import lr_schedule, tokenize
    rc, rng = TINY_CLIP, random.Random(seed)
    kw = dict(world_seed=data.PRETRAIN_WORLD, image_size=rc["image_size"],
              split_sizes={"train": rc["scenes"] // 2, "val": 1, "test": 1})
    recs = data.load_records("shapes_cls", "train", **kw) + data.load_records("shapes_caption", "train", **kw)
    captions = [scene_captions(r["meta"]["scene"]) for r in recs]
    objects = [str(sorted((o["color"], o["shape"]) for o in r["meta"]["scene"]["objects"])) for r in recs]
    key = torch.from_numpy(np.unique(objects, return_inverse=True)[1])               # same key: positives
    x = torch.from_numpy(np.stack([np.asarray(data.load_image(r, rc["image_size"])) for r in recs])) / 255
    images = ((x - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)).permute(0, 3, 1, 2)  # NCHW
    opt = torch.optim.AdamW(clip.parameters(), lr=rc["lr"], weight_decay=rc["weight_decay"])
    sched = lr_schedule(opt, rc["warmup"], steps)
    for _ in tqdm(range(steps), desc="pre-train the tiny CLIP", mininterval=10):
        idx = torch.randint(len(recs), (rc["batch"],))
        ids = tokenize(tok, [rng.choice(captions[i]) for i in idx.tolist()], clip)[0]
        logits = clip(input_ids=ids, pixel_values=images[idx]).logits_per_image                # (B, B)
        same = (key[idx, None] == key[None, idx]).float()
        target = same / same.sum(1, keepdim=True)                                               # symmetric
        loss = -((target * logits.log_softmax(1)).sum(1) + (target * logits.log_softmax(0)).sum(0)).mean() / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def make_tiny_clip(folder: Path, steps: Optional[int], seed: int) -> None:
    """The tiny CLIP of `seed`: its tokenizer, config and pre-training; saved with a CLIP image processor."""
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    # the tokenizer puts "<s> ... <eot>" around each text: data.py's [EOS] is id 2, which HF's CLIPTextModel
    # reads as legacy "pool at argmax(id)"; <eot> is the last id
    tok = build_tokenizer(["a an the of and is there photo image with on at in x , .", *data.COLORS,
                                *data.SHAPES, *data.SIZES, *data.POSITIONS])
    tok.add_special_tokens({"eos_token": "<eot>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A <eot>", special_tokens=[("<s>", tok.bos_token_id), ("<eot>", tok.eos_token_id)])
    w, rc = TINY_CLIP["width"], TINY_CLIP
    tower = dict(hidden_size=w, intermediate_size=4 * w, num_attention_heads=rc["heads"], projection_dim=w,
                 num_hidden_layers=rc["layers"], bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(vocab_size=len(tok), max_position_embeddings=48, eos_token_id=tok.eos_token_id, **tower)
    vision = dict(image_size=rc["image_size"], patch_size=rc["patch"], **tower)
    torch.manual_seed(seed)                                          # the tiny CLIP's init and batches
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=w))
    tok.save_pretrained(folder)                                      # before the batches set its padding
    pretrain_clip(clip, tok, seed, rc["steps"] if steps is None else steps)
    clip.save_pretrained(folder)
    # its pixels: the 48-px scenes unchanged, CLIP's mean / std (what the pre-training saw)
    side = rc["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD)).save_pretrained(folder)


for _seed, _name in ((0, "tiny-clip"), (1, "tiny-clip-seed1"), (2, "tiny-clip-seed2")):
    recipe(_name)(lambda folder, steps, seed=_seed: make_tiny_clip(folder, steps, seed))


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
    p.add_argument("--out", default=str(REPO / "stand_ins"), help="the folders' parent (default: stand_ins/)")
    p.add_argument("--steps", type=int, help="pre-training steps instead of the recipe's (a quick re-make)")
    p.add_argument("--check", action="store_true", help="re-make into a temporary folder and compare")
    p.add_argument("--overwrite", action="store_true", help="replace existing folders")
    p.add_argument("--list", action="store_true", help="list the stand-ins")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown stand-in {', '.join(unknown)}; choose from {', '.join(RECIPES)}",
              file=sys.stderr)
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
