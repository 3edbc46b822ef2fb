"""The command line, report and recorded row of the framework comparisons.

A comparison module (``lm_step``, ``qlora_step``) is a *bench*: it defines ``NAME``,
``SECTION``, ``TITLE``, ``DEFAULTS`` / ``SMALL`` (integer sizes), ``OPTIM`` (optimizer
defaults), ``EXTRA_FIELDS``, ``TORCH_PACKAGES``, ``WORKERS``, ``add_args(parser)``,
``check_spec(spec)``, ``summarize(spec, runs, load_trace)``, ``model_str(spec)`` and
``precision_str(spec)`` (parts of a row's ``config``), ``describe(res)`` (``(torch note,
model note)`` for the line under the title), ``extra_rows(res)``, ``extra_checks(res)``
and ``row_notes(res)``; :func:`main` does the rest, the same way for both.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from experiments.bench import compare, procs, report

COLUMNS = (
    "date", "machine", "backend", "versions", "commit", "config",
    "jax step ms", "torch step ms", "step ratio (paired)", "jax tok/s", "torch tok/s",
    "jax compile s", "jax peak MiB (+imports)", "torch peak MiB (+imports)",
    "peak ratio (increase ratio)", "loss diff", "notes",
)  # fmt: skip
RUN_FIELDS = ("seed", "repeats", "schedule", "threads", "torch_adamw", "plan")


def parse_args(bench, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=bench.__doc__.split("\n\n")[0])
    for name, value in bench.DEFAULTS.items():
        small = bench.SMALL.get(name, value)
        p.add_argument(f"--{name}", type=int, help=f"default {value} (--small: {small})")
    p.add_argument("--small", action="store_true", help="a ~1 minute preset: " + str(bench.SMALL))
    for name, value in bench.OPTIM.items():
        p.add_argument(f"--{name}", type=float, default=value, help=f"default {value:g}")
    p.add_argument("--torch_adamw", choices=("default", "foreach", "fused"), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=report.cpu_count(), help="default: all cores")
    p.add_argument(
        "--schedule",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: the two workers take turns step by step (robust to a changing "
        "machine load); sequential: one framework's steps, then the other's",
    )
    p.add_argument("--repeats", type=int, default=1, help="worker pairs, order alternating")
    p.add_argument(
        "--no_plan",
        dest="plan",
        action="store_false",
        help="skip jaxfit's planned peak (one more compilation)",
    )
    p.add_argument("--record", action="store_true", help="append a row to docs/BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the recorded row's notes")
    p.add_argument("--json", help="also write the full result dict to this file")
    p.add_argument("--jsonl", help="also append the row as a JSON line to this file")
    bench.add_args(p)
    p.add_argument("--worker", choices=tuple(bench.WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_spec(bench, args: argparse.Namespace) -> dict:
    """Resolve the presets; ``ValueError`` on impossible sizes or schedules."""
    spec = {**bench.DEFAULTS, **(bench.SMALL if args.small else {})}
    spec.update({k: getattr(args, k) for k in bench.DEFAULTS if getattr(args, k) is not None})
    for k in (*bench.OPTIM, *RUN_FIELDS, *bench.EXTRA_FIELDS):
        spec[k] = getattr(args, k)
    spec["threads"] = min(spec["threads"], report.cpu_count())
    if spec["steps"] < 1 or spec["warmup"] < 0 or spec["repeats"] < 1 or spec["threads"] < 1:
        raise ValueError("need steps >= 1, warmup >= 0, repeats >= 1, threads >= 1")
    bench.check_spec(spec)
    return spec


def config_str(bench, spec: dict) -> str:
    """A row's ``config``: model, batch x sequence, precision, optimizer and schedule."""
    s = spec
    clip = f"clip {s['grad_clip_norm']:g}" if s["grad_clip_norm"] else "no clip"
    return (
        f"{bench.model_str(s)}, B{s['batch_size']} x S{s['seq_len']}, {bench.precision_str(s)}, "
        f"AdamW lr {s['lr']:g} betas ({s['b1']:g}, {s['b2']:g}) eps {s['eps']:g} "
        f"wd {s['weight_decay']:g} {clip} (torch {s['torch_adamw']}), {s['threads']} threads, "
        f"median of {s['steps'] * s['repeats']} steps after {s['warmup']} warm-up, "
        f"{s['schedule']}"
    )


def run_benchmark(bench, spec: dict) -> dict:
    """The ``init`` worker, then the jax and torch workers (:func:`compare.run_steps`) in
    a temporary ``spec["workdir"]``; returns ``bench.summarize``'s dict."""
    with tempfile.TemporaryDirectory(prefix=f"{bench.NAME}_") as tmp:
        workdir = Path(tmp)
        spec = {**spec, "workdir": tmp}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        procs.log(bench.NAME, "init worker: writing the random-weight checkpoint")
        compare.run_init(bench.NAME, spec_path, workdir)
        runs, load_trace = compare.run_steps(bench.NAME, spec, spec_path, workdir)
    return bench.summarize(spec, runs, load_trace)


