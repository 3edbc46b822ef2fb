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
FRAMEWORKS = ("jax", "torch")
PROTOCOL = "@@lm_step"  # prefix of the workers' protocol lines on stdout
SECTION = "lm_step: GPT-2 training step, jaxfit vs transformers + PyTorch"
COLUMNS = (
    "date", "machine", "backend", "versions", "commit", "config",
    "jax step ms", "torch step ms", "step ratio (paired)", "jax tok/s", "torch tok/s",
    "jax compile s", "jax peak MiB (+imports)", "torch peak MiB (+imports)",
    "peak ratio (increase ratio)", "loss diff", "notes",
)  # fmt: skip


def _log(msg: str) -> None:
    print(f"[lm_step] {msg}", file=sys.stderr, flush=True)


def make_batch(spec: dict):
    """``(input_ids, labels)`` int64 ``[batch_size, seq_len]``; ``labels[:, t] =
    input_ids[:, t + 1]`` and -100 (ignored) at the last position, as HF shifts them."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    shape = (spec["batch_size"], spec["seq_len"])
    ids = rng.integers(0, spec["vocab_size"], shape, dtype=np.int64)
    labels = np.concatenate([ids[:, 1:], np.full((shape[0], 1), -100, np.int64)], axis=1)
    return ids, labels


def _reply(*words: object) -> None:
    """A protocol line from a worker to the parent (stdout; logs go to stderr)."""
    print(PROTOCOL, *words, flush=True)


def _serve_steps(run_step) -> tuple[list[float], list[float]]:
    """Worker side of the step protocol: say ``ready``, then for every ``step`` line on
    stdin time one call of ``run_step() -> float loss`` (which synchronises) and answer
    ``step <seconds> <loss>``, until ``end``. Returns (seconds, losses) of all steps."""
    _reply("ready")
    times, losses = [], []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        losses.append(run_step())
        times.append(time.perf_counter() - t)
        _reply("step", repr(times[-1]), repr(losses[-1]))
    return times, losses


def _mib(kib: float) -> float:
    return kib / common.KIB_PER_MIB


# -- workers (each runs in its own process) -------------------------------------------------


def _quiet(transformers) -> None:
    """No progress bars or info/warning lines from transformers (e.g. its ``loss_type``
    notice) in the benchmark's output."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _init_worker(spec: dict, peak: common.PeakRSS) -> dict:
    """Write random GPT-2 weights (transformers' own init) to ``spec["ckpt_dir"]``."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet(transformers)
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
    on_cpu = device.platform == "cpu"
    if spec["precision"] == "fp32" and not on_cpu:
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32, like torch

    def memory() -> dict:
        if on_cpu:
            return {"now": peak.current_kib(), "peak": peak.peak_kib(), "measure": peak.measure}
        stats = device.memory_stats()
        return {
            "now": stats["bytes_in_use"] / 1024,
            "peak": stats["peak_bytes_in_use"] / 1024,
            "measure": 'jax memory_stats()["peak_bytes_in_use"]',
        }

    after_imports = memory()["now"]
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

    ids, labels = make_batch(spec)
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

    times, step_losses = _serve_steps(run_step)
    mem = memory()
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

    _quiet(transformers)
    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False

    def memory() -> dict:
        if not cuda:
            return {"now": peak.current_kib(), "peak": peak.peak_kib(), "measure": peak.measure}
        return {
            "now": torch.cuda.memory_allocated() / 1024,
            "peak": torch.cuda.max_memory_allocated() / 1024,
            "measure": "torch.cuda.max_memory_allocated()",
        }

    after_imports = memory()["now"]
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
    ids, _ = make_batch(spec)
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

    times, step_losses = _serve_steps(run_step)
    mem = memory()
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


def worker_main(kind: str, spec_path: str, out_path: str) -> None:
    """Entry point of a worker process: run ``WORKERS[kind]``, write its result as JSON."""
    peak = common.PeakRSS()  # first, before anything big is allocated
    spec = json.loads(Path(spec_path).read_text())
    if hasattr(os, "sched_setaffinity"):  # Linux; before XLA sizes its thread pool
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec["threads"]])
    load_start = common.load_average()
    result = WORKERS[kind](spec, peak)
    result["load_average"] = [load_start, common.load_average()]
    Path(out_path).write_text(json.dumps(result))


# -- parent ----------------------------------------------------------------------------------


def _command(kind: str, spec_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.bench.lm_step", "--worker", kind,
            "--spec", str(spec_path), "--out", str(out)]  # fmt: skip


class _Worker:
    """Parent side of a ``jax``/``torch`` worker: started, set up (imports, weights,
    compilation) and ``ready`` on construction; :meth:`step` runs one timed step;
    :meth:`finish` ends it and returns its result dict."""

    def __init__(self, kind: str, spec_path: Path, workdir: Path):
        self.kind, self.out = kind, workdir / f"{kind}.json"
        _log(f"{kind} worker starting")
        env = dict(os.environ)
        # Interleaved on a GPU, jax must not take 75% of its memory up front (torch shares it).
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        self.proc = subprocess.Popen(
            _command(kind, spec_path, self.out),
            cwd=common.REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")

    def _expect(self, tag: str) -> list[str]:
        for line in self.proc.stdout:
            words = line.split()
            if words[:2] == [PROTOCOL, tag]:
                return words[2:]
            sys.stderr.write(line)  # the worker's (or a library's) own output
        raise RuntimeError(f"the {self.kind} worker exited (status {self.proc.wait()})")

    def step(self) -> tuple[float, float]:
        """One step: (seconds, loss) as the worker measured them."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        seconds, loss = self._expect("step")
        return float(seconds), float(loss)

    def finish(self) -> dict:
        self.proc.stdin.close()
        for line in self.proc.stdout:
            sys.stderr.write(line)
        if status := self.proc.wait():
            raise RuntimeError(f"the {self.kind} worker failed with exit status {status}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_benchmark(spec: dict) -> dict:
    """Write the checkpoint (``init`` worker), run the jax and torch workers
    ``spec["repeats"]`` times (alternating which goes first) on ``spec["schedule"]``, and
    return :func:`summarize`'s dict.

    ``interleaved``: both workers are set up one after the other, then take turns step by
    step (order alternating), so that both see the same machine load over time;
    ``sequential``: all steps of one worker, then all of the other.
    """
    runs = {k: [] for k in FRAMEWORKS}
    load_trace = []  # 1-minute load average after every step (pair)
    n = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory(prefix="lm_step_") as tmp:
        workdir = Path(tmp)
        spec = {**spec, "ckpt_dir": str(workdir / "ckpt")}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        _log("init worker: writing the random-weight checkpoint")
        init = subprocess.run(
            _command("init", spec_path, workdir / "init.json"),
            cwd=common.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if init.returncode:
            raise RuntimeError(f"the init worker failed with exit status {init.returncode}")
        for r in range(spec["repeats"]):
            order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
            groups = [order] if spec["schedule"] == "interleaved" else [(k,) for k in order]
            for group in groups:
                workers = {}
                try:
                    for kind in group:
                        workers[kind] = _Worker(kind, spec_path, workdir)
                    for i in range(n):
                        done = []
                        for kind in group if i % 2 == 0 else group[::-1]:
                            seconds, loss = workers[kind].step()
                            done.append(f"{kind} {seconds:.3f} s (loss {loss:.5f})")
                        load_trace.append(common.load_average()[0])
                        _log(f"step {i}{' (warm-up)' if i < spec['warmup'] else ''}: "
                             + ", ".join(done))  # fmt: skip
                    for kind in group:
                        runs[kind].append(workers[kind].finish())
                finally:
                    for w in workers.values():
                        w.kill()
    return summarize(spec, runs, load_trace)


def summarize(spec: dict, runs: dict[str, list[dict]], load_trace: list[float]) -> dict:
    """Per framework: step-time median / quartiles over the timed steps of all repeats,
    tokens/s, compile and first-step time (medians), peak memory (max), losses; plus the
    jaxfit / torch ratios, the loss check and the 1-minute load average seen during the
    steps (``load_trace``: one value per step or step pair).

    Raises:
      RuntimeError: the frameworks ran different models (parameter or decayed-parameter
        counts differ) or on different backends.
    """
    tokens = spec["batch_size"] * spec["seq_len"]
    out = {"spec": spec, "tokens_per_step": tokens, "load_trace": load_trace}
    for kind in FRAMEWORKS:
        rs = runs[kind]
        timed = [t for r in rs for t in r["times_s"][spec["warmup"] :]]
        q1, med, q3 = (
            statistics.quantiles(timed, n=4, method="inclusive") if len(timed) > 1 else timed * 3
        )
        peak = max(r["memory"]["peak_kib"] for r in rs)
        imports = statistics.median(r["memory"]["after_imports_kib"] for r in rs)
        out[kind] = {
            "step_median_s": med,
            "step_q1_s": q1,
            "step_q3_s": q3,
            "tokens_per_s": tokens / med,
            "first_step_s": statistics.median(r["times_s"][0] for r in rs),
            "compile_s": statistics.median(r["compile_s"] for r in rs) if kind == "jax" else None,
            "peak_mib": _mib(peak),
            "after_imports_mib": _mib(imports),
            "increase_mib": _mib(peak - imports),
            "first_loss": rs[0]["losses"][0],
            "last_loss": rs[0]["losses"][-1],
            "memory_measure": rs[0]["memory_measure"],
            "load_average": [r["load_average"] for r in rs],
            **{k: rs[0][k] for k in ("n_params", "n_decay", "backend", "device", "version")},
        }
    out["torch"]["attention"] = runs["torch"][0]["attention"]
    out["torch"]["threads"] = runs["torch"][0]["threads"]
    jx, pt = out["jax"], out["torch"]
    for key in ("n_params", "n_decay", "backend"):
        if jx[key] != pt[key]:
            raise RuntimeError(f"different {key}: jaxfit {jx[key]} vs torch {pt[key]}")
    paired = [
        a / b
        for j, t in zip(runs["jax"], runs["torch"])
        for a, b in zip(j["times_s"][spec["warmup"] :], t["times_s"][spec["warmup"] :])
    ]
    out["ratio"] = {
        "step": jx["step_median_s"] / pt["step_median_s"],
        # Median over steps i of jax_i / torch_i: under "interleaved" the two steps i ran
        # back to back, so a load change cancels out of each ratio.
        "step_paired": statistics.median(paired),
        "tokens_per_s": jx["tokens_per_s"] / pt["tokens_per_s"],
        "peak": jx["peak_mib"] / pt["peak_mib"],
        "increase": jx["increase_mib"] / pt["increase_mib"],
    }
    diffs = [abs(j["losses"][0] - t["losses"][0]) for j, t in zip(runs["jax"], runs["torch"])]
    out["loss_diff"] = max(diffs)
    out["loss_diff_last"] = abs(jx["last_loss"] - pt["last_loss"])
    out["loss_tolerance"] = LOSS_TOLERANCE[spec["precision"]]
    out["loss_ok"] = out["loss_diff"] <= out["loss_tolerance"]
    return out


def _config_str(spec: dict) -> str:
    s = spec
    clip = f"clip {s['grad_clip_norm']:g}" if s["grad_clip_norm"] else "no clip"
    return (
        f"L{s['n_layer']} D{s['n_embd']} H{s['n_head']} V{s['vocab_size']}, "
        f"B{s['batch_size']} x S{s['seq_len']}, {s['precision']}, "
        f"AdamW lr {s['lr']:g} betas ({s['b1']:g}, {s['b2']:g}) eps {s['eps']:g} "
        f"wd {s['weight_decay']:g} {clip} (torch {s['torch_adamw']}), "
        f"{s['threads']} threads, median of {s['steps'] * s['repeats']} steps "
        f"after {s['warmup']} warm-up, {s['schedule']}"
    )


def _loads(res: dict) -> str:
    """The 1-min load average during the steps (min / median / max over steps) and the
    1/5/15-min ones when the first worker started."""
    trace = res["load_trace"]
    first = res["jax"]["load_average"][0][0]  # jax's worker starts first
    return (
        f"1-min load during the steps {min(trace):.1f} / {statistics.median(trace):.1f} / "
        f"{max(trace):.1f} (min / median / max); at the start "
        + "/".join(f"{v:.1f}" for v in first)
    )


def format_report(res: dict) -> str:
    """The stdout report: a metric x (jaxfit, torch, jaxfit/torch) table and notes."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    f3 = lambda x: f"{x:.3f}"
    rows = [
        ("compile (s)", f3(jx["compile_s"]), "-", "-"),
        ("first step (s)", f3(jx["first_step_s"]), f3(pt["first_step_s"]), ""),
        ("step median (ms)", f"{jx['step_median_s'] * 1e3:.1f}",
         f"{pt['step_median_s'] * 1e3:.1f}", f3(ratio["step"])),
        ("step ratio, paired", "", "", f3(ratio["step_paired"])),
        ("step q1-q3 (ms)",
         f"{jx['step_q1_s'] * 1e3:.1f}-{jx['step_q3_s'] * 1e3:.1f}",
         f"{pt['step_q1_s'] * 1e3:.1f}-{pt['step_q3_s'] * 1e3:.1f}", ""),
        ("tokens/s", f"{jx['tokens_per_s']:.1f}", f"{pt['tokens_per_s']:.1f}",
         f3(ratio["tokens_per_s"])),
        ("peak memory (MiB)", f"{jx['peak_mib']:.0f}", f"{pt['peak_mib']:.0f}",
         f3(ratio["peak"])),
        ("  after imports (MiB)", f"{jx['after_imports_mib']:.0f}",
         f"{pt['after_imports_mib']:.0f}", ""),
        ("  increase (MiB)", f"{jx['increase_mib']:.0f}", f"{pt['increase_mib']:.0f}",
         f3(ratio["increase"])),
        ("first-step loss", f"{jx['first_loss']:.6f}", f"{pt['first_loss']:.6f}",
         f"|diff| {res['loss_diff']:.2e}"),
        (f"loss after step {res['spec']['warmup'] + res['spec']['steps'] - 1}",
         f"{jx['last_loss']:.6f}", f"{pt['last_loss']:.6f}", f"|diff| {res['loss_diff_last']:.2e}"),
    ]  # fmt: skip
    verdict = "OK" if res["loss_ok"] else "MISMATCH: the two steps do not compute the same loss"
    notes = [
        f"GPT-2 training step: {_config_str(res['spec'])}",
        f"backend {jx['backend']} ({jx['device']}); {jx['version']}; {pt['version']} "
        f"(attention {pt['attention']}, {pt['threads']} threads); tokens/step "
        f"{res['tokens_per_step']}, {jx['n_params']:,} parameters",
        "",
        common.format_table(("", "jaxfit", "torch", "jaxfit/torch"), rows),
        "",
        f"memory: jaxfit {jx['memory_measure']}; torch {pt['memory_measure']}; "
        "'after imports' = in use right after the framework imports, 'increase' = peak - it",
        f"first-step loss check (|diff| <= {res['loss_tolerance']:g}): {verdict}",
        f"load: {_loads(res)}",
    ]
    return "\n".join(notes)


def record(res: dict, note: str = "", path: Path = common.BENCHMARKS_MD) -> Path:
    """Append ``res`` as a dated row to ``docs/BENCHMARKS.md`` (section :data:`SECTION`)."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    backend = jx["backend"] if jx["backend"] == "cpu" else f"{jx['backend']} ({jx['device']})"
    mem = lambda r: f"{r['peak_mib']:.0f} (+{r['increase_mib']:.0f})"
    notes = f"{_loads(res)}; torch attention {pt['attention']}"
    row = (
        date, common.machine(), backend,
        f"{jx['version']}, {pt['version']}", common.git_commit(), _config_str(res["spec"]),
        f"{jx['step_median_s'] * 1e3:.0f}", f"{pt['step_median_s'] * 1e3:.0f}",
        f"{ratio['step']:.2f} ({ratio['step_paired']:.2f})",
        f"{jx['tokens_per_s']:.0f}", f"{pt['tokens_per_s']:.0f}",
        f"{jx['compile_s']:.1f}", mem(jx), mem(pt),
        f"{ratio['peak']:.2f} ({ratio['increase']:.2f})", f"{res['loss_diff']:.1e}",
        f"{notes}; {note}" if note else notes,
    )  # fmt: skip
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=common.cpu_count(), help="default: all cores")
    p.add_argument(
        "--schedule",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: the two workers take turns step by step (robust to a changing "
        "machine load); sequential: one framework's steps, then the other's",
    )
    p.add_argument("--repeats", type=int, default=1, help="worker pairs, order alternating")
    p.add_argument("--record", action="store_true", help="append a row to docs/BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the recorded row's notes")
    p.add_argument("--json", help="also write the full result dict to this file")
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace) -> dict:
    """Resolve presets and check the sizes; ``ValueError`` on impossible ones."""
    spec = {**DEFAULTS, **(SMALL if args.small else {})}
    spec.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    for k in ("precision", "lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm"):
        spec[k] = getattr(args, k)
    spec.update(torch_adamw=args.torch_adamw, seed=args.seed, repeats=args.repeats)
    spec["schedule"] = args.schedule
    spec["threads"] = min(args.threads, common.cpu_count())
    if spec["seq_len"] > spec["n_positions"]:
        raise ValueError(f"seq_len {spec['seq_len']} > n_positions {spec['n_positions']}")
    if spec["n_embd"] % spec["n_head"]:
        raise ValueError("n_embd must be a multiple of n_head")
    if spec["steps"] < 1 or spec["warmup"] < 0 or spec["repeats"] < 1 or spec["threads"] < 1:
        raise ValueError("need steps >= 1, warmup >= 0, repeats >= 1, threads >= 1")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec, args.out)
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
