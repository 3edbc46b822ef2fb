"""GPU benchmark suite: the jaxfit training steps that matter on one card, each measured
through the library's own train step. No download; sized to a device call.

Run from the repository root::

    python -m experiments.bench.gpu_suite --record          # 540 s budget: a 10-minute call
    python -m experiments.bench.gpu_suite --quick           # 200 s: a 4-minute call, no search
    python -m experiments.bench.gpu_suite --small           # toy sizes: a CPU smoke test
    python -m experiments.bench.gpu_suite --parts qlora     # matmul + the QLoRA part alone

Parts (``--parts``, comma-separated; ``matmul`` always runs first: it is the denominator
of ``MFU (matmul)`` and measures the device's memory for the cap), one module each:

* ``matmul`` (:mod:`.gpu_matmul`): the bf16 ``jnp.dot`` rate, 8192^3;
* ``gpt2`` (:mod:`.gpu_gpt2`): GPT-2 124M, ``configs/gpt2_scratch.py``, B16 x 1024;
* ``clip`` (:mod:`.gpu_clip`): ``configs/clip_coco.py`` at its batch and at the planner's
  best micro-batch;
* ``decode`` (:mod:`.gpu_decode`): batch-1 NF4 8B decoding against the bandwidth bound;
* ``qlora`` (:mod:`.gpu_qlora`): ``configs/llama3_8b_qlora.py`` with a random NF4 base,
  B1 x 2048 timed, the longest batch-1 sequence at r=16 and r=32.

Every measurement goes config -> task -> ``jaxfit.step.jit_train_step`` (the step
``jaxfit.train`` runs; :mod:`experiments.bench.runner`) and reports the planned peak
(``jaxfit.plan``) next to the measured one. Every worker is a fresh process (an
out-of-memory error or a crash in one is a row with its error; the suite goes on); workers
share a compilation cache. ``--mem_cap 12GiB`` (the default; ``none`` to lift it) sets
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (preallocated) in every worker but matmul's, so a
large card behaves as a 12 GB one. ``--budget_s`` bounds the whole run (default 540, 200
with ``--quick``); the parts run in the order matmul, gpt2, clip, decode, qlora, each
within its own cap, and the QLoRA search takes what is left. ``--record`` appends one row
per measurement to the ``gpu_suite`` section of ``docs/BENCHMARKS.md`` (refused on a CPU
backend and with ``--small``); ``--json`` / ``--jsonl`` write everything / the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: make ``experiments.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.bench import (  # noqa: E402
    gpu_clip,
    gpu_common,
    gpu_decode,
    gpu_gpt2,
    gpu_matmul,
    gpu_qlora,
    procs,
    report,
)  # fmt: skip

PARTS = {
    "matmul": gpu_matmul,
    "gpt2": gpu_gpt2,
    "clip": gpu_clip,
    "decode": gpu_decode,
    "qlora": gpu_qlora,
}
WORKERS = {name: module.worker for name, module in PARTS.items()}
BUDGET_S = {"full": 540.0, "quick": 200.0, "small": 600.0}
SECTION = "gpu_suite: jaxfit training steps on one GPU (matmul, GPT-2, CLIP, 8B QLoRA, decode)"
INTRO = (
    "`python -m experiments.bench.gpu_suite --record`: one row per measurement; the "
    "section above describes the parts and columns."
)


def _log(msg: str) -> None:
    procs.log("gpu_suite", msg)


class Suite:
    """Runs the parts' workers, one fresh process at a time, under one deadline."""

    def __init__(self, args, mode: str, workdir: Path):
        self.args, self.mode, self.workdir = args, mode, workdir
        self.deadline = time.time() + (args.budget_s or BUDGET_S[mode])
        self.cap_env: dict[str, str] = {}
        self.cap_note = "no memory cap"
        self.part, self.part_deadline = "", math.inf

    def remaining(self) -> float:
        return self.deadline - time.time()

    def set_cap(self, device_bytes: float | None, backend: str | None) -> None:
        """The environment of capped workers, from the device memory matmul measured."""
        cap = self.args.mem_cap_bytes
        if not cap:
            self.cap_note = "no memory cap (--mem_cap none)"
        elif backend != "gpu":
            self.cap_note = f"no memory cap ({backend} backend)"
        elif not device_bytes:
            self.cap_note = "NO memory cap: the device memory is unknown (matmul failed)"
        elif cap >= device_bytes:
            self.cap_note = f"no cap needed: the device has {device_bytes / 2**30:.1f} GiB"
        else:
            frac = cap / device_bytes
            self.cap_env = {
                "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.6f}",
                "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
            }
            self.cap_note = (
                f"cap {cap / 2**30:g} GiB: XLA_PYTHON_CLIENT_MEM_FRACTION="
                f"{frac:.4f} of {device_bytes / 2**30:.1f} GiB"
            )

    def run_worker(self, kind, spec, *, env=None, capped=True, timeout=None) -> dict:
        """One worker of the current part; its time limit is the smallest of ``timeout``,
        the part's cap and what is left of the budget."""
        limit = min(timeout or math.inf, self.part_deadline - time.time(), self.remaining())
        if limit < 5:
            return {"ok": False, "error": "not run: time budget spent", "wall_s": 0.0}
        spec = {
            **spec,
            "workdir": str(self.workdir / kind),
            "compilation_cache": str(self.workdir / "xla_cache"),
            "mem_cap_bytes": self.args.mem_cap_bytes or 0,
        }
        if self.args.simulate_oom_seq:
            spec["simulate_oom_seq"] = self.args.simulate_oom_seq
        full_env = {**(self.cap_env if capped else {}), **(env or {})}
        _log(f"{kind}: worker starting ({self.remaining():.0f} s of the budget left)")
        return procs.run_worker(
            "gpu_suite", kind, spec, self.workdir / "procs", env=full_env, timeout=limit
        )

    def run_part(self, name: str) -> dict:
        module = PARTS[name]
        spec = dict(module.SIZES[self.mode])
        if name == "qlora" and self.args.max_seq:
            spec["max_seq"] = self.args.max_seq
        self.part, self.part_deadline = name, time.time() + module.CAP_S[self.mode]
        try:
            res = module.run(self, spec)
        except Exception as e:  # noqa: BLE001 - a part's parent-side failure is a row too
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if not res.get("rows"):
            res["rows"] = [gpu_common.error_row(name, res.get("error", "no result"))]
        return res


