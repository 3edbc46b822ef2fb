"""Quantisation error report: ``python -m jaxfit.quantize --model PATH [--method nf4|int8]``.

Loads an HF model (directory or Hub name) in float32, quantises its layer kernels as a
QLoRA / int8 run would (``jaxfit.quant.quantize_params``), and prints per-tensor (per
layer for stacked tensors) relative Frobenius error ``||W - Q(W)||_F / ||W||_F`` and
max-abs error, plus the bits per weight achieved (NF4 with double quantisation:
``4 + 8/64 + 32/(64*256) = 4.127``). ``--json FILE`` writes the full report.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp
import numpy as np

from jaxfit import hf, quant


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxfit.quantize", description=__doc__)
    ap.add_argument("--model", required=True, help="HF model directory or Hub name")
    ap.add_argument("--method", choices=("nf4", "int8"), default="nf4")
    ap.add_argument("--json", default="", help="write the full report to this file")
    args = ap.parse_args(argv)
    try:
        _, params = hf.load_pretrained(args.model, dtype=jnp.float32)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    qparams = quant.quantize_params(params, method=args.method, float_dtype=jnp.float32)
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


if __name__ == "__main__":
    sys.exit(main())
