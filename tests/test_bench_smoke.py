"""Smoke test of ``experiments/bench/lm_step.py`` at a tiny size (not a timing test).

Runs the real entry point in a subprocess (as a user would; its workers then measure a
clean peak RSS, see ``experiments.bench.procs.PeakRSS``), without ``--record``, and checks
that jaxfit and torch computed the same first-step loss and that every reported number is
finite and positive. Also unit-tests the Markdown row appender and the result rows.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``experiments`` is not installed (plain ``pytest``)
    sys.path.insert(0, str(REPO))
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--seq_len", "16"]
TINY += ["--batch_size", "2", "--steps", "2", "--warmup", "1", "--vocab_size", "1000"]


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_lm_step_tiny(tmp_path):
    out = tmp_path / "result.json"
    env = fast_subprocess_env()
    # Fast XLA compilation of the tiny step: compile speed is not what this test checks.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.lm_step", *TINY, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    res = json.loads(out.read_text())

    assert res["loss_diff"] <= 1e-4, res["loss_diff"]
    assert abs(res["jax"]["first_loss"] - res["torch"]["first_loss"]) <= 1e-4
    assert res["jax"]["n_params"] == res["torch"]["n_params"]
    assert res["jax"]["n_decay"] == res["torch"]["n_decay"]
    assert _positive(res["jax"]["planned_peak_mib"])
    for kind in ("jax", "torch"):
        r = res[kind]
        for key in ("step_median_s", "tokens_per_s", "first_step_s", "peak_mib", "first_loss"):
            assert _positive(r[key]), (kind, key, r[key])
        assert r["peak_mib"] >= r["after_imports_mib"] > 0
    assert _positive(res["jax"]["compile_s"])
    assert all(_positive(v) for v in res["ratio"].values()), res["ratio"]
    # The printed table carries the same numbers.
    assert "jaxfit/torch" in proc.stdout and "OK" in proc.stdout
    assert f"{res['jax']['tokens_per_s']:.1f}" in proc.stdout


def test_append_row(tmp_path):
    from experiments.bench import report

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n")
    report.append_row("a", ("x", "y"), (1, 2), intro="about a", path=md)
    report.append_row("b", ("z",), ("q|r",), path=md)
    report.append_row("a", ("x", "y"), (3, 4), path=md)
    text = md.read_text()
    assert text.index("| 1 | 2 |") < text.index("| 3 | 4 |") < text.index("## b")
    assert "| q/r |" in text and "about a" in text
    with pytest.raises(ValueError, match="other columns"):
        report.append_row("a", ("x", "w"), (5, 6), path=md)


def test_record_rows_markdown_and_jsonl(tmp_path):
    from experiments.bench import report

    md, jsonl = tmp_path / "BENCHMARKS.md", tmp_path / "rows.jsonl"
    md.write_text("# Benchmarks\n")
    rows = [{"x": 1, "y": "a|b"}, {"x": 2, "y": "c", "extra": 3}]
    assert report.record("s", ("x", "y"), rows, intro="about s", path=md, jsonl=jsonl) == 2
    assert "| 1 | a/b |" in md.read_text() and "| 2 | c |" in md.read_text()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == [{"section": "s", **r} for r in rows]
    head = report.row_head("cpu")
    assert set(head) == set(report.HEAD_COLUMNS)
    assert head["versions"].startswith("jax ") and "jaxlib" in head["versions"]
    assert "flax" in head["versions"]
