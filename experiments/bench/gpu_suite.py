"""GPU benchmark suite: bf16 matmul rate, GPT-2 124M training, Llama-3-8B QLoRA under a
12 GiB cap, CLIP ViT-B/32 training. No download; sized to finish within a 10-minute call.

Run from the repository root::

    python -m experiments.bench.gpu_suite --record          # on a GPU; rows in docs/BENCHMARKS.md
    python -m experiments.bench.gpu_suite --small           # tiny sizes, ~1 minute on a CPU
    python -m experiments.bench.gpu_suite --only qlora8b    # one part (matmul always runs)

Parts, each in its own process (``--worker PART``; a crash or an out-of-memory in one is
reported, not fatal; the memory cap of the QLoRA part must be set before jax starts):

* ``matmul``: the dense bf16 matmul rate of this device, ``jnp.dot`` of ``[n, n]`` bf16
  matrices (n = 8192), ``inner`` chained products per jitted call, the median of ``reps``
  calls after ``warmup``, each ended by ``block_until_ready``: ``2 n^3 inner / t`` FLOP/s.
  Every MFU below is model FLOP/s over THIS rate (what the device really reaches on a large
  bf16 matmul); the "datasheet" MFU divides by the dense bf16 peak of
  :data:`jaxfit.perf.DEVICES` when the device is one of them (H200: 989.4 TFLOP/s).
* ``gpt2``: GPT-2 124M (``configs/gpt2_scratch.py`` shape, vocabulary 50257 padded to 50304
  as the LM task does) from a random init, float32 master weights, bf16 compute, the
  config's AdamW; batch 16 x 1024 tokens as one micro-batch, no remat. Loss: the LM task's
  own ``_sum_loss`` (``jaxfit.tasks.lm.LMTask``). Step: ``jaxfit.step.make_train_step``
  jitted with ``donate_argnums=0``, compiled ahead of time. Tokens/s and MFU with
  ``perf.decoder_flops_per_token`` (``6 N + 12 L d T``, ``N`` without the position table).
* ``qlora8b``: the Llama 3 8B architecture (hidden 4096, 32 layers, 32 heads, 8 KV heads,
  MLP 14336, vocabulary 128256, RoPE theta 500000 with Llama 3.1's ``llama3`` scaling)
  trained as ``configs/llama_qlora.py:all_linear`` trains it: NF4 base with double
  quantisation (bf16 embeddings, norms and LM head), LoRA r=16 alpha 32 dropout 0.05 on
  every linear layer (split into trainable / frozen by ``jaxfit.lora.training.split``), bf16
  compute, full remat, chunked cross-entropy (1024 tokens), the config's AdamW. The random
  base is built by :func:`jaxfit.quant.random_init.random_quantized_params`: one layer's
  float kernel at a time, quantised at once, so the 16 GB bf16 model never exists. The
  process runs under a 12 GiB cap (``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 12 GiB / the
  device's memory, ``XLA_PYTHON_CLIENT_PREALLOCATE=true``; on a CPU no cap, said in the
  output). Measured: batch 1 x 2048 and the config's micro-batch (4) x 2048, tokens/s and
  MFU with ``4 N_frozen + 6 N_lora + 12 L d T`` FLOPs per token (the frozen base needs the
  forward and the activation gradients, not its weight gradients; remat recomputation is
  not counted), peak memory. Then the longest sequence that fits at batch 1 (one step runs):
  4096, 8192, ... (doubling up to ``max_seq``) until the first failure, then bisection
  between the longest fit and the first failure down to ``seq_step`` (1024) tokens. A
  failure is foreseen, without running, when XLA's buffers of the compiled step (arguments
  + outputs - aliased + temporaries, ``memory_analysis()``) exceed the allocator's limit:
  nothing is allocated, and the same process goes on. A real out-of-memory
  (``RESOURCE_EXHAUSTED`` / "out of memory" while running) ends the process (the donated
  state may be gone, the allocator fragmented): a fresh process continues the search, and
  re-tries that length first when it failed after earlier runs. The search stops at the time
  budget; the result says how far it got. Fresh processes share a compilation cache.
* ``clip``: ``configs/clip_coco.py``'s model (ViT-B/32 image tower, 12-layer text tower,
  text vocabulary 16384, 77 tokens) and batch (128 as 8 GradCache micro-batches of 16, remat
  ``dots_no_batch``, bf16), random init, random pixels and captions; the CLIP task's own
  ``loss_and_grad``. Images/s.

Peak memory is ``memory_stats()["peak_bytes_in_use"]`` of the device (since the process
started, so it includes parameter initialisation; the QLoRA part also prints the peak right
after its init) where jax reports it, else the process's peak RSS (``common.PeakRSS``).
Every part prints one table; ``--record`` appends one dated row per measurement (machine,
backend, versions, commit) to the ``gpu_suite`` section of ``docs/BENCHMARKS.md`` (refused on
a CPU backend or with ``--small``). ``--budget_s`` (default 540) bounds the whole run: the
parts run in the order matmul, gpt2, clip, qlora8b, and the sequence search takes what is
left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import common  # noqa: E402

PARTS = ("matmul", "gpt2", "clip", "qlora8b")
GIB = 2**30
MIB = 2**20

# Llama 3 8B (Meta-Llama-3.1-8B config.json): the QLoRA part's architecture.
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192),
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
# A Llama whose per-layer kernels are multiples of the NF4 block (64), for --small.
TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# Real sizes (for a GPU). Times on an H200 are estimates until the first recorded run.
DEFAULTS = {
    "matmul": dict(n=8192, inner=10, warmup=3, reps=10),
    "gpt2": dict(config="configs/gpt2_scratch.py", vocab=50257, batch=16, seq=1024,
                 remat="none", warmup=2, steps=10),
    "clip": dict(config="configs/clip_coco.py", warmup=2, steps=10),
    "qlora8b": dict(config="configs/llama_qlora.py:all_linear", llama=LLAMA3_8B, seq=2048,
                    warmup=1, steps=5, max_seq=131072, seq_step=1024, cap_gib=12.0),
}  # fmt: skip
# --small: every part at a toy size (the whole suite in about a minute on 2 CPU cores).
SMALL = {
    "matmul": dict(n=256, inner=2, warmup=1, reps=3),
    "gpt2": dict(config="configs/gpt2_scratch.py:demo", vocab=512, batch=4, seq=64,
                 remat="none", warmup=1, steps=2),
    "clip": dict(config="configs/clip_coco.py:demo", batch=8, micro_batch=4, warmup=1,
                 steps=2),
    "qlora8b": dict(config="configs/llama_qlora.py:demo", llama=TINY_LLAMA, seq=64,
                    warmup=1, steps=2, max_seq=128, seq_step=64, cap_gib=12.0,
                    loss_chunk_size=32, remat="full"),
}  # fmt: skip
# Upper bounds of each part's wall time (s, process start to exit) within --budget_s; the
# QLoRA part (and its sequence search) gets whatever is left.
PART_CAP_S = {"matmul": 120, "gpt2": 180, "clip": 180}
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OutOfMemory")

SECTION = "gpu_suite: matmul rate, GPT-2 124M, Llama-3-8B QLoRA (12 GiB cap), CLIP ViT-B/32"
INTRO = """\
`python -m experiments.bench.gpu_suite [--small] [--record] [--only PARTS]` (on a lent GPU;
no download; within a 10-minute call): one row per measurement. `benchmark`: `matmul` (the
dense bf16 `jnp.dot` rate of the device, 8192^3, the denominator of every `MFU (matmul)`),
`gpt2` (GPT-2 124M from random init, fp32 master weights, bf16 compute, AdamW), `qlora8b`
(Llama 3 8B architecture, random NF4 base quantised layer by layer, LoRA r=16 on every
linear layer, full remat, chunked CE, under a 12 GiB memory cap; the longest batch-1
sequence that fits is in `notes`) and `clip` (`configs/clip_coco.py`'s ViT-B/32 and batch
128 in micro-batches of 16). The module docstring has the details.

