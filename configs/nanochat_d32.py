"""A nanochat-d32-sized decoder trained from scratch: the planner's "how long?" example.

  python -m jaxfit.plan --config configs/nanochat_d32.py --device rtx4070 --tokens 38e9

nanochat's d32 (Karpathy, github.com/karpathy/nanochat, `--depth=32`): 32 layers of width
2048 (64 per unit of depth), 16 heads of 128, a 65,536-token vocabulary with untied
embeddings, 2048-token sequences, about 1.9B parameters, trained on 38B tokens (20 per
parameter, Chinchilla) with a batch of 524,288 tokens. jaxfit's Llama block stands in for
nanochat's: RoPE and RMSNorm as there; nanochat's MLP is ReLU^2 with 4x width (two
matrices, 2 x 2048 x 8192), here SwiGLU of width 5504 (three matrices, 3 x 2048 x 5504:
the same parameters and FLOPs within 1%). The plan shows it does not fit a 12 GB card for
full training (float32 master weights, gradients and AdamW moments alone are ~30 GB) and
what the 38B tokens would cost in time on one if it did.

Arguments: ``steps`` (int).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import parse_arg, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, steps=0)
    c = sibling_config(__file__, "llama_finetune.py", None)
    c.model.config = ml_collections.ConfigDict(
        dict(
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=32,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
            vocab_size=65536,
        )
    )
    c.model.remat_policy = "full"
    c.seq_len = 2048
    c.batch_size = 256  # x 2048 = 524,288 tokens per step, nanochat's total batch
    c.micro_batch_size = 1
    c.loss_chunk_size = 1024
    c.precision = "bf16"
    c.optim.lr = 3e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.total_steps = a.steps or 72_480  # 38e9 tokens / 524,288 per step
    c.device = "rtx4070"
    return c
