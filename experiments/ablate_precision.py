"""Precision ablation: the same LoRA adapters trained over a frozen base stored in
float32, bfloat16, int8 or NF4 (QLoRA); full fine-tuning only when asked.

  python experiments/ablate_precision.py --config configs/gpt2_scratch.py:demo \\
      --out runs/ablate_gpt2 --steps 150 --base_steps 300
  python experiments/ablate_precision.py --config configs/clip_coco.py:demo \\
      --out runs/ablate_clip --steps 150 --base_steps 300
  # an existing pretrained model as the common starting point (no base stage):
  python experiments/ablate_precision.py --config configs/gpt2_finetune.py \\
      --init_from gpt2 --out runs/ablate_ft --config.data.path=train.txt

The question is the QLoRA workflow's (Dettmers et al. 2023, section 4): what does
storing the frozen base in fewer bits cost a LoRA fine-tune? So the default arms hold
the adapters fixed (the config's ``lora`` targets, rank, alpha, dropout and
initialisation; the same data, seed and learning rate) and vary only the base:

=================  =======================  ==============  ==================
arm                trains                   frozen base     compute dtype
=================  =======================  ==============  ==================
lora-fp32          LoRA adapters            float32         float32
lora-bf16          LoRA adapters            bfloat16        bfloat16 (reference)
lora-int8          LoRA adapters            int8 (absmax)   bfloat16
qlora-nf4          LoRA adapters            NF4             bfloat16
qlora-nf4+adam8    LoRA adapters, 8-bit     NF4             bfloat16
                   Adam moments
full-fp32          every weight (asked)     -               float32
full-bf16          every weight (asked)     -               bfloat16
=================  =======================  ==============  ==================

``--arms`` picks them (default the five LoRA arms); a ``+adam8`` suffix on any arm
keeps Adam's moments in 8 bits (``optim.name=adamw8bit``). ``full-*`` arms answer
another question (full fine-tuning against LoRA): a set mixing them with LoRA arms gets
a warning at the top of ``results.md`` and on the plots. ``lora-bf16`` is the reference
of every difference: it computes in bfloat16 like the quantised arms, over a float base.
``--arm_override ARM:key=value`` (repeatable) changes one arm's config only (not what it
trains or its base: that is refused). The GPT-2 demo (``:demo``: LoRA r=16 on every
linear layer, the demo's lr 3e-3) took 14.5 minutes on a busy 2-core CPU; its figures
are in docs/ablation.md.

Every arm starts from the same pretrained base (quantised arms learn little over a
random one): ``--init_from DIR`` (an HF directory or Hub name), else the config's
``init_from``, else a *base stage* first trains the config's model in fp32 for
``--base_steps`` steps in ``OUT/base`` and exports it to ``OUT/base/hf``. Each arm then
fine-tunes it for ``--steps`` steps with ``log_every=1`` (every step timed), evaluates
once at the end on the config's held-out split, and is measured:

* planned peak memory: ``jaxfit.plan.core.plan_config`` (XLA's buffer assignment of the
  arm's real train step, compiled for abstract shapes);
* measured peak memory: the device's ``peak_bytes_in_use`` where the backend reports it
  (GPU/TPU), else the arm process's peak RSS (CPU; includes the Python/JAX runtime);
  ``measured_source`` says which;
* step time (median over steps 2..N), throughput (batch / step time; tokens/s for LMs),
  compile time (time to the first step), final train loss (mean of the last 10% of
  steps), validation loss + perplexity (LM) or recall@K (CLIP), with 95% bootstrap
  intervals over the evaluation examples and paired differences to the reference arm;
* what trained: the trainable parameter count (``jaxfit.plan``'s), the base format and
  the compute dtype;
* the base's quantisation error: relative Frobenius error of the stored frozen kernels
  against the float32 ones (``jaxfit.quant.error_report``; bfloat16 rounding for
  ``lora-bf16``; 0 for a float32 base and full fine-tuning);
* with a base stage, every arm's paired differences to the base it started from (the
  base stage's final evaluation, the same examples): of the arm's final evaluation (what
  the adapters learned) and of its starting point, evaluated before training in
  ``OUT/runs/<arm>/start`` (what storing the base costs before the adapters learn).

Arms run one after another, each in a fresh process (``--worker ARM``) writing to
``OUT/runs/<arm>`` (its log: ``worker.log``): a crash or OOM is recorded (``status``,
``error``) and the other arms still run. An arm is finished when
``OUT/runs/<arm>/result.json`` exists; rerunning with the same ``--out`` skips finished
arms and re-runs unfinished or failed ones from scratch.

Outputs in ``OUT``: ``results.csv`` (one row per arm), ``results.md`` (a summary per
arm: what trained, the base's quantisation error, the headline metric with its interval
and its paired differences to the base and to ``lora-bf16`` (else the first successful
arm); then every measurement as a table with relative differences), ``bootstrap.csv``,
``loss.png``, ``memory.png``, ``throughput.png``, ``metrics_ci.png``, and ``tb/<arm>``
(TensorBoard: ``tensorboard --logdir OUT/tb`` overlays the arms; HParams tab included).
Config overrides ``--config.key=value`` apply to the base stage and every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import results, tensorboard_runs  # noqa: E402
from experiments.bench import common  # noqa: E402
from jaxfit import config as config_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: what trains, and how the frozen base is stored.

    Attributes:
      method: ``"lora"`` (adapters over a float or int8 base), ``"qlora"`` (adapters over
        an NF4 base, Dettmers et al. 2023) or ``"full"`` (every weight trains).
      precision: the config's ``precision`` shorthand (:data:`jaxfit.config.PRECISIONS`):
        compute dtype and base format.
      adam8: Adam's moments in 8 bits (``optim.name=adamw8bit``).
    """

    name: str
    method: str
    precision: str
    adam8: bool = False

    @property
    def lora(self) -> bool:
        return self.method != "full"

    def overrides(self, has_lora: bool = True) -> list[str]:
        """The arm's config overrides (``lora.enabled`` only where the config has a
        ``lora`` section)."""
        out = [f"precision={self.precision}"]
        out += [f"lora.enabled={self.lora}"] if has_lora or self.lora else []
        return out + (["optim.name=adamw8bit"] if self.adam8 else [])


