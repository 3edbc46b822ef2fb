"""The jaxfit step a benchmark measures, built from the library as ``jaxfit.train`` builds it.

config -> task -> train state -> the SAME jitted step the trainer runs:

* :func:`build`: ``jaxfit.run.build_run(config, workdir, abstract=...)``, what the
  trainer and the planner build (the config's mesh, the batch-size check, the task, the
  optimizer, the state's shardings and the jitted step);
* :func:`fresh_state`: the trainer's fresh state (``jaxfit.run.Run.fresh_state``:
  ``task.initial_params`` from ``param_rng(config)``), or one over given params;
* :func:`synthetic_batch`: host arrays of the shapes and dtypes of
  ``task.abstract_batch(batch_size)`` (:mod:`experiments.bench.batches`), placed as the
  trainer places a batch (``jaxfit.sharding.shard_batch``);
* :func:`measure`: the planned peak (``jaxfit.plan.core.plan_config``: XLA's buffers of
  the same step compiled for abstract shapes; a step planned above the allocator's limit
  is not run), compilation (``step.lower(...).compile()``, timed on its own), ``warmup``
  + ``steps`` steps each ended by ``jax.block_until_ready`` and the loss read back, the
  median step time, examples (tokens) per second, model FLOPs (the planner's: ``6N + 12 L
  d T`` for decoders, ``4 N`` for a frozen base, :func:`jaxfit.perf.decoder_flops_per_token`;
  the traced step without remat otherwise), MFU against the dense bf16 peak of the device
  actually used (``jaxfit.perf.DEVICES``; None on a CPU or an unlisted device) and the
  peak memory of the process (:class:`Memory`).
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import batches
from experiments.bench.procs import KIB_PER_MIB, PeakRSS
from jaxfit import perf, sharding
from jaxfit.config import get_field
from jaxfit.plan.core import plan_config
from jaxfit.run import Run, build_run

MIB = 2**20


def perf_device(device_kind: str) -> str | None:
    """The :data:`jaxfit.perf.DEVICES` name of a jax ``device_kind`` ("NVIDIA H200" ->
    "h200"), or None when it is not one of them (MFU is then not given)."""
    k = device_kind.lower()
    name = None
    if "h200" in k:
        name = "h200"
    elif "h100" in k and ("sxm" in k or "hbm3" in k):
        name = "h100-sxm"
    elif "a100" in k:
        name = "a100-80gb" if "80g" in k else "a100-40gb"
    elif m := re.search(r"rtx\s*(\d{4})(\s*ti)?", k):
        name = f"rtx{m.group(1)}{'ti' if m.group(2) else ''}"
    return name if name in perf.DEVICES else None


def device_info() -> dict:
    """Backend, device kind, its :func:`perf_device` label and the CUDA runtime."""
    d = jax.devices()[0]
    try:  # e.g. "cuda 12080" on a GPU
        platform_version = d.client.platform_version
    except AttributeError:
        platform_version = ""
    label = perf_device(d.device_kind) if d.platform == "gpu" else None
    return {
        "backend": d.platform,
        "device": d.device_kind,
        "device_label": label,
        "platform_version": platform_version,
    }


class Memory:
    """Peak memory of this process: the device allocator's ``peak_bytes_in_use`` (since the
    process started) where jax reports it, else the process's peak RSS."""

    def __init__(self, peak_rss: PeakRSS):
        self.device = jax.devices()[0]
        self.rss = peak_rss
        stats = self.device.memory_stats() or {}
        self.on_device = "peak_bytes_in_use" in stats
        self.measure = (
            'device memory_stats()["peak_bytes_in_use"]' if self.on_device else peak_rss.measure
        )
        self.bytes_limit = stats.get("bytes_limit")

    def peak_mib(self) -> float:
        if self.on_device:
            return self.device.memory_stats()["peak_bytes_in_use"] / MIB
        return self.rss.peak_kib() / KIB_PER_MIB

    def in_use_mib(self) -> float:
        if self.on_device:
            return self.device.memory_stats()["bytes_in_use"] / MIB
        return (self.rss.current_kib() or 0) / KIB_PER_MIB