Columns: `config` (sizes, batch x sequence, precision, remat); `step ms` (median wall time of
one optimizer step after warm-up; for `matmul`, of one 8192^3 product); `throughput`
(tokens/s, images/s, or TFLOP/s for `matmul`); `model TFLOP/s` (model FLOPs per token x
tokens/s: `6 N + 12 L d T` for full training, `4 N_frozen + 6 N_lora + 12 L d T` for QLoRA;
remat recomputation not counted); `MFU (matmul)` = model FLOP/s / the `matmul` rate of the
same run; `MFU (datasheet)` = model FLOP/s / the device's dense bf16 peak from
`jaxfit.perf.DEVICES`; `peak MiB` (the device allocator's `peak_bytes_in_use` since the
process started, initialisation included); `compile s` (tracing + XLA compilation of the
step). `--record` refuses CPU backends and `--small` runs."""
COLUMNS = (
    "date", "machine", "backend", "versions", "commit", "benchmark", "config", "step ms",
    "throughput", "model TFLOP/s", "MFU (matmul)", "MFU (datasheet)", "peak MiB",
    "compile s", "notes",
)  # fmt: skip


def _log(msg: str) -> None:
    print(f"[gpu_suite] {msg}", file=sys.stderr, flush=True)


def is_oom(error: BaseException | str) -> bool:
    """True when an exception (or its message) is an out-of-memory failure of XLA."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(m in text for m in OOM_MARKERS)


