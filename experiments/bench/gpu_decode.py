"""gpu_suite part ``decode``: tokens/s of batch-1 greedy decoding of the NF4 8B Llama.

The model of ``configs/llama3_8b_qlora.py`` (the Llama 3 8B architecture) with a random
NF4 base (``gpu_common.random_base``; no adapters), sampled with ``jaxfit.sampling.generate``
(KV cache, greedy, no early stop) from a random ``prompt``-token prompt. Decoding rate:
``(new - 1) / (t(new) - t(1))`` with ``t(k)`` the median wall time of a whole
``generate`` call of ``k`` new tokens (prefill and the first token cancel out).

A batch-1 decoding step reads every weight once, so it is bound by memory bandwidth:
``bound = bandwidth / bytes per token``, the bytes of the weights a token reads (all of
the base but the embedding table, of which it reads one row: NF4 codes, block scales,
bf16 norms and LM head; the KV cache's few MB are left out). Bandwidths are the vendors'
(``memory_gbs`` of :data:`jaxfit.perf.DEVICES`, the table ``jaxfit.plan --generate``
bounds decoding with); the row gives the measured rate as a fraction of the bound.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from experiments.bench import gpu_common
from jaxfit import perf

SIZES = {
    "full": dict(config="configs/llama3_8b_qlora.py", prompt=128, new=128, reps=3),
    "quick": dict(config="configs/llama3_8b_qlora.py", prompt=128, new=64, reps=2),
    "small": dict(config="configs/llama_qlora.py:demo", model_overrides=[
        "model.config.vocab_size=512"], prompt=16, new=16, reps=2),
}  # fmt: skip
CAP_S = {"full": 180, "quick": 120, "small": 120}


def _read_bytes(model, params) -> int:
    """Bytes of ``params`` one decoded token reads: all but lookup-only embeddings."""
    from jaxfit.plan.core import tree_bytes

    lookup = model.lookup_only_params()
    return tree_bytes({k: v for k, v in params.items() if k not in lookup})


def worker(spec: dict, peak, save) -> dict:
    from experiments.bench import batches, runner
    from jaxfit import sampling
    from jaxfit.plan.estimate import format_bytes

    out, memory = gpu_common.start_worker(spec, peak)
    workdir = Path(spec["workdir"])
    config = gpu_common.llama_config(spec, workdir)
    setup = runner.build(config, workdir)
    base, _, _ = gpu_common.random_base(setup)
    model = setup.task.model
    prompt = batches.lm_batch(1, spec["prompt"], model.config.vocab_size)["input_ids"]
    times = {}
    for new in (1, spec["new"]):
        run = lambda new=new: sampling.generate(
            model, base, prompt, max_new_tokens=new, temperature=0.0
        )
        run()  # compiles
        times[new] = statistics.median(runner.time_calls(run, 0, spec["reps"]))
    per_token = (times[spec["new"]] - times[1]) / (spec["new"] - 1)
    read = _read_bytes(model, base)
    label = out["device_label"]
    device = perf.DEVICES.get(label)
    bandwidth, source = (device.memory_gbs, "jaxfit.perf.DEVICES") if device else (None, "")
    bound = bandwidth * 1e9 / read if bandwidth else None
    notes = f"{format_bytes(read)} read per token"
    if bound:
        notes += (
            f"; bandwidth bound {bound:,.1f} tok/s at {bandwidth:,.0f} GB/s ({source}): "
            f"{100 / per_token / bound:.1f}% of it"
        )
    out["measurements"] = [
        {
            "config": f"{runner.describe(config, model).split(', batch')[0]}, NF4 base, batch 1, "
            f"prompt {spec['prompt']}, {spec['new']} new tokens, greedy",
            "step_s": per_token,
            "tokens_per_s": 1 / per_token,
            "read_bytes": read,
            "bound_tokens_per_s": bound,
            "generate_s": times,
            "peak_mib": memory.peak_mib(),
            "notes": notes,
        }
    ]
    return out


def run(suite, spec: dict) -> dict:
    r = suite.run_worker("decode", spec)
    r["rows"] = [
        gpu_common.raw_row("decode", m, notes=m["notes"]) for m in r.get("measurements", [])
    ]
    return r
