"""What a 12 GB card can generate with: the table of docs/BENCHMARKS.md (see docs/generation.md).

  python experiments/generation_table.py --out /tmp/generation_table.json
  python experiments/generation_table.py --write   # also rewrite docs/generation_records.json

Plans (``jaxfit.plan.generation.plan_generation``, the program ``jaxfit.generate`` runs,
compiled for abstract shapes on this machine's backend) every model x weight format x
context of the table at batch 1 with a bf16 KV cache and prints the markdown rows of
docs/BENCHMARKS.md: weights, KV cache, planned peak, fits an RTX 4070 Ti's usable 10.9
GiB, decode bound. ``--write`` records the rows' planned peaks in
``docs/generation_records.json`` (with the machine and commit), which
``tests/plan/test_generation_records.py`` checks within 2%.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import jax

from jaxfit.plan import apply, estimate, generation

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "generation_records.json"
MODELS = ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b")
QUANTS = ("bf16", "int8", "nf4")
CONTEXTS = (2048, 8192, 32768)
DEVICE = "rtx4070ti"


def rows(models=MODELS, quants=QUANTS, contexts=CONTEXTS, progress=print) -> list[dict]:
    usable = apply.usable_bytes(12 * 2**30)
    out = []
    for model in models:
        for quant in quants:
            for context in contexts:
                p = generation.plan_generation(model, quant=quant, context=context)
                row = generation.to_json(p, DEVICE, usable, 0.4)
                out.append(row)
                progress(_line(row))
    return out


def _line(r: dict) -> str:
    gib = estimate.format_bytes
    return (
        f"| {r['model']} | {r['quant']} | {r['context']:,} | {gib(r['weights_bytes'])} | "
        f"{gib(r['kv_cache_bytes'])} | {gib(r['peak_bytes'])} | "
        f"{'yes' if r['fits'] else 'no'} | {r['decode_tokens_per_s']:,.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--write", action="store_true", help=f"rewrite {RECORDS.name}")
    args = ap.parse_args(argv)
    print("| model | weights | context | weights bytes | KV cache | planned peak | fits "
          "10.9 GiB | decode tokens/s bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    table = rows()
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2))
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        record = {
            "reason": "generation plans of docs/BENCHMARKS.md (experiments/generation_table.py "
            "--write); a change that moves a peak by more than 2% updates this file",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "commit": commit,
            "rows": {
                f"{r['model']}/{r['quant']}/{r['context']}": {
                    "peak_bytes": r["peak_bytes"],
                    "weights_bytes": r["weights_bytes"],
                    "kv_cache_bytes": r["kv_cache_bytes"],
                }
                for r in table
            },
        }
        RECORDS.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {RECORDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