def qlora_flops_per_token(
    n_frozen: int, n_trainable: int, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """Model FLOPs per token of a training step over a frozen base with trainable adapters.

    A frozen weight needs its forward product (``2 N``) and, for the gradient of the
    activations below it, one backward product (``2 N``) but no weight gradient: ``4 N``
    instead of ``6 N``. Trainable parameters cost ``6 N``; attention scores and values
    ``12 L d T`` (forward ``4 L d T``, backward twice that), as in
    :func:`jaxfit.perf.decoder_flops_per_token`, which this equals when nothing is frozen.
    """
    attention = 12 * num_layers * hidden_size * seq_len
    return float(4 * n_frozen + 6 * n_trainable + attention)


def perf_device(device_kind: str) -> str | None:
    """The :data:`jaxfit.perf.DEVICES` name of a jax ``device_kind`` ("NVIDIA H200" ->
    "h200"), or None when it is not one of them (the datasheet MFU is then not given)."""
    import re

    from jaxfit import perf

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


# -- workers (each runs in its own process) -------------------------------------------------


class _Memory:
    """Peak memory of this process: the device allocator's when jax reports it, else RSS."""

    def __init__(self, peak_rss: common.PeakRSS):
        import jax

        self.device = jax.devices()[0]
        self.rss = peak_rss
        stats = self.device.memory_stats()
        self.on_device = bool(stats) and "peak_bytes_in_use" in stats
        self.measure = (
            'device memory_stats()["peak_bytes_in_use"]' if self.on_device else peak_rss.measure
        )
        self.bytes_limit = stats.get("bytes_limit") if stats else None

    def peak_mib(self) -> float:
        if self.on_device:
            return self.device.memory_stats()["peak_bytes_in_use"] / MIB
        return self.rss.peak_kib() / common.KIB_PER_MIB

    def in_use_mib(self) -> float:
        if self.on_device:
            return self.device.memory_stats()["bytes_in_use"] / MIB
        return (self.rss.current_kib() or 0) / common.KIB_PER_MIB


def _env_info() -> dict:
    import jax

    d = jax.devices()[0]
    try:  # e.g. "cuda 12080" on a GPU: the CUDA runtime the plugin was built for
        platform_version = d.client.platform_version
    except AttributeError:
        platform_version = ""
    return {
        "backend": d.platform,
        "device": d.device_kind,
        "jax_version": jax.__version__,
        "platform_version": platform_version,
        "perf_device": perf_device(d.device_kind) if d.platform == "gpu" else None,
    }


def _timed(run, warmup: int, steps: int) -> list[float]:
    """Wall times of ``steps`` calls of ``run()`` (which synchronises) after ``warmup``."""
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times[warmup:]


def _memory_analysis(compiled) -> dict:
    """XLA's static buffer sizes of a compiled step (MiB), where the backend gives them."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional information
        return {}
    if ma is None:
        return {}
    return {
        "argument_mib": ma.argument_size_in_bytes / MIB,
        "output_mib": ma.output_size_in_bytes / MIB,
        "alias_mib": ma.alias_size_in_bytes / MIB,
        "temp_mib": ma.temp_size_in_bytes / MIB,
    }


def _lm_sum_loss(model, loss_chunk_size: int):
    """The LM task's per-micro-batch loss (``LMTask._sum_loss``, the code a training run
    executes), bound to ``model`` without building the task (which needs a corpus)."""
    import ml_collections

    from jaxfit.tasks.lm import LMTask

    task = object.__new__(LMTask)
    task.model = model
    task.config = ml_collections.ConfigDict({"loss_chunk_size": int(loss_chunk_size)})
    return task._sum_loss


def _lm_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """A training batch as ``jaxfit.data.text_batches`` makes it from one document per
    row: next-token labels, every position a loss token, one segment, positions 0..S-1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.ascontiguousarray(pos),
    }


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _matmul_worker(spec: dict, peak: common.PeakRSS, save) -> dict:
    import jax
    import jax.numpy as jnp

    n, inner = spec["n"], spec["inner"]
    out = _env_info()
    mem = _Memory(peak)
    if mem.bytes_limit and spec.get("mem_fraction"):
        out["device_memory_bytes"] = mem.bytes_limit / spec["mem_fraction"]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)

    @jax.jit
    def chain(x, w):  # ``inner`` dependent products: one dispatch, values stay O(1)
        return jax.lax.fori_loop(0, inner, lambda _, y: jnp.dot(y, w), x)

    t = time.perf_counter()
    compiled = chain.lower(a, b).compile()
    out["compile_s"] = time.perf_counter() - t
    times = _timed(lambda: compiled(a, b).block_until_ready(), spec["warmup"], spec["reps"])
    med = statistics.median(times)
    out.update(
        n=n,
        inner=inner,
        times_s=times,
        step_s=med / inner,
        tflops=2 * n**3 * inner / med / 1e12,
        peak_mib=mem.peak_mib(),
        memory_measure=mem.measure,
    )
    return out


def _gpt2_worker(spec: dict, peak: common.PeakRSS, save) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxfit import accumulate, optim, perf
    from jaxfit import step as step_lib
    from jaxfit.config import load_config
    from jaxfit.models import gpt2
    from jaxfit.tasks.base import COMPUTE_DTYPES
    from jaxfit.tasks.lm import _pad_vocab

    out = _env_info()
    mem = _Memory(peak)
    cfg = load_config(spec["config"])
    m = cfg.model.config
    vocab = _pad_vocab(spec["vocab"])
    model = gpt2.GPT2LMHeadModel(
        gpt2.GPT2Config(
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_embd=m.n_embd,
            n_positions=m.n_positions,
            vocab_size=vocab,
            dtype=COMPUTE_DTYPES[cfg.precision],
            param_dtype=jnp.float32,
            remat_policy=spec["remat"],
        )
    )
    key = jax.random.key(cfg.seed)
    params = jax.jit(model.init)(key, jnp.zeros((1, 8), jnp.int32))["params"]
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.total_steps, params)
    state = step_lib.create_train_state(params, optimizer, key)
    n_params = _count(params)
    n_flops = n_params - _count(params.get("wpe", {}))  # position table: no FLOPs
    del params
    loss_and_grad = accumulate.microbatched(_lm_sum_loss(model, 0), 1)
    batch = jax.device_put(_lm_batch(spec["batch"], spec["seq"], vocab))
    train_step = step_lib.make_train_step(loss_and_grad, optimizer, schedule)
    _log(f"gpt2: compiling (B{spec['batch']} x S{spec['seq']})")
    t = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    losses = []

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # synchronises

    times = _timed(run, spec["warmup"], spec["steps"])
    med = statistics.median(times)
    tokens = spec["batch"] * spec["seq"]
    fpt = perf.decoder_flops_per_token(n_flops, m.n_layer, m.n_embd, spec["seq"])
    out.update(
        config=f"L{m.n_layer} D{m.n_embd} H{m.n_head} V{vocab}, B{spec['batch']} x "
        f"S{spec['seq']}, {cfg.precision} (fp32 master), remat {spec['remat']}, AdamW",
        n_params=n_params,
        n_flops_params=n_flops,
        flops_per_token=fpt,
        compile_s=compile_s,
        times_s=times,
        step_s=med,
        tokens_per_s=tokens / med,
        model_tflops=fpt * tokens / med / 1e12,
        losses=losses,
        peak_mib=mem.peak_mib(),
        memory_measure=mem.measure,
        xla=_memory_analysis(compiled),
    )
    return out


