"""Fixtures for the data tests: the shared real data (skipped when absent)."""

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
