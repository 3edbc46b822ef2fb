"""gpu_suite part ``qlora``: Llama-3-8B QLoRA training under the memory cap.

``configs/llama3_8b_qlora.py``: the Llama 3 8B architecture (hidden 4096, 32 layers, GQA
32/8 heads, MLP 14336, vocabulary 128,256, ``llama3`` RoPE scaling) as a run from a real
checkpoint holds it (``gpu_common.llama_config``: NF4 kernels with double quantisation,
bf16 embeddings, norms and LM head), a random base drawn one layer at a time
(``gpu_common.random_base``), LoRA on every linear layer (alpha 32, dropout 0.05), bf16
compute, full remat, the LM head + loss in chunks of 1024 tokens, the recipe's AdamW; the
trainer's jitted step with the frozen base as its third argument.

Measured, in the first process of rank ``ranks[0]`` (16): batch 1 x 2048 tokens and the
config's micro-batch x 2048 (skipped when it is 1, as in this recipe), timed; then, for
each rank of ``ranks`` (16, 32), the longest batch-1 sequence that runs: doubling from 2048
then bisecting to ``seq_step`` (:mod:`experiments.bench.seq_search`; a length the planner
foresees above the allocator's limit is not run; a real out-of-memory error ends the
process and a fresh one continues). The ranks share what is left of the suite's budget;
the search says where it stopped. ``--parts qlora`` gives it the whole budget.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from experiments.bench import gpu_common, report, seq_search

_LLAMA = dict(
    config="configs/llama3_8b_qlora.py",
    overrides=[],
    seq=2048,
    ranks=[16, 32],
    warmup=1,
    steps=5,
    max_seq=131072,
    seq_step=1024,
)
SIZES = {
    "full": dict(_LLAMA, search=True),
    "quick": dict(_LLAMA, ranks=[16], steps=3, search=False),
    "small": dict(config="configs/llama_qlora.py:demo", model_overrides=[
        "model.config.vocab_size=512"], overrides=[], seq=64, ranks=[4, 8], warmup=1,
        steps=2, max_seq=128, seq_step=64, search=True),
}  # fmt: skip
CAP_S = {"full": math.inf, "quick": math.inf, "small": math.inf}


class _Process:
    """One worker process: the random base and its adapters built once (the train state
    donated from step to step), then :meth:`attempt` per batch x sequence."""

    def __init__(self, spec: dict, peak, save):
        import jax

        from experiments.bench import runner
        from jaxfit.plan.core import frozen_bytes_by_kind

        t0 = time.perf_counter()
        self.spec, self.save, self.n, self.longest_s = spec, save, 0, 0.0
        self.out, self.memory = gpu_common.start_worker(spec, peak)
        self.workdir = Path(spec["workdir"])
        self.config = config = gpu_common.llama_config(spec, self.workdir)
        setup = runner.build(config, self.workdir)
        _, trainable, self.frozen = gpu_common.random_base(setup)
        self.state = runner.fresh_state(setup, trainable)
        del trainable
        jax.block_until_ready((self.state, self.frozen))
        sizes = f"batch {config.batch_size} (micro {config.micro_batch_size}) x {config.seq_len}, "
        self.out.update(
            config=runner.describe(config, setup.task.model).replace(sizes, ""),
            frozen_mib={
                k: v / gpu_common.MIB for k, v in frozen_bytes_by_kind(self.frozen).items()
            },
            setup_s=time.perf_counter() - t0,
            peak_after_init_mib=self.memory.peak_mib(),
            items=[],
        )
        save(self.out)

    def time_ok(self) -> bool:
        """Whether another attempt fits before the deadline (1.5 x the longest so far)."""
        guess = 1.5 * self.longest_s + 5 if self.n else self.spec.get("estimate_s", 0)
        return time.time() + guess < self.spec["deadline"]

    def attempt(self, b: int, s: int, timed: bool) -> dict:
        """One step (``timed``: warm-up + timed steps) of batch ``b`` x ``s`` tokens,
        recorded in ``out["items"]``: the measurement, or ``fit`` False (out of memory) /
        None (another error) with the error; ``trusted``: a failure that says the length
        does not fit (the first attempt of its process, or foreseen by the planner)."""
        from experiments.bench import runner
        from jaxfit import oom
        from jaxfit.config import set_fields

        rec = {"batch": b, "seq": s, "timed": timed, "first_in_process": self.n == 0}
        self.n += 1
        t = time.perf_counter()
        try:
            if s > self.spec.get("simulate_oom_seq", math.inf):  # tests of the search on a CPU
                raise RuntimeError("RESOURCE_EXHAUSTED: simulated (--simulate_oom_seq)")
            sizes = {"seq_len": s, "batch_size": b, "micro_batch_size": b}
            sub = runner.build(set_fields(self.config, sizes), self.workdir)
            batch = runner.synthetic_batch(sub.task, b, seed=self.n)
            warmup, steps = (self.spec["warmup"], self.spec["steps"]) if timed else (0, 1)
            m, self.state = runner.measure(sub, self.state, batch, self.frozen, warmup=warmup,
                                           steps=steps, memory=self.memory)  # fmt: skip
            rec.update(m)
        except Exception as e:  # noqa: BLE001 - recorded; out of memory is an expected outcome
            error = f"{type(e).__name__}: {e}"[:600]
            fit = False if oom.is_out_of_memory(e) else None
            rec.update(fit=fit, error=error, peak_mib=self.memory.peak_mib())
        rec["trusted"] = rec["fit"] is False and (rec["first_in_process"] or "predicted" in rec)
        rec["wall_s"] = time.perf_counter() - t
        self.longest_s = max(self.longest_s, rec["wall_s"])
        self.out["items"].append(rec)
        self.save(self.out)
        return rec


def worker(spec: dict, peak, save) -> dict:
    """Run ``spec["items"]`` and then the in-process search (``spec["prior"]``: the
    attempts of earlier processes) until the first real failure or the deadline."""
    proc = _Process(spec, peak, save)
    out = proc.out
    for item in spec.get("items", []):
        b = item["batch"] or proc.config.micro_batch_size  # 0: the config's micro-batch
        if not item["batch"] and b == 1:
            continue  # the config's micro-batch is 1: measured already
        if not proc.time_ok():
            out["stopped"] = "time budget"
            return out
        rec = proc.attempt(b, item["seq"], item["timed"])
        if rec["fit"] is not True and not rec.get("predicted"):
            out["stopped"] = "error" if rec["fit"] is None else "out of memory"
            return out
    if spec.get("search"):
        out["stopped"] = seq_search.inprocess_search(
            spec.get("prior", []),
            out["items"],
            lambda s: proc.attempt(1, s, False),
            proc.time_ok,
            max_seq=spec["max_seq"],
            step=spec["seq_step"],
        )
    return out


def _search(suite, spec: dict, main: dict, deadline: float) -> dict:
    """Fresh processes continue ``main``'s search while ``deadline`` allows."""
    estimate = {"s": main.get("setup_s", 60.0) + max(r["wall_s"] for r in main["items"]) + 10}

    def can_run() -> bool:
        return deadline - time.time() > 1.2 * estimate["s"] + 10

    def run_fresh(prior: list[dict]) -> list[dict]:
        slim = [{k: r.get(k) for k in ("batch", "seq", "fit", "trusted")} for r in prior]
        longest = max(r["wall_s"] for r in main["items"])
        r = suite.run_worker(
            "qlora",
            {**spec, "items": [], "prior": slim, "estimate_s": longest},
            timeout=deadline - time.time(),
        )
        estimate["s"] = max(estimate["s"], r["wall_s"])
        main.setdefault("fresh", []).append(r)
        return r.get("items", [])

    return seq_search.continue_search(
        main["items"], run_fresh, can_run, max_seq=spec["max_seq"], step=spec["seq_step"]
    )


