"""QLoRA fine-tuning of a Llama-architecture model: NF4 base + bf16 LoRA adapters.

  python -m jaxfit.train --config configs/llama_qlora.py:init_from=meta-llama/Meta-Llama-3-8B \\
      --workdir runs/qlora --config.data.path=train.jsonl --config.data.instruction=True
  python -m jaxfit.export --workdir runs/qlora --out runs/qlora/adapter --format peft

  # chat SFT: {"messages": [...]} JSONL (or ShareGPT), the model's chat template, loss on
  # the assistant's turns, conversations packed into seq_len rows
  python -m jaxfit.train --config configs/llama_qlora.py:init_from=DIR,chat \\
      --workdir runs/chat --config.data.path=chat.jsonl
  # the same on a CPU: a tiny random Llama on synthetic chats
  python -c "from jaxfit.data.text import write_synthetic_chat as w; w('chat.jsonl')"
  python -m jaxfit.train --config configs/llama_qlora.py:demo,chat --workdir runs/chat_demo \\
      --config.data.path=chat.jsonl

The recipe of QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the frozen base quantised to
NF4 with double quantisation while it streams from the checkpoint (``jaxfit.quant``),
LoRA adapters (r=16, alpha=32, dropout 0.05) on q/k/v/o (``:all_linear`` for every
linear layer except the LM head), bf16 compute, lr 2e-4, 4 sequences per micro-batch x 4
accumulation steps, warmup 100, full remat. ``init_from`` may also be a ``*-bnb-4bit``
checkpoint (read as stored). ``:demo`` runs a tiny random Llama on a synthetic corpus on
a CPU, to see the machinery work.

``:chat`` reads conversations (``data.format="chat"``; ``--config.data.format=alpaca`` for
Alpaca rows) with packing on; the template is the tokenizer's (``data.chat_template``
overrides it; the demo's trained BPE has none, so it uses :data:`DEMO_CHAT_TEMPLATE`).

Arguments: ``init_from`` (str), ``all_linear`` (bool), ``demo`` (bool), ``chat`` (bool),
``steps`` (int).
"""

from __future__ import annotations

import ml_collections

from jaxfit.config import parse_arg, sibling_config

# ChatML-style turns in plain-text markers, for tokenizers without a chat template.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, init_from="", all_linear=False, demo=False, chat=False, steps=0)
    c = sibling_config(__file__, "llama_finetune.py", None)
    c.init_from = a.init_from
    c.model.config.num_hidden_layers = 4  # from-scratch shape (only without init_from)
    c.lora.enabled = True
    if a.all_linear:
        c.lora.targets = ("all-linear",)
    c.data.val_fraction = 0.02
    c.batch_size = 16  # 4 x 4 accumulation
    c.micro_batch_size = 4
    # LM head + loss in chunks of this many tokens (0 = all at once; jaxfit.losses.
    # chunked_cross_entropy). Llama 3's 128,256-token vocabulary makes a micro-batch's
    # float32 logits 4096 tokens x 128,256 x 4 B = 2.1 GB, and as much again for their
    # gradient, next to the ~5.7 GB of an NF4 8B base (bf16 embeddings and head) on a
    # 12 GB card. Chunks of 1024 (a quarter of the micro-batch) hold a quarter of that, for
    # one more pass of the head's matmul (the frozen head has no gradient to accumulate).
    c.loss_chunk_size = 1024
    c.optim.lr = 2e-4
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.0
    c.optim.grad_clip_norm = 0.3  # QLoRA's max_grad_norm
    c.precision = "nf4"
    c.total_steps = a.steps or 1000
    if a.demo:
        c.data.synthetic.enabled = True
        c.data.split_by_blank_lines = True
        c.data.tokenizer.vocab_size = 512
        c.model.remat_policy = "none"
        c.model.config.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        c.seq_len = 64
        c.batch_size = 16
        c.micro_batch_size = 8
        c.loss_chunk_size = 0  # a 512-token vocabulary: nothing to save
        c.lora.rank = 8
        c.lora.targets = ("all-linear",)
        c.optim.lr = 1e-2
        c.optim.warmup_steps = 5
        c.eval.batch_size = 16
        c.eval.max_batches = 10
        c.total_steps = a.steps or 60
        c.log_every = 10
        c.eval_every = c.total_steps
        c.ckpt_every = c.total_steps
    if a.chat:
        c.data.format = "chat"
        c.data.packing = True
        if a.demo:  # conversations of ~100-200 tokens in a 512-token BPE
            c.data.synthetic.enabled = False
            c.data.chat_template = DEMO_CHAT_TEMPLATE
            c.data.val_fraction = 0.05
            c.seq_len = 256
            c.batch_size = 8
            c.micro_batch_size = 8
            c.eval.batch_size = 8
    return c