def _clip_worker(spec: dict, peak: common.PeakRSS, save) -> dict:
    import types

    import jax
    import numpy as np

    from jaxfit import optim
    from jaxfit import step as step_lib
    from jaxfit.config import load_config
    from jaxfit.models import clip as clip_model
    from jaxfit.tasks import clip as clip_task

    out = _env_info()
    mem = _Memory(peak)
    cfg = load_config(spec["config"])
    batch_size = spec.get("batch") or cfg.batch_size
    micro = spec.get("micro_batch") or cfg.micro_batch_size
    vocab, length = cfg.data.vocab_size, cfg.data.context_length
    tokenizer = types.SimpleNamespace(  # the ids a trained BPE would give the specials
        vocab_size=vocab,
        context_length=length,
        pad_token_id=0,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )
    model = clip_model.CLIPModel(clip_task.model_config(cfg, tokenizer))
    task = object.__new__(clip_task.CLIPTask)  # its loss_and_grad, without data
    task.model, task.config = model, cfg
    task.num_micro_batches = batch_size // micro
    key = jax.random.key(cfg.seed)
    params = jax.jit(task._init_base)(key)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.total_steps, params)
    state = step_lib.create_train_state(params, optimizer, key)
    n_params = _count(params)
    del params
    rng = np.random.default_rng(0)
    v = model.config.vision
    lengths = rng.integers(8, min(32, length) + 1, batch_size)  # COCO-like caption lengths
    ids = rng.integers(1, vocab - 2, (batch_size, length), dtype=np.int32)
    cols = np.arange(length)[None]
    ids[:, 0] = tokenizer.bos_token_id
    ids = np.where(cols == lengths[:, None] - 1, tokenizer.eos_token_id, ids)
    ids = np.where(cols >= lengths[:, None], tokenizer.pad_token_id, ids).astype(np.int32)
    shape = (batch_size, v.image_size, v.image_size, v.num_channels)
    batch = jax.device_put(
        {
            "pixel_values": rng.standard_normal(shape, dtype=np.float32),
            "input_ids": ids,
            "attention_mask": (cols < lengths[:, None]).astype(np.int32),
        }
    )
    train_step = step_lib.make_train_step(task.loss_and_grad, optimizer, schedule)
    _log(f"clip: compiling (batch {batch_size} in micro-batches of {micro})")
    t = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    losses = []

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))

    times = _timed(run, spec["warmup"], spec["steps"])
    med = statistics.median(times)
    out.update(
        config=f"ViT-B/{v.patch_size}-shaped: image {v.image_size} D{v.hidden_size} "
        f"L{v.num_hidden_layers}, text D{model.config.text.hidden_size} "
        f"L{model.config.text.num_hidden_layers} V{vocab} x {length}, batch {batch_size} "
        f"(GradCache {batch_size // micro} x {micro}), {cfg.precision}, remat "
        f"{model.config.remat_policy}, AdamW",
        n_params=n_params,
        batch=batch_size,
        micro_batch=micro,
        compile_s=compile_s,
        times_s=times,
        step_s=med,
        images_per_s=batch_size / med,
        losses=losses,
        peak_mib=mem.peak_mib(),
        memory_measure=mem.measure,
        xla=_memory_analysis(compiled),
    )
    return out


