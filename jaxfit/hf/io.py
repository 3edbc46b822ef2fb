"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the
shards listed in ``model.safetensors.index.json`` (``weight_map``: tensor name -> file).
Tensors are read lazily through ``safetensors.safe_open`` so at most one tensor is in
host memory beyond what the caller keeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# What a checkpoint download fetches: config, weights and tokenizer files.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")


def resolve(
    path_or_name: str | os.PathLike, patterns: tuple[str, ...] = CHECKPOINT_PATTERNS
) -> Path:
    """Return a local directory for a checkpoint path or a Hub repository name.

    A local directory is returned as is. Otherwise ``path_or_name`` is taken as a Hub
    name (``openai/clip-vit-base-patch32``) and fetched with
    ``huggingface_hub.snapshot_download`` (only files matching ``patterns``: by default
    config, safetensors and tokenizer files; ``("config.json",)`` for the architecture
    alone; honours ``HF_HUB_OFFLINE`` and the local cache).

    Raises:
      FileNotFoundError: not a directory and the Hub could not provide it.
    """
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(path_or_name),
            allow_patterns=list(patterns),
        )
    except Exception as e:  # network errors, unknown repo, offline mode
        raise FileNotFoundError(
            f"{str(path_or_name)!r} is neither a local directory nor a reachable Hugging Face "
            f"Hub repository ({type(e).__name__}: {e})"
        ) from e
    return Path(local)


def read_config(directory: Path) -> dict:
    """Load ``config.json``; raises ``FileNotFoundError`` naming the path if missing."""
    f = Path(directory) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"no config.json in {str(directory)!r}")
    return json.loads(f.read_text())


def write_config(hf_config: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/config.json`` atomically (temporary name, then rename); returns it."""
    out = Path(out_dir) / "config.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    os.replace(tmp, out)
    return out


class TensorReader:
    """Lazy, name-addressed access to the tensors of a (possibly sharded) checkpoint.

    Use as a context manager. ``reader[name]`` returns a host ``np.ndarray`` in the
    stored dtype (``bfloat16`` as ``ml_dtypes.bfloat16``).

    Raises:
      FileNotFoundError: the directory holds neither ``model.safetensors`` nor an index.
      KeyError: (on lookup) a tensor name that the checkpoint does not hold.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.weight_map: dict[str, str] = dict(weight_map)
        elif single.is_file():
            self.weight_map = {}
            with safe_open(single, framework="numpy") as f:
                for k in f.keys():
                    self.weight_map[k] = SINGLE_FILE
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.directory)!r}")
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, fname: str):
        if fname not in self._files:
            # framework="flax" is used because safetensors' numpy backend cannot return
            # bfloat16; arrays are created on the host CPU device and viewed as numpy.
            self._files[fname] = self._stack.enter_context(
                safe_open(self.directory / fname, framework="flax", device="cpu")
            )
        return self._files[fname]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in checkpoint {str(self.directory)!r}")
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._file(self.weight_map[name]).get_tensor(name))


def as_written_by_open(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a file made by ``open(path, "w")`` gets: ``0o666``
    less the process's umask (0644 under the usual 022). safetensors' writer creates its
    files 0600, which other users (a serving process, a colleague) cannot read."""
    mask = os.umask(0o022)  # no getter: read it by setting it, then put it back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_tensors(
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write tensors as ``model.safetensors`` or shards plus an index, like transformers.

    The write is atomic per file: each file is written under a temporary name and
    renamed, and the index is written last, so a crash leaves no file that claims to be
    complete but is not.

    Args:
      tensors: name -> array (any numpy dtype safetensors supports, incl. bfloat16).
      out_dir: created if needed.
      max_shard_bytes: shard size limit; one file when everything fits.

    Returns:
      The written file paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in items:
        arr = np.asarray(arr, order="C")  # keeps 0-d tensors 0-d (ascontiguousarray: [1])
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    written = []
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp = out / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        as_written_by_open(tmp)
        os.replace(tmp, out / fname)
        written.append(out / fname)
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(a.nbytes for s in shards for a in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = out / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, out / INDEX_FILE)
        written.append(out / INDEX_FILE)
    return written
