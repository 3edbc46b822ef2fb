"""Synthetic shapes data: COCO round trip, determinism, captions that match the pixels."""

from __future__ import annotations

import json
import time

import numpy as np

from jaxfit.data.image_text.images import decode_image
from jaxfit.data.image_text.sources import default_data_config, load_source
from jaxfit.data.image_text.synthetic_coco import COLORS, POSITIONS, write_synthetic_coco


def _load(root, split):
    cfg = default_data_config()
    cfg.root = str(root)
    return load_source(cfg, split)


def test_round_trip_through_the_coco_loader(tmp_path):
    start = time.perf_counter()
    root = write_synthetic_coco(tmp_path, num_train=200, num_val=30, image_size=48, seed=1)
    assert time.perf_counter() - start < 10  # hundreds of images in seconds
    train, skips_t = _load(root, "train")
    val, skips_v = _load(root, "val")
    assert (len(train), len(val)) == (200, 30) and skips_t.total == skips_v.total == 0
    assert all(len(r.captions) == 5 and len(set(r.captions)) == 5 for r in train + val)
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    assert decode_image(train[0].image).size == (48, 48)


def test_deterministic_in_seed(tmp_path):
    a = write_synthetic_coco(tmp_path / "a", num_train=5, num_val=2, seed=3)
    b = write_synthetic_coco(tmp_path / "b", num_train=5, num_val=2, seed=3)
    c = write_synthetic_coco(tmp_path / "c", num_train=5, num_val=2, seed=4)
    ann = "annotations/captions_train2017.json"
    assert (a / ann).read_text() == (b / ann).read_text() != (c / ann).read_text()
    for x, y in zip(_load(a, "train")[0], _load(b, "train")[0]):
        assert open(x.image, "rb").read() == open(y.image, "rb").read()


def test_captions_describe_the_drawn_objects(tmp_path):
    root = write_synthetic_coco(
        tmp_path, num_train=40, num_val=0, image_size=64, seed=0, two_object_prob=0.0
    )
    meta = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    caps = {}
    for a in meta["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].lower())
    for im in meta["images"]:
        (obj,) = im["objects"]
        for c in caps[im["id"]]:
            assert obj["color"] in c and obj["shape"] in c
        # The object's colour is at its position in the image.
        pixels = np.asarray(decode_image(root / "train2017" / im["file_name"]), np.float32)
        fx, fy = POSITIONS[obj["position"]]
        centre = pixels[int(fy * 64), int(fx * 64)]
        assert np.abs(centre - COLORS[obj["color"]]).max() < 40, (im, centre)
