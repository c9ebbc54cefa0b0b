"""Writers of small fixture files in the official dataset layouts, shared by the method tests."""
import json

from PIL import Image


def write_coco_karpathy(data_root, splits=("train", "restval", "train", "train", "val", "val"),
                        captions=("a red circle is on the left .", "a blue square .")):
    """<data_root>/coco/dataset_coco.json (Karpathy split file) + <data_root>/coco/val2014/COCO_val2014_*.jpg."""
    coco, images = data_root / "coco", []
    (coco / "val2014").mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(splits):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (48, 40), (40 * i % 256, 100, 200)).save(coco / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": split,
                       "sentences": [{"raw": c} for c in captions]})
    (coco / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return coco
