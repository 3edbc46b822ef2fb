"""Small helpers shared by the benchmark scripts of ``experiments/bench``.

* what ran where: :func:`machine`, :func:`git_commit`, :func:`load_average`;
* peak memory of a process: :class:`PeakRSS` (``getrusage`` ``ru_maxrss``, guarded against
  the value a child process inherits from its parent, see the class docstring);
* output: :func:`format_table` (plain text for stdout) and :func:`append_row` (one dated
  row in a Markdown table of ``docs/BENCHMARKS.md``, one section per benchmark).

Standard library only, so that a benchmark's parent process stays small (see
:class:`PeakRSS`).
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
KIB_PER_MIB = 1024


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


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return os.getloadavg()


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None if unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class PeakRSS:
    """Peak resident set size of the current process, in KiB.

    The measure is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux). Caveat:
    Linux carries the peak RSS of the *parent's* address space into a child across
    ``fork``/``vfork`` + ``exec`` (``exec_mmap`` -> ``setmax_mm_hiwater_rss``), so a worker
    started by a big process (a pytest run, a parent that imported torch) reports at least
    the parent's peak. Create this object first thing in the worker: when ``ru_maxrss``
    then already exceeds the current RSS by more than ``inherited_margin_kib``, the value
    was inherited and :meth:`peak_kib` falls back to ``VmHWM`` of ``/proc/self/status`` (the
    high-water mark of this process's own address space), and :attr:`measure` says so.
    """

    def __init__(self, inherited_margin_kib: int = 64 * KIB_PER_MIB):
        rss = self.current_kib()
        self.inherited = rss is not None and _ru_maxrss_kib() > rss + inherited_margin_kib
        if self.inherited and _proc_status_kib("VmHWM") is None:
            raise RuntimeError("ru_maxrss is inherited from the parent and VmHWM is unavailable")

    @property
    def measure(self) -> str:
        if self.inherited:
            return "peak RSS (VmHWM; ru_maxrss was inherited from the parent)"
        return "peak RSS (getrusage ru_maxrss)"

    def peak_kib(self) -> int:
        if self.inherited:
            return int(_proc_status_kib("VmHWM"))
        return _ru_maxrss_kib()

    @staticmethod
    def current_kib() -> int | None:
        """Current RSS (``VmRSS``), KiB; None where ``/proc`` is unavailable."""
        return _proc_status_kib("VmRSS")


def _ru_maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: columns left-aligned, cells ``str()``-ed, a dashed rule under
    the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_row(cells: Sequence[object]) -> str:
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
    header = _md_row(columns)
    heading = f"## {section}"
    try:
        start = lines.index(heading)
    except ValueError:
        block = ["", heading, ""] + ([intro, ""] if intro else [])
        block += [header, _md_row(["---"] * len(columns)), _md_row(row)]
        lines = _strip_trailing_blank(lines) + block
    else:
        i = start + 1
        while i < len(lines) and not lines[i].startswith("|") and not lines[i].startswith("## "):
            i += 1
        if i >= len(lines) or not lines[i].startswith("|"):
            lines[i:i] = [header, _md_row(["---"] * len(columns)), _md_row(row), ""]
        else:
            if lines[i].strip() != header:
                raise ValueError(f"{path}: the table of {heading!r} has other columns:\n{lines[i]}")
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            lines.insert(i, _md_row(row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines
