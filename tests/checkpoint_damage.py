"""Damage a checkpoint directory as a disk, a copy or a hand might (shared by the checkpoint
tests and the fault-injection suite)."""

from __future__ import annotations

import os

HOW = ("truncate", "flip", "metadata")


def damage(step_dir, how: str) -> str:
    """Damage orbax checkpoint ``step_dir``: ``"truncate"`` halves its largest array data
    file, ``"flip"`` flips one bit in the middle of it, ``"metadata"`` deletes
    ``state/_METADATA``. Returns the damaged file's path relative to ``step_dir``."""
    if how == "metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
        return os.path.join("state", "_METADATA")
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    data = max((f for f in files if f"{os.sep}d{os.sep}" in f), key=os.path.getsize)
    if how == "truncate":
        os.truncate(data, os.path.getsize(data) // 2)
    elif how == "flip":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
    else:
        raise ValueError(f"how={how!r}; expected one of {HOW}")
    return os.path.relpath(data, step_dir)
