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
  quantises it while loading, as a user would: jaxfit trains
  ``configs/llama_qlora.py:init_from=<it>`` through the task ``jaxfit.train`` builds (its
  loader ``jaxfit.hf.load_pretrained(quantize="nf4")``; ``compute_dtype`` set in the
  config), torch
  loads it with ``LlamaForCausalLM.from_pretrained(dir, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype), dtype=
  compute_dtype)``. Both quantise the seven linear kernels of every decoder layer
  (embeddings, norms and LM head stay float) in bitsandbytes' NF4 layout (64-blocks,
  double quantisation).
* adapters: ``peft.get_peft_model(base, LoraConfig(r, lora_alpha, lora_dropout=0,
  target_modules=q/k/v/o_proj, task_type="CAUSAL_LM"))`` in the ``init`` worker (PEFT's
  initialisation: ``lora_A`` Kaiming-uniform from the torch seed, ``lora_B = 0``, so the
  first step's loss is the base model's), saved with ``save_pretrained``; torch loads them
  with ``PeftModel.from_pretrained(..., is_trainable=True)``, jaxfit through the config's
  ``lora.peft_dir`` (dropout 0). Adapters are float32 on both sides.
* batch and loss: as ``lm_step`` (random ids, ``model(ids, labels=ids).loss`` against the
  LM task's loss with the last position masked).
* step: forward, loss, backward into the adapters only, AdamW over the adapters (the QLoRA
  recipe of ``configs/llama_qlora.py``: lr 2e-4, betas (0.9, 0.999), no weight decay,
  global-norm clipping at 0.3; constant lr). jaxfit: the task's ``jit_train_step`` with the
  frozen NF4 base as the step's third argument (``experiments.bench.runner``); torch
  (eager): ``loss.backward()``, ``clip_grad_norm_``, ``AdamW.step()``, ``zero_grad``.
* precision (``--compute_dtype``): ``bfloat16`` (the default, QLoRA's) = bfloat16 compute
  and float weights, NF4 dequantised to bfloat16, float32 adapters and optimizer state;
  one difference remains: PEFT runs the adapter path ``(x A) B`` in float32, jaxfit in the
  compute dtype. ``float32`` = float32 everywhere (on GPU without TF32). No gradient
  checkpointing on either side (jaxfit ``remat_policy="none"``; torch without
  ``prepare_model_for_kbit_training``).

Checks (any failing one fails the run, and nothing is recorded). A random model's loss on
random tokens is about ln(vocab_size) whatever its weights, so the loss alone cannot show
that both sides trained the same model. Hence:

* NF4 base: the workers hash their 4-bit codes (SHA-256, in (layer, module) order), which
  must be equal, and sum their squared dequantised weights (float32 products), which must
  agree within ``NF4_SQ_RTOL`` (1e-4): the 8-bit codes of the block scales may differ in a
  few blocks, where bitsandbytes' native CPU kernel picks a non-nearest code near a
  midpoint (``tests/quant/test_nf4.py``). Trainable and NF4 weight counts and double
  quantisation must match too.
* first step (``lora_B = 0``): loss within ``LOSS_TOLERANCE`` and gradient norm (before
  clipping) within ``GRAD_NORM_RTOL`` relative. ``float32``: 1e-4 and 1e-3 (measured ~1e-6
  and ~1e-5: summation order); ``bfloat16``: 5e-3 and 2e-2, about ten times the largest
  differences measured, as the frameworks round different intermediates to bfloat16.

Workers, schedule and memory are those of ``lm_step`` (:mod:`experiments.bench.compare`).

CPU: bitsandbytes' CPU backend dequantises each NF4 weight on every forward and backward
and multiplies in the compute dtype. PyTorch's bfloat16 matmul on a CPU without
AVX512-BF16/AMX is a slow fallback (on a 2-core AMD EPYC: 1.9 GFLOP/s against 46 GFLOP/s
in float32 for a 1024x512x1408 product) while XLA runs bfloat16 dots at its float32 rate,
so ``bfloat16`` CPU rows mostly measure that fallback; ``--compute_dtype float32``
compares the two QLoRA implementations without it. QLoRA is meant for GPUs.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import compare, compare_report  # noqa: E402
from experiments.bench import compare_workers as cw  # noqa: E402

NAME = "qlora_step"  # experiments.bench.<NAME>
SECTION = "qlora_step: QLoRA training step, jaxfit vs transformers + PEFT + bitsandbytes"
TITLE = "QLoRA training step"
TORCH_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")
RECIPE = "configs/llama_qlora.py:init_from={ckpt}"
# A small Llama (GQA, Llama-2 vocabulary) at a CPU-sized batch. On 2 CPU cores ~5 minutes
# with --compute_dtype float32 but ~20 in bfloat16 (torch's CPU bf16 steps), hence few
# steps; pass --steps 20 on a GPU.
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
# configs/llama_qlora.py's optimizer (QLoRA, Dettmers et al. 2023), eps as torch's.
OPTIM = dict(lr=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.3)
EXTRA_FIELDS = ("compute_dtype",)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# |first-step loss jaxfit - torch| and |grad norm jaxfit / torch - 1|; see the docstring.
LOSS_TOLERANCE = {"bfloat16": 5e-3, "float32": 1e-4}
GRAD_NORM_RTOL = {"bfloat16": 2e-2, "float32": 1e-3}
NF4_SQ_RTOL = 1e-4
# Must be equal in both workers (else the run fails): the same adapters and NF4 base.
BASE_KEYS = ("n_trainable", "n_nf4", "nf4_double_quant", "nf4_codes_sha256")


def add_args(p) -> None:
    p.add_argument(
        "--compute_dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the compute and of the float (not quantised) weights; bfloat16 is "
        "QLoRA's; float32 for CPUs whose torch bfloat16 matmuls are slow (no AVX512-BF16)",
    )


def check_spec(spec: dict) -> None:
    d, heads, kv = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"]
    if d % heads or heads % kv:
        raise ValueError(
            "need hidden_size % num_attention_heads == 0 and "
            "num_attention_heads % num_key_value_heads == 0"
        )
    kernels = {"q/o": (d, d), "k/v": (d, d // heads * kv), "mlp": (d, spec["intermediate_size"])}
    for what, (n_in, n_out) in kernels.items():
        if (n_in * n_out) % 64:
            raise ValueError(f"{what} kernel [{n_in}, {n_out}]: not a multiple of NF4's 64-blocks")
        if spec["rank"] > min(n_in, n_out) and what != "mlp":  # LoRA on q/k/v/o only
            raise ValueError(f"LoRA rank {spec['rank']} > min{(n_in, n_out)} of the {what} kernel")
    spec["fp32"] = spec["compute_dtype"] == "float32"


def _dirs(spec: dict) -> tuple[str, str]:
    return str(Path(spec["workdir"]) / "ckpt"), str(Path(spec["workdir"]) / "lora")


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
        sq_sum += float(np.sum(np.square(dequantise(), dtype=np.float64)))
    return {"nf4_codes_sha256": codes.hexdigest(), "nf4_sq_sum": sq_sum}


def _quiet(transformers) -> None:
    cw.quiet_transformers(transformers)
    # PEFT asks transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning).
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)


# -- workers (each runs in its own process) -------------------------------------------------


def _init_worker(spec: dict, peak, save) -> dict:
    """Write the bf16 base (transformers' own init) and PEFT's fresh adapters for it."""
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet(transformers)
    torch.manual_seed(spec["seed"])
    sizes = tuple(DEFAULTS)[:6]  # the LlamaConfig fields of DEFAULTS
    config = LlamaConfig(
        **{k: spec[k] for k in sizes},
        tie_word_embeddings=False,
        max_position_embeddings=max(2048, spec["seq_len"]),
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    ckpt, adapters = _dirs(spec)
    model.save_pretrained(ckpt)
    lora = peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    peft.get_peft_model(model, lora).save_pretrained(adapters)
    return {}


def _jax_info(setup) -> dict:
    """Counts and the NF4 fingerprint of the task's frozen base (``task.frozen``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxfit import quant
    from jaxfit.lora import adapters as lora_adapters

    nf4 = {}  # hf module name (q_proj, ...) -> stacked NF4Weight [num_layers, ...]
    for group in setup.task.frozen["layers"].values():
        for name, sub in group.items():
            leaf = sub.get("kernel") if isinstance(sub, dict) else None
            leaf = leaf.base if isinstance(leaf, lora_adapters.LoraWeight) else leaf
            if isinstance(leaf, quant.NF4Weight):
                nf4[name] = leaf
    layer = lambda leaf, i: jax.tree.map(lambda x: x[i], leaf)
    trainable = setup.task.abstract_params()
    return {
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
        ),
    }


def _jax_worker(spec: dict, peak, save) -> dict:
    ckpt, adapters = _dirs(spec)
    overrides = [
        f"lora.peft_dir={adapters}",
        f"lora.rank={spec['rank']}",
        f"lora.alpha={float(spec['alpha'])!r}",
        "lora.dropout=0.0",
        f"compute_dtype={spec['compute_dtype']}",
    ]
    recipe = RECIPE.format(ckpt=ckpt)
    return cw.jax_worker(NAME, spec, peak, recipe, overrides, _jax_info)


def _torch_worker(spec: dict, peak, save) -> dict:
    side = cw.TorchWorker(NAME, spec, peak)
    torch = side.torch
    import bitsandbytes
    import peft
    import transformers
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    _quiet(transformers)
    dtype = getattr(torch, spec["compute_dtype"])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    ckpt, adapters = _dirs(spec)
    base = LlamaForCausalLM.from_pretrained(
        ckpt, quantization_config=quantization, dtype=dtype, device_map=side.device
    )
    model = peft.PeftModel.from_pretrained(base, adapters, is_trainable=True)
    model.train()  # dropout rates are 0: train mode changes nothing numerically
    trainable = [p for p in model.parameters() if p.requires_grad]
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

    fingerprint = _nf4_fingerprint(
        (i, name, w.data.cpu().numpy(), lambda w=w: dequantise(w)) for (i, name), w in nf4.items()
    )
    steps = side.serve(model, side.adamw(trainable), trainable, side.token_ids(spec["vocab_size"]))
    versions = (
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}"
    )
    n_nf4 = sum(math.prod(w.quant_state.shape) for w in nf4.values())
    nested = all(w.quant_state.nested for w in nf4.values())
    dtypes = sorted({str(p.dtype) for p in trainable})
    n_trainable = sum(p.numel() for p in trainable)
    return side.result(steps, model, versions, n_trainable=n_trainable, n_nf4=n_nf4,
                       nf4_double_quant=nested, adapter_dtypes=dtypes, **fingerprint)  # fmt: skip


WORKERS = {"init": _init_worker, "jax": _jax_worker, "torch": _torch_worker}


# -- parent ----------------------------------------------------------------------------------


def summarize(spec: dict, runs: dict[str, list[dict]], load_trace: list[float]) -> dict:
    """:func:`compare.summarize_steps` plus the first-step gradient-norm and NF4 checks
    (part of ``loss_ok``).

    Raises:
      RuntimeError: the frameworks ran different models (trainable or NF4 weight counts,
        4-bit codes differ) or on different backends.
    """
    tolerance = LOSS_TOLERANCE[spec["compute_dtype"]]
    out = compare.summarize_steps(spec, runs, load_trace, loss_tolerance=tolerance, same=BASE_KEYS)
    if out["jax"]["model_dtype"] != spec["compute_dtype"]:
        raise RuntimeError(
            f"jaxfit computed in {out['jax']['model_dtype']}, not "
            f"{spec['compute_dtype']}: the config's compute_dtype was ignored"
        )
    for kind in compare.FRAMEWORKS:
        out[kind]["first_grad_norm"] = runs[kind][0]["grad_norms"][0]
    out["grad_norm_rdiff"] = max(
        abs(j["grad_norms"][0] / t["grad_norms"][0] - 1) for j, t in zip(runs["jax"], runs["torch"])
    )
    out["grad_norm_rtol"] = GRAD_NORM_RTOL[spec["compute_dtype"]]
    out["nf4_sq_rdiff"] = abs(out["jax"]["nf4_sq_sum"] / out["torch"]["nf4_sq_sum"] - 1)
    out["nf4_sq_rtol"] = NF4_SQ_RTOL
    out["loss_ok"] = out["loss_ok"] and all(c[1] for c in extra_checks(out))
    return out


_SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def model_str(spec: dict) -> str:
    s = spec
    return (
        f"Llama L{s['num_hidden_layers']} D{s['hidden_size']} F{s['intermediate_size']} "
        f"H{s['num_attention_heads']}/KV{s['num_key_value_heads']} V{s['vocab_size']}"
    )


def precision_str(spec: dict) -> str:
    s = spec
    targets = "/".join(t[0] for t in TARGETS)
    return (
        f"NF4 (double quant) base, {_SHORT[s['compute_dtype']]} compute, "
        f"LoRA r{s['rank']} alpha {s['alpha']:g} on {targets} (fp32)"
    )


def describe(res: dict) -> tuple[str, str]:
    jx, pt = res["jax"], res["torch"]
    return f", adapters {'/'.join(pt['adapter_dtypes'])}", (
        f"{jx['n_trainable']:,} trainable parameters, {jx['n_nf4']:,} NF4 weights "
        f"(4-bit codes sha256 {jx['nf4_codes_sha256'][:12]} in both)"
    )


def extra_rows(res: dict) -> list:
    jx, pt = res["jax"], res["torch"]
    return [
        (
            "first-step grad norm",
            f"{jx['first_grad_norm']:.6g}",
            f"{pt['first_grad_norm']:.6g}",
            f"|rel diff| {res['grad_norm_rdiff']:.2e}",
        ),
        (
            "NF4 base: sum w^2",
            f"{jx['nf4_sq_sum']:.6f}",
            f"{pt['nf4_sq_sum']:.6f}",
            f"|rel diff| {res['nf4_sq_rdiff']:.2e}",
        ),
    ]


def extra_checks(res: dict) -> list[tuple[str, bool]]:
    return [
        (
            f"first-step grad-norm check (|rel diff| <= {res['grad_norm_rtol']:g})",
            res["grad_norm_rdiff"] <= res["grad_norm_rtol"],
        ),
        (
            f"NF4 base check (same 4-bit codes; sum w^2 |rel diff| <= {res['nf4_sq_rtol']:g})",
            res["nf4_sq_rdiff"] <= res["nf4_sq_rtol"],
        ),
    ]


def row_notes(res: dict) -> str:
    return (
        f"torch attention {res['torch']['attention']}; first-step grad-norm rel diff "
        f"{res['grad_norm_rdiff']:.1e}, NF4 sum w^2 rel diff {res['nf4_sq_rdiff']:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    return compare_report.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
