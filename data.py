"""data.py -- the one shared module of the VL-PEFT reimplementations: data, frozen features, metrics.

  1. ShapesWorld                      the synthetic world: scenes, images, VQA / captions / classes
  2. load_records, load_image         every dataset in its official layout (README 'Data'); caption_pairs
  3. extract_features, drop_missing   frozen vision features, cached ("tiny-cnn": the synthetic world's)
  4. vqa_accuracy, caption_metrics, scienceqa_accuracy, accuracy, harmonic_mean, answer_vocab,
     vqa_soft_targets                 the official metrics; VQA classifier classes and soft targets
  5. make_loader                      seeded DataLoader (DistributedSampler; loader.sampler.set_epoch)
  6. arg, check_values, ...           the scripts' flags and value checks, trainable counts, threads, seeds
  DataError                           every bad input: a message naming the file / key and where to get it

Typical use (offline):

  recs = load_records("shapes_vqa", "train")              # list of dicts, schema below
  feats, rows, missing = extract_features(recs, "tiny-cnn", dataset="shapes_vqa", split="train",
                                          train=True)      # (n_img, 9, TINY_CNN_WIDTH) fp16
  recs, rows = drop_missing(recs, rows, missing)           # training only; evaluation keeps every record
  vqa_accuracy(preds, recs)                                # {"overall": 71.3, "yes/no": ...}

Sample schema -- every dataset (DATASETS) yields a list of plain dicts ("records"):

  id, image_id   str; features are cached per image_id (None: no image, e.g. ScienceQA text-only questions)
  image_path     str, or None (synthetic images are rendered from meta["scene"]; no file is written)
  task           "vqa" | "caption" | "cls" | "mcq"
  question       (vqa, mcq) the question
  answers        (vqa) the 10 annotator answers, raw; answer: the most common one (the training target)
  answer_type    (vqa) "yes/no" | "number" | "other"; question_type: e.g. "what color is the"
  captions       (caption) the reference captions, stripped (5 for COCO and the synthetic world)
  label, classname  (cls) class index and name
  context, choices  (mcq) the hint ("" if none) and the options; answer "A".."E"; answer_index int
  meta           anything else (synthetic: scene graph; cls: classnames; mcq: subject, grade, ...)
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

DATASETS = ("shapes_vqa", "shapes_caption", "shapes_cls", "vqav2", "gqa", "coco", "flickr30k",
            "scienceqa", "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
            "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
DATA_VERSION = 1  # bump when synthetic rendering / feature layout changes (invalidates caches)
PRETRAIN_WORLD = 1000  # world seed of every tiny stand-in's pre-training; benchmarks use world 0
REPO = Path(__file__).resolve().parent


def cache_dir(*parts: str) -> str:
    """Folder of every cache (frozen features): $VLPEFT_CACHE, else cache/ here."""
    root = os.environ.get("VLPEFT_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
    return os.path.join(root, *parts)


_cache_folder = cache_dir  # extract_features' argument of the same name hides the function


def model_path(name: str, what: Optional[str] = None) -> str:
    """A --model value as from_pretrained reads it: `stand_ins/<name>` resolved against the repository (a
    missing one: an error line starting with `what`, default "--model <name>"); anything else as given."""
    if not name.startswith("stand_ins/"):
        return name
    path = REPO / name
    if not (path / "config.json").is_file():
        raise UsageError(f"{what or '--model ' + name}: no stand-in at {path}; make it with "
                         f"python scripts/make_stand_ins.py --only {path.name}")
    return str(path)


class UsageError(Exception):
    """Bad input (a flag, path, model or checkpoint): one 'error: ...' line, exit code 2, in every script."""


class DataError(UsageError):
    """Bad data or arguments; the message names the file / key and where to get the data (scripts: exit 2)."""


class UnreadableImage(Exception):
    """An image file that is missing or cannot be decoded (skip it and count it)."""


# ---------------------------------------------------------------------------------------- 1. Synthetic world
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
VQA_FAMILIES = ("color", "shape", "count", "exist", "position", "relation")

_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
        "purple": (150, 60, 200), "orange": (250, 140, 30), "white": (245, 245, 245), "gray": (128, 128, 128)}
_XY = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
_RADIUS = {"small": 0.09, "large": 0.14}
_MASKS = {  # pixels of a shape, in units of its radius around its centre
    "circle": lambda dx, dy: dx * dx + dy * dy <= 1,
    "square": lambda dx, dy: np.maximum(np.abs(dx), np.abs(dy)) <= 0.8,
    "diamond": lambda dx, dy: np.abs(dx) + np.abs(dy) <= 1,
    "cross": lambda dx, dy: (((np.abs(dx) <= 0.33) & (np.abs(dy) <= 1))
                             | ((np.abs(dy) <= 0.33) & (np.abs(dx) <= 1))),
    "triangle": lambda dx, dy: (dy <= 0.8) & (np.abs(dx) <= (dy + 1) / 1.8 * 0.95),
    "star": lambda dx, dy: np.hypot(dx, dy) <= 0.42 + 0.58 * (  # five points, one pointing up
        (1 + np.cos(5 * (np.arctan2(dy, dx) + np.pi / 2))) / 2) ** 1.5,
}
PLURAL = {s: s + ("es" if s.endswith(("s", "x", "ss")) else "s") for s in SHAPES}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}
RELATIONS = {"left of": lambda b, a: b[0] < a[0], "right of": lambda b, a: b[0] > a[0],
             "above": lambda b, a: b[1] < a[1], "below": lambda b, a: b[1] > a[1]}
NUMWORD = ("zero", "one", "two", "three")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_ANSWER_POOL = {"color": COLORS, "shape": SHAPES, "relation": SHAPES, "position": POSITIONS,
                "count": ("0", "1", "2", "3"), "exist": ("yes", "no")}
_ANSWER_TYPE = {"count": "number", "exist": "yes/no"}
Q_TEMPLATES = {
    "color": ("what color is {ref}?", "what is the color of {ref}?"),
    "shape": ("what shape is {ref}?", "which shape is {ref}?"),
    "count": ("how many {what} are there?", "how many {what} are in the image?"),
    "exist": ("is there a {color} {shape}?", "is there a {color} {shape} in the image?"),
    "position": ("where is {ref}?", "in which part of the image is {ref}?"),
    "relation": ("what is {rel} {ref}?", "what shape is {rel} {ref}?"),
}
ANSWER_NOISE = 0.1  # probability that one of the 10 synthetic annotators answers wrongly


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _unique(objs, obj, keys) -> bool:
    return sum(all(o[k] == obj[k] for k in keys) for o in objs) == 1


@dataclass
class ShapesWorld:
    """Deterministic synthetic world: scene = f(seed, split, index); split_sizes = images per split.
    VQA / caption images hold 1-3 objects (shape, colour, size; no two at one position). Classification
    images hold one object, class "red circle" (48 classes; image `index` has label index % 48; labels:
    base then new, each sorted; base = colour_idx + shape_idx even, so both halves share every word)."""
    seed: int = 0
    image_size: int = 64
    split_sizes: dict = field(default_factory=lambda: {"train": 2000, "val": 200, "test": 500})

    def _size(self, split: str) -> int:
        if split not in self.split_sizes:
            raise DataError(f"unknown split {split!r} of the synthetic world; "
                            f"choose from {sorted(self.split_sizes)}")
        return int(self.split_sizes[split])

    def _key(self, split: str, index: int, stream: int) -> list[int]:
        self._size(split)
        code = _SPLIT_CODE.get(split) or int(hashlib.md5(split.encode()).hexdigest()[:6], 16)
        return [self.seed, code, index, stream]
    def scene(self, split: str, index: int, *, single: bool = False) -> dict:
        """Scene graph {"objects": [{shape, color, size, pos, x, y}], "key": [...]}.
        single=True: the one-object classification scene of image `index`."""
        rng = np.random.default_rng(self._key(split, index, 1 if single else 0))
        if single:
            kinds = [tuple(self.classnames[index % len(self.classnames)].split())]
        else:
            kinds = [(COLORS[rng.integers(8)], SHAPES[rng.integers(6)])
                     for _ in range(int(rng.integers(1, 4)))]
        positions = rng.permutation(len(POSITIONS))[:len(kinds)]
        objects = []
        for (color, shape), p in zip(kinds, positions):
            pos = POSITIONS[p]
            jx, jy = rng.uniform(-0.03, 0.03, 2)
            objects.append({"shape": shape, "color": color, "size": SIZES[rng.integers(2)],
                            "pos": pos, "x": round(_XY[pos][0] + jx, 4), "y": round(_XY[pos][1] + jy, 4)})
        return {"objects": objects, "key": self._key(split, index, int(single))}

    def render(self, scene: dict, image_size: Optional[int] = None) -> Image.Image:
        """PIL RGB image (image_size x image_size, default self.image_size) of a scene."""
        s = int(image_size or self.image_size)
        rng = np.random.default_rng(scene["key"] + [7])
        img = np.full((s, s, 3), (18, 20, 28), np.float32)
        img += rng.normal(0, 4, (s, s, 1)).astype(np.float32)  # faint sensor noise
        for o in scene["objects"]:
            r = _RADIUS[o["size"]]
            i0, i1 = max(0, int((o["y"] - r) * s) - 1), min(s, int((o["y"] + r) * s) + 2)
            j0, j1 = max(0, int((o["x"] - r) * s) - 1), min(s, int((o["x"] + r) * s) + 2)
            yy, xx = np.mgrid[i0:i1, j0:j1].astype(np.float32)
            dy, dx = ((yy + 0.5) / s - o["y"]) / r, ((xx + 0.5) / s - o["x"]) / r
            img[i0:i1, j0:j1][_MASKS[o["shape"]](dx, dy)] = _RGB[o["color"]]
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    def _base(self, split, index, scene, kind):
        image_id = f"shapes{self.seed}-{split}-{kind}{index}"
        meta = {"seed": self.seed, "split": split, "index": index, "scene": scene,
                "image_size": self.image_size}
        return {"id": image_id, "image_id": image_id, "image_path": None, "meta": meta}

    def vqa(self, split: str) -> list[dict]:
        """One question per applicable family per image (relation needs 2+ objects),
        10 answers with ANSWER_NOISE annotator noise; question_type = family."""
        out = []
        for index in range(self._size(split)):
            scene = self.scene(split, index)
            rng = np.random.default_rng(self._key(split, index, 2))
            for fam in VQA_FAMILIES:
                qa = _make_question(fam, scene["objects"], rng)
                if qa is None:
                    continue
                question, ans = qa
                answers = [str(rng.choice([a for a in _ANSWER_POOL[fam] if a != ans]))
                           if rng.random() < ANSWER_NOISE else ans for _ in range(10)]
                counts = Counter(answers)
                top = max(counts.values())
                rec = self._base(split, index, scene, "s")
                rec.update(id=f"{rec['image_id']}-{fam}", task="vqa", question=question,
                           answers=answers, answer=ans if counts[ans] == top else counts.most_common(1)[0][0],
                           answer_type=_ANSWER_TYPE.get(fam, "other"), question_type=fam)
                rec["meta"]["family"] = fam
                out.append(rec)
        return out

    def captions(self, split: str) -> list[dict]:
        """5 reference captions per image, one per template (objects in random order)."""
        out = []
        for index in range(self._size(split)):
            scene = self.scene(split, index)
            rng = np.random.default_rng(self._key(split, index, 3))
            objs = [scene["objects"][i] for i in rng.permutation(len(scene["objects"]))]
            n = len(objs)
            caps = [
                _join([_a(f"{o['size']} {o['color']} {o['shape']}") for o in objs]) + ".",
                "there is " + _join([_a(f"{o['color']} {o['shape']} {WHERE[o['pos']]}") for o in objs])
                + ".",
                "an image with " + _join([_a(f"{o['color']} {o['shape']}") for o in objs]) + ".",
                f"{NUMWORD[n]} object{'s' if n > 1 else ''}: " + _join([_a(o["shape"]) for o in objs]) + ".",
                _join([f"the {o['color']} {o['shape']} is {WHERE[o['pos']]}" for o in objs]) + ".",
            ]
            rec = self._base(split, index, scene, "s")
            rec.update(task="caption", captions=caps)
            out.append(rec)
        return out

    def classification(self, split: str) -> list[dict]:
        """One single-object image per index; label = index % 48 (label order = classnames)."""
        names = self.classnames
        out = []
        for index in range(self._size(split)):
            scene = self.scene(split, index, single=True)
            rec = self._base(split, index, scene, "c")
            label = index % len(names)
            rec.update(task="cls", label=label, classname=names[label])
            rec["meta"]["classnames"] = names
            out.append(rec)
        return out

    @property
    def classnames(self) -> list[str]:
        """The 48 "colour shape" names in label order: base (sorted), then new (sorted)."""
        pairs = [(ci + si, f"{c} {s}") for ci, c in enumerate(COLORS) for si, s in enumerate(SHAPES)]
        return sorted(n for k, n in pairs if k % 2 == 0) + sorted(n for k, n in pairs if k % 2 == 1)


def _make_question(fam: str, objs: list[dict], rng) -> Optional[tuple[str, str]]:
    """(question, answer) of family `fam` about a scene, or None when not applicable."""
    tpl = Q_TEMPLATES[fam][int(rng.integers(2))]
    o = objs[int(rng.integers(len(objs)))]
    if fam == "color":
        ref = (f"the {o['shape']}" if _unique(objs, o, ["shape"]) else
               f"the {o['size']} {o['shape']}" if _unique(objs, o, ["size", "shape"]) else
               f"the {o['shape']} {WHERE[o['pos']]}")
        return tpl.format(ref=ref), o["color"]
    if fam == "shape":
        ref = (f"the {o['color']} object" if _unique(objs, o, ["color"]) else
               f"the {o['size']} {o['color']} object" if _unique(objs, o, ["size", "color"]) else
               f"the object {WHERE[o['pos']]}")
        return tpl.format(ref=ref), o["shape"]
    if fam == "count":
        mode = int(rng.integers(3))
        if mode == 0:
            shape = SHAPES[rng.integers(6)] if rng.random() < 0.3 else o["shape"]
            return tpl.format(what=PLURAL[shape]), str(sum(x["shape"] == shape for x in objs))
        if mode == 1:
            color = COLORS[rng.integers(8)] if rng.random() < 0.3 else o["color"]
            return tpl.format(what=f"{color} objects"), str(sum(x["color"] == color for x in objs))
        return tpl.format(what="objects"), str(len(objs))
    if fam == "exist":
        color, shape = o["color"], o["shape"]
        if rng.random() < 0.5:  # ask about a random (colour, shape), usually absent
            color, shape = COLORS[rng.integers(8)], SHAPES[rng.integers(6)]
        present = any(x["color"] == color and x["shape"] == shape for x in objs)
        return tpl.format(color=color, shape=shape), "yes" if present else "no"
    if fam == "position":
        unique = _unique(objs, o, ["color", "shape"])
        return (tpl.format(ref=f"the {o['color']} {o['shape']}"), o["pos"]) if unique else None
    # relation: "what is left of the red circle?" -> the shape of the only object there
    cands = []
    for a in objs:
        if not _unique(objs, a, ["color", "shape"]):
            continue
        for rel, test in RELATIONS.items():
            hits = [b for b in objs if b is not a and test(_XY[b["pos"]], _XY[a["pos"]])]
            if len(hits) == 1:
                cands.append((rel, a, hits[0]))
    if not cands:
        return None
    rel, a, b = cands[int(rng.integers(len(cands)))]
    return tpl.format(rel=rel, ref=f"the {a['color']} {a['shape']}"), b["shape"]


# --------------------------------------------------------- 2. Official formats: one loader for every dataset
def load_records(dataset: str, split: str, data_root: Optional[str] = None, *, seed: int = 0,
                 image_size: int = 64, num_shots: Optional[int] = None, subset: Optional[str] = None,
                 limit: Optional[int] = None, world_seed: int = 0, split_sizes: Optional[dict] = None,
                 shapes_split: str = "checker") -> list[dict]:
    """Records of `dataset` / `split` ("train" | "val" | "test"). shapes_*: ShapesWorld(world_seed,
    image_size, split_sizes) (not `seed`); real: the official files under data_root or data_root/<dataset>.
    num_shots: k per class drawn with `seed` (val: min(k, 4)), as CoOp for real datasets. subset "base" |
    "new" | "all": the first ceil(K/2) labels are base, re-indexed within the subset, after the k-shot draw
    (CoCoOp). limit: the first N records. shapes_split (shapes_cls): "checker" (see ShapesWorld) or
    "shape" (base = circles, squares, triangles: every new class name holds a word no base class has)."""
    for what, value, choices in (("dataset", dataset, DATASETS), ("split", split, ("train", "val", "test")),
                                 ("class subset", subset, (None, "all", "base", "new")),
                                 ("shapes_split", shapes_split, ("checker", "shape"))):
        if value not in choices:
            raise DataError(f"unknown {what} {value!r}; choose from {', '.join(filter(None, choices))}")
    if limit is not None and limit < 1:
        raise DataError(f"{dataset}/{split}: no records (limit={limit}; the first N records need N >= 1)")
    if dataset.startswith("shapes_"):
        world = ShapesWorld(seed=world_seed, image_size=image_size,
                            **({"split_sizes": split_sizes} if split_sizes else {}))
        task = dataset[len("shapes_"):]
        recs = {"vqa": world.vqa, "caption": world.captions, "cls": world.classification}[task](split)
    else:
        recs = _load_real(dataset, split, data_root)
    if recs and recs[0]["task"] == "cls":
        if num_shots and dataset == "shapes_cls":
            recs = _few_shot(recs, num_shots if split == "train" else min(num_shots, 4), seed)
        elif num_shots:
            recs = _coop_few_shot(dataset, split, recs, num_shots, seed, data_root)
        if dataset == "shapes_cls" and shapes_split == "shape":  # base: the first three shapes
            names = sorted(classnames_of(recs), key=lambda n: (n.split()[1] not in SHAPES[:3], n))
            recs = [dict(r, label=names.index(r["classname"]), meta=dict(r["meta"], classnames=names))
                    for r in recs]
        if subset in ("base", "new"):
            names = classnames_of(recs)
            m = math.ceil(len(names) / 2)
            lo, hi = (0, m) if subset == "base" else (m, len(names))
            recs = [dict(r, label=r["label"] - lo, meta=dict(r["meta"], classnames=names[lo:hi]))
                    for r in recs if lo <= r["label"] < hi]
    if limit is not None:
        recs = recs[:limit]
    if not recs:
        why = (f", subset={subset}" if subset else "") + (f", limit={limit}" if limit is not None else "")
        raise DataError(f"{dataset}/{split}: no records (empty split{why})")
    return recs


def _few_shot(recs: list[dict], k: int, seed: int) -> list[dict]:
    """k records per label, sampled with `seed` (all of them when a class has fewer)."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        by_label.setdefault(r["label"], []).append(i)
    keep = []
    for label in sorted(by_label):
        idx = by_label[label]
        keep += idx if len(idx) <= k else sorted(rng.choice(idx, k, replace=False).tolist())
    return [recs[i] for i in sorted(keep)]


