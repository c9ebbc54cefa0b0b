"""data.py -- the one shared module of the VL-PEFT reimplementations.

*** SKELETON: this is the agreed API. Bodies marked NotImplementedError are being
*** written now (issue #2). Method files code against these names and signatures.

Everything a method file needs besides its own method:

  ShapesWorld           deterministic synthetic images + VQA / captions / classes (no files)
  load_records          one function for every dataset (synthetic or real, official formats)
  load_image            a record -> PIL.Image (renders synthetic scenes on the fly)
  extract_features      frozen vision-encoder features, cached on disk (fp16, memory-mapped)
  build_tokenizer       word-level PreTrainedTokenizerFast for tiny models
  vqa_score / vqa_accuracy / caption_metrics / accuracy / harmonic_mean   official metrics
  answer_vocab          VQA answer vocabulary (frequency threshold) for classifier heads
  make_loader           seeded DataLoader (DistributedSampler under torchrun)
  DataError             every bad-input problem raises this with a readable message

Sample schema -- every dataset yields a list of plain dicts ("records"):

  id           str    unique id of the sample (question id / image id / file name)
  image_id     str    key of the image; features are cached per image_id
  image_path   str|None  absolute path of the image file; None for the synthetic world
  task         str    "vqa" | "caption" | "cls"
  question     str    (vqa) the question
  answers      list[str]  (vqa) the 10 annotator answers (raw, un-normalised)
  answer       str    (vqa) the most common answer -- training target
  answer_type  str    (vqa) "yes/no" | "number" | "other"
  question_type str   (vqa) e.g. "what color is the" / family name for synthetic
  captions     list[str]  (caption) reference captions (5 for COCO / synthetic)
  label        int    (cls) class index into the dataset's class list
  classname    str    (cls) human-readable class name
  meta         dict   anything else (synthetic: scene graph, family, style)

Synthetic records carry meta["seed"], meta["split"], meta["index"]; load_image renders
them deterministically, so no file is ever written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

DATASETS = ("shapes_vqa", "shapes_caption", "shapes_cls",
            "vqav2", "gqa", "coco", "flickr30k",
            "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
            "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")


class DataError(Exception):
    """A problem with the user's data or arguments. Scripts catch it, print the
    message (which names the file / key / path and how to get the data) and exit 2."""


# ----------------------------------------------------------------------------------
# 1. Synthetic world
# ----------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
VQA_FAMILIES = ("color", "shape", "count", "exist", "position", "relation")


@dataclass
class ShapesWorld:
    """Deterministic synthetic world: scene = f(seed, split, index).

    split_sizes: number of images per split. VQA/caption images have 1-3 objects (shape,
    colour, size, position, no two objects at one position). Classification images hold
    exactly one object; class = (colour, shape), class name "red circle" (48 classes).
    Base/new split (CoOp/CoCoOp protocol: labels 0..K/2-1 are base, the rest new): a class
    is base when (colour_idx + shape_idx) is even -- a checkerboard, so base and new share
    every colour and every shape (compositional). Labels: base classes sorted by name
    first, then new classes sorted by name; `classnames` lists them in label order.
    """
    seed: int = 0
    image_size: int = 64
    split_sizes: dict = field(default_factory=lambda: {"train": 2000, "val": 200, "test": 500})

    def scene(self, split: str, index: int) -> dict: ...
    def render(self, scene: dict): ...          # -> PIL.Image RGB (image_size x image_size)
    def vqa(self, split: str, families: Sequence[str] = VQA_FAMILIES) -> list[dict]: ...
    def captions(self, split: str) -> list[dict]: ...
    def classification(self, split: str) -> list[dict]: ...
    @property
    def classnames(self) -> list[str]: ...     # sorted "colour shape" names
    def base_new_split(self) -> tuple[list[str], list[str]]: ...


def synthetic_vocab() -> list[str]:
    """Every word the synthetic world can produce (questions, answers, captions)."""
    raise NotImplementedError


# ----------------------------------------------------------------------------------
# 2. One loader for all datasets
# ----------------------------------------------------------------------------------
def load_records(dataset: str, split: str, data_root: Optional[str] = None, *,
                 seed: int = 0, image_size: int = 64, num_shots: Optional[int] = None,
                 subset: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """Records of `dataset` / `split` ("train" | "val" | "test").

    shapes_*: synthetic, data_root ignored. vqav2/gqa/coco/flickr30k/CoOp datasets read
    the official files under data_root (see README 'Data'); missing root/file, malformed
    JSON -> DataError naming the path/key and where to download. num_shots: k-shot per
    class sampled with `seed` (classification). subset: "base" | "new" | "all" class
    subset for base-to-new (labels re-indexed within the subset). limit: first N records.
    """
    raise NotImplementedError


def classnames_of(records: Sequence[dict]) -> list[str]:
    """Class names ordered by label."""
    raise NotImplementedError


def load_image(record: dict):
    """PIL RGB image of a record; raises DataError-free `UnreadableImage` for corrupt files
    so callers can skip and count (see `ImageSkipCounter`)."""
    raise NotImplementedError


# ----------------------------------------------------------------------------------
# 3. Frozen visual features, cached
# ----------------------------------------------------------------------------------
def extract_features(records: Sequence[dict], encoder: str = "patches", *,
                     cache_dir: str = "cache/features", dataset: str = "", split: str = "",
                     layer: int = -2, image_size: int = 224, patch_size: int = 8,
                     keep_cls: bool = False, pooled: bool = False, device: str = "cpu",
                     batch_size: int = 64, max_bad_fraction: float = 0.01):
    """-> (feats, rows): feats a (num_images, n, d) float16 tensor (memory-mapped from the
    cache), rows a LongTensor (len(records),) mapping each record to its image's row.

    encoder "patches": raw-pixel patch tokens (Fuyu-style), n = (image_size/patch_size)^2,
    d = 3*patch_size^2, values in [-1, 1]; no network. Any other value: a Hugging Face
    CLIP/ViT vision tower id or path; tokens of hidden_states[layer] (grid tokens, CLS
    dropped unless keep_cls); pooled=True gives (num_images, 1, d) pooled+projected
    embedding (CLIP image_embeds). Cached at cache_dir keyed by (dataset, split, encoder,
    layer, image_size, pooled); written to a temp file then renamed, so a partial cache is
    never read. Unreadable images: zero features, counted, reported; DataError if more
    than max_bad_fraction. tqdm bar while extracting.
    """
    raise NotImplementedError


# ----------------------------------------------------------------------------------
# 4. Tokenizer for tiny models
# ----------------------------------------------------------------------------------
def build_tokenizer(words: Iterable[str] = None, *, lowercase: bool = True):
    """Word-level PreTrainedTokenizerFast (library `tokenizers`): special tokens
    pad "<pad>" (id 0), bos "<s>", eos "</s>", unk "<unk>"; words default to
    synthetic_vocab(); splits on whitespace and punctuation ("?" "." "," are tokens)."""
    raise NotImplementedError


# ----------------------------------------------------------------------------------
# 5. Official metrics
# ----------------------------------------------------------------------------------
def normalize_answer(ans: str) -> str:
    """Official VQA answer normalisation (punctuation, digits, articles, contractions)."""
    raise NotImplementedError


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction: mean over the 10 leave-one-out subsets of
    min(#matches/3, 1)."""
    raise NotImplementedError


