"""Full fine-tuning of a pretrained GPT-2 on your text: the Hugging Face ``Trainer`` recipe.

  python -m jaxfit.train --config configs/gpt2_finetune.py --workdir runs/gpt2_ft \\
      --config.data.path=train.txt --config.data.val_path=valid.txt

``init_from`` is an HF directory or Hub name (default ``gpt2``, the 124M model); the
tokenizer is the model's. The recipe of the transformers language-modeling example
(``run_clm.py`` with ``Trainer``): lr 5e-5, 4 sequences per step x 4 accumulation steps,
512 tokens, weight decay 0.01, 16-bit compute (bf16 here), perplexity from the eval loss.

Arguments: ``init_from`` (str), ``steps`` (int, 0 = recipe default).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import default_lora_config, parse_arg, run_rhythm
from jaxfit.data.text import default_text_config
from jaxfit.optim import default_optim_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, init_from="gpt2", steps=0)
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.init_from = a.init_from
    c.model = ml_collections.ConfigDict()
    c.model.family = "gpt2"  # from init_from's config.json; kept for from-scratch overrides
    c.model.remat_policy = "dots_no_batch"
    # "auto": cuDNN flash attention on a GPU where jax's cuDNN path takes the shapes, else
    # the XLA reference for short sequences and jaxfit's blocked flash attention ("chunked",
    # no [seq, seq] scores) beyond; "xla" on CPU (jaxfit.models.attention.choose_attention).
    # The choice and its reason are logged and recorded in config.json.
    c.model.attention_impl = "auto"
    # > 0: the MLP runs over blocks of this many positions, recomputed in the backward
    # pass ([seq, intermediate] temporaries of one block at a time); 0 = whole sequence
    c.model.mlp_chunk_size = 0
    c.model.config = ml_collections.ConfigDict(dict(vocab_size=0))
    c.data = default_text_config()
    c.data.val_fraction = 0.05  # ignored when data.val_path is set
    c.data.synthetic = ml_collections.ConfigDict(dict(enabled=False, num_documents=4000, seed=0))
    c.seq_len = 512
    c.batch_size = 16  # 4 x 4 accumulation
    c.micro_batch_size = 4
    # LM head + loss in chunks of this many tokens (0 = all at once; jaxfit.losses.
    # chunked_cross_entropy). Unchunked, a micro-batch's float32 logits are 2048 tokens x
    # 50,257 x 4 B = 0.4 GB (about as much again for their gradient): affordable for GPT-2.
    c.loss_chunk_size = 0
    c.optim = default_optim_config()
    c.optim.lr = 5e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 0.0
    c.optim.grad_clip_norm = 1.0
    c.lora = default_lora_config()  # lora.enabled=True: adapters over a frozen base
    c.lora.targets = ("c_attn",)  # PEFT's default for GPT-2 (fused q/k/v)
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, max_batches=0))
    c.device = "rtx4070ti"
    run_rhythm(c, total_steps=a.steps or 2000, log_every=10, eval_every=250, ckpt_every=250)
    return c
