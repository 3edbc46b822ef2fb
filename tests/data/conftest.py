"""Fixtures for the data tests: the shared real data (skipped when absent), a small
synthetic COCO dataset and a small trained tokenizer (both built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/data beside the checkout (see its README.md); absent on users' machines.
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def shared():
    """``shared("coco_mini", ...)``: a path under ../shared/data; skips the test if absent."""
    return _shared


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from jaxfit.data.synthetic import write_synthetic_coco

    return write_synthetic_coco(
        tmp_path_factory.mktemp("synthetic"), num_train=60, num_val=20, image_size=40, seed=7
    )


@pytest.fixture(scope="session")
def synthetic_records(synthetic_root):
    from jaxfit.data.image_text import default_data_config, load_source

    cfg = default_data_config()
    cfg.root = str(synthetic_root)
    records, counter = load_source(cfg, "train")
    assert counter.total == 0
    return records


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, synthetic_records):
    from jaxfit.data.tokenizers import train_bpe

    captions = [c for r in synthetic_records for c in r.captions]
    return train_bpe(captions, 300, tmp_path_factory.mktemp("tok") / "bpe", context_length=16)