def _coop_few_shot(dataset: str, split: str, recs: list[dict], k: int, seed: int, data_root) -> list[dict]:
    """CoOp's few shots as Dassl draws them: `random` seeded with the run seed, k per label from train, then
    min(k, 4) per label from val (the val draw replays the train draw first), in CoOp's record order."""
    if split == "test":
        raise DataError(f"{dataset}: num_shots samples train and val; CoOp evaluates on the whole test split")
    rng = random.Random(seed)
    if split == "val":
        _dassl_draw(_load_real(dataset, "train", data_root), k, rng)
    return _dassl_draw(recs, k if split == "train" else min(k, 4), rng)


def _dassl_draw(items: list[dict], k: int, rng: random.Random) -> list[dict]:
    """Dassl's generate_fewshot_dataset: per label (in order of appearance) random.sample(group, k) or all."""
    by_label: dict[int, list[dict]] = {}
    for r in items:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for group in by_label.values():
        out += rng.sample(group, k) if len(group) >= k else group
    return out


def caption_pairs(records: Sequence[dict]) -> list[dict]:
    """Captioning training data: one record per (image, caption), id "<id>#<k>", the caption under "caption"
    (evaluation uses the records themselves: one per image, all references)."""
    return [dict(r, id=f"{r['id']}#{k}", caption=c) for r in records for k, c in enumerate(r["captions"])]


