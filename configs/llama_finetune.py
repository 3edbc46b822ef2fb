"""Full fine-tuning of a small Llama-style model (Llama-2/3 architecture) on your text.

  python -m jaxfit.train --config configs/llama_finetune.py:init_from=PATH_OR_HUB_NAME \\
      --workdir runs/llama_ft --config.data.path=train.jsonl

For models that do not fit in full precision (7B/8B on 12 GB) use the QLoRA recipe
instead. Full fine-tuning keeps float32 master weights and AdamW moments: about 16 bytes
per parameter, so ~0.5B parameters is the ceiling of a 12 GB card.

Arguments: ``init_from`` (str, required for real use), ``steps`` (int).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import default_lora_config, parse_arg, run_rhythm
from jaxfit.data.text import default_text_config
from jaxfit.optim import default_optim_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, init_from="", steps=0)
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.init_from = a.init_from
    c.model = ml_collections.ConfigDict()
    c.model.family = "llama"
    c.model.remat_policy = "full"
    # "auto": cuDNN flash attention on a GPU where jax's cuDNN path takes the shapes, else
    # the XLA reference for short sequences and jaxfit's blocked flash attention ("chunked",
    # no [seq, seq] scores) beyond; "xla" on CPU (jaxfit.models.attention.choose_attention).
    # The choice and its reason are logged and recorded in config.json.
    c.model.attention_impl = "auto"
    # > 0: the MLP runs over blocks of this many positions, recomputed in the backward
    # pass ([seq, intermediate] temporaries of one block at a time); 0 = whole sequence
    c.model.mlp_chunk_size = 0
    # from-scratch shape when init_from is empty (a ~20M Llama; vocab from the tokenizer)
    c.model.config = ml_collections.ConfigDict(
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            vocab_size=0,
        )
    )
    c.data = default_text_config()
    c.data.val_fraction = 0.05
    c.data.synthetic = ml_collections.ConfigDict(dict(enabled=False, num_documents=4000, seed=0))
    c.seq_len = 1024
    c.batch_size = 16
    c.micro_batch_size = 2
    # LM head + loss in chunks of this many tokens (0 = all at once; jaxfit.losses.
    # chunked_cross_entropy). Small Llama-3 / Qwen2.5 bases have 128-152k-token
    # vocabularies: a micro-batch's float32 logits would be 2048 tokens x 151,936 x 4 B =
    # 1.2 GB, and as much again for their gradient. Chunks of 512 (a quarter of the
    # micro-batch) hold a quarter of that, plus the trained head's own [D, V] gradient:
    # for a 0.5B model (D = 896) XLA's temporaries of the loss fall from 2.3 to 1.3 GiB,
    # for one more pass of the head's matmul.
    c.loss_chunk_size = 512
    c.optim = default_optim_config()
    c.optim.lr = 2e-5
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.1
    c.optim.grad_clip_norm = 1.0
    c.lora = default_lora_config()  # lora.enabled=True: adapters over a frozen base
    c.eval = ml_collections.ConfigDict(dict(batch_size=4, max_batches=50))
    c.device = "rtx4070ti"
    run_rhythm(c, total_steps=a.steps or 1000, log_every=10, eval_every=200, ckpt_every=200)
    return c
