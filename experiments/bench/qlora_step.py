"""One QLoRA training step (NF4 base + LoRA) in jaxfit and in transformers + PEFT +
bitsandbytes, side by side.

Run from the repository root::

    python -m experiments.bench.qlora_step --small          # ~1 minute on 2 CPU cores
    python -m experiments.bench.qlora_step --record         # small Llama; adds a row to
                                                            # docs/BENCHMARKS.md
    python -m experiments.bench.qlora_step --compute_dtype float32   # see "CPU" below

Both frameworks train the SAME adapters over the SAME NF4 base on the SAME batch:

* base: ``transformers.LlamaForCausalLM(LlamaConfig(...))`` (GQA: fewer key/value heads
  than query heads) with ``torch.manual_seed(seed)``, cast to bfloat16 (as released Llama
  checkpoints are) and written with ``save_pretrained`` by the ``init`` worker. Each side
  quantises it while loading, as a user would: jaxfit with ``jaxfit.quant.load_quantized(dir,
  "nf4", dtype=compute_dtype, compute_dtype=compute_dtype)`` (what the LM task's
  ``tasks.base.load_base`` calls for ``precision="nf4"``, there with bfloat16), torch with
  ``LlamaForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=compute_dtype), dtype=compute_dtype)``. Both quantise the seven
  linear kernels of every decoder layer (embeddings, norms and LM head stay float) in
  bitsandbytes' NF4 layout (64-blocks, double quantisation).
* adapters: ``peft.get_peft_model(base, LoraConfig(r, lora_alpha, lora_dropout=0,
  target_modules=q/k/v/o_proj, task_type="CAUSAL_LM"))`` in the ``init`` worker (PEFT's
  initialisation: ``lora_A`` Kaiming-uniform from the torch seed, ``lora_B = 0``, so the
  first step's loss is the base model's), saved with ``save_pretrained``; torch loads them
  with ``PeftModel.from_pretrained(..., is_trainable=True)``, jaxfit with
  ``jaxfit.lora.training.split`` (``lora.peft_dir``), the LM task's path. Adapters are
  float32 on both sides (PEFT upcasts adapters of a bf16 base).
* batch and loss: ``[batch_size, seq_len]`` uniform random token ids; mean next-token
  cross-entropy over the ``batch_size * (seq_len - 1)`` predicted tokens (torch:
  ``model(ids, labels=ids).loss``; jaxfit: the LM task's ``_sum_loss`` recipe, logits of
  ``lora.training.full(trainable, frozen)``, ``losses.cross_entropy``, through
  ``accumulate.microbatched(..., 1)``), as in ``lm_step``.
* step: forward, loss, backward into the adapters only, AdamW over the adapters (the QLoRA
  recipe of ``configs/llama_qlora.py``: lr 2e-4, betas (0.9, 0.999), no weight decay,
  global-norm clipping at 0.3; constant lr). jaxfit: ``jaxfit.step.make_train_step`` with
  the frozen NF4 base as the jitted step's third argument, ``donate_argnums=0``, compiled
  ahead of time (compile time reported on its own); torch (eager): ``loss.backward()``,
  ``clip_grad_norm_``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``.
* precision (``--compute_dtype``): ``bfloat16`` (the default, QLoRA's) = bfloat16 compute
  and float weights, NF4 dequantised to bfloat16, float32 adapters and optimizer state,
  losses reduced in float32; one difference remains: PEFT runs the adapter path ``(x A) B``
  in float32 (it casts the input to the adapters' dtype), jaxfit in the compute dtype.
  ``float32`` = float32 everywhere (on GPU without TF32). No gradient checkpointing on
  either side (jaxfit ``remat_policy="none"``; torch without
  ``prepare_model_for_kbit_training``).

Checks (any failing one fails the run, and nothing is recorded). A random model's loss on
random tokens is about ln(vocab_size) whatever its weights (dropping the quantisation of the
default model moves its first loss by 6e-3 only), so the loss alone cannot show that both
sides trained the same model. Hence:

* NF4 base: the workers hash their 4-bit codes (SHA-256, in (layer, module) order), which
  must be equal, and sum their squared dequantised weights (float32 products, as
  bitsandbytes' ``dequantize_4bit``), which must agree within ``NF4_SQ_RTOL`` (1e-4): the
  8-bit codes of the block scales may differ in a few blocks, where bitsandbytes' native CPU
  kernel picks a non-nearest code near a midpoint (``tests/quant/test_nf4.py``), ~1e-5 at
  the smoke test's size and ~3e-7 at the default size; no quantisation would be ~6e-4.
  Trainable and NF4 weight counts and double quantisation must match too.
* first step (``lora_B = 0``): loss within ``LOSS_TOLERANCE`` and gradient norm (before
  clipping; with ``lora_B = 0`` it depends on every layer's forward and backward) within
  ``GRAD_NORM_RTOL`` relative. ``float32``: 1e-4 and 1e-3 (measured ~1e-6 and ~1e-5:
  summation order); ``bfloat16``: 5e-3 and 2e-2, about ten times the largest differences
  measured (4e-4 and 4e-3), as the frameworks round different intermediates to bfloat16
  (relative error 2^-9 each) and differ in the adapter path's dtype.

The workers, the interleaved schedule, memory (peak RSS on CPU, allocator peaks on GPU),
threads and timing are those of ``lm_step`` (:mod:`experiments.bench.common`, step
benchmarks): each framework in its own process, set up one after the other, then taking
turns step by step; ``step ratio, paired`` is the median over steps of ``jax_i /
torch_i``. The NF4 fingerprint is taken during set-up, outside the timed steps.

CPU: bitsandbytes' CPU backend dequantises each NF4 weight on every forward and backward
(``MatMul4Bit``) and multiplies in the compute dtype. PyTorch's bfloat16 matmul on a CPU
without AVX512-BF16/AMX is a slow fallback (on a 2-core AMD EPYC without AVX512: 1.9 GFLOP/s
against 46 GFLOP/s in float32 for a 1024x512x1408 product), while XLA runs bfloat16 dots at
its float32 rate, so ``bfloat16`` CPU rows mostly measure that fallback (a step of the
default model takes minutes in torch there); ``--compute_dtype float32`` compares the two
QLoRA implementations without it. QLoRA is meant for GPUs, where the comparison matters.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import common  # noqa: E402

# A small Llama (GQA, Llama-2 vocabulary) at a CPU-sized batch. On 2 CPU cores ~5 minutes
# with --compute_dtype float32 but ~20 in bfloat16 (torch's ~3-minute CPU bf16 steps; see
# the docstring), hence few steps; pass --steps 20 on a GPU.
DEFAULTS = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=32000, seq_len=256, batch_size=4,
    rank=16, alpha=32, steps=5, warmup=1,
)  # fmt: skip
# About a minute on 2 idle CPU cores, workers' start-up included.
SMALL = dict(
    hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=8000, seq_len=128, batch_size=2, steps=5, warmup=1,
)  # fmt: skip
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# |first-step loss jaxfit - torch| and |grad norm jaxfit / torch - 1|; see the docstring.
LOSS_TOLERANCE = {"bfloat16": 5e-3, "float32": 1e-4}
GRAD_NORM_RTOL = {"bfloat16": 2e-2, "float32": 1e-3}
NF4_SQ_RTOL = 1e-4
# Must be equal in both workers (else the run fails): the same adapters and NF4 base.
BASE_KEYS = ("n_trainable", "n_nf4", "nf4_double_quant", "nf4_codes_sha256")
NAME = "qlora_step"  # experiments.bench.<NAME>; see common's step benchmarks
SECTION = "qlora_step: QLoRA training step, jaxfit vs transformers + PEFT + bitsandbytes"
COLUMNS = (
    "date", "machine", "backend", "versions", "commit", "config",
    "jax step ms", "torch step ms", "step ratio (paired)", "jax tok/s", "torch tok/s",
    "jax compile s", "jax peak MiB (+imports)", "torch peak MiB (+imports)",
    "peak ratio (increase ratio)", "loss diff", "notes",
)  # fmt: skip


def _log(msg: str) -> None:
    common.log(NAME, msg)


def _nf4_fingerprint(weights) -> dict:
    """What both workers report of their NF4 base, from ``(layer, module, packed,
    dequantise)`` tuples (``packed``: the uint8 codes as numpy; ``dequantise()``: the float32
    weight as numpy): SHA-256 of the 4-bit codes in (layer, module) order, and the sum of
    the squared dequantised weights (float64), which also sees the block scales."""
    import hashlib

    import numpy as np

    codes, sq_sum = hashlib.sha256(), 0.0
    for _, _, packed, dequantise in sorted(weights, key=lambda w: w[:2]):
        codes.update(np.ascontiguousarray(packed, np.uint8).tobytes())
        w = dequantise()
        sq_sum += float(np.sum(np.square(w, dtype=np.float64)))
    return {"nf4_codes_sha256": codes.hexdigest(), "nf4_sq_sum": sq_sum}


def _quiet(transformers) -> None:
    common.quiet_transformers(transformers)
    # PEFT asks transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning).
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)


# -- workers (each runs in its own process) -------------------------------------------------


def _init_worker(spec: dict, peak: common.PeakRSS) -> dict:
    """Write the bf16 base (transformers' own init) to ``spec["ckpt_dir"]`` and PEFT's
    fresh adapters for it to ``spec["adapter_dir"]``."""
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet(transformers)
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=max(2048, spec["seq_len"]),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(spec["ckpt_dir"])
    lora = peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    peft.get_peft_model(model, lora).save_pretrained(spec["adapter_dir"])
    return {}


def _jax_worker(spec: dict, peak: common.PeakRSS) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from jaxfit import accumulate, losses, optim, quant
    from jaxfit import step as step_lib
    from jaxfit.lora import adapters as lora_adapters
    from jaxfit.lora import training as lora_training

    device = jax.devices()[0]
    if spec["compute_dtype"] == "float32" and device.platform != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32, like torch
    after_imports = common.jax_memory(peak, device)["now"]
    # The LM task's path (tasks.base.load_base with precision="nf4", which fixes bfloat16,
    # then lora.training.split), with the dtype of --compute_dtype.
    dtype = jnp.dtype(spec["compute_dtype"])
    model, base = quant.load_quantized(spec["ckpt_dir"], "nf4", dtype=dtype, compute_dtype=dtype)
    cfg = ml_collections.ConfigDict()  # the fields of an LM-task config that split reads
    cfg.precision = "nf4"
    cfg.lora = lora_training.default_lora_config()
    cfg.lora.peft_dir = spec["adapter_dir"]  # rank, alpha, dropout 0, targets: from PEFT
    trainable, frozen = lora_training.split(base, cfg, jax.random.key(spec["seed"]), model)
    del base
    trainable, frozen = jax.device_put((trainable, frozen), device)
    ocfg = optim.default_optim_config()
    ocfg.lr, ocfg.b1, ocfg.b2, ocfg.eps = spec["lr"], spec["b1"], spec["b2"], spec["eps"]
    ocfg.weight_decay, ocfg.grad_clip_norm = spec["weight_decay"], spec["grad_clip_norm"]
    ocfg.warmup_steps, ocfg.min_lr_ratio = 0, 1.0  # constant lr, as torch's AdamW alone
    total_steps = spec["warmup"] + spec["steps"] + 1
    optimizer, schedule = optim.make_optimizer(ocfg, total_steps, trainable)
    state = step_lib.create_train_state(trainable, optimizer, jax.random.key(spec["seed"]))
    nf4 = {}  # hf module name (q_proj, ...) -> stacked NF4Weight [num_layers, ...]
    for group in frozen["layers"].values():
        for name, sub in group.items():
            leaf = sub.get("kernel") if isinstance(sub, dict) else None
            leaf = leaf.base if isinstance(leaf, lora_adapters.LoraWeight) else leaf
            if isinstance(leaf, quant.NF4Weight):
                nf4[name] = leaf
    layer = lambda leaf, i: jax.tree.map(lambda x: x[i], leaf)  # noqa: E731
    counts = {
        "n_trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
        "n_nf4": sum(x.num_weights for x in nf4.values()),
        "nf4_double_quant": all(x.double_quant for x in nf4.values()),
        **_nf4_fingerprint(
            (
                i,
                name,
                np.asarray(leaf.packed[i]),
                lambda leaf=leaf, i=i: np.asarray(layer(leaf, i).dequantize(jnp.float32)),
            )
            for name, leaf in nf4.items()
            for i in range(leaf.packed.shape[0])
        ),  # fmt: skip
    }
    del trainable

    def sum_loss(p, batch, rng, frozen):  # tasks.lm.LMTask._sum_loss, no packing
        logits = model.apply({"params": lora_training.full(p, frozen, rng)}, batch["input_ids"])
        loss_sum, count = losses.cross_entropy(logits, batch["labels"])
        return loss_sum, count.astype(jnp.float32), {}

    ids, labels = common.make_batch(spec)
    batch = jax.device_put({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32)})
    train_step = step_lib.make_train_step(accumulate.microbatched(sum_loss, 1), optimizer, schedule)
    _log("jax: compiling")
    t = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t
    grad_norms = []

    def run_step() -> float:
        nonlocal state
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(state)
        grad_norms.append(float(metrics["grad_norm"]))
        return float(metrics["loss"])

    times, step_losses = common.serve_steps(NAME, run_step)
    mem = common.jax_memory(peak, device)
    return {
        "compile_s": compile_s,
        "times_s": times,
        "losses": step_losses,
        "grad_norms": grad_norms,
        **counts,
        "backend": device.platform,
        "device": device.device_kind,
        "version": f"jax {jax.__version__}",
        "memory": {"after_imports_kib": after_imports, "peak_kib": mem["peak"]},
        "memory_measure": mem["measure"],
    }


def _torch_worker(spec: dict, peak: common.PeakRSS) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    _quiet(transformers)
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    after_imports = common.torch_memory(peak, torch)["now"]
    dtype = getattr(torch, spec["compute_dtype"])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    base = LlamaForCausalLM.from_pretrained(
        spec["ckpt_dir"], quantization_config=quantization, dtype=dtype, device_map=dev
    )
    model = peft.PeftModel.from_pretrained(base, spec["adapter_dir"], is_trainable=True)
    model.train()  # dropout rates are 0: train mode changes nothing numerically
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_dtypes = sorted({str(p.dtype) for p in trainable})
    nf4 = {}  # (layer, module: q_proj, ...) -> bitsandbytes Params4bit
    for name, m in model.named_modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            parts = name.removesuffix(".base_layer").split(".")  # PEFT wraps q/k/v/o
            nf4[int(parts[parts.index("layers") + 1]), parts[-1]] = m.weight
    if len(nf4) != sum(1 for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)):
        raise RuntimeError(f"unexpected names of bitsandbytes layers: {sorted(nf4)}")

    def dequantise(weight):
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32  # the float32 products, as jaxfit's dequantize(float32)
        return bitsandbytes.functional.dequantize_4bit(weight.data, state).cpu().numpy()

    base_info = {
        "n_nf4": sum(math.prod(w.quant_state.shape) for w in nf4.values()),
        "nf4_double_quant": all(w.quant_state.nested for w in nf4.values()),
        **_nf4_fingerprint(
            (i, name, w.data.cpu().numpy(), lambda w=w: dequantise(w))
            for (i, name), w in nf4.items()
        ),
    }
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opt = torch.optim.AdamW(
        trainable, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
        weight_decay=spec["weight_decay"], **impl[spec["torch_adamw"]],
    )  # fmt: skip
    ids, _ = common.make_batch(spec)
    ids = torch.from_numpy(ids).to(dev)
    grad_norms = []

    def run_step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        # The global norm before clipping, as jaxfit's grad_norm metric (inf: no clipping).
        clip = spec["grad_clip_norm"] or math.inf
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    times, step_losses = common.serve_steps(NAME, run_step)
    mem = common.torch_memory(peak, torch)
    return {
        "times_s": times,
        "losses": step_losses,
        "grad_norms": grad_norms,
        "n_trainable": sum(p.numel() for p in trainable),
        **base_info,
        "adapter_dtypes": adapter_dtypes,
        "backend": "gpu" if cuda else "cpu",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "version": (
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
        ),
        "attention": model.base_model.model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "memory": {"after_imports_kib": after_imports, "peak_kib": mem["peak"]},
        "memory_measure": mem["measure"],
    }


WORKERS = {"init": _init_worker, "jax": _jax_worker, "torch": _torch_worker}


# -- parent ----------------------------------------------------------------------------------


def run_benchmark(spec: dict) -> dict:
    """Write the base and the adapters (``init`` worker), run the jax and torch workers
    (:func:`common.run_steps`) and return :func:`summarize`'s dict."""
    with tempfile.TemporaryDirectory(prefix="qlora_step_") as tmp:
        workdir = Path(tmp)
        spec = {**spec, "ckpt_dir": str(workdir / "ckpt"), "adapter_dir": str(workdir / "lora")}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        _log("init worker: writing the random-weight base and PEFT's adapters")
        common.run_init(NAME, spec_path, workdir)
        runs, load_trace = common.run_steps(NAME, spec, spec_path, workdir)
    return summarize(spec, runs, load_trace)


def summarize(spec: dict, runs: dict[str, list[dict]], load_trace: list[float]) -> dict:
    """:func:`common.summarize_steps` plus the first-step gradient-norm check (part of
    ``loss_ok``) and torch's attention implementation, threads and adapter dtypes.

    Raises:
      RuntimeError: the frameworks ran different models (trainable or NF4 weight counts
        differ) or on different backends.
    """
    out = common.summarize_steps(
        spec,
        runs,
        load_trace,
        tokens=spec["batch_size"] * spec["seq_len"],
        loss_tolerance=LOSS_TOLERANCE[spec["compute_dtype"]],
        keys=BASE_KEYS + ("nf4_sq_sum", "backend", "device", "version"),
        same=BASE_KEYS + ("backend",),
    )
    for key in ("attention", "threads", "adapter_dtypes"):
        out["torch"][key] = runs["torch"][0][key]
    for kind in common.FRAMEWORKS:
        out[kind]["first_grad_norm"] = runs[kind][0]["grad_norms"][0]
    out["grad_norm_rdiff"] = max(
        abs(j["grad_norms"][0] / t["grad_norms"][0] - 1) for j, t in zip(runs["jax"], runs["torch"])
    )
    out["grad_norm_rtol"] = GRAD_NORM_RTOL[spec["compute_dtype"]]
    out["nf4_sq_rdiff"] = abs(out["jax"]["nf4_sq_sum"] / out["torch"]["nf4_sq_sum"] - 1)
    out["nf4_sq_rtol"] = NF4_SQ_RTOL
    out["loss_ok"] = (
        out["loss_ok"]
        and out["grad_norm_rdiff"] <= out["grad_norm_rtol"]
        and out["nf4_sq_rdiff"] <= NF4_SQ_RTOL
    )
    return out


_SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def _config_str(spec: dict) -> str:
    s = spec
    clip = f"clip {s['grad_clip_norm']:g}" if s["grad_clip_norm"] else "no clip"
    return (
        f"Llama L{s['num_hidden_layers']} D{s['hidden_size']} F{s['intermediate_size']} "
        f"H{s['num_attention_heads']}/KV{s['num_key_value_heads']} V{s['vocab_size']}, "
        f"B{s['batch_size']} x S{s['seq_len']}, NF4 (double quant) base, "
        f"{_SHORT[s['compute_dtype']]} compute, "
        f"LoRA r{s['rank']} alpha {s['alpha']:g} on {'/'.join(t[0] for t in TARGETS)} (fp32), "
        f"AdamW lr {s['lr']:g} betas ({s['b1']:g}, {s['b2']:g}) eps {s['eps']:g} "
        f"wd {s['weight_decay']:g} {clip} (torch {s['torch_adamw']}), {common.run_str(s)}"
    )


def format_report(res: dict) -> str:
    """The stdout report: a metric x (jaxfit, torch, jaxfit/torch) table and notes."""
    jx, pt = res["jax"], res["torch"]
    rows = common.report_rows(res)
    rows += [
        ("first-step grad norm", f"{jx['first_grad_norm']:.6g}", f"{pt['first_grad_norm']:.6g}",
         f"|rel diff| {res['grad_norm_rdiff']:.2e}"),
        ("NF4 base: sum w^2", f"{jx['nf4_sq_sum']:.6f}", f"{pt['nf4_sq_sum']:.6f}",
         f"|rel diff| {res['nf4_sq_rdiff']:.2e}"),
    ]  # fmt: skip
    checks = [
        ("first-step grad-norm check (|rel diff| <= {:g})", "grad_norm_rdiff", "grad_norm_rtol"),
        ("NF4 base check (same 4-bit codes; sum w^2 |rel diff| <= {:g})", "nf4_sq_rdiff",
         "nf4_sq_rtol"),
    ]  # fmt: skip
    *table_notes, load = common.report_notes(res)
    notes = [
        f"QLoRA training step: {_config_str(res['spec'])}",
        f"backend {jx['backend']} ({jx['device']}); {jx['version']}; {pt['version']} "
        f"(attention {pt['attention']}, {pt['threads']} threads, adapters "
        f"{'/'.join(pt['adapter_dtypes'])}); tokens/step {res['tokens_per_step']}, "
        f"{jx['n_trainable']:,} trainable parameters, {jx['n_nf4']:,} NF4 weights "
        f"(4-bit codes sha256 {jx['nf4_codes_sha256'][:12]} in both)",
        "",
        common.format_table(("", "jaxfit", "torch", "jaxfit/torch"), rows),
        "",
        *table_notes,
        *(
            f"{what.format(res[tol])}: " + ("OK" if res[diff] <= res[tol] else "MISMATCH")
            for what, diff, tol in checks
        ),
        load,
    ]
    return "\n".join(notes)


def record(res: dict, note: str = "", path: Path = common.BENCHMARKS_MD) -> Path:
    """Append ``res`` as a dated row to ``docs/BENCHMARKS.md`` (section :data:`SECTION`)."""
    notes = (
        f"{common.loads_note(res)}; torch attention {res['torch']['attention']}; first-step "
        f"grad-norm rel diff {res['grad_norm_rdiff']:.1e}, NF4 sum w^2 rel diff "
        f"{res['nf4_sq_rdiff']:.1e}"
    )
    row = (
        *common.row_head(res),
        _config_str(res["spec"]),
        *common.row_cells(res),
        f"{notes}; {note}" if note else notes,
    )
    return common.append_row(SECTION, COLUMNS, row, path=path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in DEFAULTS:
        p.add_argument(f"--{name}", type=int, help=f"default {DEFAULTS[name]} (--small: "
                       f"{SMALL.get(name, DEFAULTS[name])})")  # fmt: skip
    p.add_argument("--small", action="store_true", help="a ~1 minute preset: " + str(SMALL))
    p.add_argument(
        "--compute_dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the compute and of the float (not quantised) weights; bfloat16 is "
        "QLoRA's; float32 for CPUs whose torch bfloat16 matmuls are slow (no AVX512-BF16)",
    )
    # configs/llama_qlora.py's optimizer (QLoRA, Dettmers et al. 2023), eps as torch's.
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip_norm", type=float, default=0.3, help="0: no clipping")
    p.add_argument("--torch_adamw", choices=("default", "foreach", "fused"), default="default")
    common.add_run_args(p, WORKERS)
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace) -> dict:
    """Resolve presets and check the sizes; ``ValueError`` on impossible ones."""
    spec = {**DEFAULTS, **(SMALL if args.small else {})}
    spec.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    for k in (
        "compute_dtype",
        "lr",
        "b1",
        "b2",
        "eps",
        "weight_decay",
        "grad_clip_norm",
        "torch_adamw",
    ):
        spec[k] = getattr(args, k)
    spec = common.run_spec(args, spec)
    d, heads, kv = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"]
    if d % heads or heads % kv:
        raise ValueError("need hidden_size % num_attention_heads == 0 and "
                         "num_attention_heads % num_key_value_heads == 0")  # fmt: skip
    kernels = {"q/o": (d, d), "k/v": (d, d // heads * kv), "mlp": (d, spec["intermediate_size"])}
    for what, (n_in, n_out) in kernels.items():
        if (n_in * n_out) % 64:
            raise ValueError(f"{what} kernel [{n_in}, {n_out}]: not a multiple of NF4's 64-blocks")
        if spec["rank"] > min(n_in, n_out) and what != "mlp":  # LoRA on q/k/v/o only
            raise ValueError(f"LoRA rank {spec['rank']} > min{(n_in, n_out)} of the {what} kernel")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.worker_main(WORKERS, args.worker, args.spec, args.out)
        return 0
    res = run_benchmark(make_spec(args))
    print(format_report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not res["loss_ok"]:
        return 1
    if args.record:
        _log(f"recorded in {record(res, args.note)}")
    if not all(math.isfinite(v) and v > 0 for v in res["ratio"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