def classnames_of(records: Sequence[dict]) -> list[str]:
    """Class names ordered by label (of the whole dataset / subset, even for a few-shot selection)."""
    return list(records[0]["meta"]["classnames"])


def load_image(record: dict, image_size: Optional[int] = None) -> Image.Image:
    """PIL RGB image of a record (synthetic: rendered at image_size or the record's size); a missing or
    corrupt file raises UnreadableImage (extract_features counts them), not DataError."""
    if record.get("image_id") is None:
        raise DataError(f"record {record['id']} has no image (text-only question)")
    if record.get("image_path") is None:
        meta = record["meta"]
        return ShapesWorld(seed=meta["seed"]).render(meta["scene"], image_size or meta["image_size"])
    try:
        with Image.open(record["image_path"]) as im:
            return im.convert("RGB")
    except Exception as e:  # missing, truncated, not an image
        raise UnreadableImage(f"{record['image_path']}: {type(e).__name__}") from None


# Real datasets, official formats. (folder under data_root, main file, image folder, where to get it)
_VQA_URL = ("https://visualqa.org/download.html (questions+annotations) and "
            "https://cocodataset.org/#download (2014 images)")
_KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
_COOP_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
_LETTERS = "ABCDE"  # ScienceQA options (2 to 5 choices)
_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_REAL = {
    "vqav2": ("vqav2", None, None, _VQA_URL),
    "gqa": ("gqa", None, "images", "https://cs.stanford.edu/people/dorarad/gqa/download.html"),
    "scienceqa": ("scienceqa", "problems.json", "images", "https://github.com/lupantech/ScienceQA (data/)"),
    "coco": ("coco", "dataset_coco.json", None, f"{_KARPATHY_URL} and https://cocodataset.org/#download"),
    "flickr30k": ("flickr30k", "dataset_flickr30k.json", "flickr30k-images",
                  f"{_KARPATHY_URL} and https://shannon.cs.illinois.edu/DenotationGraph/"),
    "imagenet": ("imagenet", None, "images", _COOP_URL),
    "caltech101": ("caltech-101", "split_zhou_Caltech101.json", "101_ObjectCategories", _COOP_URL),
    "oxford_pets": ("oxford_pets", "split_zhou_OxfordPets.json", "images", _COOP_URL),
    "stanford_cars": ("stanford_cars", "split_zhou_StanfordCars.json", "", _COOP_URL),
    "oxford_flowers": ("oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg", _COOP_URL),
    "food101": ("food-101", "split_zhou_Food101.json", "images", _COOP_URL),
    "fgvc_aircraft": ("fgvc_aircraft", None, "images", _COOP_URL),
    "sun397": ("sun397", "split_zhou_SUN397.json", "SUN397", _COOP_URL),
    "dtd": ("dtd", "split_zhou_DescribableTextures.json", "images", _COOP_URL),
    "eurosat": ("eurosat", "split_zhou_EuroSAT.json", "2750", _COOP_URL),
    "ucf101": ("ucf101", "split_zhou_UCF101.json", "UCF-101-midframes", _COOP_URL),
}


def _read_json(path: Path, dataset: str):
    if not path.is_file():
        raise DataError(f"missing file {path}; download it from {_REAL[dataset][3]} (see README 'Data')")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed JSON in {path}: {e}") from None