# name -> (method, precision). LoRA arms share targets, rank, alpha, init, data, seed and
# learning rate; only the frozen base's storage (and with it the compute dtype: float32
# for lora-fp32, bfloat16 for the others) changes between them.
ARMS = {
    "lora-fp32": ("lora", "fp32"),
    "lora-bf16": ("lora", "bf16"),
    "lora-int8": ("lora", "int8"),
    "qlora-nf4": ("qlora", "nf4"),
    "full-fp32": ("full", "fp32"),
    "full-bf16": ("full", "bf16"),
}
DEFAULT_ARMS = "lora-fp32,lora-bf16,lora-int8,qlora-nf4,qlora-nf4+adam8"
REFERENCE_ARM = "lora-bf16"  # the same compute dtype as the quantised arms: a float base
_RENAMED = {"fp32": "lora-fp32 or full-fp32", "bf16": "lora-bf16 or full-bf16",
            "int8": "lora-int8", "nf4": "qlora-nf4"}  # fmt: skip


def parse_arm(name: str) -> Arm:
    """The :class:`Arm` of a name ``NAME[+adam8]``, ``NAME`` a key of :data:`ARMS`.

    Raises:
      ValueError: an unknown arm name (an old name, ``nf4``, says what replaced it).
    """
    base, plus, extra = name.partition("+")
    if base not in ARMS or (plus and extra != "adam8"):
        hint = f" (renamed: {base} -> {_RENAMED[base]})" if base in _RENAMED else ""
        raise ValueError(f"unknown arm {name!r}{hint}: expected NAME[+adam8], NAME in {list(ARMS)}")
    return Arm(name, *ARMS[base], adam8=bool(plus))


def arm_overrides(arm: str, has_lora: bool = True) -> list[str]:
    """Config overrides of an arm name (:func:`parse_arm`).

    Raises:
      ValueError: an unknown arm name.
    """
    return parse_arm(arm).overrides(has_lora)


