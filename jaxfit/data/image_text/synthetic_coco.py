"""Synthetic image-caption data in COCO captions format, for demos and smoke tests.

Each image shows one or two coloured shapes (circle / square / triangle; six colours;
small / large; left / right / top / bottom / center) on a pale background, with several
paraphrased captions that describe it ("a large red circle on the left", "on the left
there is a big red circle", ...). The files follow the COCO 2017 layout::

    root/annotations/captions_{train_split}.json
    root/{train_split}/000000000001.jpg ...

so a demo run reads them through the same loader as real data (``data.format="coco"``,
``data.root=root``). Output is a deterministic function of ``seed``; image i of a split
depends only on (seed, split, i), so growing a split keeps the earlier images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
# Object centre as fractions of (width, height).
POSITIONS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Object "radius" as a fraction of the image side: two large objects at neighbouring
# edge positions (distance 0.354) never touch.
SIZES = {"small": 0.09, "large": 0.16}

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POS_WORDS = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
_ONE = (
    "a {d} {p}",
    "{p} there is a {d}",
    "there is a {d} {p}",
    "a picture of a {d} {p}",
    "{p}, a {d}",
    "an image with a {d} {p}",
)
_TWO = (
    "a {d1} {p1} and a {d2} {p2}",
    "a {d2} {p2} and a {d1} {p1}",
    "there is a {d1} {p1} and a {d2} {p2}",
    "two shapes: a {d1} {p1} and a {d2} {p2}",
    "{p1} a {d1}, {p2} a {d2}",
    "a picture of a {d2} {p2} and a {d1} {p1}",
)


def _sample_objects(rng: np.random.Generator, two_object_prob: float) -> list[dict]:
    n = 2 if rng.random() < two_object_prob else 1
    positions = list(POSITIONS) if n == 1 else ["left", "right", "top", "bottom"]
    chosen = rng.choice(len(positions), size=n, replace=False)
    return [
        {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "color": list(COLORS)[rng.integers(len(COLORS))],
            "size": list(SIZES)[rng.integers(len(SIZES))],
            "position": positions[int(k)],
        }
        for k in chosen
    ]


def _draw(objects: list[dict], image_size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        fx, fy = POSITIONS[obj["position"]]
        jitter = rng.uniform(-0.03, 0.03, size=2)
        cx, cy = (fx + jitter[0]) * image_size, (fy + jitter[1]) * image_size
        r = SIZES[obj["size"]] * image_size
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif obj["shape"] == "square":
            s = 0.9 * r
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
        else:  # upward triangle inscribed in the circle of radius r
            h = 0.5 * r
            w = 0.866 * r
            draw.polygon([(cx, cy - r), (cx - w, cy + h), (cx + w, cy + h)], fill=color)
    return img


def _describe(obj: dict, rng: np.random.Generator) -> tuple[str, str]:
    size = _SIZE_WORDS[obj["size"]][rng.integers(2)]
    pos_words = _POS_WORDS[obj["position"]]
    return f"{size} {obj['color']} {obj['shape']}", pos_words[rng.integers(len(pos_words))]


def captions_for(objects: list[dict], rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct paraphrases describing ``objects`` (1 or 2 dicts with keys shape,
    color, size, position)."""
    templates = _ONE if len(objects) == 1 else _TWO
    order = rng.permutation(len(templates))[:n]
    out = []
    for t in order:
        parts = [_describe(o, rng) for o in objects]
        if len(objects) == 1:
            text = templates[t].format(d=parts[0][0], p=parts[0][1])
        else:
            (d1, p1), (d2, p2) = parts
            text = templates[t].format(d1=d1, p1=p1, d2=d2, p2=p2)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def write_synthetic_coco(
    root: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 5,
    two_object_prob: float = 0.3,
    train_split: str = "train2017",
    val_split: str = "val2017",
) -> Path:
    """Write a synthetic shapes dataset in COCO captions layout under ``root``.

    Args:
      root: output directory (created; existing files of the same names are overwritten).
      num_train, num_val: images per split.
      image_size: side of the square JPEG images, pixels.
      seed: everything (shapes, colours, jitter, caption wording) derives from it.
      captions_per_image: paraphrases per image (at most 6).
      two_object_prob: probability that an image holds two shapes.
      train_split, val_split: split names (folders and ``captions_{split}.json``).

    Returns:
      ``Path(root)``. Image ids run 1..num_train (train), then num_train+1.. (val); each
      COCO ``images`` entry also has an ``objects`` list describing its shapes.

    Raises:
      ValueError: ``captions_per_image`` not in [1, 6].
    """
    if not 1 <= captions_per_image <= len(_ONE):
        raise ValueError(f"captions_per_image must be in [1, {len(_ONE)}]")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    next_id, next_ann = 1, 1
    for split_idx, (split, count) in enumerate(((train_split, num_train), (val_split, num_val))):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_idx, i])
            objects = _sample_objects(rng, two_object_prob)
            file_name = f"{next_id:012d}.jpg"
            _draw(objects, image_size, rng).save(image_dir / file_name, quality=95)
            images.append(
                {
                    "id": next_id,
                    "file_name": file_name,
                    "width": image_size,
                    "height": image_size,
                    "objects": objects,
                }
            )
            for caption in captions_for(objects, rng, captions_per_image):
                annotations.append({"id": next_ann, "image_id": next_id, "caption": caption})
                next_ann += 1
            next_id += 1
        coco = {
            "info": {"description": f"jaxfit synthetic shapes (seed={seed})"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
        }
        with open(root / "annotations" / f"captions_{split}.json", "w") as f:
            json.dump(coco, f)
    return root
