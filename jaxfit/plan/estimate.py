"""Time estimates from a plan's FLOPs, a device's peak and an assumed utilisation; byte units.

The estimate is ``step time = executed FLOPs / (peak x utilisation)``: the FLOPs the step
executes (the plan's jaxpr count, rematerialised forward passes included) at a sustained
fraction of the device's dense bf16 peak (``jaxfit.perf.DEVICES``). The MFU this implies
(model FLOPs without recompute over the peak, PaLM Appendix B) is printed next to it.
Memory-bound work that FLOPs do not capture (dequantising an NF4 base, optimizer updates,
small matmuls of LoRA adapters) is inside the utilisation assumption.

On several devices the step's collectives (the plan's ``communication``, read off the
compiled program) take at least :func:`collective_seconds` on the devices' link
(``jaxfit.perf.Device.link_gbs``: PCIe for GeForce cards, NVLink for A100 / H100); the step
time is the larger of the two, i.e. collectives assumed hidden behind compute as far as
they can be (XLA's latency-hiding scheduler, ``jaxfit.runtime``). Neither is measured yet;
planned on a CPU, the bytes of bf16 weights gathered count double (XLA:CPU gathers them
as float32), so the collectives' time errs high there.
"""

from __future__ import annotations

import dataclasses
import re

from jaxfit import perf

# Sustained fraction of dense bf16 peak on the executed matmul FLOPs. 0.4 is what
# well-tuned single-node training reaches on large matmuls (PaLM: 46.2% MFU, Chowdhery et
# al. 2022 Table 3; nanoGPT's GPT-2 124M on A100 reports ~40% at its default settings);
# small models, short sequences and QLoRA's dequantisation reach less. Override it with
# --mfu once a run has measured perf/mfu on your card.
DEFAULT_UTILISATION = 0.4

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"12GiB"`` -> 12884901888; decimal (GB) and binary (GiB) units, case-insensitive.

    Raises:
      ValueError: no number or an unknown unit (the message lists the units).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a memory size; write a number and a unit, e.g. 12GiB "
            f"(units: {', '.join(u.upper().replace('I', 'i') for u in _UNITS)})"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Binary units, 3 significant digits: ``format_bytes(3 * 2**30) == "3.00 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    """``90061 -> "1.0 d"``; seconds, minutes, hours or days, whichever reads best."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.2f} s"


def collective_seconds(communication: dict, devices: int, link_gbs: float) -> float:
    """Seconds one step's collectives need on the wire, at least: bandwidth-optimal ring
    algorithms (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for
    clusters of workstations") move, per device and direction, ``(n - 1) / n`` of an
    all-gather's or all-to-all's result, twice that for an all-reduce, ``n - 1`` times a
    reduce-scatter's piece and a collective-permute's whole result, over a link of
    ``link_gbs`` GB/s. ``n`` is the mesh's device count (a collective over one mesh axis
    has a smaller group, so a factor closer to 1/2: this errs high there). Latency is not
    counted.

    Args:
      communication: bytes of the collectives' results by kind
        (:func:`jaxfit.plan.devices.collective_bytes`).
      devices: the mesh's device count ``n``.
      link_gbs: GB/s per direction between two devices.

    Returns:
      Seconds (0 on one device or without collectives).
    """
    n = int(devices)
    if n < 2 or not communication:
        return 0.0
    ring = (n - 1) / n
    wire = ring * (communication.get("all-gather", 0) + communication.get("all-to-all", 0))
    wire += 2 * ring * communication.get("all-reduce", 0)
    wire += (n - 1) * communication.get("reduce-scatter", 0)
    wire += communication.get("collective-permute", 0)
    return wire / (link_gbs * 1e9)


@dataclasses.dataclass
class TimeEstimate:
    """Estimated speed of a planned step on a device.

    Attributes:
      device: name in ``jaxfit.perf.DEVICES``; peak_tflops: its dense bf16 peak (TFLOP/s).
      utilisation: the assumed sustained fraction of peak on executed FLOPs.
      mfu: the model FLOPs utilisation that implies (``utilisation x model / executed``).
      step_seconds: seconds per optimizer step: the larger of ``compute_seconds`` (the
        executed FLOPs at the assumed utilisation) and ``collective_seconds``
        (:func:`collective_seconds` on the device's link; 0 on one device).
      examples_per_second, tokens_per_second: throughput (tokens: language models).
      run_seconds: ``total_steps`` steps of the config.
      budget_tokens, budget_seconds: time for a token budget (when one is given).
      epoch_seconds: one pass over ``dataset_tokens`` / ``dataset_examples`` (if given).
    """

    device: str
    peak_tflops: float
    utilisation: float
    mfu: float
    step_seconds: float
    examples_per_second: float
    tokens_per_second: float | None
    run_seconds: float
    compute_seconds: float = 0.0
    collective_seconds: float = 0.0
    link_gbs: float = 0.0
    budget_tokens: float | None = None
    budget_seconds: float | None = None
    epoch_seconds: float | None = None


def estimate_time(
    plan,
    device: str,
    *,
    utilisation: float = DEFAULT_UTILISATION,
    total_steps: int = 0,
    tokens: float | None = None,
    dataset_tokens: float | None = None,
    dataset_examples: float | None = None,
) -> TimeEstimate:
    """Estimate throughput and wall time of ``plan`` (a :class:`jaxfit.plan.core.Plan`).

    Args:
      device: a ``jaxfit.perf.DEVICES`` name (its peak bf16 TFLOP/s is used, times the
        plan's ``devices``, and its link bandwidth for the collectives).
      utilisation: sustained fraction of peak on executed FLOPs, in (0, 1].
      total_steps: the config's optimizer steps (for ``run_seconds``).
      tokens: a token budget to estimate the time of (language models).
      dataset_tokens, dataset_examples: size of one epoch.

    Raises:
      ValueError: unknown device, utilisation outside (0, 1], or a token budget / token
        epoch for a task without tokens.
    """
    if not 0.0 < utilisation <= 1.0:
        raise ValueError(f"utilisation (--mfu) must be in (0, 1], got {utilisation}")
    dev = perf.device(device)
    # the step's FLOPs are shared by every device of the mesh; its collectives overlap them
    devices = getattr(plan, "devices", 1)
    peak = dev.peak_bf16_tflops * 1e12 * devices
    compute = plan.flops["executed"] / (peak * utilisation)
    wire = collective_seconds(getattr(plan, "communication", {}) or {}, devices, dev.link_gbs)
    step = max(compute, wire)
    examples = plan.examples_per_step / step
    per_token = None
    if plan.tokens_per_step:
        per_token = plan.tokens_per_step / step
    elif tokens or dataset_tokens:
        raise ValueError("a token budget needs a language-model config (tokens per step)")
    mfu = plan.flops["model"] / (step * peak)
    est = TimeEstimate(
        device=dev.name,
        peak_tflops=dev.peak_bf16_tflops,
        utilisation=utilisation,
        mfu=mfu,
        step_seconds=step,
        examples_per_second=examples,
        tokens_per_second=per_token,
        run_seconds=step * total_steps,
        compute_seconds=compute,
        collective_seconds=wire,
        link_gbs=dev.link_gbs,
    )
    if tokens:
        est.budget_tokens = float(tokens)
        est.budget_seconds = float(tokens) / per_token
    if dataset_tokens:
        est.epoch_seconds = float(dataset_tokens) / per_token
    elif dataset_examples:
        est.epoch_seconds = float(dataset_examples) / examples
    return est
