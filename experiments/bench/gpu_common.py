"""What the parts of ``gpu_suite`` share: worker start, result rows, a random-NF4 Llama.

A part's worker returns ``measurements``: :func:`experiments.bench.runner.measure`
results (or the matmul / decode part's own); :func:`raw_row` turns one into a row of raw
numbers, :func:`format_row` into the cells of :data:`COLUMNS` once the matmul rate of the
run is known (``MFU (matmul)``). A part that failed is a row with its error in ``notes``.

The QLoRA and decode parts train / sample a Llama of a ``configs/`` recipe whose weights
cannot be downloaded here: :func:`llama_config` writes the recipe's architecture as a
``config.json`` and points ``init_from`` at it, so the task is the one a run from a real
checkpoint builds (bf16 float leaves, NF4 kernels), and :func:`random_base` draws its
base with ``jaxfit.quant.random_init.random_quantized_params`` one layer at a time (the
16 GB bf16 8B model never exists), checked against ``task.abstract_frozen()``.
"""

from __future__ import annotations

from pathlib import Path

from experiments.bench import report

COLUMNS = (
    *report.HEAD_COLUMNS, "benchmark", "config", "step ms", "throughput", "model TFLOP/s",
    "MFU", "MFU (matmul)", "peak MiB (planned)", "compile s", "notes",
)  # fmt: skip
GIB, MIB = 2**30, 2**20


def start_worker(spec: dict, peak):
    """Jax's persistent compilation cache (``spec["compilation_cache"]``: the planner's
    compile of a step and the measurement's are then one), the device and its memory.
    Returns ``(info, memory)``."""
    import jax

    from experiments.bench import runner

    if spec.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    memory = runner.Memory(peak)
    info = {**runner.device_info(), "jax_version": jax.__version__}
    info["bytes_limit_mib"] = memory.bytes_limit / MIB if memory.bytes_limit else None
    return info, memory


def measure_config(spec: dict, peak, save, workdir: Path) -> dict:
    """The worker of a from-scratch config (GPT-2, CLIP): ``spec["config"]`` with
    ``spec["overrides"]`` -> abstract task -> fresh state -> synthetic batch -> measured."""
    from experiments.bench import runner
    from jaxfit.config import load_config

    out, memory = start_worker(spec, peak)
    config = load_config(spec["config"], spec.get("overrides", []))
    setup = runner.build(config, workdir)
    state = runner.fresh_state(setup)
    batch = runner.synthetic_batch(setup.task, config.batch_size, config.seed)
    m, _ = runner.measure(
        setup, state, batch, warmup=spec["warmup"], steps=spec["steps"], memory=memory
    )
    out["measurements"] = [m]
    save(out)
    return out


def raw_row(part: str, m: dict, unit: str = "tok/s", notes: str = "") -> dict:
    """A row of raw numbers from one measurement (``fit`` False: its error in the notes)."""
    rate = m.get("tokens_per_s") if unit == "tok/s" else m.get("examples_per_s")
    error = m.get("error", "")
    return {
        "benchmark": part,
        "config": m.get("config", ""),
        "step_s": m.get("step_s"),
        "throughput": rate,
        "unit": unit,
        "model_tflops": m.get("model_tflops"),
        "mfu": m.get("mfu"),
        "peak_mib": m.get("peak_mib"),
        "planned_mib": m.get("planned_peak_mib"),
        "compile_s": m.get("compile_s"),
        "notes": "; ".join(x for x in (notes, m.get("plan_error", ""), error) if x),
    }


def error_row(part: str, error: str, config: str = "") -> dict:
    """The row of a part (or measurement) that produced no numbers."""
    return raw_row(part, {"config": config, "error": error or "failed"})


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _num(x) -> str:
    """``1,234.5`` from 100 up, three significant digits below."""
    return "-" if x is None else f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"


