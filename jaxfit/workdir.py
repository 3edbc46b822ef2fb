"""One run per workdir, and a resume that cannot change what the run is.

* :func:`lock`: ``WORKDIR/run.lock``, an exclusive ``fcntl.flock`` held for the whole run.
  The kernel releases it when the process ends, however it ends (``kill -9`` included), so
  a lock left by a dead run is never in the way; the file holds the holder's host, PID,
  start time and command line, which a refused second run names. Re-entrant within one
  process (the CLI takes it before planning, the trainer again around the run).
* :func:`check_resume` / :func:`record_config`: a workdir that already holds a checkpoint
  is resumed only with a config that keeps the parameter shapes, the optimizer state's
  structure and the data order; fields that only change the run's rhythm or hyper-parameters
  (:data:`CHANGEABLE`) may differ and are recorded. ``config.json`` is rewritten only
  after the check (and after the state was restored); the config it held before is kept
  in ``WORKDIR/config_history/`` with the list of changes in ``changes.jsonl``.
* :func:`check_data` / :func:`record_data`: the same for the data. ``WORKDIR/
  data_fingerprint.json`` holds the content hash of the training and validation data
  (``jaxfit.data.fingerprint``: source files' sizes and SHA-256, token files' hashes); a
  resume on different data is refused naming the file, unless accepted deliberately
  (``--accept_data_change``), which ``config_history/changes.jsonl`` records.
* A refused start writes nothing: until the trainer calls :func:`commit` (the state is
  restored or created, the config recorded), an exception leaving the outermost
  :func:`lock` removes what the start created in the workdir (``run.lock``, the workdir
  itself, ``train.log``'s new lines, a tokenizer, token files, ``plan.json``: the names of
  :data:`ARTEFACTS` in a workdir that existed); ``checkpoints*/`` are never touched.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxfit import config as config_lib
from jaxfit.data import fingerprint as fingerprint_lib
from jaxfit.errors import Error

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HISTORY_DIR = "config_history"
DATA_FILE = "data_fingerprint.json"
ACCEPT_FLAG = "--accept_data_change"
# Files a start appends to (rolled back to their size when the start fails).
_APPENDED = ("train.log",)
# What a start may create in a workdir that already existed (top-level names, fnmatch):
# only these are removed when it fails, so that files other programs put into a shared
# directory meanwhile (--workdir /tmp) are never touched. A new workdir goes as a whole.
ARTEFACTS = (
    LOCK_FILE,
    "train.log",
    "plan.json",
    "config.json",
    DATA_FILE,
    HISTORY_DIR,
    "metrics.jsonl",
    "events.out.tfevents.*",
    "eval",
    "tokenizer",
    "token_cache",
    "synthetic_text.txt",
    "synthetic_coco",
    "checkpoints*",  # only an empty directory: never a checkpoint
    "*.tmp",
    "*.tmp-*",
)

# Fields a resumed run may change: they leave the state's shapes and the data order alone.
# Patterns over dotted keys (fnmatch). Everything else (model, data, seed, batch_size,
# seq_len, precision, LoRA shape, task, init_from, optimizer name) must match the saved
# config. optim.grad_clip_norm may change but not be switched on or off (that changes the
# optimizer state's structure).
CHANGEABLE = (
    "total_steps",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "device",
    "fit_budget",
    "mesh.*",  # the state restores onto any mesh (resharded), the batch is the same
    "micro_batch_size",  # exact accumulation: the same batch, split differently
    "loss_chunk_size",
    "eval.*",
    "model.remat_policy",
    "model.attention_impl",
    "data.num_threads",
    "data.cache_dir",
    "data.hf_cache_dir",
    "optim.lr",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.b1",
    "optim.b2",
    "optim.eps",
    "optim.weight_decay",
    "optim.no_decay",
    "optim.grad_clip_norm",
    "lora.alpha",
    "lora.dropout",
    "lora.use_rslora",
)


class WorkdirBusyError(Error, RuntimeError):
    """Another live process holds the workdir's lock; the message names it (exit
    status 5)."""

    exit_code = 5


class ResumeConfigError(config_lib.ConfigError):
    """Resuming would change the run's shapes or data order; ``.keys`` lists the fields."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