def loads_note(res: dict) -> str:
    """The 1-min load average during the steps (min / median / max over steps) and the
    1/5/15-min ones when the first worker started."""
    trace = res["load_trace"]
    first = res["jax"]["load_average"][0][0]  # jax's worker starts first
    return (
        f"1-min load during the steps {min(trace):.1f} / {statistics.median(trace):.1f} / "
        f"{max(trace):.1f} (min / median / max); at the start "
        + "/".join(f"{v:.1f}" for v in first)
    )


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """Rows ``(metric, jaxfit, torch, jaxfit/torch)`` for :func:`report.format_table`."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    f3 = lambda x: f"{x:.3f}"
    ms = lambda r, k: f"{r[k] * 1e3:.1f}"
    last_step = res["spec"]["warmup"] + res["spec"]["steps"] - 1
    planned = jx.get("planned_peak_mib")
    return [
        ("compile (s)", f3(jx["compile_s"]), "-", "-"),
        ("first step (s)", f3(jx["first_step_s"]), f3(pt["first_step_s"]), ""),
        ("step median (ms)", ms(jx, "step_median_s"), ms(pt, "step_median_s"), f3(ratio["step"])),
        ("step ratio, paired", "", "", f3(ratio["step_paired"])),
        (
            "step q1-q3 (ms)",
            f"{ms(jx, 'step_q1_s')}-{ms(jx, 'step_q3_s')}",
            f"{ms(pt, 'step_q1_s')}-{ms(pt, 'step_q3_s')}",
            "",
        ),
        (
            "tokens/s",
            f"{jx['tokens_per_s']:.1f}",
            f"{pt['tokens_per_s']:.1f}",
            f3(ratio["tokens_per_s"]),
        ),
        ("peak memory (MiB)", f"{jx['peak_mib']:.0f}", f"{pt['peak_mib']:.0f}", f3(ratio["peak"])),
        (
            "  after imports (MiB)",
            f"{jx['after_imports_mib']:.0f}",
            f"{pt['after_imports_mib']:.0f}",
            "",
        ),
        (
            "  increase (MiB)",
            f"{jx['increase_mib']:.0f}",
            f"{pt['increase_mib']:.0f}",
            f3(ratio["increase"]),
        ),
        ("planned step peak (MiB)", "-" if planned is None else f"{planned:.0f}", "-", ""),
        (
            "first-step loss",
            f"{jx['first_loss']:.6f}",
            f"{pt['first_loss']:.6f}",
            f"|diff| {res['loss_diff']:.2e}",
        ),
        (
            f"loss after step {last_step}",
            f"{jx['last_loss']:.6f}",
            f"{pt['last_loss']:.6f}",
            f"|diff| {res['loss_diff_last']:.2e}",
        ),
    ]


def format_report(bench, res: dict) -> str:
    """The stdout report: a metric x (jaxfit, torch, jaxfit/torch) table and notes."""
    jx, pt = res["jax"], res["torch"]
    table = report.format_table(
        ("", "jaxfit", "torch", "jaxfit/torch"), report_rows(res) + bench.extra_rows(res)
    )
    checks = [
        (
            f"first-step loss check (|diff| <= {res['loss_tolerance']:g})",
            res["loss_diff"] <= res["loss_tolerance"],
        ),
        *bench.extra_checks(res),
    ]
    torch_note, model_note = bench.describe(res)
    lines = [
        f"{bench.TITLE}: {config_str(bench, res['spec'])}",
        f"backend {jx['backend']} ({jx['device']}); {pt['version']} (attention "
        f"{pt['attention']}, {pt['threads']} threads{torch_note}); tokens/step "
        f"{res['tokens_per_step']}, {model_note}",
        "",
        table,
        "",
        f"memory: jaxfit {jx['memory_measure']}; torch {pt['memory_measure']}; 'after imports' "
        "= in use right after the framework imports, 'increase' = peak - it; planned: "
        "jaxfit.plan's peak of the same step (XLA buffers, no runtime)",
        *(f"{what}: {'OK' if ok else 'MISMATCH'}" for what, ok in checks),
        f"load: {loads_note(res)}",
    ]
    return "\n".join(lines)


def row(bench, res: dict, note: str = "") -> dict:
    """``res`` as a result row of :data:`COLUMNS`."""
    jx, pt, ratio = res["jax"], res["torch"], res["ratio"]
    backend = jx["backend"] if jx["backend"] == "cpu" else f"{jx['backend']} ({jx['device']})"
    head = report.row_head(backend, (*report.JAX_PACKAGES, *bench.TORCH_PACKAGES))
    mem = lambda r: f"{r['peak_mib']:.0f} (+{r['increase_mib']:.0f})"
    notes = f"{loads_note(res)}; {bench.row_notes(res)}"
    cells = [
        config_str(bench, res["spec"]),
        f"{jx['step_median_s'] * 1e3:.0f}",
        f"{pt['step_median_s'] * 1e3:.0f}",
        f"{ratio['step']:.2f} ({ratio['step_paired']:.2f})",
        f"{jx['tokens_per_s']:.0f}",
        f"{pt['tokens_per_s']:.0f}",
        f"{jx['compile_s']:.1f}",
        mem(jx),
        mem(pt),
        f"{ratio['peak']:.2f} ({ratio['increase']:.2f})",
        f"{res['loss_diff']:.1e}",
        f"{notes}; {note}" if note else notes,
    ]
    return {**head, **dict(zip(COLUMNS[len(report.HEAD_COLUMNS) :], cells))}


def main(bench, argv: list[str] | None = None) -> int:
    args = parse_args(bench, argv)
    if args.worker:
        procs.worker_main(bench.WORKERS, args.worker, args.spec, args.out)
        return 0
    res = run_benchmark(bench, make_spec(bench, args))
    print(format_report(bench, res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not res["loss_ok"]:
        return 1
    if args.record or args.jsonl:
        md = report.BENCHMARKS_MD if args.record else None
        jsonl = Path(args.jsonl) if args.jsonl else None
        report.record(bench.SECTION, COLUMNS, [row(bench, res, args.note)], path=md, jsonl=jsonl)
        procs.log(bench.NAME, "recorded in " + " and ".join(str(x) for x in (md, jsonl) if x))
    if not all(math.isfinite(v) and v > 0 for v in res["ratio"].values()):
        return 1
    return 0
