"""A GPT-2-style model trained from scratch on your text (nanoGPT's recipe, in JAX).

  python -m jaxfit.train --config configs/gpt2_scratch.py --workdir runs/gpt2 \\
      --config.data.path=data/input.txt --config.data.val_fraction=0.05

The same on a CPU in minutes (``small``: a 4-layer, 128-wide GPT, 128-token context and
a 1,024-token BPE, 400 steps; measured on tinyshakespeare in docs/BENCHMARKS.md)::

  python -m jaxfit.train --config configs/gpt2_scratch.py:small --workdir runs/gpt2_small \\
      --config.data.path=data/input.txt

The embedded default: a tiny GPT on a synthetic story corpus written into the workdir
(no download), a few minutes on a CPU::

  python -m jaxfit.train --config configs/gpt2_scratch.py:demo --workdir runs/gpt2_demo
  python -m jaxfit.generate --model runs/gpt2_demo --prompt "Ada went to"

Arguments: ``demo`` (bool), ``small`` (bool), ``steps`` (int, 0 = recipe default).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import default_lora_config, parse_arg, run_rhythm
from jaxfit.data.text import default_text_config
from jaxfit.optim import default_optim_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, demo=False, small=False, steps=0)
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.init_from = ""
    # GPT-2 small (124M): 12 layers, 12 heads, width 768 (Radford et al. 2019, Table 2).
    c.model = ml_collections.ConfigDict()
    c.model.family = "gpt2"
    c.model.remat_policy = "dots_no_batch"
    # "auto": cuDNN flash attention on a GPU where jax's cuDNN path takes the shapes, else
    # the XLA reference for short sequences and jaxfit's blocked flash attention ("chunked",
    # no [seq, seq] scores) beyond; "xla" on CPU (jaxfit.models.attention.choose_attention).
    # The choice and its reason are logged and recorded in config.json.
    c.model.attention_impl = "auto"
    # > 0: the MLP runs over blocks of this many positions, recomputed in the backward
    # pass ([seq, intermediate] temporaries of one block at a time); 0 = whole sequence
    c.model.mlp_chunk_size = 0
    c.model.config = ml_collections.ConfigDict(
        dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=0)
    )  # vocab_size 0: the tokenizer's, rounded up to a multiple of 64

    c.data = default_text_config()
    c.data.val_fraction = 0.05
    c.data.tokenizer.vocab_size = 16384  # byte-level BPE trained on the training text
    c.data.synthetic = ml_collections.ConfigDict(dict(enabled=False, num_documents=4000, seed=0))

    # 16 x 1024 tokens per optimizer step; micro-batches of 8 fit 12 GB in bf16 with remat.
    c.seq_len = 1024
    c.batch_size = 16
    c.micro_batch_size = 8
    # LM head + loss in chunks of this many tokens (0 = all at once; jaxfit.losses.
    # chunked_cross_entropy). Unchunked, a micro-batch's float32 logits are 8192 tokens x
    # 16,384 x 4 B = 0.5 GB (about as much again for their gradient): affordable here.
    c.loss_chunk_size = 0
    c.optim = default_optim_config()
    c.optim.lr = 6e-4  # nanoGPT train_gpt2 / GPT-3 small (Brown et al. 2020, Table 2.1)
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 200
    c.optim.min_lr_ratio = 0.1
    c.optim.grad_clip_norm = 1.0
    c.lora = default_lora_config()  # lora.enabled=True: adapters over a frozen base
    c.lora.targets = ("c_attn",)  # PEFT's default for GPT-2 (fused q/k/v)
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, max_batches=50))
    c.device = "rtx4070ti"  # peak FLOP/s for MFU (jaxfit.perf.DEVICES)
    run_rhythm(c, total_steps=a.steps or 5000, log_every=10, eval_every=500, ckpt_every=500)
    if a.demo and a.small:
        raise ValueError("gpt2_scratch: choose one of the arguments 'demo' and 'small'")
    if a.demo:
        c.data.synthetic.enabled = True
        c.data.split_by_blank_lines = True
        c.data.tokenizer.vocab_size = 512
        c.model.config.update(n_layer=2, n_head=4, n_embd=64, n_positions=128)
        c.seq_len = 64
        # LoRA (when enabled; the precision ablation's LoRA arms) on every linear layer: on
        # c_attn alone, 60 steps moved the demo's validation loss by 0.005; all-linear, r=16
        # and the demo's lr take it 0.027 below the base in 150 steps (docs/ablation.md)
        c.lora.targets = ("all-linear",)
        _cpu_sized(c, a.steps or 300)
    if a.small:
        # Your own text on a CPU in minutes. 4 x 128 (0.8M parameters besides the
        # embeddings) over 32 x 128 tokens per step: 400 steps, about 3 min of CPU, bring
        # tinyshakespeare's validation loss from 6.9 (uniform over 1,024 tokens) to 4.07
        # (docs/BENCHMARKS.md, "The first hour"); the demo's 2 x 64 stops at 4.28.
        c.data.tokenizer.vocab_size = 1024
        c.model.config.update(n_layer=4, n_head=4, n_embd=128, n_positions=128)
        c.seq_len = 128
        _cpu_sized(c, a.steps or 400)
    return c


def _cpu_sized(c: ml_collections.ConfigDict, steps: int) -> None:
    """The optimisation and rhythm of the CPU sizes (demo, small): fp32, no remat, a
    larger learning rate and short warmup for a small model, batches of 32."""
    c.model.remat_policy = "none"
    c.batch_size = 32
    c.micro_batch_size = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.eval.batch_size = 32
    c.eval.max_batches = 20
    c.precision = "fp32"  # bf16 matmuls are emulated (slow) on most CPUs
    c.total_steps = steps
    c.log_every = 25
    c.eval_every = 100
    c.ckpt_every = 100