def _get(obj, key, path: Path, where: str = ""):
    """obj[key], or DataError naming the file and the key."""
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError):
        raise DataError(f"malformed {path.name}: missing key {where}{key!r} (file {path})") from None


def _need_dir(d: Path, dataset: str) -> Path:
    if not d.is_dir():
        raise DataError(f"missing image folder {d}; download the images from {_REAL[dataset][3]}")
    return d


def _load_real(dataset: str, split: str, data_root: Optional[str]) -> list[dict]:
    url = _REAL[dataset][3]
    if not data_root:
        raise DataError(f"{dataset} needs --data_root (the folder holding its files); get it from {url}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; get {dataset} from {url}")
    for sub in (_REAL[dataset][0], dataset):  # data_root may be the parent of the dataset's folder
        if (root / sub).is_dir():
            root = root / sub
            break
    root = root.resolve()
    load = {"vqav2": _load_vqav2, "gqa": _load_gqa, "scienceqa": _load_scienceqa, "coco": _load_karpathy,
            "flickr30k": _load_karpathy}.get(dataset, _load_cls)
    try:
        return load(dataset, root, split)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # an entry of another shape
        raise DataError(f"{dataset}/{split}: a malformed entry in the files under {root} "
                        f"({type(e).__name__}: {e})") from None


def _load_vqav2(dataset: str, root: Path, split: str) -> list[dict]:
    """VQAv2 official json + COCO 2014 images. With <root>/dataset_coco.json the splits are Karpathy's images
    (questions of train2014 and val2014); without it train = train2014, val = test = val2014."""
    kar_path = root / "dataset_coco.json"
    if kar_path.is_file():
        kar = _read_json(kar_path, "coco")
        keep = {int(_get(im, "cocoid", kar_path, "images[].")) for im in _get(kar, "images", kar_path)
                if _get(im, "split", kar_path, "images[].") in _KARPATHY_SPLITS[split]}
        coco_splits = ["train2014", "val2014"]
    else:
        keep, coco_splits = None, ["train2014" if split == "train" else "val2014"]
        if split == "test":
            print("note: vqav2 has no public test answers; split 'test' = val2014 "
                  "(put dataset_coco.json in the vqav2 folder for the Karpathy test split)", file=sys.stderr)
    out = []
    for cs in coco_splits:
        qp, ap = root / f"v2_OpenEnded_mscoco_{cs}_questions.json", root / f"v2_mscoco_{cs}_annotations.json"
        questions = _get(_read_json(qp, dataset), "questions", qp)
        anns = _get(_read_json(ap, dataset), "annotations", ap)
        by_qid = {_get(a, "question_id", ap, "annotations[]."): a for a in anns}
        img_dir = _need_dir(root / cs, dataset)
        for q in questions:
            qid = _get(q, "question_id", qp, "questions[].")
            iid = int(_get(q, "image_id", qp, "questions[]."))
            if keep is not None and iid not in keep:
                continue
            a = by_qid.get(qid)
            if a is None:
                raise DataError(f"malformed {ap.name}: no annotation for question_id {qid} (file {ap})")
            answers = [_get(x, "answer", ap, "annotations[].answers[].")
                       for x in _get(a, "answers", ap, "annotations[].")]
            if not answers:
                raise DataError(f"malformed {ap.name}: question_id {qid} has no answers (file {ap})")
            out.append({"id": str(qid), "image_id": str(iid), "task": "vqa",
                        "image_path": str(img_dir / f"COCO_{cs}_{iid:012d}.jpg"),
                        "question": _get(q, "question", qp, "questions[]."), "answers": answers,
                        "answer": _get(a, "multiple_choice_answer", ap, "annotations[]."),
                        "answer_type": _get(a, "answer_type", ap, "annotations[]."),
                        "question_type": _get(a, "question_type", ap, "annotations[]."),
                        "meta": {"coco_split": cs}})
    return out


def _load_gqa(dataset: str, root: Path, split: str) -> list[dict]:
    """GQA balanced questions ({qid: {imageId, question, answer, types, ...}}); test = testdev.
    The single answer is repeated 10 times, so vqa_score equals GQA's exact-match accuracy."""
    name = {"train": "train", "val": "val", "test": "testdev"}[split] + "_balanced_questions.json"
    path = root / "questions1.2" / name if (root / "questions1.2" / name).is_file() else root / name
    data = _read_json(path, dataset)
    if not isinstance(data, dict):
        raise DataError(f"malformed {path.name}: expected an object {{question_id: question}} (file {path})")
    img_dir = _need_dir(root / "images", dataset)
    out = []
    for qid, q in data.items():
        ans, iid = _get(q, "answer", path, f"{qid}."), str(_get(q, "imageId", path, f"{qid}."))
        types = q.get("types", {})
        answer_type = "yes/no" if ans in ("yes", "no") else "number" if ans.isdigit() else "other"
        out.append({"id": str(qid), "image_id": iid, "image_path": str(img_dir / f"{iid}.jpg"), "task": "vqa",
                    "question": _get(q, "question", path, f"{qid}."), "answers": [ans] * 10, "answer": ans,
                    "answer_type": answer_type, "question_type": types.get("detailed", "gqa"),
                    "meta": {"types": types, "full_answer": q.get("fullAnswer")}})
    return out


def _load_scienceqa(dataset: str, root: Path, split: str) -> list[dict]:
    """ScienceQA as released: problems.json ({pid: {question, choices, answer (index), hint, image, ...}}),
    pid_splits.json, images/<split>/<pid>/image.png, captions.json if present (MemVP's prompt adds them)."""
    path, splits_path, captions = root / "problems.json", root / "pid_splits.json", root / "captions.json"
    problems = _read_json(path, dataset)
    pids = _get(_read_json(splits_path, dataset), split, splits_path)
    if captions.is_file():
        captions = _get(_read_json(captions, dataset), "captions", captions)
    else:
        print(f"note: no {captions}: the prompts have no image captions, which the official evaluation adds "
              "to the context, so the scores are not comparable with MemVP's", file=sys.stderr)
        captions = {}
    if any(_get(problems, pid, path).get("image") for pid in pids):
        _need_dir(root / "images" / split, dataset)
    out = []
    for pid in pids:
        p = problems[pid]
        answer, hint, choices = _get(p, "answer", path, f"{pid}."), p.get("hint") or "", p.get("choices")
        if not (isinstance(answer, int) and isinstance(choices, list) and 0 <= answer < len(choices) <= 5
                and re.fullmatch(r"grade\d+", str(p.get("grade")))):
            raise DataError(f"malformed {path.name}: problem {pid}: answer {answer!r} of {choices!r}, grade "
                            f"{p.get('grade')!r} (expected an index into 2-5 choices, grade<N>; file {path})")
        image = str(root / "images" / split / pid / p["image"]) if p.get("image") else None
        meta = {k: p.get(k) for k in ("subject", "topic", "category", "skill", "lecture", "solution")}
        meta.update(grade=p["grade"], has_context=bool(hint), has_image=bool(image),
                    caption=captions.get(pid, ""))
        out.append({"id": pid, "image_id": pid if image else None, "image_path": image, "task": "mcq",
                    "question": _get(p, "question", path, f"{pid}."), "context": hint, "choices": choices,
                    "answer": _LETTERS[answer], "answer_index": answer, "meta": meta})
    return out


def scienceqa_prompt(record: dict, use_caption: bool = True) -> tuple[str, str]:
    """(prompt, target) in MemVP's ScienceQA format (the official code's "QCM-A"): "Question: ...\n
    Context: <hint> [<caption>] or N/A\nOptions: (A) ... (B) ...\nResponse:" and "The answer is A."
    At test time the model continues prompt + " The answer is" and the first capital letter is read."""
    context = " ".join([record["context"], record["meta"]["caption"] if use_caption else ""]).strip() or "N/A"
    options = " ".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(record["choices"]))
    prompt = f"Question: {record['question']}\nContext: {context}\nOptions: {options}\nResponse:"
    return prompt.replace("  ", " "), f"The answer is {record['answer']}."