def check_arm(arm: Arm, config) -> None:
    """Refuse an arm whose overrides (``--arm_override``, ``--config.``) changed what it
    trains or its base format: its label would no longer say what ran.

    Raises:
      ValueError: naming the arm, what it should be and what the config makes of it.
    """
    p = config_lib.precision_settings(config)
    want_compute, want_base = config_lib.PRECISIONS[arm.precision]
    if (p.lora, p.base_format, p.compute_dtype) != (arm.lora, want_base, want_compute):
        raise ValueError(
            f"arm {arm.name!r} is lora={arm.lora}, base_format={want_base!r}, "
            f"compute_dtype={want_compute!r}, but its config makes it lora={p.lora}, "
            f"base_format={p.base_format!r}, compute_dtype={p.compute_dtype!r}: do not "
            "override precision, compute_dtype, base_format or lora.enabled per arm"
        )


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(
        prog="experiments/ablate_precision.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.add_argument("--config", required=True, help="config file[:arg]")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=0, help="steps per arm (0: config's)")
    ap.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help=f"comma-separated arms NAME[+adam8], NAME in {', '.join(ARMS)} (table above)",
    )
    ap.add_argument("--init_from", default="", help="pretrained base (HF dir or Hub name)")
    ap.add_argument("--base_steps", type=int, default=0, help="base stage steps (0: config's)")
    ap.add_argument("--arm_override", action="append", default=[], metavar="ARM:KEY=VALUE")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--config.") and "=" in a)]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.key=value)")
    return args, [a.removeprefix("--config.") for a in rest]


def _rhythm(config, steps: int, *, every_step: bool) -> list[str]:
    """Run length overrides; a warmup as long as the run is shortened to a tenth of it."""
    out = [f"total_steps={steps}"]
    if every_step:
        out += ["log_every=1", f"eval_every={steps}", f"ckpt_every={steps}"]
    if config.optim.warmup_steps >= steps:
        out.append(f"optim.warmup_steps={steps // 10}")
    return out


def _shared_data(config, out: Path) -> list[str]:
    """Synthetic demo data written once into ``OUT/data`` for every stage (same data)."""
    data = config.get("data")
    if data is None or not data.get("synthetic") or not data.synthetic.enabled:
        return []
    if "root" in data and not data.root:
        return [f"data.root={(out / 'data' / 'synthetic_coco').resolve()}"]
    if "path" in data and not data.path:
        return [f"data.path={(out / 'data' / 'synthetic_text.txt').resolve()}"]
    return []


def stage_overrides(args, config, stage: str, init_from: str) -> list[str]:
    """Overrides of the base stage (``stage == "base"``) or an arm, after the user's."""
    out = Path(args.out)
    if stage == "base":
        extra = ["precision=fp32", "optim.name=adamw"]
        extra += ["lora.enabled=False"] if "lora" in config else []
        steps = args.base_steps or config.total_steps
        return _rhythm(config, steps, every_step=False) + extra + _shared_data(config, out)
    steps = args.steps or config.total_steps
    mine = [o.partition(":")[2] for o in args.arm_override if o.partition(":")[0] == stage]
    return (
        _rhythm(config, steps, every_step=True)
        + [f"init_from={init_from}"]
        + arm_overrides(stage, has_lora="lora" in config)
        + _shared_data(config, out)
        + mine
    )


