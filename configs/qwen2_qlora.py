"""QLoRA fine-tuning of a Qwen2 / Qwen2.5 model: NF4 base + bf16 LoRA adapters.

  python -m jaxfit.train --config configs/qwen2_qlora.py:init_from=Qwen/Qwen2.5-1.5B \\
      --workdir runs/qwen2_qlora --config.data.path=train.jsonl --config.data.instruction=True
  python -m jaxfit.export --workdir runs/qwen2_qlora --out runs/qwen2_qlora/adapter --format peft

The recipe is ``configs/llama_qlora.py``'s (QLoRA, Dettmers et al. 2023, arXiv 2305.14314:
NF4 base with double quantisation, LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o or
``:all_linear``, lr 2e-4, QLoRA's max_grad_norm 0.3, the LM head + loss in chunks of 1024
tokens), unchanged: Qwen2 is a Llama with biases on q/k/v (:mod:`jaxfit.models.qwen2`),
which stay float and frozen in the NF4 base, and its PEFT module names are Llama's. The
chunked loss matters more here: Qwen2.5's embedding has 151,936 rows, so a micro-batch's
float32 logits would be 4096 tokens x 151,936 x 4 B = 2.5 GB. With ``init_from`` the
checkpoint's ``config.json`` gives the model (``model_type: qwen2``); without it the
model is a from-scratch Qwen2 (``model.family = "qwen2"``) of llama_finetune's shape
with Qwen2's RoPE base of 1e6. ``:demo`` trains a tiny random one on a synthetic corpus on
a CPU in about a minute (its NF4 base is the random initialisation, quantised).

Arguments: as ``configs/llama_qlora.py``: ``init_from`` (str), ``all_linear`` (bool),
``demo`` (bool), ``steps`` (int).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = sibling_config(__file__, "llama_qlora.py", arg)
    c.model.family = "qwen2"  # from-scratch model (only without init_from)
    c.model.config.rope_theta = 1e6  # Qwen2 / Qwen2.5 config.json
    return c
