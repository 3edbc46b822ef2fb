"""One GPT-2 training step in jaxfit and in transformers + PyTorch, side by side.

Run from the repository root::

    python -m experiments.bench.lm_step --small            # about a minute on 2 CPU cores
    python -m experiments.bench.lm_step --record           # GPT-2 small; adds a row to
                                                           # docs/BENCHMARKS.md

Both frameworks train the SAME model from the SAME weights on the SAME batch:

* weights: ``transformers.GPT2LMHeadModel(GPT2Config(...))`` with ``torch.manual_seed(seed)``
  (dropout 0), written with ``save_pretrained`` by the ``init`` worker; torch reads them
  with ``from_pretrained``, jaxfit trains ``configs/gpt2_finetune.py:init_from=<them>``
  through the task ``jaxfit.train`` builds (its loader: ``jaxfit.hf.load_pretrained``).
* batch: ``[batch_size, seq_len]`` uniform random token ids (numpy, ``seed``); the loss is the
  mean next-token cross-entropy over the ``batch_size * (seq_len - 1)`` predicted tokens
  (torch: ``model(ids, labels=ids).loss``; jaxfit: the LM task's loss with the last
  position masked).
* step: forward, loss, backward, AdamW (same lr, betas, eps, decoupled weight decay on the
  same tensors: kernels and embeddings, not biases or LayerNorm gains, checked by count;
  constant lr; optional global-norm clipping in both). jaxfit: the jitted, donating
  ``jaxfit.step.jit_train_step`` of the task (``experiments.bench.runner``), compiled ahead
  of time (compile time reported on its own); torch (eager, the usual training loop):
  ``loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``.
* precision: ``fp32`` = float32 everywhere (on GPU true fp32 matmuls: jax
  ``jax_default_matmul_precision="highest"``, torch ``allow_tf32=False``); ``bf16`` = float32
  parameters and optimizer, bfloat16 compute (the config's ``precision=bf16``; torch
  ``torch.autocast(dtype=torch.bfloat16)``; their lists of bf16 ops differ a little).

The first-step losses must agree (``LOSS_TOLERANCE``); otherwise the run fails and nothing
is recorded: it guards against timing two different computations.

Workers, schedule and memory (:mod:`experiments.bench.compare`): each framework in its own
subprocess, set up one after the other, then (``--schedule interleaved``, the default)
taking turns step by step so that a machine whose load changes slows both alike; ``step
ratio, paired`` is the median over steps of ``jax_i / torch_i``. Memory on CPU is the
worker's peak RSS (also as the increase over the RSS right after its imports), on GPU the
allocator's peak; jaxfit's planned step peak (``jaxfit.plan``) is reported next to it.
Threads: each worker is pinned to the first ``--threads`` cores and torch uses as many.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import compare, compare_report  # noqa: E402
from experiments.bench import compare_workers as cw  # noqa: E402

NAME = "lm_step"  # experiments.bench.<NAME>
SECTION = "lm_step: GPT-2 training step, jaxfit vs transformers + PyTorch"
TITLE = "GPT-2 training step"
TORCH_PACKAGES = ("torch", "transformers")
RECIPE = "configs/gpt2_finetune.py:init_from={ckpt}"
# GPT-2 small (124M; Radford et al. 2019, Table 2, and HF ``gpt2``) at a CPU-sized batch.
DEFAULTS = dict(
    n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
    seq_len=256, batch_size=4, steps=10, warmup=3,
)  # fmt: skip
# About a minute on 2 idle CPU cores, workers' start-up included.
SMALL = dict(n_layer=4, n_embd=256, n_head=4, seq_len=128, batch_size=4, steps=10, warmup=2)
# nanoGPT's GPT-2 recipe (train_gpt2.py / config/train_gpt2.py): AdamW 6e-4, (0.9, 0.95).
OPTIM = dict(lr=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.0)
EXTRA_FIELDS = ("precision",)
# |first-step loss jaxfit - torch|: identical weights and batch; fp32 differs only by
# summation order. bf16: the two frameworks round different intermediates to bf16.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def add_args(p) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")


def check_spec(spec: dict) -> None:
    if spec["seq_len"] > spec["n_positions"]:
        raise ValueError(f"seq_len {spec['seq_len']} > n_positions {spec['n_positions']}")
    if spec["n_embd"] % spec["n_head"]:
        raise ValueError("n_embd must be a multiple of n_head")
    spec["fp32"] = spec["precision"] == "fp32"


def _ckpt(spec: dict) -> str:
    return str(Path(spec["workdir"]) / "ckpt")


# -- workers (each runs in its own process) -------------------------------------------------


def _init_worker(spec: dict, peak, save) -> dict:
    """Write random GPT-2 weights (transformers' own init) to the checkpoint directory."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    cw.quiet_transformers(transformers)
    torch.manual_seed(spec["seed"])
    sizes = {k: spec[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    config = GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(_ckpt(spec))
    return {}


def _jax_info(setup) -> dict:
    import jax
    import numpy as np

    from jaxfit import optim

    params = setup.task.abstract_params()
    mask = optim.decay_mask(params, tuple(setup.config.optim.no_decay))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    return {
        "n_params": sum(sizes),
        "n_decay": sum(s for s, m in zip(sizes, jax.tree.leaves(mask)) if m),
    }


def _jax_worker(spec: dict, peak, save) -> dict:
    recipe = RECIPE.format(ckpt=_ckpt(spec))
    return cw.jax_worker(NAME, spec, peak, recipe, [f"precision={spec['precision']}"], _jax_info)


def _torch_worker(spec: dict, peak, save) -> dict:
    side = cw.TorchWorker(NAME, spec, peak)
    torch = side.torch
    import transformers
    from transformers import GPT2LMHeadModel

    cw.quiet_transformers(transformers)
    model = GPT2LMHeadModel.from_pretrained(_ckpt(spec), dtype=torch.float32).to(side.device)
    model.train()  # dropout rates are 0: train mode changes nothing numerically
    params = list(model.parameters())  # a tied lm_head appears once
    # Decay matrices and embeddings, not biases / LayerNorm gains: jaxfit's default rule
    # (optim.DEFAULT_NO_DECAY) on GPT-2; summarize checks that both decay as many weights.
    decay = [p for p in params if p.dim() >= 2]
    groups = [{"params": decay}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0}]
    autocast = torch.autocast(side.device, dtype=torch.bfloat16) if not spec["fp32"] else None
    steps = side.serve(model, side.adamw(groups), params, side.token_ids(spec["vocab_size"]),
                       autocast)  # fmt: skip
    return side.result(steps, model, f"transformers {transformers.__version__}",
                       n_params=sum(p.numel() for p in params),
                       n_decay=sum(p.numel() for p in decay))  # fmt: skip


WORKERS = {"init": _init_worker, "jax": _jax_worker, "torch": _torch_worker}


# -- parent ----------------------------------------------------------------------------------


def summarize(spec: dict, runs: dict[str, list[dict]], load_trace: list[float]) -> dict:
    """:func:`compare.summarize_steps` of the two frameworks.

    Raises:
      RuntimeError: the frameworks ran different models (parameter or decayed-parameter
        counts differ) or on different backends.
    """
    tolerance = LOSS_TOLERANCE[spec["precision"]]
    return compare.summarize_steps(
        spec, runs, load_trace, loss_tolerance=tolerance, same=("n_params", "n_decay")
    )


def model_str(spec: dict) -> str:
    s = spec
    return f"L{s['n_layer']} D{s['n_embd']} H{s['n_head']} V{s['vocab_size']}"


def precision_str(spec: dict) -> str:
    return spec["precision"]


def describe(res: dict) -> tuple[str, str]:
    return "", f"{res['jax']['n_params']:,} parameters"


def extra_rows(res: dict) -> list:
    return []


def extra_checks(res: dict) -> list:
    return []


def row_notes(res: dict) -> str:
    return f"torch attention {res['torch']['attention']}"


def main(argv: list[str] | None = None) -> int:
    return compare_report.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
