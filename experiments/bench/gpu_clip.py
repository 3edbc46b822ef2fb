"""gpu_suite part ``clip``: CLIP training from ``configs/clip_coco.py``.

The recipe's model (ViT-B/32 image tower, 12-layer text tower, text vocabulary 16,384, 77
tokens) and batch (128 image-caption pairs as GradCache micro-batches of 16, remat
``dots_no_batch``, bf16 compute), random init, synthetic images and captions, the task's
own GradCache ``loss_and_grad`` in the trainer's jitted step. Two measurements, each in a
fresh process:

1. the config as it is;
2. the planner's best micro-batch: ``jaxfit.plan.search.search_batch`` over the
   micro-batch sizes from the config's up to the whole batch (the config's remat and loss
   chunking; speed grows with the micro-batch, so the largest that fits is the best) within
   the memory cap less the planner's reserve (``jaxfit.plan.apply.usable_bytes``); not run
   again when that is the config's.

Images/s, MFU from the planner's model FLOPs (the step traced without remat or
micro-batching, ``jaxfit.plan.flops.traced_flops``), planned vs measured peak.
"""

from __future__ import annotations

from pathlib import Path

from experiments.bench import gpu_common

SIZES = {
    "full": dict(config="configs/clip_coco.py", overrides=[], warmup=2, steps=10,
                 search=True, max_compiles=4),
    "quick": dict(config="configs/clip_coco.py", overrides=[], warmup=1, steps=5, search=False),
    "small": dict(config="configs/clip_coco.py:demo", overrides=["batch_size=8",
                  "micro_batch_size=4"], warmup=1, steps=2, search=True, max_compiles=4),
}  # fmt: skip
CAP_S = {"full": 180, "quick": 90, "small": 180}


def _best_micro_batch(spec: dict, config, limit_bytes: int) -> dict:
    """The planner's search over micro-batch sizes >= the config's (see the docstring)."""
    from jaxfit.plan import apply, search

    usable = apply.usable_bytes(limit_bytes)
    sizes = [
        m
        for m in range(config.micro_batch_size, config.batch_size + 1)
        if config.batch_size % m == 0
    ]
    found = search.search_batch(
        config,
        usable,
        micro_batch_sizes=sizes,
        remat_policies=(config.model.remat_policy,),
        loss_chunk_sizes=(int(config.get("loss_chunk_size", 0)),),
        max_compiles=spec.get("max_compiles", 4),
        progress=lambda msg: None,
    )
    fitting = [c for c in found if c.fits]
    best = max((c.overrides["micro_batch_size"] for c in fitting), default=None)
    return {
        "usable_mib": usable / gpu_common.MIB,
        "tried": [
            (c.overrides["micro_batch_size"], c.plan and c.plan.peak_bytes / 2**20, c.fits)
            for c in found
        ],
        "best": best,
    }


def worker(spec: dict, peak, save) -> dict:
    from jaxfit.config import load_config

    out = gpu_common.measure_config(spec, peak, save, Path(spec["workdir"]))
    if spec.get("search"):
        config = load_config(spec["config"], spec.get("overrides", []))
        limit = out["bytes_limit_mib"] * gpu_common.MIB if out["bytes_limit_mib"] else None
        out["search"] = _best_micro_batch(spec, config, int(limit or spec["mem_cap_bytes"]))
    return out


def run(suite, spec: dict) -> dict:
    first = suite.run_worker("clip", spec)
    rows = [
        gpu_common.raw_row("clip", m, "img/s", "config micro-batch")
        for m in first.get("measurements", [])
    ]
    search = first.get("search") or {}
    best = search.get("best")
    micro = [o for o in spec["overrides"] if o.startswith("micro_batch_size=")]
    current = rows and first["measurements"][0]["micro_batch"]
    note = (
        f"planner's best micro-batch (largest fitting {search.get('usable_mib', 0):,.0f} "
        "MiB usable)"
    )
    if best and best != current:
        overrides = [o for o in spec["overrides"] if o not in micro]
        second = suite.run_worker(
            "clip", {**spec, "search": False, "overrides": [*overrides, f"micro_batch_size={best}"]}
        )
        rows += [
            gpu_common.raw_row("clip", m, "img/s", note) for m in second.get("measurements", [])
        ]
        if not second.get("ok"):
            rows.append(gpu_common.error_row("clip", second.get("error", ""), note))
    elif best:
        rows[-1]["notes"] += f"; it is also the {note}"
    first["rows"] = rows
    return first
