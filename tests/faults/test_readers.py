"""What reading a run may not do: disturb it while it trains, or trust a damaged or
unsealed checkpoint; and what a full disk leaves behind. Real ``python -m jaxfit.train``,
``jaxfit.evaluate`` and ``jaxfit.export`` processes (see ``faultlib``)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from checkpoint_damage import damage
from faultlib import (
    REPO,
    TIMEOUT,
    checkpoint_steps,
    copy_run,
    env,
    error_lines,
    losses,
    metric_rows,
    start,
    train,
    wait_for,
)

from jaxfit.checkpoint import CHECKSUMS, Checkpointer


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jaxfit.{module}", *map(str, args)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _reader(module: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"jaxfit.{module}", *map(str, args)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _clis(*calls) -> list[subprocess.CompletedProcess]:
    """Run each ``(module, *args)`` CLI at once (two cores: most of each is start-up)."""
    procs = [_reader(module, *args) for module, *args in calls]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _exported(out: Path) -> dict[str, str]:
    """SHA-256 of each weights file an HF export wrote."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix == ".safetensors"
    }


def _verified(workdir: Path, step: int) -> bool:
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return ckpt.is_sealed(step) and ckpt.verify(step) is None


def _tree(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*")}


# --- readers beside a run being trained ---------------------------------------------------


@pytest.mark.parametrize(
    "trial", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_evaluate_and_export_beside_a_training_run(tmp_path, trial):
    """evaluate and export, side by side, read a run that checkpoints every 2 steps and
    keeps only the newest one (retention deletes as fast as it can): the run finishes
    (exit 0) with every step logged once and its last checkpoint sealed; every reader
    succeeds on a sealed step and writes nothing into checkpoints/ (no temporary
    directory of a save in flight is cleaned up under the run, the cause of orbax's
    ``NOT_FOUND ... .orbax-checkpoint-tmp`` that killed it)."""
    workdir = tmp_path / "run"
    total = 300
    run = start(
        workdir, total_steps=total, ckpt_every=2, keep_checkpoints=1, log_every=50,
        eval_every=100000,
    )  # fmt: skip
    try:
        wait_for(lambda: checkpoint_steps(workdir), run)
        rounds = []
        while run.poll() is None and len(rounds) < 3:
            out = tmp_path / f"hf{len(rounds)}"
            readers = [_reader("evaluate", "--workdir", workdir), _reader(
                "export", "--workdir", workdir, "--out", out
            )]  # fmt: skip
            results = [(*r.communicate(timeout=TIMEOUT), r.returncode) for r in readers]
            results = [(code, out, err) for out, err, code in results]
            rounds.append((out, results))
        code = run.wait(timeout=TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
    err = (tmp_path / "run.err").read_text()
    assert code == 0, err[-3000:]
    assert "orbax-checkpoint-tmp" not in err and "Traceback" not in err
    assert sorted(losses(workdir)) == list(range(50, total + 1, 50))  # each logged step once
    assert checkpoint_steps(workdir)[-1] == total and _verified(workdir, total)
    assert rounds, "the run ended before its first checkpoint could be read"
    for out, ((ev_code, ev_out, ev_err), (ex_code, _, ex_err)) in rounds:
        assert ev_code == 0, ev_err[-3000:]
        assert ex_code == 0, ex_err[-3000:]
        printed = json.loads(ev_out)
        assert printed["step"] % 2 == 0 and 2 <= printed["step"] <= total
        assert math.isfinite(printed["eval/loss"]) and printed["eval/loss"] > 0
        assert _exported(out), f"no weights in {out}"
    # the readers' rows (the run's own evaluation at its last step has perf/eval_time_s)
    evaluated = [
        r for r in metric_rows(workdir) if "eval/loss" in r and "perf/eval_time_s" not in r
    ]
    assert sorted(r["step"] for r in evaluated) == sorted(
        json.loads(ev_out)["step"] for _, ((_, ev_out, _), _) in rounds
    )
    assert all(math.isfinite(r["eval/loss"]) for r in evaluated)


# --- damaged and unsealed checkpoints under the readers ----------------------------------


@pytest.mark.slow
def test_readers_skip_a_damaged_latest_and_write_nothing_non_finite(tmp_path, reference):
    """The latest checkpoint (12) with one flipped bit: evaluate and export warn, naming
    step and file, and use step 9: evaluate's numbers are those of ``--step 9`` on the
    intact run, export's weights are byte for byte those of step 9; eval/step_12.npz
    and metrics.jsonl's good rows stay, checkpoints/ is untouched. Asked for step 12,
    and with every checkpoint damaged, they exit 6 with one error line."""
    intact = copy_run(reference, tmp_path / "intact")
    workdir = copy_run(reference, tmp_path / "run")
    name = damage(workdir / "checkpoints" / "12", "flip")
    ckpt_before = _tree(workdir / "checkpoints")
    npz = (workdir / "eval" / "step_12.npz").read_bytes()
    rows_before = (workdir / "metrics.jsonl").read_text()

    ev, want, ex, good, newest = _clis(
        ("evaluate", "--workdir", workdir),
        ("evaluate", "--workdir", intact, "--step", 9),
        ("export", "--workdir", workdir, "--out", tmp_path / "hf"),
        ("export", "--workdir", intact, "--out", tmp_path / "hf9", "--step", 9),
        ("export", "--workdir", intact, "--out", tmp_path / "hf12"),
    )
    for done in (ev, want, ex, good, newest):
        assert done.returncode == 0, done.stderr[-3000:]
    warning = next(x for x in ev.stderr.splitlines() if "checkpoint at step 12" in x)
    assert "unusable" in warning and name in warning
    printed = json.loads(ev.stdout)
    assert printed["step"] == 9 and printed == json.loads(want.stdout)
    assert (workdir / "eval" / "step_12.npz").read_bytes() == npz
    rows = (workdir / "metrics.jsonl").read_text()
    assert rows.startswith(rows_before)
    (added,) = rows[len(rows_before) :].splitlines()
    assert json.loads(added)["step"] == 9 and math.isfinite(json.loads(added)["eval/loss"])
    assert any("checkpoint at step 12" in x and name in x for x in ex.stderr.splitlines())
    assert _exported(tmp_path / "hf") == _exported(tmp_path / "hf9")
    assert _exported(tmp_path / "hf12") != _exported(tmp_path / "hf9")  # the fallback shows
    assert _tree(workdir / "checkpoints") == ckpt_before
    assert not (workdir / "checkpoints_damaged").exists()

    asked = _clis(
        ("evaluate", "--workdir", workdir, "--step", 12),
        ("export", "--workdir", workdir, "--step", 12, "--out", tmp_path / "x"),
    )
    for done in asked:
        assert done.returncode == 6, done.stderr[-3000:]
        (line,) = error_lines(done.stderr)
        assert "step 12" in line and name in line
    for step in checkpoint_steps(workdir):
        damage(workdir / "checkpoints" / str(step), "truncate")
    none = _clis(
        ("evaluate", "--workdir", workdir),
        ("export", "--workdir", workdir, "--out", tmp_path / "y"),
    )
    for done in none:
        assert done.returncode == 6, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        (line,) = error_lines(done.stderr)
        assert "no usable checkpoint" in line and "step 3:" in line and "step 12:" in line
    assert (workdir / "metrics.jsonl").read_text() == rows
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_unsealed_latest_is_skipped_by_readers_and_sealed_by_the_next_start(tmp_path, reference):
    """Checkpoint 12 without its seal (killed between commit and seal): the readers use
    the sealed step 9 and say why; the next training start checks 12 (orbax's metadata,
    a restore, finite values), seals it and has nothing left to train; then the readers
    use 12. An unsealed checkpoint whose orbax metadata records no commit is damaged:
    set aside by training, which retrains from 9 to the same parameters."""
    workdir = copy_run(reference, tmp_path / "run")
    os.remove(workdir / "checkpoints" / "12" / CHECKSUMS)
    ev = _cli("evaluate", "--workdir", workdir)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["step"] == 9
    assert "[12]" in ev.stderr and "not sealed yet" in ev.stderr
    assert not (workdir / "checkpoints" / "12" / CHECKSUMS).exists()

    again = train(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "had no seal" in again.stderr and "sealed now" in again.stderr
    assert _verified(workdir, 12)
    ev = _cli("evaluate", "--workdir", workdir)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["step"] == 12 and "not sealed" not in ev.stderr

    os.remove(workdir / "checkpoints" / "12" / CHECKSUMS)
    meta = workdir / "checkpoints" / "12" / "_CHECKPOINT_METADATA"
    meta.write_text(meta.read_text().replace('"commit_timestamp_nsecs"', '"uncommitted"'))
    ex = _cli("export", "--workdir", workdir, "--out", tmp_path / "hf", "--step", 12)
    assert ex.returncode == 6, ex.stderr[-3000:]
    (line,) = error_lines(ex.stderr)
    assert "records no commit" in line
    retrained = train(workdir)
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert "resuming from checkpoint at step 9" in retrained.stderr
    assert (workdir / "checkpoints_damaged").is_dir() and _verified(workdir, 12)
    assert losses(workdir) == losses(reference)


# --- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs at ``tmp_path/disk`` (needs root and mount(2); skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", f"jaxfit-{uuid.uuid4().hex[:8]}", mnt],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until the disk is full."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    for size in (1 << 16, 1 << 12, 1):  # the last partial blocks too
        with open(path, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    """The disk fills up after a checkpoint was sealed: the run stops with exit 7 and one
    ``error:`` line naming the workdir, the free space and the last checkpoint, which
    stays intact and sealed; the half-written save is removed (its space given back, no
    orbax traceback). Once space is freed, the same command resumes from it and
    finishes."""
    workdir = small_disk / "run"
    overrides = {"total_steps": 100000, "ckpt_every": 3, "log_every": 100000, "eval_every": 100000}
    run = start(workdir, **overrides)
    try:
        wait_for(lambda: any(_sealed(workdir)), run)
        _fill(small_disk / "ballast")
        code = run.wait(timeout=TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
    err = Path(f"{workdir}.err").read_text()
    assert code == 7, err[-3000:]
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err[-3000:]
    (line,) = error_lines(err)
    assert f"the disk holding '{workdir}' is full" in line and " free of " in line
    last = int(line.split("the last checkpoint, step ")[1].split()[0])
    assert last % 3 == 0 and _verified(workdir, last)
    assert max(checkpoint_steps(workdir)) in (last, last + 3)  # + one left unsealed at most
    assert not [p for p in (workdir / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in p.name]

    (small_disk / "ballast").unlink()
    again = train(workdir, total_steps=last + 3, ckpt_every=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint at step {last}" in again.stderr or (
        f"resuming from checkpoint at step {last + 3}" in again.stderr
    )
    assert _verified(workdir, last + 3)


def _sealed(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return [s for s in checkpoint_steps(workdir) if (d / str(s) / CHECKSUMS).exists()]
