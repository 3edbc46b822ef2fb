"""Will a model generate on this card, and how fast? ``python -m jaxfit.plan --generate``.

  python -m jaxfit.plan --generate --model llama3-8b --quant nf4 --context 8192
  python -m jaxfit.plan --generate --model llama2-70b --quant nf4 --context 2048 --json out.json
  python -m jaxfit.plan --generate --model DIR --quant int8 --batch 8 --kv_cache int8 \\
      --search_context

Compiles the program ``jaxfit.sampling.generate`` runs (``sampling._generate``: the
chunked prefill, then the decoding loop, one XLA program) for abstract shapes: no weights
read, no memory allocated, as ``python -m jaxfit.plan`` does for the train step. The
context is the KV cache's length: a prompt of ``context - new_tokens`` tokens, padded to a
multiple of ``--prefill_chunk``, then ``--new_tokens`` generated. Printed:

* weights by storage kind (NF4 / int8 codes and their statistics, bf16 for what stays float:
  embeddings, norms, the LM head), the KV cache (the closed form
  ``2 x layers x batch x slots x kv_heads x head_dim x bytes``, checked against the
  compiled program's arguments), and the compiled peak against the card's usable memory;
* ``--search_context``: the longest context that fits (compiled at each candidate);
* decode tokens/s bound: the card's memory bandwidth (``jaxfit.perf.DEVICES``) over the
  bytes one decoding step reads (every weight but the input embedding table, plus the
  whole KV cache at the full context: the slowest step), times the batch;
* prefill tokens/s: the card's dense bf16 peak at ``--mfu`` over the forward FLOPs per
  token (``2 N + 4 L d T``, :func:`jaxfit.perf.decoder_flops_per_token`).
* ``--weights_on_host``: the layer stack stays in pinned host memory and one layer's
  weights are copied to the card as it runs (the model config's ``weights_on_host``):
  the card holds the embeddings, LM head, KV cache and one layer; every decoding step
  reads the stack over PCIe 4.0 x16 (31.5 GB/s), which then bounds the rate.

On a CPU the peak is XLA:CPU's program, read from its buffer assignment and live ranges
(:mod:`jaxfit.plan.liveness`) without the float32 copies of bf16 weights and KV cache that
XLA:CPU makes for its float32 matmuls and a GPU does not (other float32 conversions count
as bf16: it still errs high); ``--compile_for gpu`` compiles for the card as a deviceless
XLA:GPU target (``requirements-plan-gpu.txt``). Attention is the ``chunked`` flash
algorithm in plain XLA on a CPU (a GPU's ``auto`` picks cuDNN or it): no ``[queries, keys]``
scores array. XLA keeps a second copy of the KV cache for a moment between the prefill
loop and the decoding loop (loop-state copy insertion): the peak includes it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import perf, sampling, target
from jaxfit import quant as quant_lib
from jaxfit.hf import architectures, families
from jaxfit.hf import io as hf_io
from jaxfit.hf.load import abstract_params
from jaxfit.models import kv_cache
from jaxfit.plan import estimate, liveness
from jaxfit.plan.core import compile_with_liveness, frozen_bytes_by_kind, tree_bytes

KV_CACHE = ("bf16", "int8")
# As the default prefill chunk: a context that is a multiple of it then leaves a prompt
# of whole chunks, and the cache holds context - 1 slots (no padding past the context).
DEFAULT_NEW_TOKENS = sampling.DEFAULT_PREFILL_CHUNK


def weight_formats() -> tuple[str, ...]:
    """The weight storages a plan takes (``--quant``): ``"bf16"`` or a registered
    quantisation format (:func:`jaxfit.quant.names`: ``"int8"``, ``"nf4"``, ...)."""
    return ("bf16", *quant_lib.names())


@dataclasses.dataclass
class GenerationPlan:
    """The plan of one generation program (bytes on one device).

    Attributes:
      model, quant, kv_cache, context, batch, new_tokens, prefill_chunk: what was planned.
      slots: the KV cache's length (the padded prompt + ``new_tokens - 1``: the last token
        sampled is never fed back).
      params: the model's parameter count.
      weights_bytes / weights_by_kind: the weights, and by storage kind.
      kv_cache_bytes: the KV cache (closed form, :func:`jaxfit.models.kv_cache.nbytes`).
      peak_bytes: the compiled program's arguments + outputs - aliased + temporaries.
      temp_bytes: its temporaries (activations, dequantised weights, logits, scores): on
        a CPU the most that is live at once (:mod:`jaxfit.plan.liveness`), less XLA:CPU's
        float32 copies of bf16 values that a GPU does not make (:func:`_gpu_bytes`).
      cpu_upcast_bytes: what that leaves out of XLA:CPU's live peak (0 on a GPU).
      decode_bytes_per_step: what one decoding step reads from device memory (see the
        module docstring).
      host_bytes: the layer stack's bytes in host memory (``weights_on_host``; else 0),
        which every decoding step reads over the host link.
      flops_per_token: forward FLOPs per token at the full context.
      backend, compile_seconds: where and how long the compile took.
    """

    model: str
    quant: str
    kv_cache: str
    context: int
    batch: int
    new_tokens: int
    prefill_chunk: int
    slots: int
    params: int
    weights_bytes: int
    weights_by_kind: dict[str, int]
    kv_cache_bytes: int
    peak_bytes: int
    temp_bytes: int
    cpu_upcast_bytes: int
    decode_bytes_per_step: int
    host_bytes: int
    flops_per_token: float
    backend: str
    compile_seconds: float

    def decode_tokens_per_s(self, device: str) -> float:
        """The bandwidth bound of decoding: ``batch / (bytes read from the device /
        memory bandwidth + bytes read from the host / the host link)``."""
        dev = perf.device(device)
        seconds = self.decode_bytes_per_step / (dev.memory_gbs * 1e9)
        seconds += self.host_bytes / (perf.PCIE4_X16_GBS * 1e9)
        return self.batch / seconds

    def prefill_tokens_per_s(self, device: str, mfu: float) -> float:
        """``mfu x`` the card's dense bf16 peak over the forward FLOPs per token."""
        return mfu * perf.device(device).peak_bf16_tflops * 1e12 / self.flops_per_token


