"""One GPT-2 training step in jaxfit and in transformers + PyTorch, side by side.

Run from the repository root::

    python -m experiments.bench.lm_step --small            # < 1 minute on 2 CPU cores
    python -m experiments.bench.lm_step --record           # GPT-2 small; adds a row to
                                                           # docs/BENCHMARKS.md

Both frameworks train the SAME model from the SAME weights on the SAME batch:

* weights: ``transformers.GPT2LMHeadModel(GPT2Config(...))`` with ``torch.manual_seed(seed)``
  (dropout 0), written with ``save_pretrained``; jaxfit reads them with
  ``jaxfit.hf.load_pretrained``, torch with ``GPT2LMHeadModel.from_pretrained``.
* batch: ``[batch_size, seq_len]`` uniform random token ids (numpy, ``seed``); the loss is the
  mean next-token cross-entropy over the ``batch_size * (seq_len - 1)`` predicted tokens
  (torch: ``model(ids, labels=ids).loss``; jaxfit: the LM task's ``_sum_loss`` recipe,
  ``losses.cross_entropy`` with labels shifted left and -100 at the end, through
  ``accumulate.microbatched(..., 1)``).
* step: forward, loss, backward, AdamW (same lr, betas, eps, decoupled weight decay on the
  same tensors: kernels and embeddings, not biases or LayerNorm gains; constant lr; optional
  global-norm clipping in both). jaxfit: ``jaxfit.step.make_train_step`` jitted with
  ``donate_argnums=0`` and compiled ahead of time (compile time reported on its own);
  torch (eager, the usual training loop): ``loss.backward()``, ``AdamW.step()``,
  ``zero_grad(set_to_none=True)``.
* precision: ``fp32`` = float32 everywhere (on GPU true fp32 matmuls: jax
  ``jax_default_matmul_precision="highest"``, torch ``allow_tf32=False``); ``bf16`` = float32
  parameters and optimizer, bfloat16 compute (jaxfit ``compute_dtype=bfloat16``; torch
  ``torch.autocast(dtype=torch.bfloat16)``; their lists of bf16 ops differ a little).

The first-step losses must agree (``LOSS_TOLERANCE``); otherwise the run fails and nothing
is recorded: it guards against timing two different computations.

Each framework runs in its own subprocess (``--worker jax|torch``; a third one, ``init``,
writes the checkpoint first), so that peak memory is per framework. Only one of them computes
at any time: they are set up one after the other (imports, weights, jax's compilation), then
(``--schedule interleaved``, the default) take turns step by step, jax first on even steps
and torch first on odd ones, so that a machine whose load changes during the run (shared CI
cores) slows both alike; ``step ratio, paired`` is the median over steps of
``jax_i / torch_i``. ``--schedule sequential`` runs all steps of one, then of the other.
Memory on CPU is the worker's peak RSS (``ru_maxrss``), also shown as the increase over the
RSS right after its imports; on GPU it is the device allocator's peak
(``memory_stats()["peak_bytes_in_use"]``, ``torch.cuda.max_memory_allocated``; jax then runs
with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` as the two share the device). Threads: each
worker is pinned to the first ``--threads`` cores (``sched_setaffinity``, which sizes XLA's
CPU thread pool) and calls ``torch.set_num_threads(threads)``; the default is all cores this
process may use. Step time is the median of ``--steps`` steps after ``--warmup`` steps, as
measured inside the worker; each step ends with the loss read back to the host and (jax) the
new state ready.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import common  # noqa: E402

# GPT-2 small (124M; Radford et al. 2019, Table 2, and HF ``gpt2``) at a CPU-sized batch.
DEFAULTS = dict(
    n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
    seq_len=256, batch_size=4, steps=10, warmup=3,
)  # fmt: skip
# Under a minute on 2 idle CPU cores (45 s), workers' start-up included.
SMALL = dict(n_layer=4, n_embd=256, n_head=4, seq_len=128, batch_size=4, steps=10, warmup=2)
# |first-step loss jaxfit - torch|: identical weights and batch; fp32 differs only by
# summation order. bf16: the two frameworks round different intermediates to bf16.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
NAME = "lm_step"  # experiments.bench.<NAME>; see common's step benchmarks
SECTION = "lm_step: GPT-2 training step, jaxfit vs transformers + PyTorch"
COLUMNS = (
    "date", "machine", "backend", "versions", "commit", "config",
    "jax step ms", "torch step ms", "step ratio (paired)", "jax tok/s", "torch tok/s",
    "jax compile s", "jax peak MiB (+imports)", "torch peak MiB (+imports)",
    "peak ratio (increase ratio)", "loss diff", "notes",
)  # fmt: skip


def _log(msg: str) -> None:
    common.log(NAME, msg)


# -- workers (each runs in its own process) -------------------------------------------------


def _init_worker(spec: dict, peak: common.PeakRSS) -> dict:
    """Write random GPT-2 weights (transformers' own init) to ``spec["ckpt_dir"]``."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    common.quiet_transformers(transformers)
    torch.manual_seed(spec["seed"])
    config = GPT2Config(
        vocab_size=spec["vocab_size"],
        n_positions=spec["n_positions"],
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(config).save_pretrained(spec["ckpt_dir"])
    return {}


def _jax_worker(spec: dict, peak: common.PeakRSS) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxfit import accumulate, hf, losses, optim
    from jaxfit import step as step_lib

    device = jax.devices()[0]
    if spec["precision"] == "fp32" and device.platform != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32, like torch
    after_imports = common.jax_memory(peak, device)["now"]
    compute_dtype = jnp.bfloat16 if spec["precision"] == "bf16" else jnp.float32
    model, params = hf.load_pretrained(
        spec["ckpt_dir"], dtype=jnp.float32, compute_dtype=compute_dtype
    )
    params = jax.device_put(params, device)
    ocfg = optim.default_optim_config()
    ocfg.lr, ocfg.b1, ocfg.b2, ocfg.eps = spec["lr"], spec["b1"], spec["b2"], spec["eps"]
    ocfg.weight_decay, ocfg.grad_clip_norm = spec["weight_decay"], spec["grad_clip_norm"]
    ocfg.warmup_steps, ocfg.min_lr_ratio = 0, 1.0  # constant lr, as torch's AdamW alone
    total_steps = spec["warmup"] + spec["steps"] + 1
    optimizer, schedule = optim.make_optimizer(ocfg, total_steps, params)
    mask = optim.decay_mask(params, tuple(ocfg.no_decay))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    n_decay = sum(s for s, m in zip(sizes, jax.tree.leaves(mask)) if m)
    state = step_lib.create_train_state(params, optimizer, jax.random.key(spec["seed"]))
    del params

    def sum_loss(p, batch, rng, frozen=None):  # tasks.lm.LMTask._sum_loss, no packing
        del rng, frozen  # no dropout; every parameter trains
        logits = model.apply({"params": p}, batch["input_ids"])
        loss_sum, count = losses.cross_entropy(logits, batch["labels"])
        return loss_sum, count.astype(jnp.float32), {}

    ids, labels = common.make_batch(spec)
    batch = jax.device_put({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32)})
    train_step = step_lib.make_train_step(accumulate.microbatched(sum_loss, 1), optimizer, schedule)
    _log("jax: compiling")
    t = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    def run_step() -> float:
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        return float(metrics["loss"])

    times, step_losses = common.serve_steps(NAME, run_step)
    mem = common.jax_memory(peak, device)
    return {
        "compile_s": compile_s,
        "times_s": times,
        "losses": step_losses,
        "n_params": sum(sizes),
        "n_decay": n_decay,
        "backend": device.platform,
        "device": device.device_kind,
        "version": f"jax {jax.__version__}",
        "memory": {"after_imports_kib": after_imports, "peak_kib": mem["peak"]},
        "memory_measure": mem["measure"],
    }


def _torch_worker(spec: dict, peak: common.PeakRSS) -> dict:
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    common.quiet_transformers(transformers)
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    after_imports = common.torch_memory(peak, torch)["now"]
    model = GPT2LMHeadModel.from_pretrained(spec["ckpt_dir"], dtype=torch.float32).to(dev)
    model.train()  # dropout rates are 0: train mode changes nothing numerically
    named = list(model.named_parameters())  # a tied lm_head appears once
    # Decay matrices and embeddings, not biases / LayerNorm gains: jaxfit's default rule
    # (optim.DEFAULT_NO_DECAY) on GPT-2; the parent checks that both decay as many weights.
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
        **impl[spec["torch_adamw"]],
    )  # fmt: skip
    ids, _ = common.make_batch(spec)
    ids = torch.from_numpy(ids).to(dev)
    autocast = (
        torch.autocast(dev, dtype=torch.bfloat16)
        if spec["precision"] == "bf16"
        else contextlib.nullcontext()
    )

    def run_step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if spec["grad_clip_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"])
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
        "n_params": sum(p.numel() for _, p in named),
        "n_decay": sum(p.numel() for p in decay),
        "backend": "gpu" if cuda else "cpu",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "memory": {"after_imports_kib": after_imports, "peak_kib": mem["peak"]},
        "memory_measure": mem["measure"],
    }


