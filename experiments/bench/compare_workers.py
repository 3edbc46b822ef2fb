"""The two sides of a framework comparison, each run in its own worker process.

* :func:`jax_worker`: the config (a recipe of ``configs/`` with ``init_from`` = the
  checkpoint the ``init`` worker wrote, plus the benchmark's overrides) -> the task,
  built with data and weights as ``jaxfit.train`` builds it (``abstract=False``: the
  checkpoint is read by the task's own loaders; a tiny synthetic corpus and a byte-level
  tokenizer stand in for the data the task insists on) -> ``jaxfit.step.jit_train_step``
  (:mod:`experiments.bench.runner`), timed on the synthetic batch of
  :func:`experiments.bench.batches.lm_batch`.
* :class:`TorchWorker`: the eager PyTorch training step (``loss.backward()``,
  ``clip_grad_norm_``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``) on the same
  token ids.

Both mask the loss at the last position: Hugging Face's ``model(ids, labels=ids)`` predicts
``seq_len - 1`` tokens, jaxfit's batch has a label at every position.

jax and torch are imported inside the functions: the parent process and the other
framework's worker never load them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from experiments.bench import batches, compare
from experiments.bench.procs import KIB_PER_MIB, log

# The optimizer fields both frameworks take from the spec; constant learning rate (no
# warm-up, no decay), as torch.optim.AdamW alone.
OPTIM_FIELDS = ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def config_overrides(spec: dict) -> list[str]:
    """What every comparison sets in its recipe: batch, sequence, step count, seed, no
    remat, no loss chunking, the spec's optimizer at a constant learning rate."""
    out = [
        f"seq_len={spec['seq_len']}",
        f"batch_size={spec['batch_size']}",
        f"micro_batch_size={spec['batch_size']}",
        f"seed={spec['seed']}",
        f"total_steps={spec['warmup'] + spec['steps'] + 1}",
        "model.remat_policy=none",
        "loss_chunk_size=0",
        "optim.name=adamw",
        "optim.warmup_steps=0",
        "optim.min_lr_ratio=1.0",
    ]
    return out + [f"optim.{k}={float(spec[k])!r}" for k in OPTIM_FIELDS]


def _data_overrides(workdir: Path) -> list[str]:
    """A tiny synthetic corpus and a byte-level BPE (257 ids) for the task's data."""
    from jaxfit.data.text import train_text_bpe

    tokenizer = workdir / "byte_tokenizer"
    if not tokenizer.is_dir():
        train_text_bpe(["benchmark"], tokenizer, vocab_size=257)
    return [
        "data.synthetic.enabled=True",
        "data.synthetic.num_documents=32",
        "data.val_fraction=0.0",
        "data.val_path=",
        f"data.tokenizer.name={tokenizer}",
    ]


def jax_worker(name: str, spec: dict, peak, recipe: str, overrides: list[str], info=None) -> dict:
    """Set up the jaxfit step of ``recipe`` (``"configs/x.py:arg"``) with ``overrides``,
    serve timed steps (:func:`compare.serve_steps`) and return the worker's result;
    ``info(setup) -> dict`` adds what the benchmark checks (parameter counts, NF4 codes).
    With ``spec["fp32"]`` a GPU computes true float32 matmuls (no TF32), as torch does."""
    import jax
    import jax.numpy as jnp

    from experiments.bench import runner
    from jaxfit.config import load_config

    device = jax.devices()[0]
    if spec.get("fp32") and device.platform != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
    memory = runner.Memory(peak)
    after_imports = memory.in_use_mib() * KIB_PER_MIB
    workdir = Path(spec["workdir"]) / "jax"
    workdir.mkdir(parents=True, exist_ok=True)
    all_overrides = [*config_overrides(spec), *_data_overrides(workdir), *overrides]
    config = load_config(recipe, all_overrides)
    setup = runner.build(config, workdir, abstract=False)
    planned = runner.plan_summary(config) if spec.get("plan", True) else {}
    batch = runner.synthetic_batch(setup.task, spec["batch_size"], spec["seed"])
    batch["loss_mask"][:, -1] = 0  # as HF's labels=ids: no prediction after the last token
    extra = info(setup) if info else {}
    log(name, "jax: compiling")
    run = runner.StepRunner(setup, runner.fresh_state(setup), batch, setup.task.frozen)
    times, losses = compare.serve_steps(name, run)
    used = {"peak": memory.peak_mib() * KIB_PER_MIB, "measure": memory.measure}
    info = {"compile_s": run.compile_s, "grad_norms": run.grad_norms, **planned, **extra}
    info.update(backend=device.platform, device=device.device_kind)
    info["model_dtype"] = jnp.dtype(setup.task.model.config.dtype).name
    return compare.worker_result(times, losses, used, after_imports, **info)