def resolve_model(name_or_dir: str) -> tuple[str, dict[str, Any]]:
    """``(name, HF config dict)`` of a built-in architecture
    (:data:`jaxfit.hf.architectures.ARCHITECTURES`) or of an HF directory's ``config.json``.

    Raises:
      ValueError: neither a built-in name nor a directory with a config.json (lists the
        names).
    """
    if name_or_dir in architectures.ARCHITECTURES:
        return name_or_dir, dict(architectures.ARCHITECTURES[name_or_dir])
    if os.path.isfile(os.path.join(name_or_dir, "config.json")):
        return os.path.basename(os.path.normpath(name_or_dir)), hf_io.read_config(name_or_dir)
    raise ValueError(
        f"--model {name_or_dir!r}: not a built-in architecture "
        f"({', '.join(architectures.ARCHITECTURES)}) nor a directory holding a config.json"
    )


def _model(hf_config: dict[str, Any], weights_on_host: bool = False):
    family = families.for_model_type(hf_config.get("model_type", ""))
    config = family.config_from_hf(hf_config)
    impl = "auto" if target.backend() == "gpu" else "chunked"  # see the module docstring
    config = dataclasses.replace(
        config,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        attention_impl=impl,
        weights_on_host=weights_on_host,
    )
    return family.model_class(config), family


def _on_host(tree):
    """``ShapeDtypeStruct`` s of ``tree`` placed in pinned host memory of the target's
    first device (how ``sampling.generate`` passes a ``weights_on_host`` stack)."""
    device = target.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), tree)


def abstract_weights(model, family, quant: str):
    """``jax.ShapeDtypeStruct`` weights of ``model`` stored as ``quant`` (``"bf16"``, or
    ``"nf4"`` / ``"int8"`` for every kernel under the layer stack, as
    :func:`jaxfit.hf.load_pretrained` quantises: embeddings, norms, LM head stay bf16)."""
    params = abstract_params(model, family)
    if quant == "bf16":
        return params
    rules = families.DEFAULT_QUANT_RULES
    return jax.eval_shape(
        functools.partial(quant_lib.quantize_params, rules=rules, method=quant), params
    )


