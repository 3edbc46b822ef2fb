"""Sample text from a causal LM with a KV cache.

--model is a Hugging Face model directory (or Hub name) with its tokenizer, or a jaxfit
workdir (its latest checkpoint and the run's tokenizer). --temperature 0 is greedy.

examples:
  python -m jaxfit.generate --model runs/gpt2_demo --prompt "Ada went to" --temperature 0
  python -m jaxfit.generate --model runs/ft/hf --prompt "Hello" --top_k 50 --top_p 0.95
  python -m jaxfit.generate --model DIR --quant nf4 --adapter ADAPTER_DIR --prompt "Hi"
"""

from __future__ import annotations

import logging
import sys

import jax
import numpy as np

from jaxfit import cli, inference, quant, sampling

PROG = "python -m jaxfit.generate"


def parser() -> cli.ArgumentParser:
    """The command line's flags (``--help`` lists them)."""
    ap = cli.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--model", required=True, help="HF model dir / Hub name, or jaxfit workdir")
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="tokens to sample (64)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    ap.add_argument("--top_k", type=int, default=None, help="sample among the k most likely")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    ap.add_argument("--num_samples", type=int, default=1, help="continuations to print (1)")
    ap.add_argument(
        "--quant", choices=quant.names(), default=None, help="quantise an HF model while loading"
    )
    ap.add_argument("--adapter", default="", help="PEFT LoRA adapter directory (HF model)")
    ap.add_argument(
        "--kv_cache",
        choices=("bf16", "int8"),
        default="bf16",
        help="KV cache storage: the compute dtype (bf16) or int8 + scales",
    )
    ap.add_argument(
        "--prefill_chunk",
        type=int,
        default=sampling.DEFAULT_PREFILL_CHUNK,
        help=f"prompt tokens per prefill step ({sampling.DEFAULT_PREFILL_CHUNK}; "
        "0: the whole prompt at once)",
    )
    return ap  # fmt: skip


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parser().parse_args(argv)
    if inference.is_workdir(args.model):
        cli.checkpoint_step(args.model)  # a jaxfit run: its checkpoint, before its data
    model, params, encode, decode, eos = inference.load_model_and_tokenizer(
        args.model, quantize=args.quant, adapter=args.adapter
    )
    ids = np.asarray(encode(args.prompt), np.int32)
    prompt = np.repeat(ids[None], args.num_samples, axis=0)
    out = sampling.generate(
        model,
        params,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos,
        rng=jax.random.key(args.seed),
        prefill_chunk=args.prefill_chunk,
        kv_cache=None if args.kv_cache == "bf16" else args.kv_cache,
    )
    for row in out:
        row = list(row)
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        print(args.prompt + decode(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
