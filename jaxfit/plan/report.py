"""Text reports of a plan, its time estimate and a search (what ``python -m jaxfit.plan``
prints)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxfit.plan.core import Plan
from jaxfit.plan.devices import COLLECTIVES
from jaxfit.plan.estimate import TimeEstimate, format_bytes, format_seconds


def _flops(x: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.3g} FLOP"


def settings_line(settings: dict) -> str:
    s = dict(settings)
    parts = []
    if "micro_batch_size" in s and "batch_size" in s:
        k = s["batch_size"] // s["micro_batch_size"]
        parts.append(
            f"batch_size={s.pop('batch_size')} as {k} micro-batch(es) of "
            f"{s.pop('micro_batch_size')}"
        )
    parts += [f"{k}={v}" for k, v in s.items()]
    return ", ".join(parts)


def memory_report(plan: Plan, budget: int, usable: int, device: str) -> str:
    m, p = plan.memory, plan.params
    pct = 100.0 * p["trainable"] / p["total"] if p["total"] else 0.0
    kinds = ", ".join(
        f"{k[len('frozen_') :]} {format_bytes(v)}"
        for k, v in m.items()
        if k.startswith("frozen_") and v
    )
    lines = [
        f"settings: {settings_line(plan.settings)}",
        f"parameters: total {p['total']:,}  trainable {p['trainable']:,} ({pct:.2f}%)  "
        f"frozen {p['frozen']:,}",
        "memory (per device):",
        f"  frozen weights        {format_bytes(m['frozen']):>11}"
        + (f"  ({kinds})" if kinds else ""),
        f"  trainable weights     {format_bytes(m['trainable']):>11}",
        f"  optimizer state       {format_bytes(m['optimizer']):>11}",
        f"  gradients            ~{format_bytes(m['gradients']):>11}  (among the temporaries)",
        f"  activations & other  ~{format_bytes(m['activations']):>11}  "
        "(temporaries less gradients)",
        f"  batch                 {format_bytes(m['batch']):>11}",
        f"  XLA ({plan.backend}): arguments {format_bytes(m['arguments'])} + outputs "
        f"{format_bytes(m['outputs'])} - aliased {format_bytes(m['aliased'])} + "
        f"temporaries {format_bytes(m['temporaries'])} = peak {format_bytes(m['peak'])}",
    ]
    if m.get("cpu_fragmentation"):
        lines.append(
            f"  less {format_bytes(m['cpu_fragmentation'])} of holes in XLA:CPU's heap of "
            "temporaries (the plan counts the bytes live at once)"
        )
    if m.get("cpu_upcasts"):
        lines.append(
            f"  less {format_bytes(m['cpu_upcasts'])} of float32 copies of bf16 arguments "
            "that only XLA:CPU makes (it has no bf16 matmul), live at the peak"
        )
    if m.get("cpu_rng_loops"):
        lines.append(
            f"  less {format_bytes(m['cpu_rng_loops'])} of Threefry loop state (LoRA dropout "
            "masks: jax hashes in a loop on a CPU only), live at the peak"
        )
    if m.get("host_on_device"):
        lines.append(
            f"  less {format_bytes(m['host_on_device'])} of layer inputs a GPU keeps in "
            f"pinned host memory (remat_policy=offload: {format_bytes(m['host_bytes'])} "
            "on the host in all), live at the peak"
        )
    if plan.communication:
        c = plan.communication
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in c.items() if k in COLLECTIVES and v)
        lines.append(
            f"communication per step and device ({plan.devices} devices): {kinds or 'none'} "
            f"(sizes of the collectives' results; total {format_bytes(c['total'])})"
        )
    verdict = (
        "FITS"
        if plan.peak_bytes <= usable
        else (f"DOES NOT FIT (over by {format_bytes(plan.peak_bytes - usable)})")
    )
    lines += [
        f"  planned peak          {format_bytes(plan.peak_bytes):>11}"
        + ("  (a CPU estimate of the GPU peak; errs high)" if plan.backend == "cpu" else "")
        + (f"  (XLA:GPU's peak; {plan.caveats})" if plan.caveats else ""),
        f"budget {format_bytes(budget)} ({device}) less reserve {format_bytes(budget - usable)}"
        f" = {format_bytes(usable)} usable: {verdict}",
    ]
    return "\n".join(lines)


def time_report(plan: Plan, est: TimeEstimate, total_steps: int) -> str:
    f = plan.flops
    lines = [
        f"time on {est.device} ({est.peak_tflops:g} TFLOP/s dense bf16; assumed "
        f"{est.utilisation:.0%} of peak on the executed FLOPs, --mfu):",
        f"  FLOPs per step: executed {_flops(f['executed'])} (traced, recompute included); "
        f"model {_flops(f['model'])}; XLA cost_analysis {_flops(f['xla_cost_analysis'])} "
        "(counts each loop body once)",
    ]
    rate = f"{est.examples_per_second:,.2f} examples/s"
    if est.tokens_per_second:
        rate = f"{est.tokens_per_second:,.0f} tokens/s, " + rate
    lines.append(f"  step {format_seconds(est.step_seconds)}: {rate}, MFU {est.mfu:.1%}")
    if est.collective_seconds:
        slow = est.collective_seconds > est.compute_seconds
        bound = "the collectives bound it" if slow else "compute bounds it"
        lines.append(
            f"    compute {format_seconds(est.compute_seconds)}, collectives at least "
            f"{format_seconds(est.collective_seconds)} at {est.link_gbs:g} GB/s per direction "
            f"between devices (jaxfit.perf; assumed overlapped): {bound}"
        )
    lines.append(f"  this config's {total_steps:,} steps: {format_seconds(est.run_seconds)}")
    if est.epoch_seconds is not None:
        lines.append(f"  one epoch: {format_seconds(est.epoch_seconds)}")
    if est.budget_seconds is not None:
        lines.append(
            f"  {est.budget_tokens:.3g} tokens: {format_seconds(est.budget_seconds)} "
            f"({est.budget_seconds / 86400:,.1f} days)"
        )
    return "\n".join(lines)


def search_table(rows: Sequence, estimates: Sequence[TimeEstimate | None]) -> str:
    """One line per candidate: its overrides, planned peak, fit and estimated speed."""
    keys = [k for k in ("micro_batch_size", "model.remat_policy", "model.mlp_chunk_size",
                        "loss_chunk_size", "seq_len")
            if any(k in r.overrides for r in rows)]  # fmt: skip
    header = [*keys, "planned peak", "fits", "est. tokens/s", "est. examples/s", "MFU"]
    table = [header]
    for r, est in zip(rows, estimates, strict=True):
        cells = [str(r.overrides.get(k, "")) for k in keys]
        if r.plan is None:
            cells += ["error", "no", "", "", ""]
        else:
            tok = f"{est.tokens_per_second:,.0f}" if est and est.tokens_per_second else ""
            cells += [
                format_bytes(r.plan.peak_bytes),
                "yes" if r.fits else "no",
                tok,
                f"{est.examples_per_second:,.2f}" if est else "",
                f"{est.mfu:.1%}" if est else "",
            ]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
