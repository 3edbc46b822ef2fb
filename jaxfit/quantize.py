"""Quantisation error report: ``python -m jaxfit.quantize --model PATH [--method FORMAT]``.

Loads an HF model (directory or Hub name) in float32, quantises its layer kernels as a
QLoRA / int8 run would (``jaxfit.quant.quantize_params`` with the family's rules,
``jaxfit.hf.families.DEFAULT_QUANT_RULES``; --method is any registered format), and
prints per-tensor (per layer for stacked tensors) relative Frobenius error
``||W - Q(W)||_F / ||W||_F`` and max-abs error, plus the bits per weight achieved (NF4
with double quantisation: ``4 + 8/64 + 32/(64*256) = 4.127``). ``--json FILE`` writes
the full report.

examples:
  python -m jaxfit.quantize --model gpt2 --method nf4
  python -m jaxfit.quantize --model DIR --method int8 --json int8_report.json
"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np

from jaxfit import cli, hf, quant

PROG = "python -m jaxfit.quantize"


def parser() -> cli.ArgumentParser:
    """The command line's flags (``--help`` lists them)."""
    ap = cli.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--model", required=True, help="HF model directory or Hub name")
    ap.add_argument("--method", choices=quant.names(), default="nf4", help="format (nf4)")
    ap.add_argument("--json", default="", help="write the full report to this file")
    return ap


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    _, params = hf.load_pretrained(args.model, dtype=jnp.float32)
    rules = hf.families.DEFAULT_QUANT_RULES
    qparams = quant.quantize_params(params, rules, args.method, float_dtype=jnp.float32)
    report = quant.error_report(params, qparams)
    print(f"{'tensor':60s} {'rel_frobenius':>14s} {'max_abs':>10s}")
    for path, r in report["tensors"].items():
        rel = np.max(r["rel_frobenius"])
        mx = np.max(r["max_abs"])
        print(f"{path:60s} {rel:14.4f} {mx:10.4g}")
    s = report["summary"]
    print(
        f"all quantised weights: rel_frobenius {s['rel_frobenius']:.4f}, worst "
        f"{s['max_rel_frobenius']:.4f}, max_abs {s['max_abs']:.4g}, "
        f"{s['bits_per_weight']:.3f} bits/weight"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=lambda x: np.asarray(x).tolist())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
