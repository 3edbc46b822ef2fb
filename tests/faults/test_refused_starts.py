"""A start that is refused writes nothing, and never costs a good checkpoint.

Real ``python -m jaxfit.train`` runs on the tiny GPT of ``faultlib`` (a copy of the shared
12-step reference run, checkpoints at 9 and 12 kept).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faultlib import REPO, TIMEOUT, checkpoint_steps, copy_run, env, train

pytestmark = pytest.mark.usefixtures("reference")


def _listing(workdir: Path) -> dict[str, int]:
    """Every file under ``workdir`` (checkpoints included) with its size."""
    return {
        str(p.relative_to(workdir)): p.stat().st_size
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


def _error_line(proc, code: int = 2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_missing_config_json_and_another_model_is_refused_not_set_aside(reference, tmp_path):
    """Without config.json the config cannot be compared; the checkpoint's shapes can:
    exit 2 "refusing" (it was exit 6 after every checkpoint had been moved aside)."""
    workdir = copy_run(reference, tmp_path / "run")
    (workdir / "config.json").unlink()
    before = _listing(workdir)
    proc = train(workdir, **{"model.config.n_embd": 64, "total_steps": 15})
    line = _error_line(proc)
    assert "refusing to resume" in line and "config.json is missing" in line, line
    assert "h/attn/c_attn/kernel: [1, 32, 96] saved, [1, 64, 192] now" in line, line
    assert "checkpoints are intact" in line, line
    assert _listing(workdir) == before  # nothing moved aside, nothing written
    assert not (workdir / "checkpoints_damaged").exists()
    # the same model resumes from them (config.json is written again)
    again = train(workdir, total_steps=15)
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint_steps(workdir)[-1] == 15 and (workdir / "config.json").is_file()


def test_refused_resume_leaves_the_workdir_as_it_was(reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run")
    before = _listing(workdir)
    assert "run.lock" not in before  # copy_run leaves the lock out
    proc = train(workdir, seed=7)  # another data order
    line = _error_line(proc)
    assert "refusing to resume" in line and "seed: 0 -> 7" in line, line
    assert _listing(workdir) == before  # not a line of train.log, no run.lock


def test_failed_fresh_start_creates_no_workdir(tmp_path):
    """A missing input file: exit 2, and the workdir (and its parents) never appear."""
    workdir = tmp_path / "runs" / "new"
    missing = tmp_path / "no_such.txt"
    proc = train(workdir, **{"data.synthetic.enabled": False, "data.path": missing})
    line = _error_line(proc)
    assert str(missing) in line, line
    assert not workdir.exists()


def test_export_to_an_unwritable_out_names_the_flag(reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxfit.export", "--workdir", str(workdir), "--out", "/proc"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    line = _error_line(proc)
    assert "'/proc' is not writable" in line and "--out" in line, line
