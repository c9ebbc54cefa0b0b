"""Writers of small fixture files in the official dataset layouts, shared by the method tests."""
import json

from PIL import Image


def write_coco_karpathy(data_root, splits=("train", "restval", "train", "train", "val", "val"),
                        captions=("a red circle is on the left .", "a blue square .")):
    """<data_root>/coco/dataset_coco.json (Karpathy split file) + <data_root>/coco/val2014/COCO_val2014_*.jpg
    images."""
    coco, images = data_root / "coco", []
    (coco / "val2014").mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(splits):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (48, 40), (40 * i % 256, 100, 200)).save(coco / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": split,
                       "sentences": [{"raw": c} for c in captions]})
    (coco / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return coco


def write_scienceqa(data_root, problems=None):
    """<data_root>/scienceqa/ as released: problems.json, pid_splits.json, captions.json and
    images/<split>/<pid>/image.png for the problems that have an image. Default: four test problems covering
    every column of the official evaluation (subjects, context modality, grades) and two train problems."""
    import os
    root = data_root / "scienceqa"
    problems = problems or {
        "1": dict(question="Is it a mammal?", choices=["yes", "no"], answer=0, hint="", image="image.png",
                  subject="natural science", grade="grade2", split="test"),
        "2": dict(question="Which is a state?", choices=["Ohio", "Paris", "Texas"], answer=2,
                  hint="Read the text.", image=None, subject="social science", grade="grade8", split="test"),
        "3": dict(question="Which word rhymes?", choices=["cat", "hat"], answer=1, hint="", image=None,
                  subject="language science", grade="grade5", split="test"),
        "4": dict(question="What is shown?", choices=["a", "b", "c", "d"], answer=3, hint="Look.",
                  image="image.png", subject="natural science", grade="grade10", split="test"),
        "5": dict(question="Is it hot?", choices=["yes", "no"], answer=1, hint="", image="image.png",
                  subject="natural science", grade="grade3", split="train"),
        "6": dict(question="Pick one.", choices=["x", "y", "z", "w", "v"], answer=4, hint="It is v.",
                  image=None, subject="social science", grade="grade12", split="train"),
    }
    splits = {"train": [], "val": [], "test": [], "minival": []}
    for pid, p in problems.items():
        p = {"task": "closed choice", "topic": "biology", "category": "Classify", "skill": "s",
             "lecture": "A lecture.", "solution": "A solution.", **p}
        problems[pid] = p
        splits[p["split"]].append(pid)
        if p["image"]:
            os.makedirs(root / "images" / p["split"] / pid, exist_ok=True)
            image = Image.new("RGB", (40, 30), (30 * int(pid), 120, 60))
            image.save(root / "images" / p["split"] / pid / p["image"])
    os.makedirs(root, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    (root / "captions.json").write_text(json.dumps({"captions": {"1": "A photo of a dog.", "5": "A sun."}}))
    return root
