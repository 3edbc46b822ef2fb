"""Results of the benchmarks: what ran where, and one row format for every table.

A result row is a dict from column name to cell. :func:`format_table` prints rows as plain
text; :func:`record` appends them to a section's Markdown table of ``docs/BENCHMARKS.md``
(:func:`append_row`) and, when asked, as JSON lines to a file. :func:`row_head` gives the
cells every recorded row starts with: date (UTC), machine, backend, versions
(:func:`versions`: jax, jaxlib, flax and any others) and commit (:func:`git_commit`).

Standard library only (a benchmark's parent and its torch workers stay free of jax).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
HEAD_COLUMNS = ("date", "machine", "backend", "versions", "commit")
JAX_PACKAGES = ("jax", "jaxlib", "flax")


def cpu_count() -> int:
    """Cores this process may run on (``sched_getaffinity``; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    """``"<CPU model> (<n> cores)"``; the model from ``/proc/cpuinfo`` on Linux."""
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
            model = m.group(1).strip()
    except OSError:
        pass
    return f"{model} ({cpu_count()} cores)"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files differ from it.

    The dirtiness check uses ``git --no-optional-locks status`` so that it never writes the
    index (safe while others use the same checkout). ``"unknown"`` outside a git checkout.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def versions(packages: Sequence[str] = JAX_PACKAGES) -> str:
    """``"jax 0.10.2, jaxlib 0.10.2, flax 0.12.8"``: installed versions, from package
    metadata (nothing is imported); ``?`` for a missing package."""
    out = []
    for name in packages:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} ?")
    return ", ".join(out)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def row_head(backend: str, packages: Sequence[str] = JAX_PACKAGES) -> dict[str, str]:
    """The cells of :data:`HEAD_COLUMNS` for a row measured now on ``backend``."""
    return {
        "date": utc_now(),
        "machine": machine(),
        "backend": backend,
        "versions": versions(packages),
        "commit": git_commit(),
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: columns left-aligned, cells ``str()``-ed, a dashed rule under
    the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_row(cells: Sequence[object]) -> str:
    """One Markdown table line; ``|`` in a cell becomes ``/``, newlines spaces."""
    return "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |"


def append_row(
    section: str,
    columns: Sequence[str],
    row: Sequence[object],
    *,
    intro: str = "",
    path: Path = BENCHMARKS_MD,
) -> Path:
    """Append ``row`` to the Markdown table of ``## <section>`` in ``path``.

    The table is the first one after the section heading; the row goes after its last
    line. A missing section (heading, ``intro`` paragraph, table header) is added at the
    end of the file; a missing file is an error (it holds the explanation of the rows).
    The file is rewritten atomically (temporary file + ``os.replace``).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``len(row) != len(columns)``, or the section's table has other columns.
    """
    if len(row) != len(columns):
        raise ValueError(f"{len(row)} cells for {len(columns)} columns")
    lines = path.read_text().splitlines()
    header, rule = md_row(columns), md_row(["---"] * len(columns))
    heading = f"## {section}"
    try:
        start = lines.index(heading)
    except ValueError:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", heading, ""] + ([intro, ""] if intro else []) + [header, rule, md_row(row)]
    else:
        i = start + 1
        while i < len(lines) and not lines[i].startswith(("|", "## ")):
            i += 1
        if i >= len(lines) or not lines[i].startswith("|"):
            lines[i:i] = [header, rule, md_row(row), ""]
        else:
            if lines[i].strip() != header:
                raise ValueError(f"{path}: the table of {heading!r} has other columns:\n{lines[i]}")
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            lines.insert(i, md_row(row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def record(
    section: str,
    columns: Sequence[str],
    rows: Sequence[Mapping[str, object]],
    *,
    intro: str = "",
    path: Path | None = BENCHMARKS_MD,
    jsonl: Path | None = None,
) -> int:
    """Append result rows (dicts with every key of ``columns``) to ``section``'s table in
    ``path`` (None: no Markdown) and, with ``jsonl``, one JSON object per row to that file
    (``{"section": ..., **row}``). Returns the number of rows.

    Raises:
      KeyError: a row lacks a column.
    """
    for row in rows:
        cells = [row[c] for c in columns]
        if path is not None:
            append_row(section, columns, cells, intro=intro, path=path)
        if jsonl is not None:
            with open(jsonl, "a") as f:
                f.write(json.dumps({"section": section, **row}, default=str) + "\n")
    return len(rows)
