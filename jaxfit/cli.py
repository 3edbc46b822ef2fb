"""What every ``python -m jaxfit.X`` shares: ``--help``, one-line errors, quiet imports.

``run(main, argv, prog=, doc=)`` calls a CLI's ``main`` and turns what it raises into

* ``--help`` / ``-h`` (:class:`jaxfit.errors.ShowHelp`): the command's docstring
  (description and examples), its flags and, when ``--config`` names a loadable config,
  that config's fields with their defaults and comments; exit status 0.
* a mistake in the input found before work starts: ONE line on stderr,
  ``error: <what>, <where>, <what to do>``, exit status 2 (:data:`USER_ERRORS`, and a
  ``ValueError`` raised by jaxfit's own code); jaxfit's own errors
  (:class:`jaxfit.errors.Error`) carry their status: out of memory 3, non-finite results
  4, a busy workdir 5, no usable checkpoint 6, a full disk 7 (one line too). With
  ``--verbose`` or ``JAXFIT_DEBUG=1`` the traceback comes first.
* anything else: the traceback, as Python prints it (a bug to report).

Importing this module silences third-party advice a user cannot act on (transformers'
"PyTorch was not found" when only its tokenizers are used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxfit import checkpoint, config_docs  # noqa: E402 (after the environment above)
from jaxfit.errors import (  # noqa: E402
    DiskFullError,
    Error,
    ShowHelp,
    UsageError,
    disk_full_cause,
)

# Python's errors that are mistakes in a command's input: reported in one line, exit
# status 2 (jaxfit's own carry their status: jaxfit.errors.Error.exit_code).
USER_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    json.JSONDecodeError,
)
_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--verbose`` on the command line or ``JAXFIT_DEBUG=1`` in the environment."""
    argv = sys.argv if argv is None else argv
    return "--verbose" in argv or os.environ.get("JAXFIT_DEBUG", "") not in ("", "0")


def run(
    main: Callable[[list[str]], int],
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str | None,
) -> int:
    """``main(argv)`` with jaxfit's help and error reporting (see the module docstring).

    ``argv`` is passed on as given (``None``: the CLI reads ``sys.argv`` itself).

    Returns:
      ``main``'s exit status, 0 after help, else :func:`exit_code` of what it raised.
    """
    try:
        return main(argv)
    except ShowHelp as request:
        print(render_help(prog, doc, request))
        return 0
    except Exception as e:
        cause = disk_full_cause(e)
        if cause is not None and not isinstance(e, DiskFullError):
            e = DiskFullError(_directory_of(cause), cause)  # one line, status 7
        code = exit_code(e)
        if code is None:
            raise
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        return code


def _directory_of(error: BaseException) -> str:
    """The directory of the file ``error`` names (the working directory if none)."""
    filename = getattr(error, "filename", None)
    if isinstance(filename, str | os.PathLike):
        return os.path.dirname(os.path.abspath(filename))
    return os.getcwd()


def exit_code(error: BaseException) -> int | None:
    """The exit status ``error`` is reported with: a :class:`jaxfit.errors.Error`'s own
    ``exit_code`` (2 bad input, 3 out of memory, 4 non-finite results, 5 busy workdir,
    6 no usable checkpoint, 7 full disk), 2 for :data:`USER_ERRORS` and a ``ValueError``
    raised by jaxfit's own code, ``None`` for anything else (a bug: the traceback)."""
    if isinstance(error, Error):
        return error.exit_code
    if isinstance(error, USER_ERRORS) or _raised_by_jaxfit(error):
        return 2
    return None


def _raised_by_jaxfit(error: BaseException) -> bool:
    """A ``ValueError`` whose innermost frame is jaxfit's or a config file's own code: a
    deliberate message to the user (one from a library is more likely a bug)."""
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    *_, last = traceback.walk_tb(error.__traceback__)
    where = Path(last[0].f_code.co_filename).resolve()
    return where.is_relative_to(_PACKAGE) or where.is_relative_to(_REPO / "configs")


def describe(error: BaseException) -> str:
    """The one-line ``<what>, <where>, <what to do>`` text of ``error`` (no ``error:``)."""
    if isinstance(error, json.JSONDecodeError):
        path = _file_in_traceback(error, (".json", ".jsonl", ".ndjson"))
        where = f"in {path}:{error.lineno}:{error.colno}" if path else (
            f"at line {error.lineno} column {error.colno}"
        )  # fmt: skip
        return (
            f"invalid JSON ({error.msg}), {where}, the file is truncated or not JSON: "
            "download or write it again"
        )
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        hint = {
            FileNotFoundError: "check the path",
            NotADirectoryError: "pass a directory",
            IsADirectoryError: "pass a file",
            FileExistsError: "a file is in the way of a directory: pass another path",
            PermissionError: "check the permissions",
        }.get(type(error), "check the path")
        return f"{error.strerror.lower()}, {error.filename!r}, {hint}"
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (Error, ValueError, *USER_ERRORS)):
        text = f"{type(error).__name__}: {text}"
    return text