def formatted_rows(res: dict, names=None) -> list[dict]:
    """The rows of the parts ``names`` (default all) as :data:`gpu_common.COLUMNS` cells
    (raw numbers under ``raw``); the cap's note is added to every capped part's rows."""
    mm = res["parts"].get("matmul", {})
    backend = mm.get("backend", "?")
    head = report.row_head(backend if backend == "cpu" else f"{backend} ({mm.get('device')})")
    head["versions"] += f" ({mm['platform_version']})" if mm.get("platform_version") else ""
    rows = []
    for name in names or res["parts"]:
        for raw in res["parts"][name]["rows"]:
            if raw["benchmark"] != "matmul" and res.get("cap_note"):
                raw = {**raw, "notes": "; ".join(x for x in (raw["notes"], res["cap_note"]) if x)}
            rows.append(gpu_common.format_row(raw, head, mm.get("tflops"), mm.get("device_label")))
    return rows


def print_rows(rows: list[dict]) -> None:
    cols = gpu_common.COLUMNS[len(report.HEAD_COLUMNS) :]
    print(report.format_table(cols, [[r[c] for c in cols] for r in rows]) + "\n", flush=True)


def run_suite(args, mode: str) -> dict:
    res = {"mode": mode, "parts": {}}
    wanted = ["matmul"] + [p for p in PARTS if p in args.parts and p != "matmul"]
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        suite = Suite(args, mode, Path(tmp))
        for name in wanted:
            _log(f"{name}: starting ({suite.remaining():.0f} s of the budget left)")
            part = res["parts"][name] = suite.run_part(name)
            if name == "matmul":
                suite.set_cap(part.get("device_memory_bytes"), part.get("backend"))
                res["cap_note"] = suite.cap_note
            print_rows(formatted_rows(res, [name]))
            if hasattr(PARTS[name], "details") and (text := PARTS[name].details(part)):
                print(text + "\n", flush=True)
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    size.add_argument("--quick", action="store_true", help="fewer steps, no searches (~4 min)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    p.add_argument(
        "--mem_cap",
        default="12GiB",
        help="device memory cap of the workers (e.g. 12GiB; 'none': no cap)",
    )
    p.add_argument(
        "--budget_s", type=float, help=f"wall-time budget (s; default by size: {BUDGET_S})"
    )
    p.add_argument("--max_seq", type=int, help="qlora: longest sequence to try")
    p.add_argument("--record", action="store_true", help="append rows to docs/BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the recorded rows' notes")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--jsonl", help="also append the rows as JSON lines to this file")
    # Tests: qlora runs longer than this fail as out of memory, before compiling.
    p.add_argument("--simulate_oom_seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if bad := [x for x in args.parts if x not in PARTS]:
        p.error(f"unknown parts {bad}; expected some of {list(PARTS)}")
    if args.mem_cap.lower() in ("", "none", "0"):
        args.mem_cap_bytes = 0
    else:
        from jaxfit.plan.estimate import parse_bytes

        args.mem_cap_bytes = parse_bytes(args.mem_cap)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        procs.worker_main(WORKERS, args.worker, args.spec, args.out)
        return 0
    mode = "small" if args.small else "quick" if args.quick else "full"
    res = run_suite(args, mode)
    rows = formatted_rows(res)
    print_rows(rows)
    res["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    backend = res["parts"]["matmul"].get("backend")
    md = None
    if args.record and (args.small or backend != "gpu"):
        _log(f"not recorded: rows come from full-size runs on a GPU (backend {backend})")
    elif args.record:
        md = report.BENCHMARKS_MD
    if md or args.jsonl:
        for r in rows:
            r["notes"] = "; ".join(x for x in (r["notes"], args.note) if x)
        n = report.record(
            SECTION,
            gpu_common.COLUMNS,
            rows,
            intro=INTRO,
            path=md,
            jsonl=Path(args.jsonl) if args.jsonl else None,
        )
        _log(f"recorded {n} rows")
    return 0 if all(p.get("ok") for p in res["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
