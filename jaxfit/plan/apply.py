"""Hand the planner's choice to a training run, and advise after an out-of-memory error.

``python -m jaxfit.plan ... --search --apply WORKDIR`` writes ``WORKDIR/plan.json``; a
following ``python -m jaxfit.train --workdir WORKDIR`` applies its ``overrides`` to the
config before anything is built (and records them in ``config.json``). A config with
``fit_budget`` set (``--config.fit_budget=12GiB``) makes ``train`` run the search itself
at the start of a fresh run and write the same file; a resumed run reuses it, so the
settings never change mid-run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from jaxfit.config import set_fields
from jaxfit.plan import estimate, search

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"

# Reserve left free on a card: the CUDA context, cuBLAS / cuDNN workspaces and allocator
# fragmentation sit outside XLA's buffer assignment (~0.3-0.5 GiB of context on current
# drivers, plus a margin of a few percent for the BFC allocator's fragmentation).
DEFAULT_RESERVE_FRACTION = 0.05
DEFAULT_RESERVE_BYTES = 512 * 2**20


def usable_bytes(budget: int, reserve: int | None = None) -> int:
    """What a step may use of ``budget`` bytes: less ``reserve`` (default 512 MiB + 5%)."""
    if reserve is None:
        reserve = DEFAULT_RESERVE_BYTES + int(DEFAULT_RESERVE_FRACTION * budget)
    return budget - reserve


def write_plan(workdir: str | os.PathLike, overrides: dict[str, Any], record: dict) -> Path:
    """Write ``WORKDIR/plan.json`` atomically: ``{"overrides": ..., **record}``."""
    path = Path(workdir) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"overrides": overrides, **record}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_overrides(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``overrides`` of ``WORKDIR/plan.json``, or ``None`` when there is none."""
    path = Path(workdir) / PLAN_FILE
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text())["overrides"])


def apply_plan(config, workdir: str | os.PathLike):
    """The config a run in ``workdir`` should use: ``plan.json``'s overrides applied, or,
    without one and with ``config.fit_budget`` set, a fresh search's best (written to
    ``plan.json``). Unchanged otherwise.

    Raises:
      RuntimeError: ``fit_budget`` is set and nothing fits it (the message gives the
        smallest peak found).
    """
    overrides = read_overrides(workdir)
    if overrides is None and config.get("fit_budget"):
        overrides = fit_budget(config, workdir)
    if not overrides:
        return config
    log.info("applying the planner's choice from %s: %s", Path(workdir) / PLAN_FILE, overrides)
    return set_fields(config, overrides)


def fit_budget(config, workdir) -> dict[str, Any]:
    """Search the config's levers for ``config.fit_budget`` and record the best."""
    budget = estimate.parse_bytes(config.fit_budget)
    usable = usable_bytes(budget)
    log.info("fit_budget=%s: searching micro-batch x remat x loss chunk", config.fit_budget)
    found = search.search_batch(config, usable)
    best = next((c for c in found if c.fits), None)
    if best is None:
        smallest = min((c.plan.peak_bytes for c in found if c.plan), default=0)
        raise RuntimeError(
            f"nothing fits fit_budget={config.fit_budget} (usable {usable / 2**30:.2f} GiB "
            f"after the reserve); the smallest planned peak is {smallest / 2**30:.2f} GiB. "
            "Try precision=nf4, optim.name=adamw8bit or a shorter seq_len."
        )
    write_plan(workdir, best.overrides, {"budget": config.fit_budget, "plan": best.plan.to_dict()})
    return best.overrides