def _load_karpathy(dataset: str, root: Path, split: str) -> list[dict]:
    """Karpathy caption splits: images[].split/filename/(filepath)/sentences[].raw; train += restval."""
    path = root / _REAL[dataset][1]
    images = _get(_read_json(path, dataset), "images", path)
    out = []
    for im in images:
        if _get(im, "split", path, "images[].") not in _KARPATHY_SPLITS[split]:
            continue
        fname = _get(im, "filename", path, "images[].")
        folder = _get(im, "filepath", path, "images[].") if dataset == "coco" else _REAL[dataset][2]
        iid = str(im["cocoid"]) if "cocoid" in im else Path(fname).stem
        caps = [_get(s, "raw", path, "images[].sentences[].").strip()
                for s in _get(im, "sentences", path, "images[].")]
        if not caps:
            raise DataError(f"malformed {path.name}: image {iid} has no sentences (file {path})")
        out.append({"id": iid, "image_id": iid, "image_path": str(root / folder / fname), "task": "caption",
                    "captions": caps, "meta": {}})
    for d in sorted({str(Path(r["image_path"]).parent) for r in out}):
        _need_dir(Path(d), dataset)
    return out


def _load_cls(dataset: str, root: Path, split: str) -> list[dict]:
    """CoOp split_zhou_<Name>.json ({train,val,test}: [[relative_path, label, classname]]),
    FGVC-Aircraft's own txt files, else ImageNet-style folders images/<split>/<class>/*."""
    _, fname, img_sub, _ = _REAL[dataset]
    img_dir = root / img_sub
    if fname and (root / fname).is_file():
        path = root / fname
        data = _read_json(path, dataset)
        names: dict[int, str] = {}
        for s in ("train", "val", "test"):
            for i, it in enumerate(_get(data, s, path)):
                if not (isinstance(it, list) and len(it) == 3):
                    raise DataError(f"malformed {path.name}: {s}[{i}] should be "
                                    f"[relative_path, label, classname] (file {path})")
                lab, name = int(it[1]), it[2]
                if names.setdefault(lab, (name, f"{s}[{i}]"))[0] != name:
                    raise DataError(f"malformed {path.name}: label {lab} is '{names[lab][0]}' in "
                                    f"{names[lab][1]} but '{name}' in {s}[{i}] (file {path})")
        items = [(img_dir / p, int(lab)) for p, lab, _ in data[split]]
        if sorted(names) != list(range(len(names))):
            raise DataError(f"malformed {path.name}: labels are not 0..K-1 (file {path})")
        classnames = [names[i][0] for i in range(len(names))]
    elif dataset == "fgvc_aircraft" and (root / "variants.txt").is_file():
        classnames = [ln.strip() for ln in (root / "variants.txt").read_text().splitlines() if ln.strip()]
        index = {c: i for i, c in enumerate(classnames)}
        lst = root / f"images_variant_{split}.txt"
        if not lst.is_file():
            raise DataError(f"missing file {lst}; download FGVC-Aircraft as in {_COOP_URL}")
        items = []
        for line in lst.read_text().splitlines():
            if line.strip():
                im, var = line.strip().split(" ", 1)
                if var not in index:
                    raise DataError(f"malformed {lst.name}: variant {var!r} not in variants.txt (file {lst})")
                items.append((img_dir / f"{im}.jpg", index[var]))
    else:  # ImageNet-style folders (CoOp's ImageNet layout; test falls back to val)
        base = root / "images" if (root / "images").is_dir() else root
        sdir = base / split
        if split == "test" and not sdir.is_dir():
            sdir = base / "val"
        if not sdir.is_dir():
            want = f"{fname} or " if fname else ""
            raise DataError(f"{dataset}: found neither {want}the image folder {sdir} under {root}; "
                            f"lay it out as in {_COOP_URL}")
        folders = sorted(d.name for d in sdir.iterdir() if d.is_dir())
        txt = root / "classnames.txt"  # "<folder> <class name>" per line
        lines = txt.read_text().splitlines() if txt.is_file() else []
        mapping = dict(p for p in (line.strip().split(" ", 1) for line in lines) if len(p) == 2)
        classnames = [mapping.get(f, f.replace("_", " ")) for f in folders]
        img_dir = sdir
        items = [(p, lab) for lab, f in enumerate(folders) for p in sorted((sdir / f).iterdir())
                 if p.is_file()]
    _need_dir(img_dir, dataset)
    return [{"id": str(p.relative_to(root)), "image_id": str(p.relative_to(root)), "image_path": str(p),
             "task": "cls", "label": lab, "classname": classnames[lab], "meta": {"classnames": classnames}}
            for p, lab in items]


# ---------------- 3. Frozen visual features, cached (raw pixels, the synthetic world's tiny CNN, CLIP / ViT)
def extract_features(records: Sequence[dict], encoder: str = "patches", *,
                     dataset: str = "", split: str = "", train: Optional[bool] = None,
                     cache_dir: Optional[str] = None, layer: int = -2, image_size: Optional[int] = None,
                     patch_size: int = 8, keep_cls: bool = False, pooled: bool = False,
                     device: str = "cpu", batch_size: int = 64, max_bad_fraction: float = 0.01,
                     model=None, preprocess: Optional[str] = None, progress: bool = True):
    """-> (feats, rows, missing): feats (num_images, n, d) float16, memory-mapped from the cache; rows
    (len(records),) each record's row of feats; missing (len(records),) bool: image unreadable (zeros).
    encoder "tiny-cnn": the synthetic world's frozen CNN, 3 x 3 grid tokens (n = 9, d = TINY_CNN_WIDTH) or,
    pooled, its pooled vector. "patches": raw-pixel patch tokens in [-1, 1]. Else a Hugging Face CLIP / ViT
    id or folder (or `model`, a built tower or full CLIP, cached as `encoder`): hidden_states[layer] grid
    tokens (CLS dropped unless keep_cls) or, pooled, the projected embedding; image_size default 224.
    preprocess None: the tower's image processor (an in-memory `model`: resize, CLIP mean / std);
    "imagenet-resize": bicubic resize, no crop, ImageNet mean / std (official MemVP code). Unreadable
    images: above max_bad_fraction, a DataError; else reported, worded for training (`train`, default
    split == "train": drop_missing drops them) or evaluation (kept, as the official evaluation). Records
    without an image share one zero row. Cached in cache_dir (default cache_dir("features")) by every
    setting; rank 0 extracts, all ranks load."""
    model, image_size, settings = _encoder_settings(encoder, model, image_size, patch_size, layer, keep_cls,
                                                    preprocess)
    first: dict = {}  # image_id -> row; None (no image) gets a row too, which stays zero
    rows = torch.tensor([first.setdefault(r.get("image_id"), len(first)) for r in records], dtype=torch.long)
    uniq = [None] * len(first)
    for r, i in zip(records, rows.tolist()):
        uniq[i] = uniq[i] or (r if r.get("image_id") is not None else None)
    # image files: by path, size and time too, so that another --data_root or a changed file re-extracts
    ids = _digest([r and (r["image_id"] if r.get("image_path") is None else [r["image_id"], *_file_stamp(r)])
                   for r in uniq])
    key = {"version": DATA_VERSION, "dataset": dataset, "split": split, "encoder": encoder, "pooled": pooled,
           "image_size": image_size, "settings": settings, "preprocess": preprocess, "ids": ids}
    name = f"{dataset or 'data'}-{split or 'all'}-{re.sub(r'[^A-Za-z0-9._-]+', '_', encoder)[-48:]}"
    path = Path(cache_dir or _cache_folder("features")) / f"{name}-{_digest(key)[:12]}.npy"
    rank, world = _rank_world()
    error = None
    if rank == 0 and _cached(path, key) is None:
        try:
            encode = _encoder(encoder, model, layer=layer, image_size=image_size, patch_size=patch_size,
                              keep_cls=keep_cls, pooled=pooled, device=device, preprocess=preprocess)
            _extract_to(path, key, uniq, encode, image_size, batch_size, max_bad_fraction, progress)
        except Exception as e:
            error = e  # raised after the barrier, so the other ranks do not wait forever
    if world > 1:
        torch.distributed.barrier()
    if error is not None:
        raise error
    bad = _cached(path, key)
    if bad is None:
        raise DataError(f"feature cache {path} is missing after rank 0's extraction (see rank 0's error; "
                        "cache_dir must be on a file system shared by all ranks)")
    missing = torch.isin(rows, torch.tensor(sorted(bad), dtype=torch.long))
    if bad and rank == 0:
        train = split == "train" if train is None else train
        keep = "" if train else (f"; their {int(missing.sum())} questions are kept with zero image features, "
                                 "as the official evaluation counts them")
        n_img = sum(r is not None for r in uniq)
        print(f"warning: {dataset}/{split}: {len(bad)} of {n_img} images unreadable "
              f"(first: {', '.join(list(bad.values())[:3])}){keep}", file=sys.stderr)
    return torch.from_numpy(np.load(path, mmap_mode="c")), rows, missing  # copy-on-write: never written back


