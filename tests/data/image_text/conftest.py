"""Fixtures for the image-caption tests: a small synthetic COCO dataset, its records and a
small caption tokenizer trained on them (each built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from jaxfit.data.image_text.synthetic_coco import write_synthetic_coco

    return write_synthetic_coco(
        tmp_path_factory.mktemp("synthetic"), num_train=60, num_val=20, image_size=40, seed=7
    )


@pytest.fixture(scope="session")
def synthetic_records(synthetic_root):
    from jaxfit.data.image_text.sources import default_data_config, load_source

    cfg = default_data_config()
    cfg.root = str(synthetic_root)
    records, counter = load_source(cfg, "train")
    assert counter.total == 0
    return records


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, synthetic_records):
    from jaxfit.data.image_text.caption_tokenizer import train_caption_bpe

    captions = [c for r in synthetic_records for c in r.captions]
    save_dir = tmp_path_factory.mktemp("tok") / "bpe"
    return train_caption_bpe(captions, 300, save_dir, context_length=16)