def _file_in_traceback(error: BaseException, suffixes: tuple[str, ...]) -> str | None:
    """The file being read where ``error`` was raised: the innermost frame's local that
    is an open file or a path with one of ``suffixes`` (json's errors carry no name)."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", value) if hasattr(value, "read") else value
            if isinstance(name, str | os.PathLike):
                text = os.fspath(name)
                if isinstance(text, str) and text.endswith(suffixes) and os.path.isfile(text):
                    return text
    return None


# --- paths named by flags ------------------------------------------------------------


def _cannot_write(directory: Path) -> str | None:
    """Why no file can be created in the existing ``directory`` (``None``: it can): a
    real probe (a temporary file, removed), since ``os.access`` answers yes to root on
    file systems that refuse writes (read-only mounts, /proc)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".jaxfit-write-probe-")
    except OSError as e:
        return (e.strerror or type(e).__name__).lower()
    os.close(fd)
    os.unlink(name)
    return None


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a directory jaxfit writes into (``None``: it can): it is a
    file, it is not writable, or it is missing and cannot be created (the nearest
    existing parent is a file or not writable). Creates nothing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return "is a file, not a directory"
        why = _cannot_write(path)
        return f"is not writable ({why})" if why else None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"does not exist and cannot be created: {str(parent)!r} is a file"
    why = _cannot_write(parent)
    if why:
        return f"does not exist and cannot be created in {str(parent)!r} ({why})"
    return None


def input_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an input file (``None``: it can): missing, a
    directory, or not readable."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory, not a file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"is not readable ({(e.strerror or type(e).__name__).lower()})"
    return None


def check_output_dir(flag: str, path: str | os.PathLike) -> None:
    """Raise :class:`UsageError` naming ``flag`` when ``path`` cannot be written into."""
    problem = output_dir_problem(path)
    if problem:
        raise UsageError(
            f"{str(path)!r} {problem}, in {flag}, pass a directory you can write to "
            "(it is created when missing)"
        )


def check_input_file(flag: str, path: str | os.PathLike) -> None:
    """Raise :class:`UsageError` naming ``flag`` when ``path`` cannot be read as a file."""
    problem = input_file_problem(path)
    if problem:
        raise UsageError(f"{str(path)!r} {problem}, in {flag}, pass an existing file")


def checkpoint_step(workdir: str | Path, step: int | None = None) -> int:
    """The step to evaluate in ``workdir``: ``step`` if that checkpoint exists, else the
    latest, checked before any data is read.

    Raises:
      UsageError: ``workdir`` is not a run directory (no ``config.json``), has no
        checkpoint, or has none at ``step``; the message says what exists.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        what = "is a file, not a directory" if workdir.exists() else "does not exist"
        raise UsageError(
            f"run directory {str(workdir)!r} {what}, in --workdir, "
            "pass the --workdir of a `python -m jaxfit.train` run"
        )
    if not (workdir / "config.json").is_file():
        raise UsageError(
            f"no config.json in {str(workdir)!r}, in --workdir, "
            "pass the --workdir of a `python -m jaxfit.train` run"
        )
    steps = []
    if (workdir / "checkpoints").is_dir():  # read-only: a run may be writing them
        with checkpoint.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
            steps = ckpt.all_steps()
    if not steps:
        raise UsageError(
            f"no checkpoint in {str(workdir / 'checkpoints')!r} (the run has a config but "
            "saved no step yet), in --workdir, train first (checkpoints are written every "
            "ckpt_every steps and at the end)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UsageError(
            f"no checkpoint at step {step} in {str(workdir / 'checkpoints')!r}, in --step, "
            f"available steps: {', '.join(map(str, steps))}"
        )
    return step


# --- help ------------------------------------------------------------------------------------
def render_help(prog: str, doc: str | None, request: ShowHelp) -> str:
    """The ``--help`` text of a config-driven CLI (``jaxfit.train``, ``jaxfit.plan``)."""
    lines = [f"usage: {prog} --config FILE.py[:ARG] [--config.FIELD=VALUE ...] [flags]", ""]
    if doc:
        lines += [doc.strip(), ""]
    lines.append("flags:")
    for name, text in request.flags.items():
        lines.append(f"  --{name:22s} {text}")
    lines.append(f"  --{'help, -h':22s} This text; with --config FILE, that config's fields.")
    lines.append("")
    if request.config is not None:
        config_file = request.spec.partition(":")[0]
        lines.append(
            f"config fields of {request.spec} (override any as --config.FIELD=VALUE; "
            "default, then the comment from the source):"
        )
        lines.append(config_docs.describe(request.config, config_file))
    elif request.config_error:
        lines.append(f"the config did not load: {request.config_error}")
    else:
        configs = sorted(p.relative_to(_REPO).as_posix() for p in (_REPO / "configs").glob("*.py"))
        lines.append("add --config FILE --help for a config's fields; configs:")
        lines += textwrap.wrap(", ".join(configs), 96, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines).rstrip() + "\n"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with jaxfit's conventions: the description (the module docstring) is
    printed as written, ``--verbose`` is defined, and a usage error is a
    :class:`UsageError` (one ``error:`` line, status 2, from :func:`run`)."""

    def __init__(self, *, prog: str, description: str | None, **kwargs):
        super().__init__(
            prog=prog,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        self.add_argument("--verbose", action="store_true", help="show tracebacks of errors")

    def error(self, message: str):
        raise UsageError(f"{message}, in {self.prog}, add --help for the flags")