def build(config, workdir, *, abstract: bool = True) -> Run:
    """Build what ``jaxfit.trainer.train`` builds for ``config`` (:func:`jaxfit.run.build_run`;
    no data iterator, no checkpoints). ``abstract=False`` reads the config's data and
    weights (needed for ``init_from`` / ``lora.peft_dir`` values).

    Raises:
      ValueError: the config's mesh does not fit the devices, or does not divide its batch.
    """
    return build_run(config, workdir, abstract=abstract)


def fresh_state(setup: Run, params=None):
    """The state a fresh run starts from: ``task.initial_params`` (or ``params``) in the
    state's shardings, through the trainer's jitted ``make_state``
    (:meth:`jaxfit.run.Run.fresh_state`)."""
    return setup.fresh_state(params)


def synthetic_batch(task, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host arrays of ``task.abstract_batch(batch_size)``'s shapes and dtypes.

    Raises:
      ValueError: a task whose batch layout is neither the LM's nor CLIP's.
    """
    spec = task.abstract_batch(batch_size)
    if "labels" in spec:
        _, seq = spec["input_ids"].shape
        batch = batches.lm_batch(batch_size, seq, task.model.config.vocab_size, seed)
    elif "pixel_values" in spec:
        _, size, _, _ = spec["pixel_values"].shape
        text = task.model.config.text
        ids = dict(bos=text.bos_token_id, eos=text.eos_token_id, pad=text.pad_token_id)
        batch = batches.clip_batch(
            batch_size, size, spec["input_ids"].shape[1], text.vocab_size, seed=seed, **ids
        )
    else:
        raise ValueError(f"no synthetic batch for a task with inputs {sorted(spec)}")
    got = {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in spec.items()}
    if got != want:
        raise ValueError(f"synthetic batch {got} differs from the task's {want}")
    return batch


def describe(config, model) -> str:
    """One line: the model's sizes and the config's settings that a step's cost depends on."""
    m = model.config
    if hasattr(m, "vision"):
        v, t = m.vision, m.text
        head = (
            f"CLIP image {v.image_size}/{v.patch_size} D{v.hidden_size} L{v.num_hidden_layers}"
            f", text D{t.hidden_size} L{t.num_hidden_layers} V{t.vocab_size}"
        )
    elif hasattr(m, "n_layer"):
        head = f"GPT-2 L{m.n_layer} D{m.n_embd} H{m.n_head} V{m.vocab_size}"
    else:
        head = (
            f"Llama L{m.num_hidden_layers} D{m.hidden_size} H{m.num_attention_heads}/"
            f"{m.num_key_value_heads} F{m.intermediate_size} V{m.vocab_size}"
        )
    parts = [head, f"batch {config.batch_size} (micro {config.micro_batch_size})"]
    if get_field(config, "seq_len"):
        parts[-1] += f" x {config.seq_len}"
    parts.append(f"{config.precision} ({jnp.dtype(m.dtype).name} compute)")
    if get_field(config, "lora.enabled") or config.precision in ("int8", "nf4"):
        parts.append(f"LoRA r{config.lora.rank} on {'/'.join(config.lora.targets)}")
    parts.append(f"remat {config.model.remat_policy}")
    if get_field(config, "loss_chunk_size"):
        parts.append(f"loss chunk {config.loss_chunk_size}")
    parts.append(config.optim.name)
    return ", ".join(parts)


def plan_summary(config) -> dict:
    """``planned_peak_mib`` (``plan_config(config).peak_bytes``), the planner's model FLOPs
    per step and its compile time; ``plan_error`` instead when planning fails."""
    try:
        plan = plan_config(config)
    except Exception as e:  # noqa: BLE001 - reported next to the measurement
        return {"plan_error": f"{type(e).__name__}: {e}"[:500]}
    return {
        "planned_peak_mib": plan.peak_bytes / MIB,
        "model_flops_per_step": plan.flops["model"],
        "plan_s": plan.compile_seconds,
    }


def _foreseen_oom(planned_mib: float | None, limit_bytes: int | None) -> str:
    """The error of a step planned above the allocator's limit ("" when it may fit)."""
    if not planned_mib or not limit_bytes or planned_mib * MIB <= limit_bytes:
        return ""
    return (
        f"RESOURCE_EXHAUSTED (foreseen, not run): planned peak {planned_mib:,.0f} MiB > "
        f"allocator limit {limit_bytes / MIB:,.0f} MiB"
    )


def time_calls(run, warmup: int, steps: int) -> list[float]:
    """Wall times (s) of ``steps`` calls of ``run()`` (which synchronises) after ``warmup``."""
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times[warmup:]


class StepRunner:
    """One compiled step over a fixed batch; :meth:`__call__` runs it once (state donated
    and replaced, ended by ``block_until_ready``) and returns the loss as a float."""

    def __init__(self, setup: Run, state, batch: dict, frozen=None):
        self.batch = sharding.shard_batch(batch, setup.mesh)
        self.frozen, self.state = frozen, state
        t = time.perf_counter()
        self.compiled = setup.step.lower(state, self.batch, frozen).compile()
        self.compile_s = time.perf_counter() - t
        self.losses, self.grad_norms = [], []

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch, self.frozen)
        jax.block_until_ready((self.state, metrics))
        self.losses.append(float(metrics["loss"]))
        self.grad_norms.append(float(metrics["grad_norm"]))
        return self.losses[-1]


