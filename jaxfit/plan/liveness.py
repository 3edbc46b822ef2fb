"""What is live at the peak of a compiled program: XLA's buffer assignment, read back.

``compiled.memory_analysis()`` gives one number for the temporaries: the size of XLA's
temporary heap (``temp_size_in_bytes``). A plan made on a CPU for a GPU has to take off
buffers only the CPU keeps (float32 copies of bfloat16 values: XLA:CPU computes bf16
matmuls in float32), and buffers that a GPU holds in pinned host memory (the ``offload``
remat policy), but only the part of them that is live when the temporaries peak: a copy
that is dead at the peak costs nothing, and subtracting it would put the plan below the
truth.

XLA writes its buffer assignment and the schedule's live ranges when asked to dump a
module (``xla_dump_to``, passed as a compile option: :data:`DUMP_OPTIONS`):

* ``*buffer-assignment.txt``: ``allocation N: size S, preallocated-temp:`` (the heap of
  temporaries), then one `` value: <id NAME @0> (size=S,offset=O): SHAPE`` line per
  value placed in it (values updated in place, such as a loop's state, share an offset:
  :meth:`Liveness.peak` counts such a slot once);
* ``*live-range.txt``: under ``BufferLiveRange:``, ``NAME{index}:start-end`` per value,
  positions in the flattened schedule (XLA's ``HloLiveRange``); a value of a tuple
  element is ``NAME{i}`` in both files (loop state: ``arg_tuple.8{2} (phi)``).

:func:`read_dump` reads them; :meth:`Liveness.peak` replays the schedule and returns the
largest sum of live temporaries, leaving out any values asked for.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Iterable

# Compile options that make XLA write the files read here (added to the plan's own).
DUMP_OPTIONS = {"xla_dump_hlo_as_text": True}

_ALLOCATION = re.compile(r"allocation \d+: size (\d+)(.*)")
_VALUE = re.compile(
    r" value: <\d+ ([^\s{]+)(\{[^}]*\})?(?: \(phi\))? @\S+> "
    r"\(size=(\d+),offset=(\d+)\): (\S+)"
)
_RANGE = re.compile(r"\s+([^\s{]+)(\{[^}]*\}):(\d+)-(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Value:
    """One temporary: the instruction that defines it, its bytes, its shape (HLO text,
    e.g. ``f32[32768,4096]{1,0}``) and its live range ``[start, end]`` (schedule
    positions, inclusive)."""

    name: str
    size: int
    shape: str
    start: int
    end: int
    offset: int = -1  # in the heap; values updated in place share one (a loop's state)


@dataclasses.dataclass
class Liveness:
    """The temporaries of one compiled module with their live ranges.

    Attributes:
      values: every value of the preallocated temporary heap that has a live range.
      heap_bytes: the heap's size (XLA's ``temp_size_in_bytes``; at least the live peak,
        more where fragmentation leaves holes).
    """

    values: list[Value]
    heap_bytes: int

    def peak(self, weigh: Callable[[Value], int] | None = None) -> tuple[int, int]:
        """``(bytes, position)``: the most bytes of temporaries live at once, and the
        first schedule position where that happens, each value counted as ``weigh(value)``
        bytes (default its size; 0 leaves it out)."""
        # A buffer updated in place is several values at one heap slot (a loop's state
        # before, in and after the loop, whose live ranges touch): one slot counts once
        # however many of its values are live.
        events: dict[int, list] = {}
        for v in self.values:
            size = v.size if weigh is None else int(weigh(v))
            if not size:
                continue
            slot = (v.offset, v.size) if v.offset >= 0 else id(v)
            events.setdefault(v.start, []).append((1, slot, size))
            events.setdefault(v.end + 1, []).append((-1, slot, size))
        users: dict = {}
        live, best, at = 0, 0, 0
        for t in sorted(events):
            for step, slot, size in sorted(events[t], key=lambda e: e[0]):  # ends first
                before = users.get(slot, 0)
                users[slot] = before + step
                if before == 0 and step > 0:
                    live += size
                elif before == 1 and step < 0:
                    live -= size
            if live > best:
                best, at = live, t
        return best, at

    def live_at(self, position: int) -> list[Value]:
        """The values live at ``position``, largest first."""
        return sorted(
            (v for v in self.values if v.start <= position <= v.end), key=lambda v: -v.size
        )


def read_dump(dump_dir: str, module: str = "jit_train_step") -> Liveness | None:
    """The :class:`Liveness` of the module named ``module`` dumped in ``dump_dir`` (the
    last one compiled, if several), or ``None`` when XLA wrote no buffer assignment."""
    paths = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*buffer-assignment.txt")))
    paths = [p for p in paths if not p.endswith("-values.txt")]
    if not paths:
        return None
    assignment = paths[-1]
    ranges_path = assignment.replace("buffer-assignment.txt", "live-range.txt")
    if not os.path.exists(ranges_path):
        return None
    return parse(_lines(assignment), _lines(ranges_path))


def parse(assignment: Iterable[str], live_ranges: Iterable[str]) -> Liveness:
    """:class:`Liveness` from the text of a buffer assignment and of its live ranges."""
    ranges: dict[str, tuple[int, int]] = {}
    in_ranges = False
    for line in live_ranges:
        if "BufferLiveRange" in line:
            in_ranges = True
            continue
        if in_ranges and (m := _RANGE.match(line)):
            ranges[m.group(1) + m.group(2)] = (int(m.group(3)), int(m.group(4)))
    values: list[Value] = []
    heap, in_heap = 0, False
    for line in assignment:
        if m := _ALLOCATION.match(line):
            in_heap = "preallocated-temp" in m.group(2)
            heap = int(m.group(1)) if in_heap else heap
            continue
        if in_heap and (m := _VALUE.match(line)):
            name, index = m.group(1), m.group(2) or "{}"
            if (span := ranges.get(name + index)) is not None:
                values.append(Value(name, int(m.group(3)), m.group(5), *span, int(m.group(4))))
    return Liveness(values, heap)


def _lines(path: str) -> Iterable[str]:
    with open(path) as f:
        yield from f
