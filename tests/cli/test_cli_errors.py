"""One error style: each mistake a user makes before work starts ends a CLI with exit
status 2 and ONE line ``error: <what>, <where>, <what to do>`` on stderr naming the file or
key, and no traceback (unless ``--verbose`` / ``JAXFIT_DEBUG=1``)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxfit import cli
from jaxfit import config as config_lib
from jaxfit.checkpoint import NoUsableCheckpointError
from jaxfit.errors import DataError, DiskFullError, disk_full_cause
from jaxfit.metrics import NonFiniteError

REPO = Path(__file__).resolve().parents[2]
CLIP = str(REPO / "configs" / "clip_coco.py")
GPT2 = str(REPO / "configs" / "gpt2_scratch.py")
# Real data off: the CLIP demo on a data root of the test's choosing.
CLIP_REAL = [f"--config={CLIP}:demo", "--config.data.synthetic.enabled=False"]


def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jaxfit.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )


def _one_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The single ``error:`` line of a run that ended with status 2, checked."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def test_missing_data_root(tmp_path):
    root = tmp_path / "no_such_coco"
    proc = _run("train", *CLIP_REAL, f"--config.data.root={root}", f"--workdir={tmp_path / 'w'}")
    _one_error(proc, str(root))


def test_missing_annotations(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    proc = _run("train", *CLIP_REAL, f"--config.data.root={root}", f"--workdir={tmp_path / 'w'}")
    _one_error(proc, "captions_train2017.json")


def test_truncated_coco_json_names_the_file_and_line(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    records = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(200)],
        "annotations": [{"image_id": i, "caption": "a red square"} for i in range(200)],
    }
    text = json.dumps(records, indent=1)
    ann = root / "annotations" / "captions_train2017.json"
    ann.write_text(text[: len(text) // 2])
    proc = _run("train", *CLIP_REAL, f"--config.data.root={root}", f"--workdir={tmp_path / 'w'}")
    line = _one_error(proc, f"{ann}:", "JSON")
    assert int(line.split(f"{ann}:")[1].split(":")[0]) > 1  # file:line:column


def test_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    proc = _run("train", f"--config={CLIP}:demo", f"--workdir={workdir}")
    _one_error(proc, str(workdir), "--workdir")


def test_empty_text_file(tmp_path):
    empty = tmp_path / "input.txt"
    empty.write_text("")
    proc = _run(
        "train",
        f"--config={GPT2}:demo",
        "--config.data.synthetic.enabled=False",
        f"--config.data.path={empty}",
        f"--workdir={tmp_path / 'w'}",
    )
    _one_error(proc, str(empty))


def test_typo_in_the_config_argument(tmp_path):
    proc = _run("train", f"--config={CLIP}:dmeo", f"--workdir={tmp_path / 'w'}")
    _one_error(proc, "dmeo", "clip_coco.py", "demo")  # names the known arguments


def test_missing_config_file(tmp_path):
    missing = REPO / "configs" / "clip_cocoo.py"
    proc = _run("train", f"--config={missing}", f"--workdir={tmp_path / 'w'}")
    line = _one_error(proc, "clip_cocoo.py", "clip_coco.py")  # and what exists
    assert "config_config" not in line


def test_unknown_override_key_suggests_the_field(tmp_path):
    proc = _run("train", f"--config={CLIP}:demo", "--config.optim.lrr=1", f"--workdir={tmp_path}")
    _one_error(proc, "optim.lrr", "optim.lr?")


def test_plan_bad_budget():
    _one_error(_run("plan", f"--config={GPT2}:demo", "--budget=12"), "12", "GiB")


def test_evaluate_without_a_checkpoint_says_so(tmp_path):
    config_lib.save_config(config_lib.load_config(f"{CLIP}:demo"), tmp_path)
    proc = _run("evaluate", "--workdir", tmp_path)
    line = _one_error(proc, "no checkpoint", str(tmp_path))
    assert "data" not in line.split(",")[0]  # not blamed on the data root


def test_evaluate_workdir_that_is_a_file(tmp_path):
    run = tmp_path / "run"
    run.write_text("a file")
    _one_error(_run("evaluate", "--workdir", run), "--workdir", f"'{run}' is a file")


def test_argparse_usage_error_is_one_line(tmp_path):
    _one_error(_run("export", "--workdir", tmp_path), "--out", "--help")


@pytest.mark.parametrize("how", ["--verbose", "JAXFIT_DEBUG"])
def test_verbose_adds_the_traceback(tmp_path, how):
    env = None
    args = [f"--config={CLIP}:dmeo", f"--workdir={tmp_path / 'w'}"]
    if how == "--verbose":
        args.append("--verbose")
    else:
        env = {**os.environ, "JAXFIT_DEBUG": "1"}
    proc = _run("train", *args, env=env)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_data_error_message_parts():
    e = DataError("truncated JSON", path="/d/a.json", line=3, column=7, hint="write it again")
    assert str(e) == "truncated JSON, in /d/a.json:3:7, write it again"
    assert isinstance(e, ValueError) and cli.exit_code(e) == 2
    assert cli.describe(e) == str(e)


def test_a_bug_is_not_a_user_error():
    assert cli.exit_code(TypeError("unsupported operand")) is None
    try:
        math.sqrt(-1)  # a ValueError raised outside jaxfit
    except ValueError as e:
        assert cli.exit_code(e) is None


def test_exit_codes_of_checkpoints_results_and_disk(tmp_path):
    """No usable checkpoint: 6; non-finite results: 4; a full disk (Python's ENOSPC or
    tensorstore's text of it, anywhere in the chain): 7, described in one line naming
    the directory and its free space."""
    assert cli.exit_code(NoUsableCheckpointError("none", {3: "x"})) == 6
    assert cli.exit_code(NonFiniteError("nan", step=1, names=["loss"])) == 4
    orbax = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "a/0": Failed to write 512382 bytes to file 4: '
        "No space left on device [os_error_code='28']"
    )
    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))
        except OSError as inner:
            raise RuntimeError("while logging") from inner
    except RuntimeError as outer:
        chained = outer
    assert disk_full_cause(orbax) is orbax and disk_full_cause(chained) is chained.__cause__
    assert disk_full_cause(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None
    e = DiskFullError(tmp_path, chained.__cause__, "the last checkpoint, step 3, is intact")
    assert cli.exit_code(e) == 7
    line = cli.describe(e)
    assert line.startswith(f"the disk holding '{tmp_path}' is full (") and " free of " in line
    assert f"while writing {tmp_path / 'metrics.jsonl'}" in line and line.endswith("intact")


def test_every_error_carries_its_exit_code_and_cli_run_reports_it(capsys):
    """One mechanism: each jaxfit error class carries its status (``exit_code``) and
    ``cli.run`` reports any of them in one ``error:`` line with it, whichever CLI raised
    it (``jaxfit.train`` maps none by hand)."""
    from jaxfit.oom import OutOfMemoryError
    from jaxfit.workdir import ResumeConfigError, WorkdirBusyError

    expected = {
        config_lib.ConfigError("bad key"): 2,
        ResumeConfigError("changed", ["seed"]): 2,
        DataError("missing root", path="/d"): 2,
        OutOfMemoryError("out of device memory during the first step"): 3,
        NonFiniteError("diverged", step=1, names=["loss"]): 4,
        WorkdirBusyError("held by pid 1"): 5,
        NoUsableCheckpointError("none", {3: "x"}): 6,
    }
    for error, code in expected.items():
        assert error.exit_code == code and cli.exit_code(error) == code

        def main(argv, error=error):
            raise error

        assert cli.run(main, [], prog="p", doc=None) == code
        assert capsys.readouterr().err == f"error: {error}\n"  # no type name, one line


def test_a_full_disk_anywhere_is_one_line_with_status_7(tmp_path, capsys):
    """An ``ENOSPC`` raised by any command (a reader writing metrics, an export) is
    reported as a full disk naming the file's directory and its free space, not as a
    traceback."""

    def writes(argv):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model.bin"))

    assert cli.run(writes, [], prog="p", doc=None) == 7
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: the disk holding '{tmp_path / 'out'}' is full (")
    assert f"while writing {tmp_path / 'out' / 'model.bin'}" in line


# --- paths named by flags: missing, a directory, a file, or not writable -------------


def test_workdir_that_is_not_writable():
    """/proc refuses new files even to root (as a read-only mount does)."""
    line = _one_error(_run("train", f"--config={CLIP}:demo", "--workdir=/proc"), "--workdir")
    assert "'/proc' is not writable" in line, line


def test_workdir_that_cannot_be_created():
    proc = _run("train", f"--config={CLIP}:demo", "--workdir=/proc/jaxfit_run")
    line = _one_error(proc, "--workdir", "'/proc/jaxfit_run'")
    assert "does not exist and cannot be created in '/proc'" in line, line


def test_config_that_is_a_directory(tmp_path):
    proc = _run("train", f"--config={REPO / 'configs'}", f"--workdir={tmp_path / 'w'}")
    line = _one_error(proc, "--config", "is a directory", "clip_coco.py")
    assert not (tmp_path / "w").exists(), line


def test_get_config_that_raises_names_the_file_and_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def _steps():\n    return 100 // 0\n\n\ndef get_config(arg=None):\n"
                      "    return _steps()\n")  # fmt: skip
    proc = _run("train", f"--config={config}", f"--workdir={tmp_path / 'w'}")
    _one_error(proc, f"{config}:2", "ZeroDivisionError", "--config")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_evaluate_code_samples_path(tmp_path, kind):
    samples = tmp_path / ("no_such.jsonl" if kind == "missing" else "samples_dir")
    if kind == "directory":
        samples.mkdir()
    proc = _run("evaluate_code", "--samples", samples, "--out", tmp_path / "out")
    line = _one_error(proc, "--samples", str(samples))
    assert ("does not exist" if kind == "missing" else "is a directory") in line, line
    assert not (tmp_path / "out").exists()


def test_evaluate_code_out_not_writable(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n')
    line = _one_error(_run("evaluate_code", "--samples", samples, "--out", "/proc"), "--out")
    assert "'/proc' is not writable" in line, line


# --- image-text data: the demo writes only into the workdir; tables name their file ---


def _flickr_folder(root: Path) -> None:
    """A Flickr8k-style folder (captions.txt + Images/): not the COCO layout."""
    (root / "Images").mkdir(parents=True)
    (root / "captions.txt").write_text("image,caption\n1.jpg,a dog runs\n")


def test_demo_on_a_foreign_root_names_the_layout_and_writes_nothing(tmp_path):
    root, workdir = tmp_path / "flickr", tmp_path / "w"
    _flickr_folder(root)
    before = sorted(p.name for p in root.rglob("*"))
    proc = _run(
        "train", f"--config={CLIP}:demo", f"--config.data.root={root}", f"--workdir={workdir}"
    )
    line = _one_error(proc, str(root), "COCO captions layout", "data.format")
    assert "annotations/captions_{split}.json" in line, line
    assert sorted(p.name for p in root.rglob("*")) == before  # no synthetic images in it
    assert not workdir.exists()


def test_demo_on_a_mistyped_root_stops(tmp_path):
    root, workdir = tmp_path / "cocoo", tmp_path / "w"
    proc = _run(
        "train", f"--config={CLIP}:demo", f"--config.data.root={root}", f"--workdir={workdir}"
    )
    _one_error(proc, str(root), "does not exist", "check data.root")
    assert not root.exists() and not workdir.exists()


def _table_run(tmp_path, name: str, text: str, fmt: str):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / name).write_text(text)
    fields = {"format": fmt, "root": root, "captions_file": name, "image_dir": "images"}
    return root / name, _run(
        "train",
        *CLIP_REAL,
        *(f"--config.data.{k}={v}" for k, v in fields.items()),
        f"--workdir={tmp_path / 'w'}",
    )


def test_csv_with_only_a_header_names_the_file(tmp_path):
    table, proc = _table_run(tmp_path, "captions.csv", "image,caption\n", "csv")
    _one_error(proc, str(table), "no rows")
    assert not (tmp_path / "w").exists()


def test_csv_with_wrong_columns_names_the_file(tmp_path):
    table, proc = _table_run(tmp_path, "captions.csv", "file,text\na.jpg,a cat\n", "csv")
    _one_error(proc, f"{table}:2", "['caption', 'image']", "data.image_column")


def test_jsonl_table_without_usable_rows_names_the_file(tmp_path):
    text = '{"image": "missing.jpg", "caption": "a cat"}\n'
    table, proc = _table_run(tmp_path, "captions.txt", text, "jsonl")  # any suffix
    _one_error(proc, str(table), "no usable image-caption pair", "missing_image")


def test_lm_demo_on_a_mistyped_text_path_stops(tmp_path):
    """The synthetic corpus is written only into the workdir, never to a path the user named."""
    typo, workdir = tmp_path / "inptu.txt", tmp_path / "w"
    proc = _run(
        "train", f"--config={GPT2}:demo", f"--config.data.path={typo}", f"--workdir={workdir}"
    )
    _one_error(proc, str(typo), "does not exist")
    assert not typo.exists() and not workdir.exists()
