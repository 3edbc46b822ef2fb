"""One run per workdir (the lock) and resume checks (config comparison, history)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from jaxfit import workdir as workdir_lib
from jaxfit.config import ConfigError
from jaxfit.data import fingerprint as fingerprint_lib

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from jaxfit import workdir
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_run_and_outlives_no_process(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {proc.pid} on host"):
            with workdir_lib.lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # killed without releasing: the kernel dropped the flock; the file still names it
    assert str(proc.pid) in (tmp_path / "run.lock").read_text()
    with caplog.at_level(logging.WARNING, logger="jaxfit.workdir"):
        with workdir_lib.lock(tmp_path):
            info = json.loads((tmp_path / "run.lock").read_text())
            assert info["pid"] == os.getpid()
            with workdir_lib.lock(tmp_path):  # re-entrant in one process
                pass
            assert (tmp_path / "run.lock").read_text()  # still held
    assert "taking over the lock" in caplog.text and str(proc.pid) in caplog.text
    assert (tmp_path / "run.lock").read_text() == ""  # released cleanly


def _config(**changes) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        dict(
            task="lm",
            seed=0,
            total_steps=100,
            batch_size=8,
            optim=dict(lr=1e-3, grad_clip_norm=1.0, name="adamw"),
            model=dict(config=dict(n_embd=64), remat_policy="none"),
            data=dict(path="", num_threads=2),
            eval=dict(batch_size=4),
        )
    )
    for key, value in changes.items():
        node = c
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return c


def test_resume_refuses_shape_and_data_changes_without_writing(tmp_path):
    workdir_lib.record_config(_config(), tmp_path)
    before = (tmp_path / "config.json").read_bytes()
    assert workdir_lib.check_resume(_config(seed=1), tmp_path, step=None) == {}  # nothing saved
    with pytest.raises(workdir_lib.ResumeConfigError) as e:
        workdir_lib.check_resume(
            _config(**{"model.config.n_embd": 128, "seed": 1, "optim.grad_clip_norm": 0.0}),
            tmp_path,
            step=20,
        )
    assert isinstance(e.value, ConfigError)
    assert e.value.keys == ["model.config.n_embd", "optim.grad_clip_norm", "seed"]
    assert "model.config.n_embd: 64 -> 128" in str(e.value) and "step 20" in str(e.value)
    assert (tmp_path / "config.json").read_bytes() == before


def test_allowed_changes_are_recorded_in_history(tmp_path):
    workdir_lib.record_config(_config(), tmp_path)
    new = _config(
        **{"total_steps": 200, "optim.lr": 1e-4, "eval.batch_size": 2, "data.num_threads": 4}
    )
    changes = workdir_lib.check_resume(new, tmp_path, step=20)
    assert set(changes) == {"total_steps", "optim.lr", "eval.batch_size", "data.num_threads"}
    workdir_lib.record_config(new, tmp_path, step=20)
    workdir_lib.record_config(new, tmp_path, step=30)  # unchanged: no new history entry
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 200
    kept = json.loads((tmp_path / "config_history" / "0001.json").read_text())
    assert kept["total_steps"] == 100
    (record,) = (tmp_path / "config_history" / "changes.jsonl").read_text().splitlines()
    record = json.loads(record)
    assert record["step"] == 20 and record["changes"]["total_steps"] == [100, 200]


def test_paths_inside_a_moved_workdir_are_the_same_file(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    workdir_lib.record_config(_config(**{"data.path": str(old / "corpus.txt")}), old)
    new.mkdir()
    (new / "config.json").write_text((old / "config.json").read_text())
    (new / "corpus.txt").write_text("moved with the workdir")
    moved = _config(**{"data.path": str(new / "corpus.txt")})
    assert "data.path" in workdir_lib.check_resume(moved, new, step=3)  # allowed, recorded
    elsewhere = _config(**{"data.path": str(tmp_path / "corpus.txt")})
    with pytest.raises(workdir_lib.ResumeConfigError, match="data.path"):
        workdir_lib.check_resume(elsewhere, new, step=3)


# --- a refused start writes nothing ---------------------------------------------------


def test_a_start_that_fails_is_undone_checkpoints_aside(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "checkpoints" / "3" / "state").write_text("s")
    (workdir / "train.log").write_text("old line\n")
    with pytest.raises(RuntimeError, match="refused"):
        with workdir_lib.lock(workdir):
            with workdir_lib.lock(workdir):  # re-entrant: the outer one undoes
                (workdir / "train.log").open("a").write("new line\n")
                (workdir / "tokenizer").mkdir()
                (workdir / "tokenizer" / "vocab.json").write_text("{}")
                (workdir / "checkpoints" / "6").mkdir()
                (workdir / "checkpoints" / "6" / "state").write_text("s")
                (workdir / "notes.txt").write_text("another program's")  # kept
                raise RuntimeError("refused")
    assert (workdir / "train.log").read_text() == "old line\n"
    assert not (workdir / "tokenizer").exists() and not (workdir / "run.lock").exists()
    assert (workdir / "checkpoints" / "6" / "state").is_file()  # never touched
    assert (workdir / "notes.txt").is_file()  # not a name jaxfit writes
    # a new workdir goes altogether; a committed start keeps what it wrote
    fresh = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with workdir_lib.lock(fresh):
            (fresh / "plan.json").write_text("{}")
            raise RuntimeError("refused")
    assert not fresh.exists()
    with pytest.raises(RuntimeError):
        with workdir_lib.lock(fresh):
            (fresh / "config.json").write_text("{}")
            workdir_lib.commit(fresh)
            raise RuntimeError("diverged")
    assert (fresh / "config.json").is_file() and (fresh / "run.lock").read_text() == ""


# --- data fingerprints ------------------------------------------------------------------


def test_data_fingerprint_refuses_a_change_names_the_file_and_records_acceptance(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    inside, outside = workdir / "synthetic.txt", tmp_path / "val.txt"
    inside.write_text("alpha\n\nbeta\n")
    outside.write_text("gamma\n")

    def fingerprint(with_tokens=True):
        fp = {
            "train": {"files": fingerprint_lib.files_fingerprint([inside])},
            "validation": {"files": fingerprint_lib.files_fingerprint([outside])},
        }
        if with_tokens:
            fp["train"]["tokens"] = {"sha256": fingerprint_lib.sha256_of([inside]), "num_tokens": 4}
        return fp

    saved = fingerprint()
    workdir_lib.record_data(saved, workdir, 0)
    on_disk = json.loads((workdir / workdir_lib.DATA_FILE).read_text())
    assert set(on_disk["train"]["files"]) == {"WORKDIR/synthetic.txt"}  # moves with it
    assert set(on_disk["validation"]["files"]) == {str(outside.resolve())}
    assert workdir_lib.check_data(fingerprint(), workdir, 3) == {}
    assert workdir_lib.check_data({"x": 1}, workdir, None) == {}  # nothing to resume
    inside.write_text("beta\n\nalpha\n")  # same size, other content
    with pytest.raises(workdir_lib.ResumeConfigError) as e:
        workdir_lib.check_data(fingerprint(with_tokens=False), workdir, 3)  # files alone
    text = str(e.value)
    assert f"train file {inside} (same size 12 bytes, sha256 " in text
    assert "validation" not in text and "--accept_data_change" in text
    changes = workdir_lib.check_data(fingerprint(), workdir, 3, accept=True)
    assert set(changes) == {"train.files.WORKDIR/synthetic.txt", "train.tokens"}
    workdir_lib.record_data(fingerprint(), workdir, 3, changes)
    (record,) = [
        json.loads(line)
        for line in (workdir / "config_history" / "changes.jsonl").read_text().splitlines()
    ]
    assert record["accepted"] == "--accept_data_change" and record["step"] == 3
    assert json.loads((workdir / record["previous"]).read_text()) == on_disk
    assert workdir_lib.check_data(fingerprint(), workdir, 3) == {}
    outside.unlink()
    del saved
    with pytest.raises(workdir_lib.ResumeConfigError, match="validation file .* \\(gone\\)"):
        workdir_lib.check_data({"validation": {"files": {}}}, workdir, 3)