def _qlora_worker(spec: dict, peak: common.PeakRSS, save) -> dict:
    """Build the random NF4 base and its adapters once, then run ``spec["items"]`` (batch,
    seq, timed) in order until the first failure or the deadline. ``save(out)`` after every
    item, so that the parent keeps what finished if the process dies."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxfit import accumulate, optim, quant
    from jaxfit import step as step_lib
    from jaxfit.config import load_config
    from jaxfit.lora import training as lora_training
    from jaxfit.models import llama
    from jaxfit.quant.random_init import random_quantized_params
    from jaxfit.tasks.base import COMPUTE_DTYPES, param_rng

    t_start = time.perf_counter()
    if spec.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    out = _env_info()
    mem = _Memory(peak)
    out["memory_measure"] = mem.measure
    out["bytes_limit_gib"] = mem.bytes_limit / GIB if mem.bytes_limit else None
    out["items"] = []
    cfg = load_config(spec["config"])
    with cfg.unlocked():
        if "loss_chunk_size" in spec:
            cfg.loss_chunk_size = spec["loss_chunk_size"]
        if "remat" in spec:
            cfg.model.remat_policy = spec["remat"]
    dtype = COMPUTE_DTYPES[cfg.precision]
    lcfg = llama.LlamaConfig(
        **spec["llama"],
        dtype=dtype,
        param_dtype=dtype,  # as load_quantized: float leaves stored in the compute dtype
        remat_policy=cfg.model.remat_policy,
        attention_impl=spec.get("attention"),
    )
    model = llama.LlamaForCausalLM(lcfg)
    rng = param_rng(cfg)
    abstract = jax.eval_shape(model.init, rng, jnp.zeros((1, 8), jnp.int32))["params"]
    _log("qlora8b: drawing and quantising the random base, one layer at a time")
    t = time.perf_counter()
    base = random_quantized_params(abstract, rng, method=cfg.precision)
    jax.block_until_ready(base)
    init_s = time.perf_counter() - t
    nf4 = [
        x for x in jax.tree.leaves(base, is_leaf=quant.is_weight_leaf) if quant.is_weight_leaf(x)
    ]
    n_quant = sum(x.num_weights for x in nf4)
    bits = 8 * sum(x.nbytes for leaf in nf4 for x in jax.tree.leaves(leaf)) / max(n_quant, 1)
    floats = {
        k: v
        for k, v in jax.tree_util.tree_flatten_with_path(base, is_leaf=quant.is_weight_leaf)[0]
        if not quant.is_weight_leaf(v)
    }
    n_float = sum(int(np.prod(v.shape)) for v in floats.values())
    n_embed = (
        0 if lcfg.tie_word_embeddings else int(np.prod(base["embed_tokens"]["embedding"].shape))
    )
    base_mib = sum(x.nbytes for x in jax.tree.leaves(base)) / MIB
    trainable, frozen = lora_training.split(base, cfg, rng, model)
    del base
    n_lora = _count(trainable)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.total_steps, trainable)
    state = step_lib.create_train_state(trainable, optimizer, jax.random.key(cfg.seed))
    del trainable
    jax.block_until_ready((state, frozen))
    loss_and_grad = accumulate.microbatched(_lm_sum_loss(model, cfg.loss_chunk_size), 1)
    train_step = jax.jit(
        step_lib.make_train_step(loss_and_grad, optimizer, schedule), donate_argnums=0
    )
    n_frozen = n_quant + n_float - n_embed  # the embedding lookup takes no FLOPs
    out.update(
        config=f"Llama L{lcfg.num_hidden_layers} D{lcfg.hidden_size} H{lcfg.num_attention_heads}"
        f"/{lcfg.num_key_value_heads} F{lcfg.intermediate_size} V{lcfg.vocab_size}, "
        f"{cfg.precision} base + LoRA r{cfg.lora.rank} ({', '.join(cfg.lora.targets)}), "
        f"{jnp.dtype(dtype).name} compute, remat {cfg.model.remat_policy}, CE chunk "
        f"{cfg.loss_chunk_size}, attention {spec.get('attention') or 'xla (default)'}",
        init_s=init_s,
        setup_s=time.perf_counter() - t_start,
        nf4_leaves=len(nf4),
        quantized_weights=n_quant,
        bits_per_weight=bits,
        base_mib=base_mib,
        n_frozen_flops=n_frozen,
        n_lora=n_lora,
        num_layers=lcfg.num_hidden_layers,
        hidden_size=lcfg.num_attention_heads * lcfg.head_dim,
        peak_after_init_mib=mem.peak_mib(),
        in_use_after_init_mib=mem.in_use_mib(),
    )
    save(out)
    limit = mem.bytes_limit
    attempts = {"n": 0, "longest_s": 0.0, "clean": True}

    def attempt(b: int, s: int, timed: bool) -> dict:
        """Compile and run one step of batch ``b`` x ``s`` tokens; record it in ``out``.

        ``predicted``: XLA's buffer sizes of the compiled step (arguments + outputs -
        aliased + temporaries) exceed the allocator's limit, so it cannot fit and is not
        run: nothing was allocated, and this process may go on. A real out-of-memory
        leaves the allocator in an unknown state (``attempts["clean"]`` False)."""
        rec = {"batch": b, "seq": s, "timed": timed, "first_in_process": attempts["n"] == 0}
        attempts["n"] += 1
        t_item = time.perf_counter()
        _log(f"qlora8b: batch {b} x seq {s}: compiling")
        try:
            if s > spec.get("simulate_oom_seq", math.inf):  # tests of the search on a CPU
                raise RuntimeError("RESOURCE_EXHAUSTED: simulated (--simulate_oom_seq)")
            batch = jax.device_put(_lm_batch(b, s, lcfg.vocab_size, seed=attempts["n"]))
            t = time.perf_counter()
            compiled = train_step.lower(state, batch, frozen).compile()
            rec["compile_s"] = time.perf_counter() - t
            rec["xla"] = xla = _memory_analysis(compiled)
            if xla and limit:
                need = xla["argument_mib"] + xla["output_mib"] - xla["alias_mib"]
                rec["xla"]["need_mib"] = need = need + xla["temp_mib"]
                if need * MIB > limit:
                    rec.update(
                        fit=False,
                        predicted=True,
                        error=f"RESOURCE_EXHAUSTED (foreseen, not run): XLA buffers "
                        f"{need:,.0f} MiB > allocator limit {limit / MIB:,.0f} MiB",
                    )
            if "fit" not in rec:
                losses = []

                def run():
                    nonlocal state
                    state, metrics = compiled(state, batch, frozen)
                    losses.append(float(metrics["loss"]))

                times = _timed(run, spec["warmup"], spec["steps"]) if timed else _timed(run, 0, 1)
                med = statistics.median(times)
                fpt = qlora_flops_per_token(
                    n_frozen, n_lora, lcfg.num_hidden_layers, out["hidden_size"], s
                )
                rec.update(
                    fit=True,
                    times_s=times,
                    step_s=med,
                    tokens_per_s=b * s / med,
                    flops_per_token=fpt,
                    model_tflops=fpt * b * s / med / 1e12,
                    loss=losses[-1],
                )
        except Exception as e:  # noqa: BLE001 - reported; OOM is an expected outcome
            rec.update(fit=False if is_oom(e) else None, error=f"{type(e).__name__}: {e}"[:600])
            attempts["clean"] = False  # donated state may be gone, the allocator fragmented
        rec["trusted"] = rec.get("fit") is False and (rec["first_in_process"] or "predicted" in rec)
        rec["peak_mib"] = mem.peak_mib()
        rec["wall_s"] = time.perf_counter() - t_item
        attempts["longest_s"] = max(attempts["longest_s"], rec["wall_s"])
        out["items"].append(rec)
        save(out)
        verdict = {True: "fits", False: "out of memory", None: "ERROR"}[rec.get("fit")]
        _log(f"qlora8b: batch {b} x seq {s}: {verdict}")
        return rec

    def time_ok() -> bool:
        guess = 1.5 * attempts["longest_s"] + 5 if attempts["n"] else spec.get("estimate_s", 0)
        return time.time() + guess < spec["deadline"]

    out["stopped"] = None
    for item in spec.get("timed_items", []):
        b = item["batch"] or cfg.micro_batch_size  # 0: the config's micro-batch
        if not item["batch"] and b == 1:
            continue
        if not time_ok():
            out["stopped"] = "time budget"
            return out
        rec = attempt(b, item["seq"], True)
        if rec["fit"] is None:
            out["stopped"] = "error"
            return out
        if not attempts["clean"]:
            out["stopped"] = "out of memory (allocator state unknown)"
            return out
    out["stopped"] = inprocess_search(
        spec.get("prior", []),
        out["items"],
        lambda s: attempt(1, s, False),
        lambda: time_ok(),
        max_seq=spec["max_seq"],
        step=spec["seq_step"],
    )
    return out


WORKERS = {
    "matmul": _matmul_worker,
    "gpt2": _gpt2_worker,
    "clip": _clip_worker,
    "qlora8b": _qlora_worker,
}


def worker_main(part: str, spec_path: str, out_path: str) -> None:
    """Entry point of a worker process: run ``WORKERS[part]``, write its result as JSON
    (also partial results, via ``save``, while it runs)."""
    peak = common.PeakRSS()  # first, before anything big is allocated
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_path)

    def save(result: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)

    result = WORKERS[part](spec, peak, save)
    result["done"] = True
    save(result)


# -- parent ----------------------------------------------------------------------------------


class Runner:
    """Starts the worker processes, one at a time, under one overall deadline."""

    def __init__(self, workdir: Path, deadline: float):
        self.workdir, self.deadline = workdir, deadline
        self.count = 0

    def remaining(self) -> float:
        return self.deadline - time.time()

    def run(self, part: str, spec: dict, env: dict | None = None, cap_s: float = math.inf):
        """Run one worker; returns its result dict (partial ones included) with ``ok`` and,
        on failure, ``error`` (exit status, time-out, or the worker's own message)."""
        self.count += 1
        name = f"{self.count:02d}_{part}"
        spec_path, out = self.workdir / f"{name}.spec.json", self.workdir / f"{name}.json"
        timeout = max(1.0, min(cap_s, self.remaining()))
        spec = {**spec, "deadline": time.time() + timeout}
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "experiments.bench.gpu_suite", "--worker", part,
               "--spec", str(spec_path), "--out", str(out)]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        try:
            stdout = sys.stderr.fileno()  # workers' chatter goes to our stderr
        except (AttributeError, OSError, ValueError):
            stdout = None
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=common.REPO_ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=stdout
        )
        error = None
        try:
            status = proc.wait(timeout=timeout + 15)  # qlora8b workers stop themselves before
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status, error = None, f"killed after {timeout + 15:.0f} s (time budget)"
        res = json.loads(out.read_text()) if out.is_file() else {}
        res["wall_s"] = time.perf_counter() - t
        if status:
            error = f"exit status {status}" + (" (killed by a signal)" if status < 0 else "")
        res["ok"] = error is None and res.get("done", False)
        if error:
            res["error"] = error
        return res


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


