"""A resume compares the data's content, not only its size (``jaxfit.workdir.check_data``).

Real ``python -m jaxfit.train`` runs on the tiny GPT of ``faultlib``: its synthetic corpus
(``WORKDIR/synthetic_text.txt``, one document per blank-line block) puts the first 285
documents in training and the last 15 in validation. Two documents trading places keep
every count (tokens, documents) the same, which the data position check alone let through.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultlib import checkpoint_steps, copy_run, train

pytestmark = pytest.mark.usefixtures("reference")


def _swap(path: Path, i: int, j: int) -> None:
    """Swap documents ``i`` and ``j`` (blank-line blocks) of ``path``, in place."""
    docs = path.read_text().split("\n\n")
    assert docs[i] != docs[j]
    docs[i], docs[j] = docs[j], docs[i]
    path.write_text("\n\n".join(docs))


def _listing(workdir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(workdir)): p.stat().st_size
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and not p.relative_to(workdir).parts[0].startswith("checkpoints")
    }


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "split, i, j",
    [("train", 0, 1), ("validation", -1, -2)],
    ids=["training-documents-swapped", "validation-documents-swapped"],
)
def test_changed_documents_are_refused_and_nothing_is_written(reference, tmp_path, split, i, j):
    workdir = copy_run(reference, tmp_path / "run")
    corpus = workdir / "synthetic_text.txt"
    _swap(corpus, i, j)
    before = _listing(workdir)
    proc = train(workdir, total_steps=15)
    line = _error_line(proc)
    assert "refusing to resume" in line and "the data changed" in line, line
    for name in ("train", "validation"):  # one file feeds both splits
        assert f"{name} file {corpus.absolute()} (same size" in line, line
    assert "--accept_data_change" in line, line
    assert _listing(workdir) == before  # no token file, no train.log line, no run.lock
    assert checkpoint_steps(workdir)[-1] == 12


@pytest.mark.slow
def test_accepting_a_data_change_resumes_and_records_it(reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run")
    saved = json.loads((workdir / "data_fingerprint.json").read_text())
    assert set(saved) == {"train", "validation"}
    assert set(saved["train"]["files"]) == {"WORKDIR/synthetic_text.txt"}
    _swap(workdir / "synthetic_text.txt", 0, 1)
    proc = train(workdir, "--accept_data_change", total_steps=15)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 12 on changed data" in proc.stderr
    assert checkpoint_steps(workdir)[-1] == 15
    records = [
        json.loads(line)
        for line in (workdir / "config_history" / "changes.jsonl").read_text().splitlines()
    ]
    (data,) = [r for r in records if "data_changes" in r]
    assert data["accepted"] == "--accept_data_change" and data["step"] == 12
    changed = data["data_changes"]
    old, new = changed["train.files.WORKDIR/synthetic_text.txt"]
    assert old["size"] == new["size"] and old["sha256"] != new["sha256"]
    assert set(changed) >= {"train.tokens", "validation.files.WORKDIR/synthetic_text.txt"}
    assert json.loads((workdir / data["previous"]).read_text()) == saved
    now = json.loads((workdir / "data_fingerprint.json").read_text())
    assert now["train"]["files"]["WORKDIR/synthetic_text.txt"] == new
    # accepted once: the next resume on the same data needs no flag
    again = train(workdir, total_steps=18)
    assert again.returncode == 0, again.stderr[-3000:]