def format_row(raw: dict, head: dict, matmul_tflops: float | None, label: str | None) -> dict:
    """The :data:`COLUMNS` cells of ``raw``, after ``head`` (:func:`report.row_head`);
    ``label``: the device's ``jaxfit.perf.DEVICES`` name (None: MFU n/a)."""
    mfu = raw.get("mfu")
    mfu_cell = f"{100 * mfu:.1f}% of {label}" if mfu is not None and label else "n/a"
    tflops = raw.get("model_tflops")
    vs_matmul = tflops / matmul_tflops if tflops and matmul_tflops else None
    peak, planned = raw.get("peak_mib"), raw.get("planned_mib")
    peak_cell = _f(peak, ",.0f") + (f" ({planned:,.0f})" if planned is not None else "")
    throughput = raw.get("throughput")
    unit = raw.get("unit", "")
    step = raw.get("step_s")
    cells = {
        "benchmark": raw["benchmark"],
        "config": raw.get("config", ""),
        "step ms": _num(step and step * 1e3),
        "throughput": f"{_num(throughput)} {unit}" if throughput is not None else "-",
        "model TFLOP/s": _num(tflops),
        "MFU": mfu_cell,
        "MFU (matmul)": "-" if vs_matmul is None else f"{100 * vs_matmul:.1f}%",
        "peak MiB (planned)": peak_cell,
        "compile s": _f(raw.get("compile_s"), ".1f"),
        "notes": raw.get("notes", ""),
    }
    return {**head, **cells, "raw": raw}


def with_arg(recipe: str, arg: str) -> str:
    """``"configs/x.py"`` + ``"init_from=D"`` -> ``"configs/x.py:init_from=D"`` (``,`` when
    the recipe already has an argument)."""
    return f"{recipe}{',' if ':' in recipe else ':'}{arg}"


def llama_config(spec: dict, workdir: Path):
    """``spec["config"]`` (a Llama recipe) with ``init_from`` = a directory holding only
    its architecture's ``config.json`` (``transformers.LlamaConfig`` of the recipe's
    ``model.config``, after ``spec["model_overrides"]``), then ``spec["overrides"]``."""
    from transformers import LlamaConfig

    from jaxfit.config import load_config

    scratch = load_config(spec["config"], spec.get("model_overrides", []))
    hf_dir = workdir / "llama_config"
    LlamaConfig(**scratch.model.config.to_dict()).save_pretrained(hf_dir)
    return load_config(with_arg(spec["config"], f"init_from={hf_dir}"), spec.get("overrides", []))


def random_base(setup):
    """The random quantised base of ``setup``'s task, built layer by layer, and its split
    into trainable adapters and the frozen base as the task splits a checkpoint's base.

    Returns:
      ``(base, trainable, frozen)`` (the frozen tree placed; it shares ``base``'s arrays).

    Raises:
      RuntimeError: the frozen tree differs from ``task.abstract_frozen()`` (structure,
        shapes or dtypes): it would not be the base a run of the config holds.
    """
    import jax
    import jax.numpy as jnp

    from jaxfit.hf.families import DEFAULT_QUANT_RULES
    from jaxfit.lora import training as lora_training
    from jaxfit.quant.base import is_quantized
    from jaxfit.quant.random_init import random_quantized_params
    from jaxfit.tasks.base import param_rng

    task, rng = setup.task, param_rng(setup.config)
    want = task.abstract_frozen()
    kinds = {x.kind for x in jax.tree.leaves(want, is_leaf=is_quantized) if is_quantized(x)}
    if len(kinds) != 1:
        raise RuntimeError(f"expected one quantised format in the frozen base, got {kinds}")
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda r: task.model.init(r, ids)["params"], rng)
    base = random_quantized_params(
        abstract, rng, DEFAULT_QUANT_RULES, kinds.pop(), float_dtype=None
    )
    trainable, frozen = lora_training.split(base, task.source.lora, rng, task.model)
    shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), t)
    if jax.tree.structure(frozen) != jax.tree.structure(want) or shapes(frozen) != shapes(want):
        raise RuntimeError("the random base is not the task's frozen base (abstract_frozen)")
    return base, trainable, jax.device_put(frozen)
