"""Fixtures for the multi-device / multi-process tests: a small synthetic COCO set and its
caption tokenizer (once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def coco_records(tmp_path_factory):
    from jaxfit.data.image_text.sources import default_data_config, load_source
    from jaxfit.data.image_text.synthetic_coco import write_synthetic_coco

    root = write_synthetic_coco(
        tmp_path_factory.mktemp("coco"), num_train=24, num_val=4, image_size=24, seed=3
    )
    cfg = default_data_config()
    cfg.root = str(root)
    return load_source(cfg, "train")[0]


@pytest.fixture(scope="session")
def caption_tokenizer(tmp_path_factory, coco_records):
    from jaxfit.data.image_text.caption_tokenizer import train_caption_bpe

    captions = [c for r in coco_records for c in r.captions]
    return train_caption_bpe(
        captions, 300, tmp_path_factory.mktemp("tok") / "bpe", context_length=12
    )
