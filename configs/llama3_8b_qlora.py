"""QLoRA of a Llama-3-8B-architecture model on one 12 GB card (the planner's acceptance case).

  python -m jaxfit.plan --config configs/llama3_8b_qlora.py --budget 12GiB --search
  python -m jaxfit.train --config configs/llama3_8b_qlora.py:init_from=meta-llama/Llama-3.1-8B \\
      --workdir runs/llama3_8b --config.data.path=train.jsonl --config.data.instruction=True

The architecture of Llama 3.1 8B (Meta, ``config.json`` of ``meta-llama/Llama-3.1-8B``):
hidden 4096, 32 layers, 32 query heads sharing 8 KV heads (GQA), SwiGLU MLP 14336, a
128,256-token vocabulary with untied embeddings, RoPE base 500,000 with the ``llama3``
frequency scaling (factor 8, low/high frequency factors 1/4, original context 8192).
Without ``init_from`` these fields describe the model the planner compiles (and a random
model, if trained); with it the checkpoint's ``config.json`` does.

The recipe is ``configs/llama_qlora.py`` (NF4 base with double quantisation, bf16
compute, LoRA r=16 alpha=32 dropout 0.05, lr 2e-4, QLoRA's max_grad_norm 0.3) with
adapters on every linear layer of the blocks (q/k/v/o/gate/up/down: 41.9M trainable
parameters, the QLoRA paper's choice) and sequences of 2048 tokens: 16 sequences per
optimizer step as 16 micro-batches of 1 under full remat, the LM head + loss in chunks of
1024 tokens (the float32 logits of 2048 tokens x 128,256 would be 1 GiB, their gradient as
much again). ``python -m jaxfit.plan`` shows what that costs and what else fits.

Arguments: ``init_from`` (str), ``steps`` (int).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import parse_arg, sibling_config
from jaxfit.hf import architectures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, init_from="", steps=0)
    c = sibling_config(
        __file__, "llama_qlora.py", f"init_from={a.init_from},all_linear=True,steps={a.steps}"
    )
    c.model.config = ml_collections.ConfigDict(architectures.model_config("llama3-8b"))
    c.model.remat_policy = "full"
    c.seq_len = 2048
    c.batch_size = 16
    c.micro_batch_size = 1
    c.loss_chunk_size = 1024
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.eval.batch_size = 1
    c.device = "rtx4070ti"
    return c