def _qlora_env(matmul: dict, cap_gib: float) -> tuple[dict, str]:
    """Environment of a QLoRA worker (the cap, from the device memory the matmul worker
    measured) and a note on it."""
    total_bytes = matmul.get("device_memory_bytes")
    if matmul.get("backend") == "cpu":
        return {}, "no memory cap (CPU backend)"
    if not total_bytes:
        return {}, "NO memory cap: the device memory size is unknown (matmul part failed)"
    frac = cap_gib * GIB / total_bytes
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.6f}", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    return env, (
        f"cap {cap_gib:g} GiB: XLA_PYTHON_CLIENT_MEM_FRACTION={frac:.6f} of "
        f"{total_bytes / GIB:.1f} GiB, preallocated"
    )


def run_suite(parts: list[str], sizes: dict, args: argparse.Namespace) -> dict:
    """Run the parts (matmul first: it is the MFU denominator) and return all results."""
    res = {"parts": {}, "small": args.small, "budget_s": args.budget_s}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        runner = Runner(Path(tmp), time.time() + args.budget_s)
        for part in parts:
            if runner.remaining() < 5:
                res["parts"][part] = {"ok": False, "error": "not run: time budget spent"}
                continue
            _log(f"{part}: starting ({runner.remaining():.0f} s of the budget left)")
            spec = dict(sizes[part])
            if part == "matmul":
                # A known fraction, not preallocated: bytes_limit / fraction = device memory.
                env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
                       "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # fmt: skip
                r = runner.run(part, {**spec, "mem_fraction": 0.5}, env, PART_CAP_S[part])
            elif part == "qlora8b":
                r = _run_qlora(runner, spec, res, args)
            else:
                r = runner.run(part, spec, None, PART_CAP_S[part])
            res["parts"][part] = r
            derive(res)
            print(format_part(part, res) + "\n", flush=True)
    return res


def _run_qlora(runner: Runner, spec: dict, res: dict, args: argparse.Namespace) -> dict:
    env, cap_note = _qlora_env(res["parts"].get("matmul", {}), spec["cap_gib"])
    spec.update(attention=args.attention, compilation_cache=str(runner.workdir / "xla_cache"))
    if args.simulate_oom_seq:
        spec["simulate_oom_seq"] = args.simulate_oom_seq
    # batch 0: the config's micro_batch_size (the worker resolves it; dropped when 1)
    timed = [dict(batch=1, seq=spec["seq"]), dict(batch=0, seq=spec["seq"])]
    main = runner.run("qlora8b", {**spec, "timed_items": timed}, env)
    main["cap_note"], main["capped"] = cap_note, bool(env)
    if not main.get("items"):
        return main
    # Time of a fresh process: start-up and init, plus the slowest attempt so far.
    estimate = {"s": main.get("setup_s", 60.0) + max(r["wall_s"] for r in main["items"]) + 10}

    def can_run() -> bool:
        return runner.remaining() > 1.2 * estimate["s"] + 10

    def run_fresh(prior: list[dict]) -> list[dict]:
        _log(f"qlora8b: a fresh process continues the search ({runner.remaining():.0f} s left)")
        slim = [{k: r.get(k) for k in ("batch", "seq", "fit", "trusted")} for r in prior]
        longest = max(r["wall_s"] for r in main["items"])
        r = runner.run("qlora8b", {**spec, "prior": slim, "estimate_s": longest}, env)
        estimate["s"] = max(estimate["s"], r["wall_s"])
        main.setdefault("fresh", []).append(r)
        return r.get("items", [])

    main["search"] = continue_search(
        main["items"], run_fresh, can_run, max_seq=spec["max_seq"], step=spec["seq_step"]
    )
    # The main process may have stopped early at the time budget: not a part failure.
    main["ok"] = bool(main.get("done")) or any(r.get("fit") for r in main["items"])
    return main


