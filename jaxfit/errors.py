"""Errors a user can act on, and how the command lines report them.

Every ``python -m jaxfit.X`` reports a mistake in its input as one line on stderr,
``error: <what>, <where>, <what to do>``, and exits with status 2 before any work starts
(``jaxfit.cli.run``; ``--verbose`` or ``JAXFIT_DEBUG=1`` adds the traceback). The
exceptions here carry the parts of that line. This module imports nothing from jaxfit, so
any layer (data, tasks, models) can raise them.

Every error a command reports in one line derives from :class:`Error` and carries its exit
status as ``exit_code`` (one mechanism: :func:`jaxfit.cli.exit_code` reads it):

====  ===============================================================================
2     a mistake in the input (:class:`UsageError`, :class:`DataError`,
      ``jaxfit.config.ConfigError``, ``jaxfit.workdir.ResumeConfigError``)
3     out of device memory (``jaxfit.oom.OutOfMemoryError``)
4     non-finite results (``jaxfit.metrics.NonFiniteError``)
5     the workdir is held by another run (``jaxfit.workdir.WorkdirBusyError``)
6     checkpoints exist, none is usable (``jaxfit.checkpoint.NoUsableCheckpointError``)
7     the disk is full (:class:`DiskFullError`)
====  ===============================================================================
"""

from __future__ import annotations

import errno
import os
import shutil


class Error(Exception):
    """Base of the errors a command line reports in one line (``error: <text>``).

    Attributes:
      exit_code: the process's exit status for it (class attribute; see the module
        docstring). Subclasses list a builtin base too (``ValueError``, ``RuntimeError``,
        ...), so ``except ValueError`` still catches a bad input.
    """

    exit_code: int = 2


class UsageError(Error, ValueError):
    """A command line that cannot run: a missing or contradictory flag."""


class DataError(Error, ValueError):
    """Input data that cannot be used: a missing root, an unreadable or malformed file.

    Args:
      what: what is wrong (``"truncated JSON: Expecting ',' delimiter"``).
      path: the file or directory it is about (named in the message).
      line: 1-based line in ``path`` (with ``column`` when known).
      hint: what to do (``"check data.root"``).

    ``str(e)`` is ``"<what>, in <path>:<line>:<column>, <hint>"``.
    """

    def __init__(
        self,
        what: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        column: int | None = None,
        hint: str = "",
    ):
        self.what = what
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.column = column
        self.hint = hint
        super().__init__(str(self))

    @property
    def where(self) -> str:
        if self.path is None:
            return ""
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"in {self.where}")
        if self.hint:
            parts.append(self.hint)
        return ", ".join(parts)


class ShowHelp(Exception):  # noqa: N818 (a request, not an error)
    """``--help`` was asked for; the CLI wrapper prints the help and exits 0.

    Attributes:
      flags: ``{name: help}`` of the command's flags (besides ``--config``).
      config: the loaded config when ``--config`` was given and loads, else ``None``.
      spec: the ``--config`` argument (``"configs/x.py:demo"``) or ``""``.
      config_error: why the given config did not load (shown under the flags).
    """

    def __init__(self, flags: dict[str, str], config=None, spec: str = "", config_error: str = ""):
        super().__init__("help requested")
        self.flags = flags
        self.config = config
        self.spec = spec
        self.config_error = config_error


# The texts a full disk is reported with: Python's OSError, and tensorstore's (orbax's
# array writes: ``RESOURCE_EXHAUSTED ... No space left on device [os_error_code='28']``).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = (
    "No space left on device",
    "Disk quota exceeded",
    f"os_error_code='{errno.ENOSPC}'",
    f"os_error_code='{errno.EDQUOT}'",
)


def disk_full_cause(error: BaseException | None) -> BaseException | None:
    """The exception in ``error``'s chain (itself, ``__cause__``, ``__context__``) that
    says the disk is full (``ENOSPC`` / ``EDQUOT``, or tensorstore's message of them), or
    None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return error
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class DiskFullError(Error, RuntimeError):
    """The disk filled up while a run (or a reader) wrote into ``directory``.

    ``str(e)`` names the directory, the free and total space of its file system now, the
    file being written when known, and ``note`` (what is intact: the trainer names its
    last sealed checkpoint). The command lines exit with status 7 (``exit_code``).

    Args:
      directory: the workdir (or output directory) on the full disk.
      cause: the error that reported it (see :func:`disk_full_cause`).
      note: what survived and what to do.
    """

    exit_code = 7

    def __init__(self, directory: str | os.PathLike, cause: BaseException, note: str = ""):
        self.directory = os.fspath(directory)
        try:
            usage = shutil.disk_usage(self.directory)
            space = f"{_size(usage.free)} free of {_size(usage.total)}"
        except OSError:
            space = "free space unknown"
        filename = getattr(cause, "filename", None)
        writing = f" while writing {filename}" if filename else ""
        self.note = note
        text = f"the disk holding {self.directory!r} is full ({space}){writing}"
        super().__init__(f"{text}; {note}" if note else text)
