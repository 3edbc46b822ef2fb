"""What a run survives: divergence, kill -9 anywhere, a second run, damaged checkpoints,
a changed config, signals and malformed config values. Each test drives real
``python -m jaxfit.train`` processes (see ``faultlib``)."""

from __future__ import annotations

import json
import random
import signal
import time

import numpy as np
import pytest
from checkpoint_damage import HOW, damage
from faultlib import (
    assert_same_state,
    checkpoint_steps,
    copy_run,
    error_lines,
    kill9,
    losses,
    metric_rows,
    read_state,
    start,
    train,
    wait_for,
)

# --- divergence -----------------------------------------------------------------------


@pytest.mark.slow
def test_nan_keeps_only_finite_checkpoints_and_resumes_with_lower_lr(tmp_path):
    """lr=1e4 diverges within a few steps: the run stops at once (exit 4) naming the step
    and metric, every checkpoint left holds finite values (and the one whose next step was
    NaN is set aside), and rerunning with a sane lr resumes and finishes."""
    workdir = tmp_path / "nan"
    run = train(workdir, **{"optim.lr": 1e4, "total_steps": 40, "ckpt_every": 2})
    assert run.returncode == 4, run.stderr[-3000:]
    (line,) = error_lines(run.stderr)
    assert "training diverged at step" in line and ("loss" in line or "grad_norm" in line)
    bad_step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert bad_step < 40
    assert "results" not in run.stdout
    steps = checkpoint_steps(workdir)
    assert all(s < bad_step for s in steps)
    for step in steps:
        for name, array in read_state(workdir, step).items():
            if np.issubdtype(array.dtype, np.floating):
                assert np.isfinite(array).all(), f"step {step}: {name}"
    if steps:
        assert f"the last good checkpoint is step {steps[-1]}" in line
    else:
        assert "no good checkpoint remains" in line
    again = train(workdir, **{"optim.lr": 1e-3, "total_steps": 40, "ckpt_every": 2})
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint_steps(workdir)[-1] == 40
    assert sorted(losses(workdir)) == list(range(1, 41))  # each step once
    history = (workdir / "config_history" / "changes.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["changes"]["optim.lr"] == [1e4, 1e-3]


# --- kill -9 --------------------------------------------------------------------------


def _in_save(workdir):
    """A checkpoint being written: orbax's temporary directory exists."""
    d = workdir / "checkpoints"
    return d.exists() and any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir())


def _unsealed(workdir):
    """A checkpoint committed but not yet sealed with its checksums."""
    d = workdir / "checkpoints"
    return d.exists() and any(
        p.name.isdigit() and not (p / "jaxfit_checksums.json").exists() for p in d.iterdir()
    )