def measure(
    setup: Run,
    state,
    batch: dict,
    frozen=None,
    *,
    warmup: int,
    steps: int,
    memory: Memory,
    plan: bool = True,
) -> tuple[dict, Any]:
    """Plan, compile and time ``setup.step`` on ``batch`` (see the module docstring).

    Returns:
      ``(result, state)``: the result dict (``fit`` False and ``predicted`` True, not run,
      when the planned peak exceeds the allocator's limit) and the state after the steps
      (the given one when nothing ran).

    Raises:
      Whatever the step raises (an out-of-memory error: ``jaxfit.oom.is_out_of_memory``).
    """
    config = setup.config
    n = config.batch_size
    seq = get_field(config, "seq_len")
    out = {
        "config": describe(config, setup.task.model),
        "batch": n,
        "seq": seq,
        "micro_batch": config.micro_batch_size,
        "memory_measure": memory.measure,
    }
    if plan:
        out.update(plan_summary(config))
        if error := _foreseen_oom(out.get("planned_peak_mib"), memory.bytes_limit):
            out.update(fit=False, predicted=True, peak_mib=memory.peak_mib(), error=error)
            return out, state
    if "model_flops_per_step" not in out:  # the task's formula, where it has one
        flops = setup.task.spec.task.model_flops(setup.task, n)
        if flops is not None:
            out["model_flops_per_step"] = flops
    run = StepRunner(setup, state, batch, frozen)
    times = time_calls(run, warmup, steps)
    med = statistics.median(times)
    out.update(
        fit=True,
        compile_s=run.compile_s,
        times_s=times,
        step_s=med,
        losses=run.losses,
        grad_norms=run.grad_norms,
        examples_per_s=n / med,
        peak_mib=memory.peak_mib(),
    )
    if seq:
        out["tokens_per_s"] = n * seq / med
    if out.get("model_flops_per_step"):
        out["model_tflops"] = out["model_flops_per_step"] / med / 1e12
        label = device_info()["device_label"]
        out["mfu"] = perf.mfu(out["model_tflops"] * 1e12, label) if label else None
    return out, run.state
