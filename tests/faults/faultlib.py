"""Helpers of the fault tests: real ``python -m jaxfit.train`` subprocesses on a tiny GPT.

Each run is the ``gpt2_scratch.py:demo`` config shrunk by overrides (one layer of width
32 on a 300-document synthetic corpus, batches of 8 x 32 tokens) so that a run is a few
seconds, most of it start-up. Subprocesses compile with the fast CPU XLA flags and share
the test suite's persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[2]
CONFIG = f"{REPO / 'configs' / 'gpt2_scratch.py'}:demo"
TINY = {
    "data.synthetic.num_documents": 300,
    "data.tokenizer.vocab_size": 300,
    "model.config.n_layer": 1,
    "model.config.n_embd": 32,
    "model.config.n_head": 2,
    "model.config.n_positions": 32,
    "seq_len": 32,
    "batch_size": 8,
    "micro_batch_size": 8,
    "eval.batch_size": 8,
    "eval.max_batches": 2,
    "optim.warmup_steps": 2,
    "total_steps": 12,
    "log_every": 1,
    "eval_every": 12,
    "ckpt_every": 3,
}
TIMEOUT = 240


def env() -> dict[str, str]:
    out = fast_subprocess_env()
    cache = os.environ.get("JAXFIT_TEST_XLA_CACHE", str(Path.home() / ".cache" / "jaxfit-xla"))
    out.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    out.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}"
    return out


def command(workdir: Path, *flags: str, **overrides) -> list[str]:
    values = {**TINY, **overrides}
    return [
        sys.executable,
        "-m",
        "jaxfit.train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in values.items()),
        *flags,
    ]


def train(workdir: Path, *flags: str, **overrides) -> subprocess.CompletedProcess:
    """Run to completion (or failure); stdout and stderr captured as text. ``flags``:
    more command-line flags (``--accept_data_change``)."""
    return subprocess.run(
        command(workdir, *flags, **overrides),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def start(workdir: Path, **overrides) -> subprocess.Popen:
    """Start a run in the background; its output goes to ``WORKDIR.out`` / ``.err``."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    out = open(f"{workdir}.out", "w")  # noqa: SIM115 (closed with the process)
    err = open(f"{workdir}.err", "w")  # noqa: SIM115
    return subprocess.Popen(
        command(workdir, **overrides), cwd=REPO, env=env(), stdout=out, stderr=err
    )


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout=TIMEOUT, poll=0.002):
    """Poll ``predicate()`` until true; fails if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            err = Path(f"{proc.args[4].split('=', 1)[1]}.err")
            tail = err.read_text()[-2000:] if err.exists() else ""
            pytest.fail(f"run exited ({proc.returncode}) before the awaited event:\n{tail}")
        time.sleep(poll)
    pytest.fail("timed out waiting for the run")


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a kill
    return rows


def losses(workdir: Path) -> dict[int, float]:
    """``{step: train/loss}``; fails if a step was logged twice."""
    steps = [r["step"] for r in metric_rows(workdir) if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {sorted(steps)}"
    return {r["step"]: r["train/loss"] for r in metric_rows(workdir) if "train/loss" in r}


def checkpoint_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def read_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The saved train state of ``step`` as ``{path: numpy array}`` (no task needed)."""
    path = workdir / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as ckptr:
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        tree = ckptr.restore(path)
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                visit(f"{prefix}/{k}", v)
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                visit(f"{prefix}/{i}", v)
        elif node is not None:
            flat[prefix] = np.asarray(node)

    visit("", tree)
    return flat


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock"))
    return dst


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a CLI's stderr (the one-line errors of ``jaxfit.cli``)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]
