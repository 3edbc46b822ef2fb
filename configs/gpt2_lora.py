"""LoRA fine-tuning of GPT-2 (frozen base, adapters on the attention projection).

  python -m jaxfit.train --config configs/gpt2_lora.py:init_from=gpt2 --workdir runs/gpt2_lora \\
      --config.data.path=train.txt
  python -m jaxfit.export --workdir runs/gpt2_lora --out runs/gpt2_lora/adapter --format peft

Everything of ``configs/gpt2_finetune.py``, with LoRA r=16, alpha=32, dropout 0.05 on
``c_attn`` (PEFT's default target for GPT-2) and the LoRA learning rate 2e-4. Add
``--config.precision=int8`` or ``nf4`` for a quantised base.

Arguments: ``init_from`` (str), ``steps`` (int).
"""

from __future__ import annotations

from jaxfit.config import sibling_config


def get_config(arg: str | None = None):
    c = sibling_config(__file__, "gpt2_finetune.py", arg)
    c.lora.enabled = True
    c.lora.targets = ("c_attn",)
    c.optim.lr = 2e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 50
    return c