WORKERS = {"init": _init_worker, "jax": _jax_worker, "torch": _torch_worker}


# -- parent ----------------------------------------------------------------------------------


def run_benchmark(spec: dict) -> dict:
    """Write the checkpoint (``init`` worker), run the jax and torch workers
    (:func:`common.run_steps`: ``spec["repeats"]`` times, order alternating, on
    ``spec["schedule"]``) and return :func:`summarize`'s dict."""
    with tempfile.TemporaryDirectory(prefix="lm_step_") as tmp:
        workdir = Path(tmp)
        spec = {**spec, "ckpt_dir": str(workdir / "ckpt")}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        _log("init worker: writing the random-weight checkpoint")
        common.run_init(NAME, spec_path, workdir)
        runs, load_trace = common.run_steps(NAME, spec, spec_path, workdir)
    return summarize(spec, runs, load_trace)


def summarize(spec: dict, runs: dict[str, list[dict]], load_trace: list[float]) -> dict:
    """:func:`common.summarize_steps` (step times, memory, ratios, the first-step loss
    check) plus the parameter counts and torch's attention implementation and threads.

    Raises:
      RuntimeError: the frameworks ran different models (parameter or decayed-parameter
        counts differ) or on different backends.
    """
    out = common.summarize_steps(
        spec,
        runs,
        load_trace,
        tokens=spec["batch_size"] * spec["seq_len"],
        loss_tolerance=LOSS_TOLERANCE[spec["precision"]],
        keys=("n_params", "n_decay", "backend", "device", "version"),
        same=("n_params", "n_decay", "backend"),
    )
    out["torch"]["attention"] = runs["torch"][0]["attention"]
    out["torch"]["threads"] = runs["torch"][0]["threads"]
    return out