def _encoder_settings(encoder, model, image_size, patch_size, layer, keep_cls, preprocess):
    """-> (model, image_size, the settings in the cache key) of an encoder; bad combinations: DataError."""
    if preprocess not in (None, "imagenet-resize") or (preprocess and encoder in ("patches", "tiny-cnn")):
        raise DataError(f"preprocess {preprocess!r}: None or 'imagenet-resize', for Hugging Face towers only")
    if encoder == "tiny-cnn":
        model = model or tiny_cnn()
        if image_size not in (None, model.config["image_size"]):
            raise DataError(f"tiny-cnn reads images at {model.config['image_size']} px; "
                            "leave image_size unset")
        return model, model.config["image_size"], _weights_digest(model)  # the features follow the weights
    image_size = image_size or 224
    if encoder == "patches" and image_size % patch_size:
        raise DataError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return model, image_size, patch_size if encoder == "patches" else [layer, keep_cls]


def drop_missing(records: Sequence[dict], rows: torch.Tensor, missing: torch.Tensor):
    """Training records whose image is unreadable, removed (the count is printed) -> (records, rows)."""
    keep = (~missing).nonzero().flatten()
    if len(keep) < len(records):
        print(f"dropped {len(records) - len(keep)} of {len(records)} training records whose image is "
              "unreadable", file=sys.stderr)
    return [records[i] for i in keep.tolist()], rows[keep]


def _file_stamp(record: dict) -> list:
    with contextlib.suppress(OSError):
        st = os.stat(record["image_path"])
        return [str(record["image_path"]), st.st_size, st.st_mtime_ns]
    return [str(record["image_path"])]


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _weights_digest(model: torch.nn.Module) -> str:
    sha = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def _cached(path: Path, key: dict) -> Optional[dict]:
    """{row: why} of the unreadable images of a COMPLETE cache file with this key, else None."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        np.load(path, mmap_mode="r")  # the header must parse
    except Exception:
        return None
    return {int(i): why for i, why in meta["unreadable"]} if meta.get("key") == key else None


def _extract_to(path: Path, key: dict, uniq: list, encode: Callable, image_size: int,
                batch_size: int, max_bad_fraction: float, progress: bool) -> None:
    from tqdm.auto import tqdm
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    bad, n_img = [], sum(r is not None for r in uniq)
    shape = encode([Image.new("RGB", (image_size, image_size))]).shape[1:]                # (n, d)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(uniq), *shape))  # zeros
    try:
        for start in tqdm(range(0, len(uniq), batch_size), disable=not progress,
                          desc=f"features {key['dataset']}/{key['split']} ({key['encoder']})"):
            images = {}
            for i, r in enumerate(uniq[start:start + batch_size], start):
                try:
                    images[i] = load_image(r, image_size) if r is not None else None
                except UnreadableImage as e:
                    bad.append((i, str(e)))
            ok = [i for i, im in images.items() if im is not None]
            if ok:
                out[ok] = encode([images[i] for i in ok]).astype(np.float16)             # (B, n, d)
        if len(bad) > max_bad_fraction * n_img:
            raise DataError(f"{key['dataset']}/{key['split']}: {len(bad)} of {n_img} images are unreadable, "
                            f"more than {max_bad_fraction:.0%} (first: {', '.join(b for _, b in bad[:3])}); "
                            "check the image folder (re-download or re-extract)")
        out.flush()
        del out
        tmp.with_name(tmp.name + ".json").write_text(json.dumps({"key": key, "unreadable": bad}))
        os.replace(tmp.with_name(tmp.name + ".json"), path.with_suffix(".json"))
        os.replace(tmp, path)  # the .npy appears last and complete
    finally:
        tmp.unlink(missing_ok=True)


def _encoder(encoder: str, model, *, layer, image_size, patch_size, keep_cls, pooled, device,
             preprocess) -> Callable:
    """A function list[PIL image] -> (B, n, d) float array."""
    if encoder == "patches":
        return lambda images: np.stack([_patches(im, image_size, patch_size) for im in images])
    if encoder == "tiny-cnn":
        return functools.partial(_tiny_cnn_encode, model, pooled)
    return _hf_encoder(encoder, model, layer=layer, image_size=image_size, keep_cls=keep_cls, pooled=pooled,
                       device=device, preprocess=preprocess)


def _patches(img: Image.Image, image_size: int, patch_size: int) -> np.ndarray:
    """Raw-pixel patch tokens (Fuyu-style) (n, 3 * p * p) in [-1, 1], patches in row-major order."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    a = np.asarray(img, np.float32) / 127.5 - 1.0
    g, p = image_size // patch_size, patch_size
    return a.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)


# DEVIATION (offline only): the papers' frozen towers (CLIP, a ViT) stand in as "tiny-cnn", a small CNN
# pre-trained to name the objects of world PRETRAIN_WORLD (recipe: scripts/make_stand_ins.py), then frozen.
TINY_CNN_WIDTH = 96       # C: width of the grid tokens and of the pooled vector
TINY_CNN_IMAGE_SIZE = 48  # every image is read at 48 x 48: one grid cell = 16 x 16 pixels


class TinyCNN(torch.nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> grid tokens (B, 9, C), pooled vector (B, C), each divided by its
    RMS on the pre-training images (unit scale). Its folder: config.json + model.safetensors."""

    def __init__(self, width: int = TINY_CNN_WIDTH, image_size: int = TINY_CNN_IMAGE_SIZE):
        super().__init__()
        nn = torch.nn
        self.config = {"width": width, "image_size": image_size}
        self.conv = nn.Sequential(  # 4 x 4 patches -> 12 x 12 map -> max over 4 x 4 blocks -> 3 x 3 grid
            nn.Conv2d(3, 32, 4, stride=4), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3))
        self.pool = nn.Linear(9 * width, width)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, px):
        grid = self.conv(px).flatten(2).transpose(1, 2)                          # (B, 9, C)
        return grid / self.scale[0], self.pool(grid.flatten(1)) / self.scale[1]  # (B, 9, C), (B, C)

    @classmethod
    def from_pretrained(cls, folder) -> "TinyCNN":
        """The frozen model of a folder written by make_stand_ins.save_tiny_cnn (the caller's RNG is kept)."""
        from safetensors.torch import load_file
        with torch.random.fork_rng(devices=[]):  # the init that the loaded weights replace draws numbers
            model = cls(**json.loads(Path(folder, "config.json").read_text()))
        model.load_state_dict(load_file(Path(folder, "model.safetensors")))
        return model.eval().requires_grad_(False)


def tiny_cnn() -> TinyCNN:
    """The frozen pre-trained "tiny-cnn": the folder stand_ins/tiny-cnn (scripts/make_stand_ins.py)."""
    return TinyCNN.from_pretrained(model_path("stand_ins/tiny-cnn", what="vision encoder tiny-cnn"))


def tiny_cnn_pixels(images: list, size: int = TINY_CNN_IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [0, 1], the tiny CNN's input."""
    images = [im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR) for im in images]
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])


