"""gpu_suite part ``gpt2``: GPT-2 124M training from ``configs/gpt2_scratch.py``.

The recipe at its full size (12 layers, width 768, 12 heads, 1024 positions; batch 16 x
1024 tokens in micro-batches of 8, remat ``dots_no_batch``, bf16 compute over float32
master weights, AdamW) from a random init, with GPT-2's vocabulary of 50,257 padded to
50,304 (the recipe's own is the BPE it trains on your text, 16,384 by default: 97M
parameters instead of 124M). Synthetic token batches; the task's loss and the trainer's
jitted step (``experiments.bench.runner``). Tokens/s, MFU from ``6 N + 12 L d T`` per token
(``jaxfit.perf.decoder_flops_per_token``, position table excluded), planned vs measured
peak.
"""

from __future__ import annotations

from pathlib import Path

from experiments.bench import gpu_common

SIZES = {
    "full": dict(config="configs/gpt2_scratch.py", overrides=["model.config.vocab_size=50304"],
                 warmup=2, steps=10),
    "quick": dict(config="configs/gpt2_scratch.py", overrides=["model.config.vocab_size=50304"],
                  warmup=1, steps=5),
    "small": dict(config="configs/gpt2_scratch.py:demo", overrides=[], warmup=1, steps=2),
}  # fmt: skip
CAP_S = {"full": 150, "quick": 90, "small": 120}


def worker(spec: dict, peak, save) -> dict:
    return gpu_common.measure_config(spec, peak, save, Path(spec["workdir"]))


def run(suite, spec: dict) -> dict:
    r = suite.run_worker("gpt2", spec)
    r["rows"] = [gpu_common.raw_row("gpt2", m) for m in r.get("measurements", [])]
    return r