def _config_str(spec: dict) -> str:
    s = spec
    clip = f"clip {s['grad_clip_norm']:g}" if s["grad_clip_norm"] else "no clip"
    return (
        f"L{s['n_layer']} D{s['n_embd']} H{s['n_head']} V{s['vocab_size']}, "
        f"B{s['batch_size']} x S{s['seq_len']}, {s['precision']}, "
        f"AdamW lr {s['lr']:g} betas ({s['b1']:g}, {s['b2']:g}) eps {s['eps']:g} "
        f"wd {s['weight_decay']:g} {clip} (torch {s['torch_adamw']}), {common.run_str(s)}"
    )


def format_report(res: dict) -> str:
    """The stdout report: a metric x (jaxfit, torch, jaxfit/torch) table and notes."""
    jx, pt = res["jax"], res["torch"]
    notes = [
        f"GPT-2 training step: {_config_str(res['spec'])}",
        f"backend {jx['backend']} ({jx['device']}); {jx['version']}; {pt['version']} "
        f"(attention {pt['attention']}, {pt['threads']} threads); tokens/step "
        f"{res['tokens_per_step']}, {jx['n_params']:,} parameters",
        "",
        common.format_table(("", "jaxfit", "torch", "jaxfit/torch"), common.report_rows(res)),
        "",
        *common.report_notes(res),
    ]
    return "\n".join(notes)


def record(res: dict, note: str = "", path: Path = common.BENCHMARKS_MD) -> Path:
    """Append ``res`` as a dated row to ``docs/BENCHMARKS.md`` (section :data:`SECTION`)."""
    notes = f"{common.loads_note(res)}; torch attention {res['torch']['attention']}"
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
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    # nanoGPT's GPT-2 recipe (train_gpt2.py / config/train_gpt2.py): AdamW 6e-4, (0.9, 0.95).
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip_norm", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--torch_adamw", choices=("default", "foreach", "fused"), default="default")
    common.add_run_args(p, WORKERS)
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace) -> dict:
    """Resolve presets and check the sizes; ``ValueError`` on impossible ones."""
    spec = {**DEFAULTS, **(SMALL if args.small else {})}
    spec.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    for k in ("precision", "lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm"):
        spec[k] = getattr(args, k)
    spec["torch_adamw"] = args.torch_adamw
    spec = common.run_spec(args, spec)
    if spec["seq_len"] > spec["n_positions"]:
        raise ValueError(f"seq_len {spec['seq_len']} > n_positions {spec['n_positions']}")
    if spec["n_embd"] % spec["n_head"]:
        raise ValueError("n_embd must be a multiple of n_head")
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