@torch.no_grad()
def _tiny_cnn_encode(model: TinyCNN, pooled: bool, images: list) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same features whatever the caller's thread count
    try:
        grid, vec = model(tiny_cnn_pixels(images, model.config["image_size"]))
    finally:
        torch.set_num_threads(threads)
    return (vec[:, None] if pooled else grid).numpy()                                # (B, 1, C) or (B, 9, C)


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*


def _hf_encoder(encoder, model, *, layer, image_size, keep_cls, pooled, device, preprocess):
    """A function list[PIL image] -> (B, n, d) float array from a Hugging Face vision tower."""
    import transformers as tf
    image_processor = None  # without one: resize, the mean / std of `preprocess` (an in-memory model: CLIP's)
    if model is None:
        try:
            cfg = tf.AutoConfig.from_pretrained(encoder)
        except Exception as e:
            raise DataError(f"cannot load vision encoder {encoder!r} (a Hugging Face id or a local folder "
                            f"with config.json): {_first_line(e)}") from None
        clip = cfg.model_type in ("clip", "clip_vision_model")
        model = (tf.CLIPVisionModelWithProjection if pooled else tf.CLIPVisionModel) if clip else tf.AutoModel
        verbosity = tf.logging.get_verbosity()
        tf.logging.set_verbosity_error()  # a full CLIP folder: its text tower is not loaded, by design
        model = model.from_pretrained(encoder)
        tf.logging.set_verbosity(verbosity)
        if preprocess is None:
            try:  # the PIL backend: the original CLIP preprocessing, pixel for pixel
                image_processor = tf.AutoImageProcessor.from_pretrained(encoder, backend="pil")
            except Exception as e:
                raise UsageError(f"cannot load the image processor of vision encoder {encoder!r} "
                                 f"({_first_line(e)}); save the tower's image processor with it") from None
    full = hasattr(model, "get_image_features")  # a full CLIP / SigLIP model: its image side
    dev = torch.device(device)
    model = model.to(dev, torch.float16 if dev.type == "cuda" else torch.float32).eval()
    patch = getattr(getattr(model.config, "vision_config", model.config), "patch_size", None)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if preprocess == "imagenet-resize" else (CLIP_MEAN, CLIP_STD)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    @torch.no_grad()
    def encode(images):
        if image_processor is not None:
            px = image_processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            images = [im.resize((image_size, image_size), Image.BICUBIC) for im in images]
            px = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255.0) for im in images])
            px = (px.permute(0, 3, 1, 2) - mean) / std
        px = px.to(dev, next(model.parameters()).dtype)
        if full:
            out = model.get_image_features(pixel_values=px, output_hidden_states=not pooled)
            emb = out if torch.is_tensor(out) else out.pooler_output  # projected in transformers >= 5
        else:
            out = model(pixel_values=px, output_hidden_states=not pooled)
            emb = out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output
        if pooled:
            return emb[:, None].float().cpu().numpy()                                  # (B, 1, d)
        hs = out.hidden_states[layer]                                                  # (B, extra + grid, d)
        grid = (px.shape[-2] // patch) * (px.shape[-1] // patch) if patch else hs.shape[1]
        hs = hs if keep_cls else hs[:, hs.shape[1] - grid:]                          # CLS / registers dropped
        return hs.float().cpu().numpy()

    return encode


# --------------------------------------------------------------------------------------- 4. Official metrics
# Official VQA normalisation (GT-Vision-Lab/VQA vqaEval.py), re-implemented.
_NUMBERS = "zero one two three four five six seven eight nine ten".split()
_MANUAL_MAP = {**{w: str(i) for i, w in enumerate(_NUMBERS)}, "none": "0"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = list(';/[]"{}()=+\\_-><@`,?!')  # in the official order
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official look-behind typo, kept
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_CANONICAL = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
              "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
              "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at "
              "shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
              "someone'd someone'd've someone'll someone's something'd something'd've something'll "
              "that's there'd there'd've there're there's they'd they'd've they'll they're they've "
              "'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
              "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
              "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_keys(c: str) -> list[str]:
    """Official keys: one apostrophe -> drop it; several -> drop any single one of them."""
    pos = [i for i, ch in enumerate(c) if ch == "'"]
    return [c[:i] + c[i + 1:] for i in pos] if len(pos) > 1 else [c.replace("'", "")]


_CONTRACTIONS = {k: c for c in _CANONICAL for k in _contraction_keys(c)}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic, as in the official table


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        drop = (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None
        out = out.replace(p, "" if drop else " ")
    return _PERIOD_STRIP.sub("", out)


def _clean(answer: str) -> str:
    """What the official evaluation does to every answer before comparing."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(ans: str) -> str:
    """Official VQA answer normalisation (processPunctuation then processDigitArticle: number words, articles,
    contractions): "Two" -> "2", "yes." -> "yes", "the dog" -> "dog", "dont" -> "don't"."""
    words = [_MANUAL_MAP.get(w, w) for w in _process_punctuation(_clean(ans)).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _loo(k: int, n: int = 10) -> float:
    """Mean over the n leave-one-out subsets of min(matches/3, 1) when k of n answers match."""
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n if n else 0.0


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction (_loo: 1, 2, 3, >=4 matches -> 0.3, 0.6, 0.9, 1.0), as
    vqaEval.py (2021 fix): answers stripped, normalised only if the annotators disagree, else exact match."""
    pred, gts = _clean(pred), [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    return _loo(sum(a == pred for a in gts), len(gts))


def vqa_accuracy(preds: Sequence[str], records: Sequence[dict]) -> dict:
    """{"overall": %, "yes/no": %, "number": %, "other": %} (the types present), 2 decimals as vqaEval.py."""
    if len(preds) != len(records):
        raise ValueError(f"vqa_accuracy: {len(preds)} predictions for {len(records)} records")
    scores = [vqa_score(p, r["answers"]) for p, r in zip(preds, records)]
    per: dict[str, list[float]] = {}
    for s, r in zip(scores, records):
        per.setdefault(r.get("answer_type", "other"), []).append(s)
    out = {"overall": round(100 * sum(scores) / max(len(scores), 1), 2)}
    out.update({t: round(100 * sum(per[t]) / len(per[t]), 2) for t in ("yes/no", "number", "other")
                if t in per})
    return out


_CAP_PUNCT = set("''`.?!,:;-()[]{}\"")


def _caption_tokens(text: str) -> list[str]:
    """Lower-cased tokens, clitics ("n't", "'s") split, punctuation tokens dropped."""
    # DEVIATION: COCO eval uses Stanford CoreNLP's PTBTokenizer (Java); this is a regex approximation.
    t = text.lower().replace("\n", " ")
    t = re.sub(r"(\w)n't\b", r"\1 n't", t)
    t = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", t)
    toks = re.findall(r"n't|'\w+|\w+(?:[-./']\w+)*|\S", t)
    return [w for w in toks if not set(w) <= _CAP_PUNCT]


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _bleu(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption's bleu_scorer (option "closest" ref length)."""
    guess, correct, test_len, ref_len = [0] * n, [0] * n, 0, 0
    for h, rs in zip(hyps, refs):
        max_ref: Counter = Counter()
        for r in rs:
            for g, c in _ngrams(r, n).items():
                max_ref[g] = max(max_ref[g], c)
        test_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for k in range(n):
            guess[k] += max(len(h) - k, 0)
        for g, c in _ngrams(h, n).items():
            correct[len(g) - 1] += min(c, max_ref[g])
    tiny, small = 1e-15, 1e-9
    out, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    return [b * math.exp(1 - 1 / ratio) for b in out] if ratio < 1 else out


def _cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption's cider_scorer: tf-idf n-gram vectors (document frequencies from the
    references), clipped weights, Gaussian length penalty (sigma 6), mean over n = 1..4 and references x10."""
    crefs = [[_ngrams(r, n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in crefs:
        df.update(set(g for r in rs for g in r))
    log_n = math.log(float(len(crefs)))

    def vec(counts):
        v, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            length += tf if k == 1 else 0  # sic: the official code counts bigrams as "length"
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for h, rs in zip(hyps, crefs):
        vh, nh, lh = vec(_ngrams(h, n))
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(total / n / len(rs) * 10.0)
    return float(np.mean(scores))


def caption_metrics(preds: dict, refs: dict) -> dict:
    """preds {id: str}, refs {id: [str,...]} -> {"BLEU-1".."BLEU-4", "CIDEr"} (CIDEr-D), x100 as in papers,
    over the ids of `preds`, as the COCO caption evaluation (on lower-cased tokens without punctuation)."""
    missing = [k for k in preds if not refs.get(k)]
    if missing or not preds:
        raise ValueError(f"caption_metrics: no references for ids {missing[:5]}" if missing else
                         "caption_metrics: no predictions")
    hyps = [_caption_tokens(p) for p in preds.values()]
    rs = [[_caption_tokens(r) for r in refs[i]] for i in preds]
    out = {f"BLEU-{k + 1}": 100 * b for k, b in enumerate(_bleu(hyps, rs))}
    out["CIDEr"] = 100 * _cider_d(hyps, rs)
    return out


def scienceqa_accuracy(texts: Sequence[str], records: Sequence[dict]) -> dict:
    """Accuracy (percent, 2 decimals) in the columns of MemVP's Table 2 (average; NAT / SOC / LAN; TXT (hint),
    IMG (image), NO (neither); G1-6 / G7-12), as the official evaluation: the first capital letter [A-Z] of
    the text is the answer; none ("b" has none), or a letter beyond the problem's choices, is wrong."""
    if len(texts) != len(records):
        raise ValueError(f"scienceqa_accuracy: {len(texts)} predictions for {len(records)} records")
    groups = {"NAT": lambda m: m["subject"] == "natural science",
              "SOC": lambda m: m["subject"] == "social science",
              "LAN": lambda m: m["subject"] == "language science",
              "TXT": lambda m: m["has_context"], "IMG": lambda m: m["has_image"],
              "NO": lambda m: not (m["has_context"] or m["has_image"]),
              "G1-6": lambda m: int(m["grade"][5:]) <= 6, "G7-12": lambda m: int(m["grade"][5:]) > 6}
    right = [_chosen_index(text, r["choices"]) == r["answer_index"] for text, r in zip(texts, records)]
    out = {"average": round(100 * sum(right) / max(len(right), 1), 2)}
    for name, member in groups.items():
        hits = [ok for ok, r in zip(right, records) if member(r["meta"])]
        if hits:
            out[name] = round(100 * sum(hits) / len(hits), 2)
    return out


def _chosen_index(text: str, choices: Sequence[str]) -> int:
    """The official get_pred_idx: the index of the text's first capital letter among the options, else -1."""
    found = re.findall(r"[A-Z]", text)
    options = _LETTERS[:len(choices)]
    return options.index(found[0]) if found and found[0] in options else -1


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """percent"""
    preds, labels = list(map(int, preds)), list(map(int, labels))
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(labels)} labels")
    return 100.0 * sum(p == t for p, t in zip(preds, labels)) / len(labels)


def harmonic_mean(base: float, new: float) -> float:
    """2*base*new / (base + new) (0 when both are 0) -- the base-to-new 'H' column."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def answer_vocab(records: Sequence[dict], min_freq: int = 9) -> list[str]:
    """Classes of a VQA classifier head: the normalised answers that are the most common answer of >= min_freq
    training questions (3129 for VQAv2 train+val with 9), by frequency, then alphabetically, each as its most
    frequent raw form ("t-shirt", not "t shirt"): the official metric compares unanimous answers exactly."""
    counts = Counter(normalize_answer(r["answer"]) for r in records)
    keep = sorted((a for a, c in counts.items() if c >= min_freq), key=lambda a: (-counts[a], a))
    raw: dict[str, Counter] = {a: Counter() for a in keep}
    for r in records:
        for a in r["answers"]:
            a = _clean(a)
            raw.get(normalize_answer(a), Counter())[a] += 1
    return [min(raw[a].items(), key=lambda kv: (-kv[1], kv[0] != a, kv[0]))[0] if raw[a] else a for a in keep]


def vqa_soft_targets(record: dict, vocab: Sequence[str]) -> torch.Tensor:
    """(len(vocab),) BCE targets: the official leave-one-out score of each class among the record's answers
    (1, 2, 3, >=4 of 10 -> 0.3, 0.6, 0.9, 1), answers matched to answer_vocab's classes when normalised."""
    index = _class_index(tuple(vocab))
    target = torch.zeros(len(index))
    answers = [normalize_answer(a) for a in record["answers"]]
    for a, k in Counter(answers).items():
        if a in index:
            target[index[a]] = _loo(k, len(answers))
    return target


@functools.lru_cache(maxsize=8)
def _class_index(vocab: tuple) -> dict:
    return {normalize_answer(a): i for i, a in enumerate(vocab)}


# -------------------------------------------------------------------------------------------- 5. DataLoaders
def _collate(batch):
    """Records stay a list of dicts; anything else goes through torch's default_collate."""
    if isinstance(batch[0], dict) and "task" in batch[0]:
        return list(batch)
    return torch.utils.data.default_collate(batch)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                collate_fn: Callable = None, num_workers: int = 0, drop_last: bool = False):
    """DataLoader whose order depends only on (seed, epoch) (loader.sampler.set_epoch): a DistributedSampler
    (seed=seed), one replica outside torch.distributed (shards padded by repetition). Records stay dicts."""
    from torch.utils.data import DataLoader, DistributedSampler
    rank, world = _rank_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn or _collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))  # workers: seeded by torch