def _dims(shape: str) -> tuple[int, ...]:
    """``(32, 1, 8447)`` of an HLO shape ``f32[32,1,8447]{2,1,0}``."""
    inner = shape[shape.index("[") + 1 : shape.index("]")]
    return tuple(int(d) for d in inner.split(",") if d)


def _read_in_place(weights, cache) -> set[tuple[int, ...]]:
    """Sorted dims of the bf16 arrays a GPU reads where they are: the weights' float
    leaves (and a stacked leaf's per-layer slice) and the KV cache (and a layer's)."""
    out = set()
    for x in jax.tree.leaves((weights, cache)):
        if getattr(x, "dtype", None) == jnp.bfloat16:
            out.add(tuple(sorted(x.shape)))
            out.add(tuple(sorted(x.shape[1:])))
    return out


def _gpu_bytes(value: liveness.Value, in_place: set[tuple[int, ...]]) -> int:
    """A temporary's bytes on a GPU. XLA:CPU computes bf16 matmuls in float32 and keeps
    float32 conversions of their bf16 operands, which XLA:GPU does not make: a float32
    conversion of an array a GPU reads in place (``in_place``: the bf16 weights, the KV
    cache, in any layout) counts 0; one of a computed value (a dequantised NF4 / int8
    kernel) counts as the bf16 it would be (half), which errs high."""
    if not (value.shape.startswith("f32[") and "convert" in value.name):
        return value.size
    return 0 if tuple(sorted(_dims(value.shape))) in in_place else value.size // 2


def _decoder_sizes(model) -> tuple[int, int, int, int]:
    """``(layers, kv_heads, head_dim, hidden)`` of a jaxfit decoder config."""
    c = model.config
    if hasattr(c, "n_layer"):  # GPT-2
        return c.n_layer, c.n_head, c.head_dim, c.n_embd
    return c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.hidden_size