def longest_note(s: dict) -> str:
    """One line: the longest batch-1 sequence and how sure the search is of it."""
    text = f"longest sequence at batch 1: {s['longest'] or 'none'}"
    if s["first_failure"] is not None:
        sure = "" if s["failure_confirmed"] else " (after other runs in its process)"
        text += f"; {s['first_failure']} did not fit{sure}"
    elif s["longest"] >= s["max_seq"]:
        text += f" (the search stops at max_seq {s['max_seq']})"
    if s["stopped"]:
        text += f"; search stopped: {s['stopped']}"
    elif s["first_failure"] is not None:
        text += f"; resolved to {s['step']} tokens"
    n = len(s.get("fresh_processes", []))
    return text + f"; {n} fresh process{'es' if n != 1 else ''} after the first"


def _rows(rank: int, main: dict) -> list[dict]:
    config = main.get("config", "")
    rows = [
        gpu_common.raw_row("qlora", it, notes=f"r{rank}")
        for it in main.get("items", [])
        if it["timed"]
    ]
    if "search" in main:
        fits = [it for it in main["search_items"] if it.get("fit")]
        best = max(fits, key=lambda it: it["seq"], default={"config": config})
        rows.append(
            gpu_common.raw_row(
                "qlora longest B1", best, notes=f"r{rank}; {longest_note(main['search'])}"
            )
        )
    if not main.get("items"):
        rows.append(gpu_common.error_row("qlora", main.get("error", "no attempt ran"), config))
    return rows


