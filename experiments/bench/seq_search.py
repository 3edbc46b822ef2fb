"""The search for the longest batch-1 sequence that trains under a memory cap.

Doubling from the first timed length while nothing fails (up to ``max_seq``), then bisection
between the longest fit and the first failure down to ``step`` tokens. A failure is
*foreseen* when the planner's peak of the compiled step exceeds the allocator's limit
(nothing is allocated, the process goes on); a real out-of-memory error leaves the
allocator in an unknown state (the donated state may be gone, the heap fragmented), so a
fresh process continues the search and re-tries that length first when it failed after
earlier runs of its process (it is *trusted* only as the first run of a process).

:func:`inprocess_search` is a worker's side (one process), :func:`continue_search` the
parent's (fresh processes while the time budget allows). Attempts are dicts with ``batch``,
``seq``, ``fit`` (True, False = out of memory, None = another error), ``predicted``
(foreseen), ``first_in_process`` and ``trusted``.
"""

from __future__ import annotations


def search_state(items: list[dict]) -> dict:
    """Where the search for the longest batch-1 sequence stands, from all attempts so far
    (any processes, any order): ``longest`` that fitted (0: none yet), ``first_failure``
    (the shortest failure above it, or None) and whether that failure is ``trusted`` (it
    was foreseen from XLA's buffer sizes, or it was the first run of its process; else
    earlier runs may have fragmented the allocator and it must be re-tried)."""
    ones = [r for r in items if r["batch"] == 1]
    lo = max([r["seq"] for r in ones if r.get("fit") is True], default=0)
    failed = [r for r in ones if r.get("fit") is False and r["seq"] > lo]
    hi = min([r["seq"] for r in failed], default=None)
    trusted = any(r["seq"] == hi and r.get("trusted") for r in failed)
    return {"longest": lo, "first_failure": hi, "trusted": hi is None or trusted}


def next_seqs(state: dict, *, max_seq: int, step: int) -> list[int] | None:
    """The lengths to try next, in order (a process stops at its first failure), or None
    when the search is over: doubling while nothing failed (up to ``max_seq``), the
    failure again when it is not trusted, then bisection down to ``step`` tokens."""
    lo, hi = state["longest"], state["first_failure"]
    if hi is None:
        seqs, s = [], max(lo, step // 2) * 2
        while s <= max_seq:
            seqs.append(s)
            s *= 2
        return seqs or None
    if not state["trusted"]:
        return [hi]
    mid = lo + max(step, (hi - lo) // 2 // step * step)
    return [mid] if hi - lo > step and mid < hi else None


def inprocess_search(prior, items, attempt, time_ok, *, max_seq: int, step: int) -> str | None:
    """Continue the search in this process while it is safe: ``attempt(seq) -> record``
    runs one batch-1 length (and appends it to ``items``). Stops after a real
    out-of-memory (a foreseen one, ``predicted``, allocated nothing), an error, at the time
    budget, or when :func:`next_seqs` is done. Returns why it stopped (None: done)."""
    while True:
        seqs = next_seqs(search_state(prior + items), max_seq=max_seq, step=step)
        if seqs is None:
            return None
        for s in seqs:
            if not time_ok():
                return "time budget"
            rec = attempt(s)
            if rec.get("fit") is None:
                return "error"
            if rec["fit"] is False:
                if not rec.get("predicted"):
                    return "out of memory (allocator state unknown)"
                break


def continue_search(items, run_fresh, can_run, *, max_seq: int, step: int) -> dict:
    """The parent's side: while the search is not over, start a fresh process
    (``run_fresh(prior_items) -> its new records``, which continues the search itself as
    far as it safely can), if ``can_run()`` (the time budget) allows. Returns the summary."""
    items, fresh, stopped = list(items), [], None
    while next_seqs(search_state(items), max_seq=max_seq, step=step) is not None:
        if any(r.get("fit") is None and not r.get("skipped") for r in items if r["batch"] == 1):
            stopped = "error"
            break
        if not can_run():
            stopped = "time budget"
            break
        new = run_fresh([r for r in items if r["batch"] == 1])
        fresh.append([r["seq"] for r in new])
        if not new:
            stopped = "a fresh process tried nothing"
            break
        items += new
    st = search_state(items)
    return {
        "longest": st["longest"],
        "first_failure": st["first_failure"],
        "failure_confirmed": st["trusted"],
        "stopped": stopped,
        "fresh_processes": fresh,
        "attempts": [
            {k: r.get(k) for k in ("seq", "fit", "trusted", "first_in_process", "predicted")}
            for r in items
            if r["batch"] == 1
        ],
        "max_seq": max_seq,
        "step": step,
    }
