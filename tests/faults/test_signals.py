"""Ctrl-C during a slow step: answered at once, and a second Ctrl-C ends the run within
seconds (exit 130), keeping the last complete checkpoint and releasing the lock. The
step is made slow inside XLA (``slow_step_train``), where Python itself would run no
signal handler until the step ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from faultlib import REPO, TINY, env, kill9, read_state, wait_for

SLOW = 20.0  # seconds each step from the second on spends in XLA


def _start(workdir: Path) -> subprocess.Popen:
    values = {**TINY, "total_steps": 100, "ckpt_every": 1, "eval_every": 100}
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("slow_step_train.py")),
        f"--config={REPO / 'configs' / 'gpt2_scratch.py'}:demo",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in values.items()),
    ]
    workdir.parent.mkdir(parents=True, exist_ok=True)
    err = open(f"{workdir}.err", "w")  # noqa: SIM115 (closed with the process)
    environ = {**env(), "JAXFIT_TEST_SLOW_STEP": str(SLOW)}
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=err, stderr=err)


def test_ctrl_c_in_a_slow_step_is_answered_at_once_and_twice_stops_now(tmp_path):
    workdir = tmp_path / "run"
    err = Path(f"{workdir}.err")
    proc = _start(workdir)
    try:
        # step 1 (fast) is checkpointed and sealed: the run is now in slow step 2
        wait_for(lambda: (workdir / "checkpoints/1/jaxfit_checksums.json").exists(), proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        wait_for(lambda: "received SIGINT" in err.read_text(), proc, timeout=10, poll=0.02)
        answered = time.monotonic() - sent
        assert answered < 2.0, err.read_text()[-2000:]
        assert proc.poll() is None  # still in the step: checkpointing after it
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            kill9(proc)
    text = err.read_text()
    assert code == 130, text[-2000:]
    assert stopped < 10.0
    lines = [line for line in text.splitlines() if "received SIGINT" in line]
    assert "checkpointing after the current step" in lines[0]
    assert "Ctrl-C again to stop now" in lines[0]
    assert "the last complete checkpoint, step 1, is kept" in lines[1]
    assert (workdir / "run.lock").read_text() == ""  # released: no lock in the way
    # step 1 sealed (the finite step after it confirmed it); a later one may be unsealed
    assert (workdir / "checkpoints/1/jaxfit_checksums.json").exists()
    state = read_state(workdir, 1)  # intact: orbax restores it
    assert int(state["/step"]) == 1
