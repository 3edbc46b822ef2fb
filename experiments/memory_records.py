"""The planned peaks jaxfit publishes, re-planned and held against their recorded values.

``docs/memory_records.json`` holds one entry per headline configuration: the config, its
overrides, the planned peak in bytes (``peak_target`` of ``jaxfit.plan``, the CPU estimate
of the GPU peak when planned on a CPU), where and when it was recorded, and why it is what
it is. ``tests/plan/test_memory_records.py`` (slow, in CI) re-plans every entry and fails
when a peak moves by more than :data:`TOLERANCE` either way: a change that costs memory
is caught, and one that saves memory updates the record (and the docs/BENCHMARKS.md
figures that quote it) with its reason.

  python -m experiments.memory_records            # re-plan, print old vs new
  python -m experiments.memory_records --write    # ... and write the new values

``--write`` keeps each entry's reason: edit it by hand to say why the value moved.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import jax

from jaxfit import config as config_lib
from jaxfit.plan import core

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "memory_records.json"
TOLERANCE = 0.02  # relative change of a planned peak that fails the check


def load(path: Path = RECORDS) -> list[dict]:
    """The entries of the records file (a JSON list of objects)."""
    return json.loads(path.read_text())["records"]


def plan_peak(entry: dict) -> int:
    """``peak_target`` bytes of the entry's config and overrides, planned here."""
    config = config_lib.load_config(str(REPO / entry["config"]), list(entry["overrides"]))
    return int(core.plan_config(config).peak_bytes)


def compare(entry: dict, planned: int) -> tuple[float, bool]:
    """``(relative change, within TOLERANCE)`` of ``planned`` against the record."""
    change = planned / entry["peak_bytes"] - 1.0
    return change, abs(change) <= TOLERANCE


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the new peaks")
    parser.add_argument("--only", default="", help="re-plan only the entry of this name")
    args = parser.parse_args(argv)
    doc = json.loads(RECORDS.read_text())
    failed = 0
    for entry in doc["records"]:
        if args.only and entry["name"] != args.only:
            continue
        planned = plan_peak(entry)
        change, ok = compare(entry, planned)
        failed += not ok
        moved = "" if ok else ", MOVED"
        print(
            f"{entry['name']:<28} recorded {entry['peak_bytes'] / 2**30:6.2f} GiB  "
            f"planned {planned / 2**30:6.2f} GiB  ({change:+.1%}{moved})"
        )
        if args.write:
            entry.update(
                peak_bytes=planned,
                peak_gib=round(planned / 2**30, 2),
                backend=jax.default_backend(),
                commit=_commit(),
                date=datetime.date.today().isoformat(),
            )
    if args.write:
        RECORDS.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
