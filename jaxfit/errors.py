"""Errors a user can act on, and how the command lines report them.

Every ``python -m jaxfit.X`` reports a mistake in its input as one line on stderr,
``error: <what>, <where>, <what to do>``, and exits with status 2 before any work starts
(``jaxfit.cli.run``; ``--verbose`` or ``JAXFIT_DEBUG=1`` adds the traceback). The
exceptions here carry the parts of that line. This module imports nothing from jaxfit, so
any layer (data, tasks, models) can raise them.
"""

from __future__ import annotations

import os


class UsageError(ValueError):
    """A command line that cannot run: a missing or contradictory flag."""


class DataError(ValueError):
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
