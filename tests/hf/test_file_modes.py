"""Exported weights are files like any other: mode 0666 less the umask (0644 under 022),
not the 0600 safetensors' writer gives (issue 22)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from jaxfit.hf import io


@pytest.fixture
def umask():
    """Set the process umask for a test, restored after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_safetensors_exports_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    tensors = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    single = io.write_tensors(tensors, tmp_path / "one")
    sharded = io.write_tensors(tensors, tmp_path / "two", max_shard_bytes=24)
    assert [p.name for p in single] == ["model.safetensors"]
    assert len(sharded) == 3  # two shards and the index
    for path in [*single, *sharded, io.write_config({"x": 1}, tmp_path / "one")]:
        assert _mode(path) == expected, path


def test_peft_adapter_is_0644(tmp_path, umask):
    from jaxfit.lora import peft_io

    umask(0o022)
    path = tmp_path / "adapter_model.safetensors"
    peft_io._write_atomic(path, lambda p: peft_io.save_file({"a": np.zeros(2, np.float32)}, str(p)))
    assert _mode(path) == 0o644
