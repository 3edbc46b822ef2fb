"""``configs/qwen2_qlora.py:demo`` as a user runs it: ``python -m jaxfit.train`` in a
subprocess (a tiny random Qwen2, its NF4-quantised initialisation as the frozen base,
LoRA adapters on every linear layer of the stack, a synthetic corpus; CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_qwen2_qlora_demo_lowers_the_loss(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "jaxfit.train",
        "--config", str(REPO / "configs" / "qwen2_qlora.py") + ":demo",
        "--workdir", str(workdir),
        "--config.total_steps=30", "--config.log_every=5",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, env=fast_subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.2, losses
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["family"] == "qwen2" and saved["total_steps"] == 30
