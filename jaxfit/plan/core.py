"""Plan one configuration: compile its real train step for abstract shapes and read the cost.

``plan_config(config)`` builds the run without data or weights (``build_run(...,
abstract=True)``), the train state, batch and frozen base as ``jax.ShapeDtypeStruct``
trees, and compiles the SAME jitted step ``jaxfit.train`` runs
(``jaxfit.run.build_run``) on the local backend, or, inside
``jaxfit.target.compiling_for`` (``--compile_for gpu``: :mod:`jaxfit.plan.cuda_target`),
for a deviceless XLA:GPU target. Nothing is allocated: an 8B QLoRA step compiles on a
CPU-only machine.

Memory comes from XLA's buffer assignment (``compiled.memory_analysis()``): the step's
peak is ``arguments + outputs - aliased + temporaries`` (the donated state's outputs reuse
its input buffers, so they count once). The categories are read off the abstract trees:
frozen base (by storage kind), trainable parameters, optimizer state and batch are
arguments; gradients live among the temporaries (one per trainable parameter, in its
dtype) with the activations saved for the backward pass and the loss's buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
import time
import warnings
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from jaxfit import checkpoint, sharding, target
from jaxfit.config import get_field, set_fields
from jaxfit.lora import adapters as lora_adapters
from jaxfit.lora import training as lora_training
from jaxfit.models.layers import OFFLOAD_NAMES
from jaxfit.plan import devices as devices_lib
from jaxfit.plan import flops as flops_lib
from jaxfit.plan import liveness
from jaxfit.quant.base import is_quantized
from jaxfit.run import build_run

log = logging.getLogger(__name__)

# A CPU compile is mostly LLVM code generation, which the plan does not need: these
# options make it several times faster and leave XLA's buffer assignment (the memory
# numbers) unchanged (measured on the GPT-2 demo step: identical temporaries).
CPU_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}

# The config fields a plan is about (and the search varies); dotted paths.
SETTINGS = ("batch_size", "micro_batch_size", "model.remat_policy", "loss_chunk_size", "seq_len")


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays (or ``ShapeDtypeStruct``) of a pytree on one device: a leaf with
    a ``sharding`` counts its shard (split over ``fsdp``: a fraction of the array)."""
    return int(
        sum(np.prod(_shard_shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize
            for x in _arrays(tree))
    )  # fmt: skip


def _shard_shape(x) -> tuple:
    sharding_ = getattr(x, "sharding", None)
    return tuple(x.shape) if sharding_ is None else sharding_.shard_shape(tuple(x.shape))


def _arrays(tree: Any) -> list:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def frozen_bytes_by_kind(frozen: Any) -> dict[str, int]:
    """Bytes of a frozen base by storage kind: quantised leaves by their format
    (``leaf.kind``: ``nf4``, ``int8``; codes and statistics, ``leaf.nbytes``) and float
    leaves by dtype name."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(frozen, is_leaf=is_quantized):
        if is_quantized(leaf):
            kind, size = leaf.kind, tree_bytes(leaf)  # its arrays' shards
        elif hasattr(leaf, "dtype"):
            kind, size = np.dtype(leaf.dtype).name, tree_bytes(leaf)
        else:
            continue
        out[kind] = out.get(kind, 0) + size
    return out


_ENTRY_PARAM = re.compile(r"%(\S+) = (?:bf16|f16)\[([\d,]*)\]\{[^}]*\} parameter\(\d+\)")
_ENTRY_UPCAST = re.compile(r"%(\S+) = f32\[([\d,]*)\]\{[^}]*\} (?:convert|fusion)\(%([^,\s)]+)\)")


def hoisted_upcast_bytes(hlo_text: str) -> int:
    """Bytes of whole float32 copies of 16-bit step arguments made at the top level of an
    optimised XLA:CPU program (the sum of :func:`hoisted_upcasts`)."""
    return sum(hoisted_upcasts(hlo_text).values())


def hoisted_upcasts(hlo_text: str) -> dict[str, int]:
    """``{instruction: bytes}`` of the whole float32 copies of 16-bit step arguments made at
    the top level of an optimised XLA:CPU program.

    XLA:CPU has no bf16 matmul: it converts bf16 operands to float32. When the operand is a
    loop-invariant argument (a frozen embedding table or LM head used inside the layer or
    micro-batch loop), loop-invariant code motion hoists the conversion out of the loop,
    and a float32 copy of the whole matrix stays live for the loop's duration (2 GiB each
    for Llama 3's [128256, 4096] tables). A GPU computes bf16 matmuls natively and makes no
    such copy. Counted: instructions of the ENTRY computation that produce ``f32[shape]``
    from a single bf16/f16 parameter of the same shape (a ``convert``, or a fusion of one).
    """
    start = hlo_text.find("\nENTRY")
    if start < 0:
        return {}
    entry = hlo_text[start:]
    entry = entry[: entry.find("\n}\n") if "\n}\n" in entry else len(entry)]
    params = {m.group(1): m.group(2) for m in _ENTRY_PARAM.finditer(entry)}
    return {
        m.group(1): _f32_bytes(m.group(2))
        for m in _ENTRY_UPCAST.finditer(entry)
        if params.get(m.group(3)) == m.group(2)
    }


# jax lowers its Threefry-2x32 hash (``threefry2x32_p``: ``jax.random``, LoRA dropout
# masks) as a rolled ``while`` loop of 5 x 4 rounds on a CPU only
# (``_threefry2x32_cpu_lowering_rule`` in ``jax/_src/random/threefry2x32.py``; a GPU gets
# the unrolled form, fused into the op that uses the bits): the loop's state is
# ``(i, x0, x1, ks0, ks1, ks2, rotations0, rotations1)``.
_THREEFRY_LOOP = re.compile(
    r"%(while[.\d]*) = \(s32\[\], u32\[([\d,]*)\]\{[^}]*\}, u32\[\2\]\{[^}]*\}, "
    r"u32\[\], u32\[\], u32\[\], u32\[4\]\{0\}, u32\[4\]\{0\}\) while\("
)


def threefry_loops(hlo_text: str) -> set[str]:
    """Names of the ``while`` instructions of an optimised XLA:CPU program that are jax's
    rolled Threefry-2x32 hash (:data:`_THREEFRY_LOOP`). Their state holds two ``uint32``
    arrays of the hashed shape (224 MiB for a LoRA dropout mask of a ``[2048, 14336]`` MLP
    input) that only a CPU keeps: the deviceless XLA:GPU compile of the 8B QLoRA step
    needs 7.41 GiB with dropout 0.05 and 7.30 GiB without (docs/BENCHMARKS.md)."""
    text = re.sub(r"/\*index=\d+\*/", "", hlo_text)
    return {m.group(1) for m in _THREEFRY_LOOP.finditer(text)}


def _f32_bytes(dims: str) -> int:
    return 4 * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))


_LOOP_OUTPUT = re.compile(
    r"%(\S+) = (?:bf16|f16)\[([\d,]*)\]\{[^}]*\} get-tuple-element\(%while[^,\s)]*\)"
)


def loop_upcast_bytes(hlo_text: str) -> int:
    """Bytes of whole float32 copies of 16-bit loop outputs in an optimised XLA:CPU
    program (the sum of :func:`loop_upcasts`)."""
    return sum(loop_upcasts(hlo_text).values())


def loop_upcasts(hlo_text: str) -> dict[str, int]:
    """``{instruction: bytes}`` of the whole float32 copies of 16-bit loop outputs in an
    optimised XLA:CPU program (any computation).

    The forward scan over the layers stacks each layer's saved activation into a
    ``[layers, batch, seq, hidden]`` loop output; the backward loop reads it one layer at a
    time, into bf16 matmuls that XLA:CPU computes in float32, and XLA:CPU converts the
    whole stack before the loop (``f32[L, ...] convert(get-tuple-element(while))``: 4
    bytes per element for the whole backward pass). A GPU converts nothing. Counted:
    ``convert`` instructions (or fusions of one) whose single operand is a same-shaped
    bf16/f16 output of a ``while`` loop.
    """
    outputs = {m.group(1): m.group(2) for m in _LOOP_OUTPUT.finditer(hlo_text)}
    return {
        m.group(1): _f32_bytes(m.group(2))
        for m in _ENTRY_UPCAST.finditer(hlo_text)
        if outputs.get(m.group(3)) == m.group(2)
    }


@dataclasses.dataclass
class Plan:
    """What one configuration's train step costs. Bytes are per device; FLOPs per step.

    Attributes:
      settings: the planned values of :data:`SETTINGS` (+ ``precision``, ``optimizer``).
      params: parameter counts ``total`` / ``trainable`` / ``frozen`` (quantised weights
        count their logical elements, as PEFT's ``get_nb_trainable_parameters``).
      memory: bytes: ``frozen`` (and ``frozen_<kind>``), ``trainable``, ``optimizer``,
        ``batch``, ``gradients`` (estimated: the trainable bytes), ``activations`` (the
        temporaries less the gradients), and XLA's ``arguments``, ``outputs``,
        ``aliased``, ``temporaries``, ``peak`` (XLA's, on this backend), and
        ``peak_target``: the peak on the card planned for. Compiled on a GPU (or for a
        deviceless XLA:GPU target) it is ``peak``; compiled on a CPU it is ``peak`` less
        ``cpu_fragmentation``, ``cpu_upcasts``, ``cpu_rng_loops`` and
        ``host_on_device``, each measured where
        the temporaries peak (:func:`_cpu_only_bytes`, :mod:`jaxfit.plan.liveness`). The
        CPU compile still differs from a GPU's in other ways (fusion; float32
        activations and copies of each layer's weights inside the loop; the blocked
        attention standing in for cuDNN's, :func:`cpu_stand_in`): on a CPU the target
        peak is an estimate that errs high. ``host_bytes``: activations in pinned host
        memory under the ``offload`` remat policy (:func:`_host_bytes`).
      flops: ``executed`` (the step's jaxpr, loops times trip counts, recompute
        included), ``model`` (without rematerialisation: ``6N``/``4N`` + attention for
        decoders), ``xla_cost_analysis`` (XLA's count, which takes each loop body once).
      examples_per_step, tokens_per_step: what one optimizer step consumes (tokens: LM).
      compile_seconds: lowering + compilation wall time.
      backend: the backend compiled for: jax's (``cpu``, ``gpu``, ``tpu``), or a
        deviceless target's description (``cuda (deviceless, rtx4070ti)``).
      devices: devices of the mesh the step was compiled for (``settings`` has its
        ``mesh.data`` x ``mesh.fsdp``); ``memory`` is per device, ``flops`` for all.
      communication: bytes of the collectives' results in one step, per device, by kind
        (``jaxfit.plan.devices.collective_bytes``; empty on one device).
      caveats: what the compile does not see (a deviceless target's
        ``jaxfit.plan.cuda_target.CAVEATS``), else empty.
    """

    settings: dict[str, Any]
    params: dict[str, int]
    memory: dict[str, int]
    flops: dict[str, float]
    examples_per_step: int
    tokens_per_step: int | None
    compile_seconds: float
    backend: str
    devices: int = 1
    communication: dict[str, Any] = dataclasses.field(default_factory=dict)
    caveats: str = ""

    @property
    def peak_bytes(self) -> int:
        """The planned peak on the target device (``memory["peak_target"]``)."""
        return self.memory["peak_target"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _settings(config) -> dict[str, Any]:
    out = {k: get_field(config, k) for k in SETTINGS if get_field(config, k) is not None}
    if get_field(config, "model.attention_impl") is not None:
        out["model.attention_impl"] = get_field(config, "model.attention_impl") or "auto"
    out["precision"] = config.precision
    out["optimizer"] = config.optim.name
    mesh = sharding.MeshSpec.from_config(config).build()
    out.update({f"mesh.{k}": int(v) for k, v in mesh.shape.items()})
    return out


def _model_flops(config, task, batch_size: int) -> float:
    """Model FLOPs of one step: the task's formula (its registry hook,
    ``jaxfit.tasks.TaskEntry.model_flops``) where it has one, else the traced FLOPs of the
    same step without rematerialisation or micro-batching."""
    with _offload_accounted():
        flops = task.spec.task.model_flops(task, batch_size)
    if flops is not None:
        return flops
    plain = {"micro_batch_size": batch_size, "model.remat_policy": "none"}
    if get_field(config, "loss_chunk_size") is not None:
        plain["loss_chunk_size"] = 0
    return _trace(set_fields(config, plain))[1]


def cpu_stand_in(config):
    """The config compiled when planning on a CPU for a GPU.

    ``model.attention_impl`` ``"auto"`` (or ``""`` / absent) on a GPU resolves to cuDNN
    flash attention (``jaxfit.models.attention.choose_attention``), or, where cuDNN's
    constraints fail, to the blocked ``"chunked"`` form; on a CPU it would resolve to the
    XLA reference, whose ``[batch, heads, seq, seq]`` float32 scores no GPU run keeps.
    cuDNN does not compile on a CPU, so the plan compiles ``"chunked"``
    (``jaxfit.models.flash``, blocks of 512 x 512): like cuDNN's kernel it keeps the output
    and a float32 log-sum-exp per query for the backward pass and needs float32 gradient
    accumulators of ``O(seq)`` (cuDNN: dQ; here: dK, dV), so its memory is cuDNN's within
    one block's scores (``[batch, heads, 512, 512]`` float32: 32 MiB at 32 heads). Not
    modelled: where the GPU runs cuDNN with packed documents, jax's dense
    ``[batch, 1, seq, seq]`` bias and its gradient (at most
    ``attention.CUDNN_MASK_MAX_BYTES``, 256 MiB, by that rule). A configured implementation
    other than ``"auto"`` is compiled as it is."""
    impl = get_field(config, "model.attention_impl")
    if target.backend() != "cpu" or impl not in ("", "auto", None):
        return config
    return set_fields(config, {"model.attention_impl": "chunked"}, create=True)


def offloaded_bytes(jaxpr) -> int:
    """Bytes the ``offload`` remat policy moves to host memory in one traced step: every
    ``checkpoint_name`` tensor named in ``layers.OFFLOAD_NAMES`` that the differentiated
    step saves, times the length of the layer scan around it.

    In the jaxpr of a differentiated step, a tagged value that is saved for the backward
    pass appears outside any ``checkpoint`` (remat) equation, inside the forward scan over
    the layers; forward passes that are not differentiated (GradCache's embedding pass,
    evaluation) keep it inside their ``checkpoint`` equation and save nothing. Only the
    innermost scan counts: an outer loop (micro-batches) runs its backward pass before the
    next iteration, so its layers' residuals are not live together.
    """
    return sum(
        int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize * length
        for aval, length in _offloaded_tensors(jaxpr)
    )


def offloaded_stacks(jaxpr) -> set[str]:
    """HLO shapes (``bf16[32,1,2048,4096]``) of the stacks the ``offload`` remat policy
    keeps in host memory in one traced step: each :func:`offloaded_bytes` tensor with
    the length of its layer scan in front (how the forward scan stacks it)."""
    return {
        f"{_HLO_DTYPES.get(np.dtype(aval.dtype).name, '?')}"
        f"[{','.join(str(d) for d in (length, *aval.shape))}]"
        for aval, length in _offloaded_tensors(jaxpr)
    }


def _offloaded_tensors(jaxpr) -> list[tuple[Any, int]]:
    """``(aval, length of the innermost scan around it)`` of every tagged tensor the
    ``offload`` policy moves (:func:`offloaded_bytes`)."""
    found: list[tuple[Any, int]] = []

    def walk(jx, scan_length: int, in_remat: bool):
        for eqn in getattr(jx, "jaxpr", jx).eqns:
            name = eqn.primitive.name
            if name == "name" and eqn.params.get("name") in OFFLOAD_NAMES and not in_remat:
                found.append((eqn.outvars[0].aval, scan_length))
            length = eqn.params["length"] if name == "scan" else scan_length
            remat = in_remat or name in ("checkpoint", "remat", "remat2")
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(sub, jex_core.ClosedJaxpr | jex_core.Jaxpr):
                        walk(sub, length, remat)

    walk(jaxpr, 1, False)
    return found


_HLO_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


@contextlib.contextmanager
def _uncached(on: bool):
    """Inside (when ``on``), nothing compiled goes into jax's persistent compilation cache
    (the time threshold for an entry out of reach): a plan's compile read back from it
    would not be compiled, so XLA would write no buffer assignment to read
    (:func:`jaxfit.plan.liveness.read_dump`). jax decides once per process whether the
    cache is used at all, so the threshold is the switch that acts at every compile."""
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    if on:
        jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, before)


def compile_with_liveness(lowered, module: str):
    """``(compiled, Liveness or None)``: ``lowered`` compiled for the plan, and on a CPU
    the live ranges of its temporaries (:mod:`jaxfit.plan.liveness`) read from XLA's dump
    of module ``module`` (``"jit_train_step"``, ``"jit__generate"``).

    On a CPU the compile uses :data:`CPU_COMPILE_OPTIONS` and asks XLA to dump its buffer
    assignment and live ranges. A compile read back from jax's persistent cache would
    write none: the emitter filter (a debug option that matches no emitter) is in jax's
    cache key and unique, so the lookup misses, and :func:`_uncached` writes no entry. A
    GPU target compiles with no options and gets ``None``."""
    on_cpu = target.backend() == "cpu"
    with tempfile.TemporaryDirectory() as dump, _uncached(on_cpu):
        options = {
            **CPU_COMPILE_OPTIONS,
            **liveness.DUMP_OPTIONS,
            "xla_dump_to": dump,
            "xla_dump_emitter_re": f"jaxfit-plan-{os.path.basename(dump)}",
        }
        compiled = lowered.compile(options if on_cpu else None)
        return compiled, liveness.read_dump(dump, module) if on_cpu else None


@contextlib.contextmanager
def _offload_accounted():
    """Silence ``layers.remat_policy``'s warning that ``offload`` saves in place on a CPU:
    a plan accounts for it (:func:`_host_bytes`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "remat policy 'offload'")
        yield


def _trace(config):
    """``(lowerable step, executed FLOPs, pieces)`` of a config, abstract throughout;
    ``pieces`` ends with the step's jaxpr."""
    config = cpu_stand_in(config)
    with _offload_accounted():
        with tempfile.TemporaryDirectory() as workdir:
            run = build_run(config, workdir, abstract=True)  # the step jaxfit.train runs
        task, mesh = run.task, run.mesh
        abstract_params = task.abstract_params()
        state = checkpoint.to_abstract(run.abstract_state, run.state_shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
            task.abstract_batch(config.batch_size),
        )
        frozen = task.abstract_frozen()
        if frozen is not None:  # placed as the trainer places it: split over fsdp
            frozen = checkpoint.to_abstract(frozen, sharding.fsdp_shardings(frozen, mesh))
        step = run.step
        jaxpr = jax.make_jaxpr(step)(state, batch, frozen)
    executed = flops_lib.jaxpr_flops(jaxpr)
    return step, executed, (task, state, batch, frozen, abstract_params, jaxpr)


def _host_bytes(config, ma, jaxpr, on_cpu: bool) -> dict[str, int]:
    """``host_bytes``: activations the ``offload`` remat policy keeps in pinned host memory
    (0 under other policies). Compiled on a GPU it is XLA's host temporaries; on a CPU,
    where the policy saves the same tensors in place (``layers.remat_policy``), it is
    :func:`offloaded_bytes` of the traced step, and ``host_on_device``, the part of the CPU
    compile's temporaries a GPU holds on the host instead (the same bytes), leaves the
    target peak."""
    if get_field(config, "model.remat_policy") != "offload":
        return {"host_bytes": 0, "host_on_device": 0}
    if not on_cpu:
        return {"host_bytes": int(getattr(ma, "host_temp_size_in_bytes", 0)), "host_on_device": 0}
    host = offloaded_bytes(jaxpr)
    return {"host_bytes": host, "host_on_device": host}


def _cpu_only_bytes(config, hlo_text: str, jaxpr, live, host_on_device: int) -> dict[str, int]:
    """What of a CPU compile's peak a GPU does not hold on the device, measured where the
    temporaries peak (:mod:`jaxfit.plan.liveness`), so that a buffer dead at the peak
    takes nothing off the plan.

    Returns, each the drop of the live peak of the temporaries when it is left out (in
    this order):

    * ``cpu_fragmentation``: XLA:CPU's heap of temporaries less their live peak (holes
      of the CPU's packing; a GPU's allocator overhead is in the plan's reserve);
    * ``cpu_upcasts``: XLA:CPU's float32 copies of bf16 arguments (:func:`hoisted_upcasts`:
      the argument itself is counted among the arguments) and of loop outputs
      (:func:`loop_upcasts`: where XLA:CPU converts a stacked bf16 activation before the
      backward loop, the bf16 original may be dead at the peak, so the copy counts as the
      bf16 stack a GPU holds, half its bytes);
    * ``cpu_rng_loops``: the state of jax's rolled Threefry loops (:func:`threefry_loops`:
      LoRA dropout masks; a GPU hashes inside the fusion that uses the bits);
    * ``host_on_device``: under the ``offload`` policy, the layer-input stacks a GPU keeps
      in pinned host memory (:func:`offloaded_stacks`).

    Without the dump (XLA wrote none) the whole upcast sizes are taken off, no
    fragmentation and no Threefry state."""
    hoisted, looped = hoisted_upcasts(hlo_text), loop_upcasts(hlo_text)
    rng_loops = threefry_loops(hlo_text)
    if live is None:
        return {
            "cpu_fragmentation": 0,
            "cpu_upcasts": sum(hoisted.values()) + sum(looped.values()),
            "cpu_rng_loops": 0,
            "host_on_device": host_on_device,
        }
    stacks = {_dims(s) for s in offloaded_stacks(jaxpr)} if host_on_device else set()

    def gpu_bytes(v, offload: bool, rng: bool = True) -> int:
        if rng and v.name in rng_loops:  # hashed inside the bits' user on a GPU
            return 0
        if v.name in hoisted:  # the bf16 argument itself is among the arguments
            return 0
        offloaded = offload and _dims(v.shape) in stacks
        if v.name in looped:  # a GPU holds the bf16 stack (half), or nothing if offloaded
            return 0 if offloaded else v.size // 2
        return 0 if offloaded else v.size

    whole, _ = live.peak()
    no_upcasts, _ = live.peak(lambda v: gpu_bytes(v, offload=False, rng=False))
    no_rng, _ = live.peak(lambda v: gpu_bytes(v, offload=False))
    on_device, _ = live.peak(lambda v: gpu_bytes(v, offload=True))
    return {
        "cpu_fragmentation": max(live.heap_bytes - whole, 0),
        "cpu_upcasts": whole - no_upcasts,
        "cpu_rng_loops": no_upcasts - no_rng,
        "host_on_device": no_rng - on_device,
    }


def _dims(shape: str) -> str:
    """``"[32,1,2048,4096]"`` of an HLO shape (``bf16[32,1,2048,4096]{3,2,1,0}``)."""
    return shape[shape.find("[") : shape.find("]") + 1]


def plan_config(config) -> Plan:
    """Compile ``config``'s train step for abstract shapes and account for its cost.

    Args:
      config: a validated training config (``jaxfit.config``).

    Returns:
      A :class:`Plan`.

    Raises:
      ValueError / ConfigError: the config does not describe a buildable task.
    """
    t0 = time.perf_counter()
    step, executed, (task, state, batch, frozen, abstract_params, jaxpr) = _trace(config)
    on_cpu = target.backend() == "cpu"  # a GPU target compiles as XLA:GPU: no CPU terms
    with _offload_accounted():
        compiled, live = compile_with_liveness(step.lower(state, batch, frozen), "jit_train_step")
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else {}

    counts = lora_adapters.trainable_report(lora_training.full(abstract_params, frozen))
    trainable = tree_bytes(state.params)
    memory = {
        "frozen": tree_bytes(frozen),
        **{f"frozen_{k}": v for k, v in frozen_bytes_by_kind(frozen).items()},
        "trainable": trainable,
        "optimizer": tree_bytes(state.opt_state),
        "batch": tree_bytes(batch),
        "gradients": trainable,
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
    }
    memory["activations"] = max(memory["temporaries"] - trainable, 0)
    memory["peak"] = memory["arguments"] + memory["outputs"] - memory["aliased"]
    memory["peak"] += memory["temporaries"]
    hlo_text = compiled.as_text()
    memory.update(_host_bytes(config, ma, jaxpr, on_cpu))
    memory.update({"cpu_fragmentation": 0, "cpu_upcasts": 0, "cpu_rng_loops": 0})
    if on_cpu:
        memory.update(_cpu_only_bytes(config, hlo_text, jaxpr, live, memory["host_on_device"]))
    memory["peak_target"] = memory["peak"] - sum(
        memory[k] for k in ("cpu_fragmentation", "cpu_upcasts", "cpu_rng_loops", "host_on_device")
    )
    batch_size = config.batch_size
    return Plan(
        settings=_settings(cpu_stand_in(config)),
        params={
            "total": counts["total"],
            "trainable": counts["trainable"] if frozen is not None else counts["total"],
            "frozen": counts["total"] - counts["trainable"] if frozen is not None else 0,
        },
        memory=memory,
        flops={
            "executed": executed,
            "model": _model_flops(config, task, batch_size),
            "xla_cost_analysis": float(cost.get("flops", float("nan"))),
        },
        examples_per_step=batch_size,
        tokens_per_step=task.spec.task.tokens_per_step(task.config),
        compile_seconds=seconds,
        backend=target.description(),
        devices=target.device_count(),
        communication=devices_lib.collective_bytes(hlo_text) if target.device_count() > 1 else {},
        caveats=(target.current().caveats if target.current() else ""),
    )