def worker(args, overrides: list[str]) -> int:
    """One stage in this (fresh) process; writes result.json / error.json or base/done.json."""
    peak = common.PeakRSS()  # first: before the heavy imports
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    stage, out = args.worker, Path(args.out)
    workdir = out / "base" if stage == "base" else out / "runs" / stage
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        import jax

        from jaxfit import trainer

        init_from = args.init_from  # the driver always passes it
        user = config_lib.load_config(args.config, overrides)
        overrides = overrides + stage_overrides(args, user, stage, init_from)
        config = config_lib.load_config(args.config, overrides)
        if stage != "base":
            check_arm(parse_arm(stage), config)
        if stage == "base":
            from jaxfit.export import export

            _train(trainer, config, workdir, out)
            export(str(workdir), str(workdir / "hf"))
            results.write_json(workdir / "done.json", {"overrides": overrides})
            return 0
        t0 = time.perf_counter()
        _train(trainer, config, workdir, out)
        res = {"status": "ok", "arm": stage, "init_from": init_from, "overrides": overrides}
        res["train_wall_s"] = time.perf_counter() - t0
        res["load_average_1m"] = common.load_average()[0]  # contention during the timing
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            res["measured_peak_bytes"] = int(stats["peak_bytes_in_use"])
            res["measured_source"] = "device peak_bytes_in_use"
        else:
            res["measured_peak_bytes"] = 1024 * peak.peak_kib()
            res["measured_source"] = "process peak RSS"
        from jaxfit.run import build_run

        run = build_run(config, workdir, abstract=False)  # assembled as the trainer does
        res["quant_rel_error"] = base_error(init_from, run.spec.precision)
        start = evaluate_start(trainer, run, workdir)  # after the memory was read
        res.update({f"start/{k}": v for k, v in start.items()})
        from jaxfit.plan.core import plan_config

        plan = plan_config(config_lib.load_config(args.config, overrides))
        res["planned_peak_bytes"] = plan.peak_bytes
        res["trainable_params"] = int(plan.params["trainable"])
        res["plan"] = plan.to_dict()
        results.write_json(workdir / "result.json", res)
        return 0
    except Exception as e:  # recorded for the table; the driver goes on with other arms
        error = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        results.write_json(workdir / "error.json", {**error, "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1


def _write_shared_data(config, out: Path) -> None:
    """The synthetic demo data :func:`_shared_data` points every stage at, written by the
    first stage that needs it (a run writes its synthetic set only into its own workdir,
    and these are outside it)."""
    from jaxfit.data.text import write_synthetic_text
    from jaxfit.tasks import clip as clip_task

    data = config.get("data")
    if data is None or not data.get("synthetic") or not data.synthetic.enabled:
        return
    shared = (out / "data").resolve()
    if data.get("root") and Path(data.root).resolve().is_relative_to(shared):
        clip_task.ensure_synthetic_data(config)
    elif data.get("path") and Path(data.path).resolve().is_relative_to(shared):
        if not Path(data.path).is_file():
            syn = data.synthetic
            write_synthetic_text(data.path, num_documents=syn.num_documents, seed=syn.seed)


def _train(trainer, config, workdir: Path, out: Path) -> None:
    """``trainer.train``; raises when the run stopped early (SIGINT / SIGTERM)."""
    _write_shared_data(config, out)
    trainer.train(config, workdir)
    done = max((r["step"] for r in results.read_metrics(workdir)), default=0)
    if done < config.total_steps:
        raise RuntimeError(f"training stopped at step {done} of {config.total_steps}")


def evaluate_start(trainer, run, workdir: Path) -> dict[str, float]:
    """The arm's starting point evaluated on the validation split: its stored base (int8 /
    NF4 / bf16 / float32) with the adapters as initialised (``B = 0``: the base's
    function), per-example results in ``workdir/start/eval/step_0.npz``. Against the base
    stage's evaluation this is what storing the base costs before any training. ``run``:
    the arm's ``jaxfit.run.Run`` (not abstract)."""
    from jaxfit.tasks.base import param_rng

    params = run.task.initial_params(param_rng(run.config), None)
    return trainer.run_evaluation(run.task, params, workdir / "start", 0, require_finite=True)


def base_error(init_from: str, p: config_lib.Precision) -> float:
    """Relative Frobenius error ``||W - S(W)||_F / ||W||_F`` of the frozen base as the arm
    stores it (``S``: quantisation to the arm's ``base_format``, or rounding to bfloat16
    for a bf16 LoRA base), over the kernels the quantisers select
    (:data:`jaxfit.hf.families.DEFAULT_QUANT_RULES`; ``jaxfit.quant.error_report``); 0
    for a float32 base and for full fine-tuning (float32 master weights). The base is
    read again from ``init_from`` (float32). ``p``: the arm's resolved precision (its
    ``jaxfit.tasks.RunSpec``'s)."""
    import jax.numpy as jnp

    from jaxfit import hf, quant

    stored = jnp.dtype(p.base_dtype)
    if not p.lora or (not p.quantised and stored == jnp.float32):
        return 0.0
    _, params = hf.load_pretrained(init_from, dtype=jnp.float32)
    rules = hf.families.DEFAULT_QUANT_RULES
    if p.quantised:
        qparams = quant.quantize_params(params, rules, p.base_format, float_dtype=jnp.float32)
        return float(quant.error_report(params, qparams)["summary"]["rel_frobenius"])
    return rounding_error(params, stored, rules)


def rounding_error(params, dtype, rules) -> float:
    """``||W - round(W)||_F / ||W||_F`` over the kernels ``rules`` select
    (:func:`jaxfit.params.select`; the tensors of the quantised arms' errors), ``round``
    a cast of the float32 values to ``dtype`` and back."""
    import numpy as np

    from jaxfit import params as params_lib

    flat = params_lib.flatten(params)
    sq_err = sq_ref = 0.0
    for path in params_lib.select(flat, rules):
        w = np.asarray(flat[path], np.float32)
        err = w.astype(np.float64) - np.asarray(w.astype(dtype), np.float64)
        sq_err += float(np.sum(err**2))
        sq_ref += float(np.sum(w.astype(np.float64) ** 2))
    return (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0


def launch(argv: list[str], stage: str, log: Path) -> int:
    """Run ``stage`` in a fresh process (this script with ``--worker``); output to ``log``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", stage]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " / ".join(text[-lines:])


def run_arm(argv: list[str], out: Path, arm: str) -> str:
    """Run one arm unless finished; returns what happened (for the console)."""
    workdir = out / "runs" / arm
    if (workdir / "result.json").is_file():
        return "finished earlier, skipped"
    shutil.rmtree(workdir, ignore_errors=True)  # unfinished or failed: start over
    t0 = time.perf_counter()
    rc = launch(argv, arm, workdir / "worker.log")
    took = f"{time.perf_counter() - t0:.0f} s"
    if rc == 0 and (workdir / "result.json").is_file():
        return f"ok ({took})"
    if not (workdir / "error.json").is_file():  # killed (OOM, signal) before recording
        status = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        results.write_json(
            workdir / "error.json",
            {"status": "failed", "error": f"{status}: {_tail(workdir / 'worker.log')}"},
        )
    return f"FAILED ({took}): {results.read_json(workdir / 'error.json')['error'][:300]}"


def _base_note(out: Path, init_from: str) -> str:
    """The base stage's length and final validation metrics, when it made ``init_from``."""
    if Path(init_from) != out / "base" / "hf":
        return ""
    row = results.summarize_run(out / "base").row
    evals = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k in results.eval_keys([row]))
    return f" (the base stage: {row['steps']} fp32 steps; {evals})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    if args.worker:
        return worker(args, overrides)
    try:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        for arm in arms + [o.partition(":")[0] for o in args.arm_override]:
            parse_arm(arm)
        config = config_lib.load_config(args.config, overrides)
    except (ValueError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_from = args.init_from or config.get("init_from", "")
    if not init_from:
        if not (out / "base" / "done.json").is_file():
            print(f"[base] training the base model in fp32 ({out / 'base'})", flush=True)
            if launch(argv, "base", out / "base" / "worker.log") != 0:
                print(f"error: base stage failed, see {out / 'base' / 'worker.log'}:")
                print(_tail(out / "base" / "worker.log", 15), file=sys.stderr)
                return 1
        init_from = str(out / "base" / "hf")
    argv += ["--init_from", init_from]
    for arm in arms:
        if not (out / "runs" / arm / "result.json").is_file():
            print(f"[{arm}] running ({out / 'runs' / arm / 'worker.log'})", flush=True)
        print(f"[{arm}] {run_arm(argv, out, arm)}", flush=True)
    runs = [results.summarize_run(out / "runs" / arm, arm) for arm in arms]
    tensorboard_runs.export(out / "tb", runs)
    sources = sorted({r.row["measured_source"] for r in runs if "measured_source" in r.row})
    notes = [
        f"{datetime.date.today()}, {common.machine()}, commit {common.git_commit()}.",
        f"Config `{args.config}` {' '.join(overrides)}; {args.steps or config.total_steps} "
        f"steps per arm, all from `{init_from}`{_base_note(out, init_from)}; measured peak "
        f"memory: {', '.join(sources) or '-'} (a peak RSS includes the Python/JAX runtime).",
    ]
    ok = [r.name for r in runs if r.ok]
    reference = REFERENCE_ARM if REFERENCE_ARM in ok else None  # else the first ok arm
    baseline = None
    if Path(init_from) == out / "base" / "hf":
        baseline = results.summarize_run(out / "base", "base")
    text = results.write_report(
        out,
        runs,
        title=f"Precision ablation: {args.config}",
        notes=notes,
        reference=reference,
        resamples=args.resamples,
        baseline=baseline,
    )
    print(text)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