class TorchWorker:
    """The torch side of a comparison: imports torch, pins its threads (``spec["threads"]``),
    turns TF32 off on a GPU; :meth:`memory` (KiB: the CUDA allocator's allocated / peak on
    a GPU, else this process's RSS from ``peak``, a ``PeakRSS``), :meth:`token_ids` (the jax
    worker's batch, same seed), :meth:`adamw`, :meth:`serve` (the timed steps) and
    :meth:`result`."""

    def __init__(self, name: str, spec: dict, peak):
        import torch

        self.name, self.spec, self.peak, self.torch = name, spec, peak, torch
        torch.set_num_threads(spec["threads"])
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        self.after_imports = self.memory()["now"]

    def memory(self) -> dict:
        if not self.cuda:
            p = self.peak
            return {"now": p.current_kib(), "peak": p.peak_kib(), "measure": p.measure}
        cuda = self.torch.cuda
        return {"now": cuda.memory_allocated() / 1024, "peak": cuda.max_memory_allocated() / 1024,
                "measure": "torch.cuda.max_memory_allocated()"}  # fmt: skip

    def token_ids(self, vocab_size: int):
        s = self.spec
        ids = batches.lm_batch(s["batch_size"], s["seq_len"], vocab_size, s["seed"])["input_ids"]
        return self.torch.from_numpy(ids.astype("int64")).to(self.device)

    def adamw(self, groups):
        """``torch.optim.AdamW`` over ``groups`` with the spec's hyper-parameters and
        implementation (``torch_adamw``: default / foreach / fused)."""
        s = self.spec
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        kwargs = dict(lr=s["lr"], betas=(s["b1"], s["b2"]), eps=s["eps"])
        return self.torch.optim.AdamW(groups, weight_decay=s["weight_decay"], **kwargs,
                                      **impl[s["torch_adamw"]])  # fmt: skip

    def serve(self, model, opt, trainable, ids, autocast=None) -> tuple:
        """Serve timed eager steps of ``model(ids, labels=ids).loss`` (under ``autocast``):
        backward, global-norm clipping of ``trainable`` at ``spec["grad_clip_norm"]`` (its
        norm before clipping is recorded, as jaxfit's ``grad_norm``), ``opt.step()``,
        ``zero_grad``. Returns ``(times, losses, grad_norms)``."""
        torch, grad_norms = self.torch, []
        clip = self.spec["grad_clip_norm"] or math.inf

        def run_step() -> float:
            with autocast or contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.synchronize()
            return loss.item()

        times, losses = compare.serve_steps(self.name, run_step)
        return times, losses, grad_norms

    def result(self, steps, model, versions: str, **info) -> dict:
        """The worker's result (:func:`compare.worker_result`) from :meth:`serve`'s output,
        with backend, device, versions, attention implementation and threads."""
        torch, (times, losses, grad_norms) = self.torch, steps
        config = getattr(model, "config", None) or model.base_model.model.config
        info.update(grad_norms=grad_norms, attention=config._attn_implementation,
                    threads=torch.get_num_threads(), backend="gpu" if self.cuda else "cpu",
                    device=torch.cuda.get_device_name() if self.cuda else "cpu")  # fmt: skip
        info["version"] = f"torch {torch.__version__}, {versions}"
        return compare.worker_result(times, losses, self.memory(), self.after_imports, **info)


def quiet_transformers(transformers) -> None:
    """No progress bars or info/warning lines from transformers in a benchmark's output."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