KILLS = [
    pytest.param("random", 0, id="random-0"),
    pytest.param("random", 1, id="random-1", marks=pytest.mark.slow),
    pytest.param("random", 2, id="random-2", marks=pytest.mark.slow),
    pytest.param("in-save", 0, id="in-save"),
    pytest.param("unsealed", 0, id="unsealed", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize("when,seed", KILLS)
def test_kill9_anywhere_then_rerun_is_bit_identical(tmp_path, reference, when, seed):
    """kill -9 at a random moment, in the middle of a checkpoint write, or between a
    checkpoint's commit and its seal; rerunning gives the reference run's parameters,
    optimizer state and losses bit for bit, each step logged once."""
    workdir = tmp_path / "run"
    proc = start(workdir)
    if when == "random":  # after a random number of steps, at a random moment in a step
        rng = random.Random(seed)
        k = rng.randint(1, 10)
        wait_for(lambda: len(metric_rows(workdir)) >= k, proc)
        time.sleep(rng.uniform(0.0, 0.05))
    elif when == "in-save":
        wait_for(lambda: _in_save(workdir), proc, poll=0.0005)
    else:
        wait_for(lambda: _unsealed(workdir), proc, poll=0.0005)
    assert proc.poll() is None, "the run ended before the kill"
    kill9(proc)
    if when == "in-save":
        assert _in_save(workdir), "the kill came after the checkpoint was committed"
    elif when == "unsealed":
        assert _unsealed(workdir), "the kill came after the checkpoint was sealed"
    done = train(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(workdir) == losses(reference)
    assert_same_state(read_state(workdir, 12), read_state(reference, 12))


# --- one run per workdir, signals -----------------------------------------------------


@pytest.mark.slow
def test_second_run_is_refused_and_sigterm_checkpoints_with_143(tmp_path):
    """A second run on a busy workdir stops at once (exit 5) naming the holder; SIGTERM
    makes the first checkpoint its step and exit 143 with the command to resume (no
    results table); the resume may lengthen or shorten the run (recorded)."""
    workdir = tmp_path / "run"
    first = start(workdir, total_steps=100000, ckpt_every=100000)
    try:
        wait_for(lambda: metric_rows(workdir), first)
        second = train(workdir)
        assert second.returncode == 5, second.stderr[-3000:]
        (line,) = error_lines(second.stderr)
        assert "in use by another run" in line and f"pid {first.pid}" in line
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    finally:
        if first.poll() is None:
            kill9(first)
    err = (tmp_path / "run.err").read_text()
    assert "stopped by SIGTERM at step" in err and "resume with: python -m jaxfit.train" in err
    assert "results" not in (tmp_path / "run.out").read_text()
    stopped = checkpoint_steps(workdir)[-1]
    assert stopped > 0 and (workdir / "run.lock").read_text() == ""  # released
    log = (workdir / "train.log").read_text()
    assert "received SIGTERM" in log
    resumed = train(workdir, total_steps=stopped + 2, ckpt_every=100000)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint at step {stopped}" in resumed.stderr
    assert checkpoint_steps(workdir)[-1] == stopped + 2
    changes = json.loads((workdir / "config_history" / "changes.jsonl").read_text())
    assert changes["changes"]["total_steps"] == [100000, stopped + 2]


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    """SIGINT twice: the second ends the process without waiting, with exit status 130."""
    workdir = tmp_path / "run"
    proc = start(workdir, total_steps=100000, ckpt_every=100000, eval_every=100000)
    try:
        wait_for(lambda: metric_rows(workdir), proc)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert code == 130  # 128 + SIGINT, the lock released (see test_signals)


# --- damaged checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_damaged_latest_checkpoint_falls_back(tmp_path, reference, how):
    """The latest checkpoint damaged (half its data file, one flipped bit, _METADATA gone):
    reported with step and file, set aside, the previous one used; the run ends with the
    reference's parameters."""
    workdir = copy_run(reference, tmp_path / "run")
    name = damage(workdir / "checkpoints" / "12", how)
    done = train(workdir, total_steps=12)
    assert done.returncode == 0, done.stderr[-3000:]
    warning = next(x for x in done.stderr.splitlines() if "checkpoint at step 12" in x)
    assert "unusable" in warning and name in warning
    assert "resuming from checkpoint at step 9" in done.stderr
    assert (workdir / "checkpoints_damaged").is_dir()
    assert_same_state(read_state(workdir, 12), read_state(reference, 12))
    assert losses(workdir) == losses(reference)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, reference):
    workdir = copy_run(reference, tmp_path / "run")
    for step in checkpoint_steps(workdir):
        damage(workdir / "checkpoints" / str(step), "truncate")
    done = train(workdir)
    assert done.returncode == 6, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    assert "no usable checkpoint" in line and "step 3:" in line and "step 12:" in line


# --- config ---------------------------------------------------------------------------


def test_changed_config_is_refused_without_touching_config_json(tmp_path, reference):
    workdir = copy_run(reference, tmp_path / "run")
    before = (workdir / "config.json").read_bytes()
    done = train(workdir, **{"model.config.n_embd": 64, "seed": 1})
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    assert "refusing to resume" in line
    assert "model.config.n_embd: 32 -> 64" in line and "seed: 0 -> 1" in line
    assert (workdir / "config.json").read_bytes() == before
    assert not (workdir / "config_history").exists()


BAD_VALUES = [
    ({"optim.lr": -1e-3}, "optim.lr=-0.001"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps=-1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"seq_len": 64}, "seq_len=64"),  # the model has 32 positions
    ({"model.config.n_head": 3}, "model.config.n_head=3"),
    ({"init_from": "no_such_dir"}, "init_from='no_such_dir'"),
    ({"optimizer.lr": 1e-3}, "unknown config key 'optimizer'"),
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
]


@pytest.mark.slow
def test_malformed_config_values_exit_2_with_one_line(tmp_path):
    """Each bad value: exit 2, one ``error:`` line naming key and value, no traceback, and
    nothing written into the workdir (checked before any data or model work)."""
    procs = []
    for i, (overrides, _) in enumerate(BAD_VALUES):
        procs.append(start(tmp_path / f"w{i}", **overrides))
        if len(procs) % 2 == 0:  # two at a time (two cores)
            procs[-2].wait(timeout=120)
            procs[-1].wait(timeout=120)
    for i, ((_, expected), proc) in enumerate(zip(BAD_VALUES, procs)):
        assert proc.wait(timeout=120) == 2, expected
        err = (tmp_path / f"w{i}.err").read_text()
        assert "Traceback" not in err, err
        (line,) = error_lines(err)
        assert expected in line, line
        assert not (tmp_path / f"w{i}").exists() or not any((tmp_path / f"w{i}").iterdir())