def derive(res: dict) -> None:
    """MFU of every throughput against the matmul rate of this run and the datasheet."""
    from jaxfit import perf

    mm = res["parts"].get("matmul", {})
    rate = mm.get("tflops") if mm.get("ok") else None
    name = mm.get("perf_device")
    peak = perf.DEVICES[name].peak_bf16_tflops if name else None
    res["matmul_tflops"], res["datasheet_tflops"], res["datasheet_device"] = rate, peak, name

    def add(r: dict) -> None:
        if "model_tflops" in r:
            r["mfu_matmul"] = r["model_tflops"] / rate if rate else None
            r["mfu_datasheet"] = r["model_tflops"] / peak if peak else None

    for part, r in res["parts"].items():
        if part == "matmul" and r.get("ok") and peak:
            r["fraction_of_datasheet"] = r["tflops"] / peak
        add(r)
        fresh = [i for f in r.get("fresh", []) for i in f.get("items", [])]
        for item in r.get("items", []) + fresh:
            add(item)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def format_part(part: str, res: dict) -> str:
    """One part's table (plain text)."""
    r = res["parts"][part]
    where = f"{r.get('backend', '?')} ({r.get('device', '?')}), jax {r.get('jax_version', '?')}"
    status = "" if r.get("ok") else f"  ** FAILED: {r.get('error', 'no result')} **"
    ds = res.get("datasheet_device")
    ds_label = f"vs datasheet ({ds}: {res['datasheet_tflops']:g} TFLOP/s)" if ds else "vs datasheet"
    if part == "matmul":
        head = f"matmul: dense bf16 jnp.dot rate, {where}{status}"
        reps = len(r.get("times_s", []))
        memory = r.get("device_memory_bytes")
        rows = [
            ("size", f"{r.get('n')}^3 x {r.get('inner')} chained, median of {reps}"),
            ("time per product (ms)", _f(r.get("step_s") and r["step_s"] * 1e3, ".3f")),
            ("achieved TFLOP/s", _f(r.get("tflops"), ".1f")),
            (ds_label, _pct(r.get("fraction_of_datasheet"))),
            ("device memory (GiB)", _f(memory and memory / GIB)),
        ]
        return head + "\n" + common.format_table(("metric", "value"), rows)
    if part in ("gpt2", "clip"):
        title = {"gpt2": "GPT-2 124M training step", "clip": "CLIP ViT-B/32 training step"}
        head = f"{part}: {title[part]}, {where}{status}\n{r.get('config', '')}"
        rows = [
            ("parameters", f"{r['n_params']:,}" if "n_params" in r else "-"),
            ("compile (s)", _f(r.get("compile_s"))),
            ("step median (ms)", _f(r.get("step_s") and r["step_s"] * 1e3)),
        ]
        if part == "gpt2":
            rows += [
                ("tokens/s", _f(r.get("tokens_per_s"), ",.0f")),
                ("model TFLOP/s (6N + 12LdT)", _f(r.get("model_tflops"), ".2f")),
                ("MFU vs measured bf16 matmul", _pct(r.get("mfu_matmul"))),
                (f"MFU {ds_label}", _pct(r.get("mfu_datasheet"))),
            ]
        else:
            rows.append(("images/s", _f(r.get("images_per_s"), ",.1f")))
        losses = r.get("losses", [])
        rows += [
            ("peak memory (MiB)", _f(r.get("peak_mib"), ".0f")),
            ("first / last loss", " / ".join(f"{x:.4f}" for x in losses[:1] + losses[-1:])),
        ]
        foot = f"memory: {r.get('memory_measure', '-')}"
        return head + "\n" + common.format_table(("metric", "value"), rows) + "\n" + foot
    # qlora8b
    head = [
        f"qlora8b: Llama-3-8B-architecture QLoRA training step, {where}{status}",
        r.get("config", ""),
        f"memory: {r.get('cap_note', '-')}; allocator limit "
        f"{_f(r.get('bytes_limit_gib'), '.2f')} GiB; {r.get('memory_measure', '-')}",
    ]
    if "nf4_leaves" in r:
        head.append(
            f"base: {r['nf4_leaves']} NF4 leaves, {r['quantized_weights']:,} weights at "
            f"{r['bits_per_weight']:.3f} bits; {r['base_mib']:,.1f} MiB with the bf16 "
            f"leaves; built in {r['init_s']:.1f} s (peak so far {r['peak_after_init_mib']:,.0f}"
            f" MiB); trainable LoRA {r['n_lora']:,}; model FLOPs/token 4 x "
            f"{r['n_frozen_flops']:,} + 6 x {r['n_lora']:,} + 12 L d T"
        )
    rows = []
    procs = [r.get("items", [])] + [f.get("items", []) for f in r.get("fresh", [])]
    for proc, items in enumerate(procs, 1):
        for it in items:
            fit = {True: "yes", False: "OOM", None: "error"}[it.get("fit")]
            if it.get("predicted"):
                fit = "OOM (foreseen)"
            rows.append((
                proc, it["batch"], it["seq"], "timed" if it["timed"] else "fit?", fit,
                _f(it.get("compile_s")), _f(it.get("step_s") and it["step_s"] * 1e3, ".0f"),
                _f(it.get("tokens_per_s"), ",.0f"), _f(it.get("model_tflops"), ".1f"),
                _pct(it.get("mfu_matmul")), _pct(it.get("mfu_datasheet")),
                _f(it.get("peak_mib"), ",.0f"), _f(it.get("xla", {}).get("temp_mib"), ",.0f"),
            ))  # fmt: skip
    table = common.format_table(
        ("process", "batch", "seq", "run", "fits", "compile s", "step ms", "tokens/s", "TFLOP/s",
         "MFU (matmul)", "MFU (datasheet)", "peak MiB", "XLA temp MiB"),
        rows,
    )  # fmt: skip
    foot = [
        "process: 1 = the first, 2... = fresh ones continuing the search; peak MiB: the "
        "process's peak so far; XLA temp: the step's temporaries as compiled; OOM (foreseen): "
        "XLA's buffers exceed the allocator limit, not run"
    ]
    if "search" in r:
        foot.append(longest_note(r["search"]))
    errors = [it["error"] for items in procs for it in items if it.get("fit") is None]
    foot += [f"error: {e}" for e in errors]
    for k, f in enumerate(r.get("fresh", []), 2):
        if f.get("error"):
            foot.append(f"process {k}: {f['error']}")
    return "\n".join(head) + "\n" + table + "\n" + "\n".join(foot)


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


