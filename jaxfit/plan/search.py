"""Search the memory levers for what fits a budget, fastest first.

``search_batch`` tries micro-batch size x remat policy x cross-entropy chunk size. Speed
does not depend on the micro-batch (FLOPs per token are the same) but does on the other two
(recompute; the chunked LM head's extra pass when it is trained), so each (remat, chunk)
pair is traced once for its FLOPs, and the pairs are tried fastest first; for each, the
micro-batch grows through the divisors of ``batch_size`` (the effective batch stays the
config's) until the compiled peak no longer fits. Peak memory grows with the micro-batch,
so the walk stops at the first one that does not fit.

``search_seq_len`` finds the longest sequence that fits at the config's micro-batch:
doubling from the config's ``seq_len``, then bisecting between the longest that fit and the
shortest that did not, over lengths where the plan is exact: when planning on a CPU the
attention is compiled as blocks of 512 x 512 (``cpu_stand_in``), which pads a length that
is not a multiple of 512 up to one, so only those multiples (and lengths up to one block,
in steps of 128) are tried. A length the config does not fit is tried again with one more
memory lever pulled at a time (``seq_len_levers``: the layer inputs offloaded to pinned host
memory, the MLP in blocks of positions, a smaller loss chunk), so the answer is the longest
length that fits with some of them, and its overrides say which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from jaxfit import tasks
from jaxfit.models.attention import ATTENTION_CHUNK
from jaxfit.plan import core

log = logging.getLogger(__name__)

# What --search tries when not told: from the cheapest in memory to the fastest.
REMAT_POLICIES = ("full", "dots_no_batch", "dots", "none")
LOSS_CHUNK_SIZES = (0, 1024, 256)
SEQ_LEN_QUANTUM = 128


@dataclasses.dataclass
class Candidate:
    """One compiled configuration: its overrides, plan and whether it fits."""

    overrides: dict[str, Any]
    plan: core.Plan | None
    fits: bool
    error: str = ""


def _divisors(batch_size: int) -> list[int]:
    return [d for d in range(1, batch_size + 1) if batch_size % d == 0]


def _try(config, overrides, usable: int, progress) -> Candidate:
    try:
        plan = core.plan_config(core.set_fields(config, overrides))
    except Exception as e:  # a combination the model rejects (e.g. a seq_len too long)
        progress(f"  {overrides}: not buildable ({type(e).__name__}: {str(e)[:120]})")
        return Candidate(dict(overrides), None, False, f"{type(e).__name__}: {e}")
    fits = plan.peak_bytes <= usable
    host = plan.memory.get("host_bytes", 0)
    progress(
        f"  {overrides}: peak {plan.peak_bytes / 2**30:.2f} GiB "
        + (f"+ {host / 2**30:.2f} GiB on the host " if host else "")
        + f"({'fits' if fits else 'does not fit'}; compiled in {plan.compile_seconds:.0f} s)"
    )
    return Candidate(dict(overrides), plan, fits)


def search_batch(
    config,
    usable_bytes: int,
    *,
    micro_batch_sizes: Sequence[int] | None = None,
    remat_policies: Sequence[str] = REMAT_POLICIES,
    loss_chunk_sizes: Sequence[int] | None = None,
    max_compiles: int = 40,
    progress: Callable[[str], None] = log.info,
) -> list[Candidate]:
    """Every compiled candidate, fitting ones first, fastest (fewest executed FLOPs per
    example, then fewest bytes of collectives per example), then largest micro-batch,
    first.

    Args:
      config: the training config; its ``batch_size`` is the effective batch kept.
      usable_bytes: the peak a candidate may reach (budget less reserve).
      micro_batch_sizes: to try (default: the divisors of ``batch_size``).
      remat_policies: ``model.remat_policy`` values to try.
      loss_chunk_sizes: ``loss_chunk_size`` values (default :data:`LOSS_CHUNK_SIZES` for
        a config that has the field, else the config's own).
      max_compiles: stop after this many compilations (the search says so).
    """
    batch = int(config.batch_size)
    sizes = sorted(micro_batch_sizes or _divisors(batch))
    if bad := [m for m in sizes if m <= 0 or batch % m]:
        raise ValueError(f"micro-batch sizes {bad} do not divide batch_size={batch}")
    has_chunk = core.get_field(config, "loss_chunk_size") is not None
    chunks = list(loss_chunk_sizes or (LOSS_CHUNK_SIZES if has_chunk else [None]))
    pairs = []
    for remat in remat_policies:
        for chunk in chunks:
            pair = {"model.remat_policy": remat}
            if chunk is not None:
                pair["loss_chunk_size"] = int(chunk)
            probe = core.set_fields(config, {**pair, "micro_batch_size": sizes[0]})
            flops = core._trace(probe)[1]
            pairs.append((flops, pair))
    pairs.sort(key=lambda fp: fp[0])
    results: list[Candidate] = []
    compiles = 0
    for _, pair in pairs:
        for mb in sizes:
            if compiles >= max_compiles:
                progress(f"stopped after {max_compiles} compilations (--max_compiles)")
                return _ranked(results)
            cand = _try(config, {**pair, "micro_batch_size": mb}, usable_bytes, progress)
            compiles += 1
            results.append(cand)
            if not cand.fits:
                break
    return _ranked(results)


def _ranked(results: list[Candidate]) -> list[Candidate]:
    def key(c: Candidate):
        if c.plan is None:
            return (2, 0.0, 0)
        per_example = c.plan.flops["executed"] / c.plan.examples_per_step
        # equal FLOPs (e.g. two splits of the same devices): fewer bytes of collectives
        comm = (c.plan.communication or {}).get("total", 0) / c.plan.examples_per_step
        return (0 if c.fits else 1, per_example, comm, -c.overrides["micro_batch_size"])

    return sorted(results, key=key)


def seq_len_step(config) -> int | None:
    """The block of the attention the plan compiles (``cpu_stand_in``'s ``"chunked"``,
    ``jaxfit.models.flash``): lengths above it that are not a multiple of it are padded up
    to one there (the plan would count the padding), so only its multiples are exact.
    ``None`` when the plan compiles the config's own attention (every length is exact)."""
    impl = core.get_field(core.cpu_stand_in(config), "model.attention_impl")
    return ATTENTION_CHUNK if impl == "chunked" else None


def valid_seq_len(n: int, chunk: int | None) -> bool:
    """Whether the plan at ``seq_len=n`` estimates what a GPU runs: any length up to one
    attention chunk (a single block: the same attention), above it multiples of the
    chunk."""
    return chunk is None or n <= chunk or n % chunk == 0


def _valid_at_most(n: int, chunk: int | None) -> int:
    """The longest length ``<= n`` that is valid and, from :data:`SEQ_LEN_QUANTUM` on, a
    multiple of it (the search's step); 0 when there is none."""
    if chunk is not None and n > chunk:
        return n // chunk * chunk
    return n // SEQ_LEN_QUANTUM * SEQ_LEN_QUANTUM if n >= SEQ_LEN_QUANTUM else max(n, 0)


def seq_len_levers(config) -> list[dict[str, Any]]:
    """The settings ``search_seq_len`` tries at a length, from the cheapest in time to the
    most frugal in memory, each a superset of the one before: the config as it is; its
    layer inputs offloaded (``model.remat_policy="offload"``; no recompute beyond full
    remat's, host memory instead); the MLP over blocks of :data:`MLP_CHUNK` positions
    (``model.mlp_chunk_size``: no extra FLOPs, the ``[seq, intermediate]`` temporaries
    cut by ``seq / MLP_CHUNK``); the LM head and loss over chunks of
    :data:`SMALL_LOSS_CHUNK` tokens (``loss_chunk_size``: the float32 ``[chunk, vocab]``
    logits and their gradient smaller). A lever the config lacks (no such field) or
    already pulls is skipped."""
    ladder: list[dict[str, Any]] = [{}]
    remat = core.get_field(config, "model.remat_policy")
    if remat is not None and remat != "offload":
        ladder.append({**ladder[-1], "model.remat_policy": "offload"})
    mlp = core.get_field(config, "model.mlp_chunk_size")
    if mlp is not None and (not mlp or mlp > MLP_CHUNK):
        ladder.append({**ladder[-1], "model.mlp_chunk_size": MLP_CHUNK})
    loss = core.get_field(config, "loss_chunk_size")
    if loss is not None and (not loss or loss > SMALL_LOSS_CHUNK):
        ladder.append({**ladder[-1], "loss_chunk_size": SMALL_LOSS_CHUNK})
    return ladder


MLP_CHUNK = 2048
SMALL_LOSS_CHUNK = 256


def search_seq_len(
    config,
    usable_bytes: int,
    *,
    max_seq_len: int | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[Candidate]:
    """Candidates tried for ``seq_len`` (others as in ``config``), shortest first (at a
    length, in the order of :func:`seq_len_levers`).

    At each length the levers are pulled one more at a time (:func:`seq_len_levers`)
    until one fits, so the answer is the longest length that fits with some of them, and
    its candidate's overrides say which were needed. Only lengths where the plan is valid
    are compiled (:func:`valid_seq_len`: multiples of the attention chunk, 512, above one
    chunk when planning on a CPU).

    Args:
      max_seq_len: upper bound (default: 64 x the config's ``seq_len``).

    Raises:
      ValueError: the task does not train on ``seq_len``-token sequences (its registry
        entry's ``searches_seq_len``), or the config has no ``seq_len``.
    """
    task = tasks.entry(config)
    if not task.searches_seq_len or core.get_field(config, "seq_len") is None:
        searchable = sorted(n for n, e in tasks.TASKS.items() if e.searches_seq_len)
        raise ValueError(
            f"--search_seq_len: task {task.name!r} has no sequence length to search "
            f"(tasks that do: {searchable}; needs config.seq_len)"
        )
    chunk = seq_len_step(config)
    start = int(config.seq_len)
    if not valid_seq_len(start, chunk):
        start = _valid_at_most(start, chunk)
        progress(f"  starting from seq_len={start} (plans are valid at multiples of {chunk})")
    limit = int(max_seq_len or 64 * int(config.seq_len))
    tried: dict[int, Candidate] = {}
    rows: list[Candidate] = []
    levers = seq_len_levers(config)

    def fits(n: int) -> bool:
        if n not in tried:
            for lever in levers:
                cand = _try(config, {"seq_len": n, **lever}, usable_bytes, progress)
                rows.append(cand)
                tried[n] = cand
                if cand.fits or cand.plan is None:
                    break
        return tried[n].fits

    lo, hi = 0, limit + 1  # longest known to fit; shortest known not to (or past the limit)
    n = start
    while n <= limit:
        if not fits(n):
            hi = n
            break
        lo, n = n, n * 2
    if lo == 0:  # the config's own seq_len does not fit: halve down
        n = _valid_at_most(start // 2, chunk)
        while n >= 1 and not fits(n):
            hi, n = n, _valid_at_most(n // 2, chunk)
        lo = max(n, 0)
    while lo:
        mid = _valid_at_most((lo + hi) // 2, chunk)
        if mid <= lo:
            mid = _valid_at_most(hi - 1, chunk)  # the last valid length below hi
            if mid <= lo or mid in tried:
                break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return sorted(rows, key=lambda c: c.overrides["seq_len"])