# --- the lock -------------------------------------------------------------------------

_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth, _Start]


def _listing(workdir: Path) -> set[str]:
    """Relative paths of everything under ``workdir``, ``checkpoints*/`` contents aside."""
    out: set[str] = set()
    for root, dirs, files in os.walk(workdir):
        rel = os.path.relpath(root, workdir)
        if rel == ".":
            dirs[:] = [d for d in dirs if not d.startswith("checkpoints")]
            out.update(d for d in os.listdir(workdir) if d.startswith("checkpoints"))
        for name in dirs + files:
            out.add(os.path.normpath(os.path.join(rel, name)))
    return out


class _Start:
    """What the workdir held before a start, to undo the start if it fails (module
    docstring); ``committed`` once the run is under way."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.existed = workdir.is_dir()
        self.before = _listing(workdir) if self.existed else set()
        self.sizes = {n: (workdir / n).stat().st_size for n in _APPENDED if (workdir / n).is_file()}
        self.committed = False

    def undo(self) -> None:
        """Remove what appeared since, restore the appended files' sizes; errors ignored."""
        for rel in sorted(_listing(self.workdir) - self.before, key=len, reverse=True):
            top = rel.split(os.sep)[0]
            if self.existed and not any(fnmatch.fnmatchcase(top, p) for p in ARTEFACTS):
                continue  # not jaxfit's: another program's file in a shared directory
            path = self.workdir / rel
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    if rel.startswith("checkpoints"):
                        path.rmdir()  # only when empty: never a checkpoint
                    else:
                        shutil.rmtree(path)
                else:
                    path.unlink()
        for name, size in self.sizes.items():
            with contextlib.suppress(OSError):
                os.truncate(self.workdir / name, size)
        if not self.existed:
            with contextlib.suppress(OSError):
                self.workdir.rmdir()


def commit(workdir: str | os.PathLike) -> None:
    """Mark the start of the run holding ``workdir``'s lock as done (the trainer calls it
    once the state is restored and the config recorded): from now on a failure leaves
    the workdir as it is. A no-op where this process holds no lock on it."""
    held = _held.get(os.path.realpath(Path(workdir) / LOCK_FILE))
    if held is not None:
        held[2].committed = True


def release_now() -> None:
    """Release every ``run.lock`` this process holds, at once (emptied, then unlocked):
    for a process about to end with ``os._exit`` (a second Ctrl-C), which skips the
    ``with`` blocks of :func:`lock`. Safe to call from any thread; a start that was not
    committed is not undone (its files are left for the next start to take over)."""
    for key, held in list(_held.items()):
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(held[0], 0)
            fcntl.flock(held[0], fcntl.LOCK_UN)


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    if not info:
        return "an unknown process"
    return (
        f"pid {info.get('pid')} on host {info.get('host')!r}, started {info.get('started')} "
        f"({info.get('command', '?')})"
    )


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``WORKDIR/run.lock`` for the duration of the ``with`` block.

    Taken with ``fcntl.flock(LOCK_EX | LOCK_NB)``: atomic, and released by the kernel when
    the holder exits or is killed, so a stale lock file (its process gone) is simply
    taken over (logged). On clean release the file is emptied, not deleted (deleting
    would let two later runs lock two different files of the same name).

    A start that raises before :func:`commit` is undone as it leaves the outermost
    ``with``: what it created in the workdir is removed (the lock file and the workdir
    too when they were new), ``train.log`` cut back; ``checkpoints*/`` are kept.

    In a run of several processes (``jax.distributed``) only process 0 takes it: the
    others belong to its run.

    Raises:
      WorkdirBusyError: another process holds it (its host, PID, start time and command).
    """
    workdir = Path(workdir)
    if jax.process_index() != 0:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir / LOCK_FILE
        return
    path = workdir / LOCK_FILE
    key = os.path.realpath(path)
    if key in _held:  # re-entrant within this process (the outer one undoes a start)
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    start = _Start(workdir)  # before anything is created
    workdir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            start.undo()
            raise
        raise WorkdirBusyError(
            f"workdir {str(workdir)!r} is in use by another run: {_holder_text(path)}; "
            "wait for it to finish (or stop it), or use another --workdir"
        ) from None
    previous = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if previous:
        log.warning(
            "taking over the lock of a run that ended without releasing it: %s",
            _holder_text(path),
        )
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = [fd, 1, start]
    try:
        yield path
    except Exception:
        if not start.committed:
            start.undo()  # unlinks a new run.lock while it is still held
        raise
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


# --- config comparison and history ----------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _as_json(config) -> dict[str, Any]:
    """The config as ``config.json`` stores it (tuples as lists, odd values as str)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