def vqa_accuracy(preds: Sequence[str], records: Sequence[dict]) -> dict:
    """{"overall": %, "yes/no": %, "number": %, "other": %} (percent, 2 decimals)."""
    raise NotImplementedError


def caption_metrics(preds: dict, refs: dict) -> dict:
    """preds {id: str}, refs {id: [str,...]} -> {"BLEU-1".."BLEU-4", "CIDEr"} (x100 for
    BLEU, CIDEr-D x100 as in papers)"""
    raise NotImplementedError


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """percent"""
    raise NotImplementedError


def harmonic_mean(base: float, new: float) -> float:
    raise NotImplementedError


def answer_vocab(records: Sequence[dict], min_freq: int = 9) -> list[str]:
    """Answers (normalised) occurring >= min_freq times as the most-common answer in
    train records (3129 answers for VQAv2 train with min_freq 9); min_freq=1 for tiny data."""
    raise NotImplementedError


def vqa_soft_targets(record: dict, vocab_index: dict) -> "torch.Tensor":
    """(len(vocab),) soft scores min(count/3,1) per answer for BCE classifiers."""
    raise NotImplementedError


# ----------------------------------------------------------------------------------
# 6. Loaders
# ----------------------------------------------------------------------------------
def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                collate_fn: Callable = None, num_workers: int = 0, drop_last: bool = False):
    """DataLoader; under torch.distributed uses DistributedSampler(seed=seed), else a
    seeded torch.Generator. Call loader.sampler.set_epoch(epoch) via set_epoch(loader, e)."""
    raise NotImplementedError


def set_epoch(loader, epoch: int) -> None:
    raise NotImplementedError
