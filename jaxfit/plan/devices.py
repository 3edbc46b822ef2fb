"""Planning for a mesh of devices: how many, how they split, and what they send each other.

``python -m jaxfit.plan --devices 8 --mesh data=2,fsdp=4`` compiles the train step as an
SPMD program for 8 devices (on 8 host CPU devices when the machine has fewer: no
accelerator is needed, :func:`use_devices`), so XLA's memory analysis is per device, and
reads the communication of one step off the compiled HLO (:func:`collective_bytes`).
``--search`` tries every ``data x fsdp`` split of the devices (:func:`mesh_splits`).
"""

from __future__ import annotations

import re
from typing import Any

import jax

# Bytes per element of the HLO element types (xla/primitive_util).
_ELEMENT_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# The collectives counted, by the name their bytes are reported under.
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(body|to_apply|calls|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def use_devices(n: int) -> None:
    """Plan for ``n`` devices: compile on ``n`` host CPU devices (jax's
    ``jax_num_cpu_devices``; XLA's memory analysis of the SPMD program is per device).
    Must run before anything initialises jax's backends (the plan CLI calls it right after
    parsing its flags).

    Raises:
      ValueError: ``n < 1``, or jax's backends are already initialised with another
        device count.
    """
    if n < 1:
        raise ValueError(f"--devices {n}: at least 1")
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as e:  # backends already initialised
        if jax.device_count() != n:
            raise ValueError(
                f"--devices {n}: jax is already running on {jax.device_count()}"
            ) from e


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"mesh.data": 2, "mesh.fsdp": 4}`` (config overrides; an
    axis not named keeps the config's value).

    Raises:
      ValueError: not ``name=int`` pairs, or an axis other than ``data`` / ``fsdp``.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in ("data", "fsdp") or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh {text!r}: expected e.g. data=2,fsdp=4 (axes data, fsdp)")
        out[f"mesh.{name}"] = int(value)
    return out


def mesh_splits(n: int) -> list[dict[str, int]]:
    """Every ``data x fsdp = n`` split as config overrides, the least sharded first (less
    communication for the same memory when both fit)."""
    return [{"mesh.data": n // f, "mesh.fsdp": f} for f in range(1, n + 1) if n % f == 0]


def _result_bytes(type_text: str, op: str) -> int:
    arrays = _ARRAY.findall(type_text)
    if op.endswith("-start") and type_text.startswith("(") and arrays:
        arrays = arrays[-1:]  # (operand, result[, scratch]) of an async collective
    total = 0
    for dtype, dims in arrays:
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _ELEMENT_BYTES.get(dtype, 4)
    return total


def collective_bytes(hlo_text: str) -> dict[str, Any]:
    """Bytes of the results of the collectives one execution of a compiled (SPMD,
    per-device) program runs, by kind, loops counted their trip count times.

    Reads ``compiled.as_text()``: each computation's ``all-gather``, ``reduce-scatter``,
    ``all-reduce``, ``all-to-all`` and ``collective-permute`` instructions (async
    ``-start`` forms too), and the computations it calls (``while`` bodies times their
    ``known_trip_count``, ``call`` / fusions once, the largest ``conditional`` branch),
    from ``ENTRY``. A result's bytes are its array sizes: for an all-gather the gathered
    array, for an all-reduce the reduced one, for a reduce-scatter the scattered piece.
    What crosses the wire per device is about ``(n - 1) / n`` of an all-gather's result
    and twice that of an all-reduce's (ring algorithms, ``n`` devices in the group).

    Returns:
      ``{kind: bytes, ..., "total": bytes, "loops_without_trip_count": k}`` (loops whose
      count XLA did not know are counted once).
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    unknown = [0]
    memo: dict[str, dict[str, int]] = {}

    def visit(name: str, stack: tuple = ()) -> dict[str, int]:
        if name in memo:
            return memo[name]
        if name in stack or name not in comps:
            return {}
        out: dict[str, int] = {}
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            type_text, op, rest = m.groups()
            kind = op[: -len("-start")] if op.endswith("-start") else op
            if kind in COLLECTIVES:
                out[kind] = out.get(kind, 0) + _result_bytes(type_text, op)
            times = 1
            if op == "while":
                trip = _TRIP.search(rest)
                times = int(trip.group(1)) if trip else 1
                unknown[0] += trip is None
            for role, called in _CALLED.findall(rest):
                if role == "condition":
                    continue
                for k, v in visit(called, (*stack, name)).items():
                    out[k] = out.get(k, 0) + v * (times if role == "body" else 1)
            branches = _BRANCHES.search(rest)
            if branches:
                subs = [
                    visit(b.strip().lstrip("%"), (*stack, name))
                    for b in branches.group(1).split(",")
                ]
                biggest = max(subs, key=lambda d: sum(d.values()), default={})
                for k, v in biggest.items():
                    out[k] = out.get(k, 0) + v
        memo[name] = out
        return out

    found = visit(entry) if entry else {}
    result: dict[str, Any] = {k: int(found.get(k, 0)) for k in COLLECTIVES}
    result["total"] = int(sum(found.values()))
    result["loops_without_trip_count"] = unknown[0]
    return result
