"""Where jaxfit's log messages go: the console and ``WORKDIR/train.log``.

``logging.basicConfig`` is no way to set this up: importing orbax (through absl) installs
a root handler at WARNING first, after which ``basicConfig`` does nothing and every INFO
message of jaxfit ("resuming from checkpoint at step N", data summaries, LoRA summaries,
plan choices) is dropped. Instead :func:`setup` gives the ``jaxfit`` logger its own
console handler and level and stops it from propagating to the root logger, so it works
whatever was configured before. :func:`log_to_file` adds ``WORKDIR/train.log`` for the
duration of a run: jaxfit's messages at INFO and up, other libraries' (orbax, jax, absl)
at WARNING and up.

Native noise is filtered to what a user needs: ``TF_CPP_MIN_LOG_LEVEL=1`` (XLA/TSL C++
INFO lines off, warnings kept) unless already set, and absl's Python verbosity at WARNING.
A write that fails on a full disk is reported once, by the code that sees it
(:func:`quiet_failed_writes` drops orbax's, asyncio's and tensorstore's tracebacks of it;
``train.log`` drops what it cannot write).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import tqdm
from absl import logging as absl_logging

from jaxfit import errors

LOGGER = "jaxfit"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _ConsoleHandler(logging.Handler):
    """Writes to stderr through ``tqdm.write``, so a progress bar is not torn by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _NotJaxfit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == LOGGER or record.name.startswith(LOGGER + "."))


class _FileHandler(logging.FileHandler):
    """A ``FileHandler`` that drops records it cannot write because the disk is full
    (instead of printing a traceback per record): the run itself stops on the full disk
    with one error line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if errors.disk_full_cause(sys.exc_info()[1]) is None:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the last flush, on a full disk
            if errors.disk_full_cause(e) is None:
                raise


def quiet_native_logs() -> None:
    """Hide C++ INFO logging of XLA/TSL (set before jax initialises its backend) and
    absl's Python INFO; warnings and errors stay visible."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    absl_logging.set_verbosity(absl_logging.WARNING)


# Loggers whose INFO records tell the story of a run (resumed from step N, the config
# changed on resume, the planner's choice applied): on the console by default. The
# library's own INFO (runtime settings, data and tokenizer summaries, attention choice,
# LoRA and loading summaries) reaches the console only with ``--verbose``; train.log
# keeps all of it.
RUN_LOGGERS = ("jaxfit.trainer", "jaxfit.workdir", "jaxfit.plan", "jaxfit.train")


class _QuietLibrary(logging.Filter):
    """Lets through warnings and up, and INFO records of :data:`RUN_LOGGERS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == n or record.name.startswith(n + ".") for n in RUN_LOGGERS)


def setup(level: int = logging.INFO, *, verbose: bool = False) -> logging.Logger:
    """Send the ``jaxfit`` logger's records at ``level`` and up to the console (stderr),
    whatever handlers other libraries installed; idempotent. Returns the logger.

    Without ``verbose`` (the CLIs' ``--verbose``) the console shows INFO records only of
    :data:`RUN_LOGGERS`, warnings and errors of every logger; the level of the logger
    (and so ``train.log``, :func:`log_to_file`) is unchanged."""
    quiet_native_logs()
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    logger.propagate = False
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    console = _ConsoleHandler()
    console.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    if not verbose:
        console.addFilter(_QuietLibrary())
    logger.addHandler(console)
    return logger


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[Path]:
    """Append log records to ``path`` inside the ``with`` block: the ``jaxfit`` logger's
    at INFO and up (its level is lowered to INFO meanwhile if it was higher or unset),
    other loggers' at WARNING and up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(FORMAT, DATEFMT)
    ours = _FileHandler(path, encoding="utf-8")
    ours.setFormatter(formatter)
    ours.setLevel(logging.INFO)
    others = _FileHandler(path, encoding="utf-8")
    others.setFormatter(formatter)
    others.setLevel(logging.WARNING)
    others.addFilter(_NotJaxfit())
    logger, root = logging.getLogger(LOGGER), logging.getLogger()
    old_level = logger.level
    if old_level == logging.NOTSET or old_level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(ours)
    root.addHandler(others)
    try:
        yield path
    finally:
        logger.removeHandler(ours)
        root.removeHandler(others)
        logger.setLevel(old_level)
        ours.close()
        others.close()


# --- what failed writes print (orbax, tensorstore, asyncio) --------------------------


class _DiskFullNotices(logging.Filter):
    """Drops the ERROR records, with tracebacks, that orbax (through absl) and asyncio
    (futures of a failed save collected later) log about a write that failed on a full
    disk: the same error reaches the caller, which reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return errors.disk_full_cause(RuntimeError(text)) is None


class _QuietClosedLoops:
    """``sys.unraisablehook`` (installed by :func:`quiet_failed_writes`): drops the
    ``RuntimeError: Event loop is closed`` that tensorstore's write futures raise when
    they complete after orbax closed the event loop of a save that failed (one per
    array, each printed as a traceback); every other unraisable goes to the previous
    hook."""

    def __init__(self):
        self.previous = sys.unraisablehook

    def __call__(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and (
            str(unraisable.exc_value) == "Event loop is closed"
        ):
            return
        self.previous(unraisable)


_quieted = False


def quiet_failed_writes() -> None:
    """Install :class:`_DiskFullNotices` and :class:`_QuietClosedLoops`, once per process
    (``jaxfit.checkpoint.Checkpointer`` calls it when a writable one opens; what they drop
    comes from background threads and garbage collection, also after it is closed)."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DiskFullNotices())
    sys.unraisablehook = _QuietClosedLoops()


@contextlib.contextmanager
def quiet_read_only_notices() -> Iterator[None]:
    """Hide orbax's notices that a read-only ``CheckpointManager`` is read-only (what
    it was asked to be) inside the ``with`` block."""

    def not_read_only_notice(record: logging.LogRecord) -> bool:
        return "read only" not in str(record.msg) and "read_only=True" not in str(record.msg)

    absl = logging.getLogger("absl")
    absl.addFilter(not_read_only_notice)
    try:
        yield
    finally:
        absl.removeFilter(not_read_only_notice)


__all__ = [
    "log_to_file",
    "quiet_failed_writes",
    "quiet_native_logs",
    "quiet_read_only_notices",
    "setup",
]