def plan_generation(
    name_or_dir: str,
    *,
    quant: str = "nf4",
    context: int = 2048,
    batch: int = 1,
    kv_cache_format: str = "bf16",
    new_tokens: int | None = None,
    prefill_chunk: int = sampling.DEFAULT_PREFILL_CHUNK,
    weights_on_host: bool = False,
) -> GenerationPlan:
    """Compile ``sampling._generate`` for these abstract shapes and read its memory.

    Args:
      name_or_dir: a built-in architecture's name or an HF directory (``config.json``).
      quant: weight storage, one of :func:`weight_formats`.
      context: KV cache length asked for (prompt + new tokens), >= 2.
      batch: sequences decoded together.
      kv_cache_format: one of :data:`KV_CACHE`.
      new_tokens: tokens generated (default ``min(512, context // 2)``).
      prefill_chunk: prompt tokens per prefill step (``0``: the whole prompt at once).
      weights_on_host: the layer stack in pinned host memory, one layer copied to the
        device at a time (``weights_on_host`` of the model config): its bytes leave the
        device's peak and every decoding step reads them over the host link.

    Raises:
      ValueError: an unknown model, format, or sizes out of range (names the argument).
    """
    if quant not in weight_formats():
        raise ValueError(f"--quant {quant!r}: one of {list(weight_formats())}")
    if kv_cache_format not in KV_CACHE:
        raise ValueError(f"--kv_cache {kv_cache_format!r}: one of {list(KV_CACHE)}")
    if context < 2 or batch < 1 or prefill_chunk < 0:
        raise ValueError(f"--context {context} (>= 2), --batch {batch} (>= 1) or "
                         f"--prefill_chunk {prefill_chunk} (>= 0) out of range")  # fmt: skip
    name, hf_config = resolve_model(name_or_dir)
    model, family = _model(hf_config, weights_on_host)
    new = int(new_tokens or max(1, min(DEFAULT_NEW_TOKENS, context // 2)))
    if not 1 <= new < context:
        raise ValueError(f"--new_tokens {new}: between 1 and --context - 1 ({context - 1})")
    prompt = context - new
    chunk = prefill_chunk if prefill_chunk and prompt > prefill_chunk else 0
    width = -(-prompt // chunk) * chunk if chunk else prompt
    slots = width + new - 1
    kv_quant = None if kv_cache_format == "bf16" else kv_cache_format
    layers, kv_heads, head_dim, hidden = _decoder_sizes(model)
    positions = getattr(model.config, "n_positions", None)
    if positions and slots > positions:
        raise ValueError(f"--context {context}: {name} has {positions} learned positions")

    weights = abstract_weights(model, family, quant)
    host_bytes = tree_bytes(weights[model.STACK]) if weights_on_host else 0
    if weights_on_host:
        weights = {**weights, model.STACK: _on_host(weights[model.STACK])}
    s = jax.ShapeDtypeStruct
    args = (model, weights, s((batch, width), jnp.int32), s((), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)), s((), jnp.float32), s((), jnp.int32),
            s((), jnp.float32), s((1,), jnp.int32), s((), jnp.int32))  # fmt: skip
    t0 = time.perf_counter()
    lowered = sampling._generate.lower(
        *args, max_new_tokens=new, prefill_chunk=chunk, kv_quant=kv_quant
    )
    compiled, live = compile_with_liveness(lowered, "jit__generate")
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    fixed = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    temps, upcasts = ma.temp_size_in_bytes, 0
    if live is not None:  # XLA:CPU's float32 copies of bf16 values (_gpu_bytes)
        cache = jax.eval_shape(lambda: model.init_cache(batch, slots, kv_quant))
        in_place = _read_in_place(weights, cache)
        temps = live.peak(lambda v: _gpu_bytes(v, in_place))[0]
        upcasts = live.peak()[0] - temps
    if host_bytes and not getattr(ma, "host_argument_size_in_bytes", 0):
        fixed -= host_bytes  # XLA:CPU counts host-memory arguments with the device's
    peak = fixed + temps

    kv_bytes = kv_cache.nbytes(layers, batch, slots, kv_heads, head_dim, jnp.bfloat16, kv_quant)
    weights_bytes = tree_bytes(weights)
    embedding = 0  # read a row per token, not the table (unless tied: it is the LM head)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied:
        table = weights.get(model.EMBEDDING, {}).get("embedding")
        embedding = tree_bytes(table) if table is not None else 0
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(model, family))))
    vocab = model.config.vocab_size
    matmul_params = n_params - (0 if tied else vocab * hidden)
    flops = perf.decoder_flops_per_token(matmul_params, layers, hidden, context, training=False)
    return GenerationPlan(
        model=name,
        quant=quant,
        kv_cache=kv_cache_format,
        context=context,
        batch=batch,
        new_tokens=new,
        prefill_chunk=chunk,
        slots=slots,
        params=n_params,
        weights_bytes=weights_bytes,
        weights_by_kind=frozen_bytes_by_kind(weights),
        kv_cache_bytes=kv_bytes,
        peak_bytes=int(peak),
        temp_bytes=int(temps),
        cpu_upcast_bytes=int(upcasts),
        decode_bytes_per_step=weights_bytes - embedding + kv_bytes - host_bytes,
        host_bytes=host_bytes,
        flops_per_token=flops,
        backend=target.backend(),
        compile_seconds=seconds,
    )


def search_context(
    plan_fn, usable: int, *, start: int = 1024, limit: int = 1 << 20, progress=print
):
    """The longest context (a multiple of ``start``) whose plan fits ``usable`` bytes:
    doubling from ``start`` until a plan does not fit (or ``limit``), then bisection.
    ``plan_fn(context) -> GenerationPlan``. Returns ``(longest plan or None, tried)``."""
    tried: dict[int, GenerationPlan] = {}

    def fits(n: int) -> bool:
        if n not in tried:
            tried[n] = plan_fn(n)
            p = tried[n]
            ok = "fits" if p.peak_bytes <= usable else "does not fit"
            progress(f"  context {n:>8,}: peak {estimate.format_bytes(p.peak_bytes)} {ok}")
        return tried[n].peak_bytes <= usable

    if not fits(start):
        return None, tried
    lo, hi = start, None
    while hi is None:
        n = lo * 2
        if n > limit:
            return tried[lo], tried
        if fits(n):
            lo = n
        else:
            hi = n
    while hi - lo > start:
        mid = (lo + hi) // 2 // start * start
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return tried[lo], tried