_ABSENT = "<absent>"


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` of the fields that differ (a key present
    on one side only has ``"<absent>"`` on the other)."""
    a, b = _flatten(saved), _flatten(new)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def _changeable(key: str, old: Any, new: Any) -> bool:
    if not any(fnmatch.fnmatchcase(key, p) for p in CHANGEABLE):
        return False
    if key == "optim.grad_clip_norm":  # on <-> off changes the optimizer state's structure
        return bool(old) == bool(new) and _ABSENT not in (old, new)
    return True


def _moved_with_workdir(old: Any, new: Any, workdir) -> bool:
    """A path the run derived inside its workdir (``WORKDIR/synthetic_text.txt``), saved
    when the workdir was elsewhere: the same file, moved (or copied) with the workdir."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    root = os.path.abspath(workdir) + os.sep
    if not new.startswith(root):
        return False
    rel = new[len(root) :]
    return old.endswith(os.sep + rel) and os.path.exists(new)


def _fmt(value: Any) -> str:
    text = json.dumps(value) if value is not _ABSENT else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(config, workdir: str | os.PathLike, step: int | None) -> dict[str, tuple]:
    """Compare ``config`` with the saved ``WORKDIR/config.json`` of a run being resumed.

    Args:
      config: the (resolved) config the new run would use.
      workdir: the run directory.
      step: the step of the checkpoint being resumed; None (nothing to resume) skips the
        check.

    Returns:
      The allowed changes ``{key: (saved, new)}`` (empty for a fresh run or no change).

    Raises:
      ResumeConfigError: fields that change shapes, the optimizer state or the data order
        differ; the message lists each with both values. Nothing is written.
    """
    path = Path(workdir) / "config.json"
    if step is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        log.warning("cannot read %s (%s); resuming without comparing configs", path, e)
        return {}
    changes = config_changes(saved, _as_json(config))
    refused = {
        k: v
        for k, v in changes.items()
        if not _changeable(k, *v) and not _moved_with_workdir(*v, workdir)
    }
    if refused:
        listed = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in refused.items())
        raise ResumeConfigError(
            f"refusing to resume {str(workdir)!r} (checkpoint at step {step}) with a config "
            f"that changes the parameter shapes, optimizer state or data order: {listed}. "
            f"Use a new --workdir, or restore these values (a resume may change only "
            f"{', '.join(CHANGEABLE)})",
            list(refused),
        )
    return changes


def record_config(config, workdir: str | os.PathLike, step: int | None = None) -> Path:
    """Write ``WORKDIR/config.json``; when it changes a config already there, keep the old
    one as ``config_history/NNNN.json`` and append the change list (``{"time", "step",
    "previous", "changes": {key: [old, new]}}``) to ``config_history/changes.jsonl``.

    Call it after :func:`check_resume` (and after the state was restored).
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    if path.is_file():
        old_text = path.read_text()
        try:
            changes = config_changes(json.loads(old_text), _as_json(config))
        except ValueError:
            changes = {"config.json": ("<unreadable>", "rewritten")}
        if changes:
            history = workdir / HISTORY_DIR
            history.mkdir(exist_ok=True)
            n = 1 + max(
                (int(p.stem) for p in history.glob("*.json") if p.stem.isdigit()), default=0
            )
            kept = history / f"{n:04d}.json"
            kept.write_text(old_text)
            record = {
                "time": round(time.time(), 3),
                "step": step,
                "previous": f"{HISTORY_DIR}/{kept.name}",
                "changes": {k: list(v) for k, v in changes.items()},
            }
            with open(history / "changes.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
            log.info(
                "config changed on resume at step %s (previous kept in %s): %s",
                step,
                kept,
                ", ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items()),
            )
    return config_lib.save_config(config, workdir)


def _shapes(tree) -> dict[str, tuple]:
    """``{path: shape}`` of a tree's array leaves (dict keys, attributes, indices)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[jax.tree_util.keystr(path, simple=True, separator="/")] = tuple(shape)
    return out


def check_shapes(abstract_params, workdir: str | os.PathLike, step: int | None) -> None:
    """Refuse a resume whose parameters have other shapes than checkpoint ``step``'s,
    BEFORE restoring it: such a checkpoint is not damaged, the config is another one
    (the case :func:`check_resume` cannot see when ``config.json`` is missing), and
    setting it aside would lose it. Reads orbax's metadata only; a checkpoint whose
    metadata does not read is left to the restore (damage is found there).

    Args:
      abstract_params: the trainable parameters' shapes (``task.abstract_params()``).
      workdir: the run directory; ``step``: the checkpoint to resume (None: no check).

    Raises:
      ResumeConfigError: the shapes differ; the message names up to five parameters.
    """
    if step is None:
        return
    state_dir = Path(workdir) / "checkpoints" / str(step) / "state"
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
        saved = _shapes(metadata.tree["params"])
    except Exception as e:  # unreadable: the restore decides whether it is damaged
        log.debug("no shape check of %s: %s", state_dir, e)
        return
    new = _shapes(abstract_params)
    if sorted(saved.values()) == sorted(new.values()):
        return
    differ = [
        f"{k}: {list(saved[k]) if k in saved else 'absent'} saved, "
        f"{list(new[k]) if k in new else 'absent'} now"
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k)
    ]
    why = (
        "config.json is missing, so the config it was trained with is unknown"
        if not (Path(workdir) / "config.json").is_file()
        else "the config changed the model"
    )
    raise ResumeConfigError(
        f"refusing to resume {str(workdir)!r}: its checkpoint at step {step} holds "
        f"parameters of other shapes than this config's ({len(differ)} differ: "
        f"{'; '.join(differ[:5])}); {why}. The checkpoints are intact: rerun with the "
        "config they were trained with, or use a new --workdir",
        ["model"],
    )


# --- data fingerprints ------------------------------------------------------------------


def _in_workdir(fingerprint: dict, workdir: Path) -> dict:
    """``fingerprint`` with the files inside ``workdir`` named ``WORKDIR/<relative path>``:
    a workdir moved with its synthetic data holds the same files."""
    root = os.path.abspath(workdir) + os.sep
    out = {}
    for key, value in fingerprint.items():
        if key == "files" and isinstance(value, dict):
            value = {
                ("WORKDIR/" + k[len(root) :] if k.startswith(root) else k): v
                for k, v in value.items()
            }
        elif isinstance(value, dict):
            value = _in_workdir(value, workdir)
        out[key] = value
    return out


def _saved_fingerprint(workdir: Path) -> dict | None:
    path = workdir / DATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        log.warning("cannot read %s (%s); resuming without comparing the data", path, e)
        return None


def _describe_change(key: str, old: Any, new: Any, workdir: Path) -> str:
    """``"train file /d/a.txt (same size 12345 bytes, sha256 1a2b3c4d -> 9f8e7d6c)"``."""
    split, _, rest = key.partition(".")
    kind, _, name = rest.partition(".")
    if name.startswith("WORKDIR/"):
        name = str(workdir / name.removeprefix("WORKDIR/"))
    what = {"files": f"{split} file {name}", "tokens": f"{split} tokens (token cache)"}.get(
        kind, f"{split} {rest}"
    )
    if old is None or new is None:
        return f"{what} ({'new' if old is None else 'gone'})"
    unit = {"files": ("size", " bytes"), "tokens": ("num_tokens", " tokens")}.get(kind)
    size, suffix = unit or ("size", "")
    a, b = old.get(size), new.get(size)
    how = f"same {size} {b}{suffix}" if a == b else f"{size} {a} -> {b}{suffix}"
    return f"{what} ({how}, sha256 {old.get('sha256', '?')[:8]} -> {new.get('sha256', '?')[:8]})"


def check_data(
    fingerprint: dict, workdir: str | os.PathLike, step: int | None, *, accept: bool = False
) -> dict[str, tuple]:
    """Compare the data of a run being resumed with ``WORKDIR/data_fingerprint.json``.

    Args:
      fingerprint: the new run's (``task.data_fingerprint()``, or the files-only part
        ``jaxfit.tasks.source_fingerprint(config)`` before the task is built: sections
        the saved one lacks or this one lacks are not compared).
      workdir: the run directory.
      step: the step of the checkpoint being resumed; None (nothing to resume), or a
        workdir without a saved fingerprint (made before there was one), skips the check.
      accept: resume on changed data (``--accept_data_change``): the changes are logged
        and returned for :func:`record_data` to record.

    Returns:
      ``{"split.kind.name": (saved, new)}`` of what changed (empty: nothing changed).

    Raises:
      ResumeConfigError: the data changed and ``accept`` is False; the message names each
        changed file (or split's tokens) with its sizes and hashes. Nothing is written.
    """
    workdir = Path(workdir)
    saved = _saved_fingerprint(workdir) if step is not None else None
    if saved is None:
        return {}
    changes = fingerprint_lib.differences(saved, _in_workdir(fingerprint, workdir))
    if not changes:
        return {}
    listed = "; ".join(_describe_change(k, *v, workdir.absolute()) for k, v in changes.items())
    if accept:
        log.warning("resuming at step %d on changed data (%s): %s", step, ACCEPT_FLAG, listed)
        return changes
    raise ResumeConfigError(
        f"refusing to resume {str(workdir)!r} (checkpoint at step {step}): the data changed "
        f"since it was trained on: {listed}. Restore the data, use a new --workdir, or pass "
        f"{ACCEPT_FLAG} to go on with the new data (recorded in "
        f"{HISTORY_DIR}/changes.jsonl)",
        [f"data:{k}" for k in changes],
    )


def record_data(
    fingerprint: dict,
    workdir: str | os.PathLike,
    step: int | None = None,
    accepted: dict[str, tuple] | None = None,
) -> Path:
    """Write ``WORKDIR/data_fingerprint.json`` (atomically; files inside the workdir named
    ``WORKDIR/...``, so that a moved workdir compares equal). With ``accepted`` changes
    (:func:`check_data` under ``accept``), the previous fingerprint is kept as
    ``config_history/data-NNNN.json`` and ``config_history/changes.jsonl`` gets
    ``{"time", "step", "previous", "accepted": "--accept_data_change", "data_changes":
    {key: [old, new]}}``.

    Call it after :func:`check_data` (and after the state was restored).
    """
    workdir = Path(workdir)
    path = workdir / DATA_FILE
    if accepted and path.is_file():
        history = workdir / HISTORY_DIR
        history.mkdir(exist_ok=True)
        n = 1 + max(
            (int(p.stem[5:]) for p in history.glob("data-*.json") if p.stem[5:].isdigit()),
            default=0,
        )
        kept = history / f"data-{n:04d}.json"
        shutil.copyfile(path, kept)
        record = {
            "time": round(time.time(), 3),
            "step": step,
            "previous": f"{HISTORY_DIR}/{kept.name}",
            "accepted": ACCEPT_FLAG,
            "data_changes": {k: list(v) for k, v in accepted.items()},
        }
        with open(history / "changes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_in_workdir(fingerprint, workdir), indent=1, sort_keys=True)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


__all__ = [
    "ACCEPT_FLAG",
    "CHANGEABLE",
    "DATA_FILE",
    "ResumeConfigError",
    "WorkdirBusyError",
    "check_data",
    "check_resume",
    "check_shapes",
    "commit",
    "config_changes",
    "lock",
    "record_config",
    "record_data",
    "release_now",
]