def run(suite, spec: dict) -> dict:
    out = {"ranks": {}, "rows": [], "ok": True}
    ranks = spec["ranks"]
    for i, rank in enumerate(ranks):
        deadline = time.time() + suite.remaining() / (len(ranks) - i)
        items = [dict(batch=1, seq=spec["seq"], timed=i == 0)]
        items += [dict(batch=0, seq=spec["seq"], timed=True)] if i == 0 else []
        sp = {**spec, "overrides": [*spec["overrides"], f"lora.rank={rank}"], "items": items}
        main = suite.run_worker("qlora", sp, timeout=deadline - time.time())
        if spec["search"] and main.get("items"):
            main["search"] = _search(suite, sp, main, deadline)
            fresh = [it for f in main.get("fresh", []) for it in f.get("items", [])]
            main["search_items"] = [it for it in main["items"] + fresh if it["batch"] == 1]
        out["ranks"][rank] = main
        out["rows"] += _rows(rank, main)
        out["ok"] = out["ok"] and bool(main.get("items")) and main["items"][0].get("fit") is True
    return out


def details(res: dict) -> str:
    """Every attempt of every process, one line each."""
    lines = []
    f = lambda x, fmt: "-" if x is None else format(x, fmt)
    for rank, main in res.get("ranks", {}).items():
        procs = [main.get("items", [])] + [p.get("items", []) for p in main.get("fresh", [])]
        for n, items in enumerate(procs, 1):
            for it in items:
                fit = {True: "yes", False: "OOM", None: "error"}[it.get("fit")]
                lines.append(
                    (
                        rank,
                        n,
                        it["batch"],
                        it["seq"],
                        "timed" if it["timed"] else "fit?",
                        fit + (" (foreseen)" if it.get("predicted") else ""),
                        f(it.get("step_s") and it["step_s"] * 1e3, ".0f"),
                        f(it.get("peak_mib"), ",.0f"),
                        f(it.get("planned_peak_mib"), ",.0f"),
                    )
                )
    header = (
        "rank",
        "process",
        "batch",
        "seq",
        "run",
        "fits",
        "step ms",
        "peak MiB",
        "planned MiB",
    )
    return report.format_table(header, lines) if lines else ""