def report(plan: GenerationPlan, device: str, budget: int, usable: int, mfu: float) -> str:
    """The plan as the console prints it."""
    fb = estimate.format_bytes
    other = plan.peak_bytes - (plan.weights_bytes - plan.host_bytes) - plan.kv_cache_bytes
    kinds = ", ".join(f"{k} {fb(v)}" for k, v in sorted(plan.weights_by_kind.items()))
    verdict = "FITS" if plan.peak_bytes <= usable else (
        f"DOES NOT FIT (over by {fb(plan.peak_bytes - usable)})")  # fmt: skip
    lines = [
        f"generation plan: {plan.model} ({plan.params / 1e9:.2f} B parameters), weights "
        f"{plan.quant}, KV cache {plan.kv_cache}, batch {plan.batch}, context "
        f"{plan.context:,} ({plan.context - plan.new_tokens:,} prompt + {plan.new_tokens:,} "
        f"new; prefill chunk {plan.prefill_chunk or 'whole prompt'})",
        f"  weights               {fb(plan.weights_bytes):>11}  ({kinds})",
        f"  KV cache              {fb(plan.kv_cache_bytes):>11}  ({plan.slots:,} slots)",
        f"  activations & other   {fb(other):>11}",
        f"  planned peak          {fb(plan.peak_bytes):>11}"
        + (
            f"  (XLA:CPU's program less {fb(plan.cpu_upcast_bytes)} of float32 copies a GPU "
            "does not make; errs high)"
            if plan.backend == "cpu"
            else ""
        ),  # fmt: skip
        f"budget {fb(budget)} ({device}) less reserve {fb(budget - usable)} = {fb(usable)} "
        f"usable: {verdict}",
    ]
    if plan.host_bytes:
        lines.append(
            f"  of the weights, {fb(plan.host_bytes)} (the layer stack) live in pinned host "
            "memory, one layer at a time on the device (--weights_on_host)"
        )
    elif plan.weights_bytes > usable:
        lines.append("  the weights alone exceed the card: it cannot run without streaming "
                     "weights from host memory (each token then reads them over PCIe)")  # fmt: skip
    dev = perf.device(device)
    lines += [
        f"decode: at most {plan.decode_tokens_per_s(device):,.1f} tokens/s "
        f"({dev.memory_gbs:g} GB/s / {fb(plan.decode_bytes_per_step)} read per step"
        + (f" + {perf.PCIE4_X16_GBS:g} GB/s over PCIe / {fb(plan.host_bytes)}"
           if plan.host_bytes else "")
        + f", batch {plan.batch}, full context)",
        f"prefill: about {plan.prefill_tokens_per_s(device, mfu):,.0f} tokens/s "
        f"({dev.peak_bf16_tflops:g} TFLOP/s x {mfu:.0%} MFU / {plan.flops_per_token / 1e9:.1f} "
        "GFLOP per token)",
    ]  # fmt: skip
    return "\n".join(lines)


def to_json(plan: GenerationPlan, device: str, usable: int, mfu: float) -> dict[str, Any]:
    """The plan's JSON: its fields, and ``fits``, ``decode_tokens_per_s``,
    ``prefill_tokens_per_s`` for ``device``."""
    return {
        **dataclasses.asdict(plan),
        "device": device,
        "usable_bytes": usable,
        "fits": plan.peak_bytes <= usable,
        "decode_tokens_per_s": plan.decode_tokens_per_s(device),
        "prefill_tokens_per_s": plan.prefill_tokens_per_s(device, mfu),
    }


def dump(path: str, out: Any) -> None:
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