# ------------------------------------- 6. For the scripts: flags, value checks, counts, threads, seeds
EVAL_ONLY = "(evaluation only)"  # the end of the help of a flag that changes nothing a checkpoint holds
RUN_CONTROLS = ("device", "out_dir", "data_root", "cache_dir", "num_workers", "max_steps", "resume",
                "overwrite", "eval_only", "seeds")  # with EVAL_ONLY flags: what --resume reads from the CLI


def arg(default, help: str, eval_only: bool = False):
    """An `Args` field: its default and one line of help, which shows the default unless it names one.
    eval_only: marked EVAL_ONLY, so that --resume / --eval_only take it from the command line."""
    help += ("" if "default:" in help else f" (default: {default})") + f" {EVAL_ONLY}" * eval_only
    return field(default=default, metadata={"help": help.replace("%", "%%")})  # % for argparse


def check_values(args, rules: dict) -> None:
    """For Args.__post_init__: the script's {flag: (rule, ok)}, the rules shared by the end of a flag's name
    (lr, dropout) and distinct integer --seeds; a value that breaks one is a UsageError."""
    shared = {"lr": ("> 0", lambda v: v > 0), "dropout": ("in [0, 1)", lambda v: 0 <= v < 1)}
    for k, v in vars(args).items():
        rule, ok = rules.get(k) or next((r for end, r in shared.items() if k.endswith(end)), (0, None))
        if ok is not None and v is not None and not ok(v):
            raise UsageError(f"--{k} {v}: must be {rule}")
    seeds = (args.seeds or "0").split(",")
    if not all(s.isdigit() for s in seeds) or len(set(map(int, seeds))) < len(seeds):
        raise UsageError(f"--seeds {args.seeds!r}: expected distinct integers, e.g. 0,1,2")


def count_trainable(model: torch.nn.Module, expected: Optional[int] = None, log=print) -> tuple[int, int]:
    """Print 'trainable: N || all: M || P%' (shared parameters counted once); assert N == expected."""
    params = list(model.parameters())  # de-duplicated by nn.Module
    n, m = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    log(f"trainable: {n:,} || all: {m:,} || {100 * n / m:.4f}%")
    assert expected is None or n == expected, f"{n:,} trainable parameters, the method has {expected:,}"
    return n, m


def pin_threads(model: torch.nn.Module, device: torch.device) -> None:
    """A small model (< 20M parameters) runs on one CPU thread: the same numbers on every re-run."""
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 20_000_000:
        torch.set_num_threads(1)


def mean_std(values) -> str:
    """'mean ± std' over seeds (sample std; '± 0.00' for one seed)."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f}"