def _versions(r: dict) -> str:
    extra = r.get("platform_version", "")
    return f"jax {r.get('jax_version', '?')}" + (f" ({extra})" if extra else "")


def record(res: dict, note: str = "", path: Path = common.BENCHMARKS_MD) -> int:
    """Append one row per successful measurement to ``docs/BENCHMARKS.md``; returns the
    number of rows written."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine, commit = common.machine(), common.git_commit()
    rows = []
    for part, r in res["parts"].items():
        if "backend" not in r or (not r.get("ok") and part != "qlora8b"):
            continue
        if part == "qlora8b" and not r.get("capped"):
            _log("qlora8b: not recorded: it ran without the memory cap")
            continue
        base = (date, machine, f"{r['backend']} ({r['device']})", _versions(r), commit, part)
        if part == "matmul":
            rows.append(base + (
                f"bf16 {r['n']}^3, {r['inner']} chained per call, median of "
                f"{len(r['times_s'])}", f"{r['step_s'] * 1e3:.3f}", f"{r['tflops']:.1f} TFLOP/s",
                f"{r['tflops']:.1f}", "-", _pct(r.get("fraction_of_datasheet")), "-",
                f"{r['compile_s']:.1f}", note,
            ))  # fmt: skip
        elif part in ("gpt2", "clip"):
            thr = (
                f"{r['tokens_per_s']:,.0f} tok/s"
                if part == "gpt2"
                else f"{r['images_per_s']:,.1f} img/s"
            )
            rows.append(base + (
                r["config"], f"{r['step_s'] * 1e3:.1f}", thr, _f(r.get("model_tflops"), ".1f"),
                _pct(r.get("mfu_matmul")), _pct(r.get("mfu_datasheet")),
                f"{r['peak_mib']:,.0f}", f"{r['compile_s']:.1f}", note,
            ))  # fmt: skip
        else:
            timed = [it for it in r.get("items", []) if it["timed"] and it.get("fit")]
            for k, it in enumerate(timed):
                notes = [r.get("cap_note", "")]
                if k == 0 and "search" in r:
                    notes.append(longest_note(r["search"]))
                if note:
                    notes.append(note)
                rows.append(base + (
                    f"{r['config']}; B{it['batch']} x S{it['seq']}",
                    f"{it['step_s'] * 1e3:.0f}", f"{it['tokens_per_s']:,.0f} tok/s",
                    f"{it['model_tflops']:.1f}", _pct(it.get("mfu_matmul")),
                    _pct(it.get("mfu_datasheet")), f"{it['peak_mib']:,.0f}",
                    f"{it['compile_s']:.1f}", "; ".join(n for n in notes if n),
                ))  # fmt: skip
    for row in rows:
        common.append_row(SECTION, COLUMNS, row, intro=INTRO, path=path)
    return len(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts of {PARTS} (matmul always runs: MFU)")  # fmt: skip
    p.add_argument("--record", action="store_true", help="append rows to docs/BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the recorded rows' notes")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--budget_s", type=float, default=540.0,
                   help="wall-time budget of the whole suite (s); default 540")  # fmt: skip
    p.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                   help="qlora8b attention implementation (default: jaxfit's, XLA)")  # fmt: skip
    p.add_argument("--max_seq", type=int, help="qlora8b: longest sequence to try")
    # Tests: qlora8b runs longer than this fail as out of memory, before compiling.
    p.add_argument("--simulate_oom_seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.out)
        return 0
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    if bad := [p for p in wanted if p not in PARTS]:
        raise SystemExit(f"unknown parts {bad}; expected some of {PARTS}")
    parts = [p for p in PARTS if p in wanted or p == "matmul"]
    sizes = json.loads(json.dumps(SMALL if args.small else DEFAULTS))
    if args.max_seq:
        sizes["qlora8b"]["max_seq"] = args.max_seq
    res = run_suite(parts, sizes, args)
    res["machine"], res["commit"] = common.machine(), common.git_commit()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    backends = {r.get("backend") for r in res["parts"].values() if r.get("backend")}
    if args.record:
        if args.small or backends != {"gpu"}:
            _log(f"not recorded: rows come from full-size runs on a GPU (backends {backends})")
        else:
            _log(f"recorded {record(res, args.note)} rows in {common.BENCHMARKS_MD}")
    return 0 if all(r.get("ok") for r in res["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
