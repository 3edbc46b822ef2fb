"""Sample text from a causal LM with a KV cache.

--model is a Hugging Face model directory (or Hub name) with its tokenizer, or a jaxfit
workdir (its latest checkpoint and the run's tokenizer). --temperature 0 is greedy. One
sample is printed token by token as it is generated (--no_stream: at the end); --stop
ends a sample where its text reaches the string (the text is cut before it).

--chat answers user turns read from stdin, one per line, each from the whole conversation
rendered with the chat template (the run's data.chat_template or the tokenizer's); an
answer ends at EOS or at the template's end-of-turn text.

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
    ap.add_argument("--prompt", default=None, help="text to continue (--chat: the first turn)")
    ap.add_argument(
        "--chat",
        action="store_true",
        help="a conversation: user turns from stdin, one per line (an empty line "
        "or end of input ends it); answers rendered with the chat template",
    )
    ap.add_argument("--system", default="", help="--chat: the system message")
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
        "--stop",
        action="append",
        default=[],
        help="end a sample where its text reaches this string (repeatable)",
    )
    ap.add_argument(
        "--no_stream",
        dest="stream",
        action="store_false",
        help="print the sample at the end, not token by token (one sample)",
    )
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
    if args.prompt is None and not args.chat:
        raise cli.UsageError("--prompt is required (or --chat), in the command line")
    loaded = inference.load_model_and_tokenizer(
        args.model, quantize=args.quant, adapter=args.adapter
    )
    if args.chat:
        return _chat(args, loaded)
    ids = np.asarray(loaded.encode(args.prompt), np.int32)
    texts = StopStrings(loaded.decode, args.stop, loaded.eos_token_id, args.num_samples)
    live = args.stream and args.num_samples == 1
    if live:
        texts.on_text = lambda new: print(new, end="", flush=True)
        print(args.prompt, end="", flush=True)
    _sample(args, loaded, ids, texts)
    if live:
        print(texts.flush(0), flush=True)
    else:
        for i in range(args.num_samples):
            print(args.prompt + texts.text(i))
    return 0


def _sample(args, loaded, ids: np.ndarray, texts: StopStrings) -> None:
    """``args.num_samples`` continuations of ``ids``, handed to ``texts`` as they come."""
    sampling.generate(
        loaded.model,
        loaded.params,
        np.repeat(ids[None], args.num_samples, axis=0),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=loaded.eos_token_id,
        rng=jax.random.key(args.seed),
        prefill_chunk=args.prefill_chunk,
        kv_cache=None if args.kv_cache == "bf16" else args.kv_cache,
        stream=texts,
    )


_MARK = "JAXFIT_END_OF_TURN_MARK"


def end_of_turn(loaded) -> str:
    """The text the chat template writes after an assistant's message (e.g. ``<|eot_id|>``
    of Llama 3, ``<|im_end|>`` of ChatML), stripped; '' when it writes none."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    text = loaded.decode(loaded.render_chat(messages, generation_prompt=False))
    return text[text.rindex(_MARK) + len(_MARK) :].strip() if _MARK in text else ""


def _chat(args, loaded) -> int:
    """Answer user turns from stdin, one per line, each from the whole conversation."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    stops = [*args.stop, end_of_turn(loaded)]
    turns = [args.prompt] if args.prompt else []
    args.num_samples = 1
    while True:
        user = turns.pop(0) if turns else sys.stdin.readline()
        if not user or not user.strip():
            return 0
        messages.append({"role": "user", "content": user.strip()})
        ids = np.asarray(loaded.render_chat(messages), np.int32)
        texts = StopStrings(loaded.decode, stops, loaded.eos_token_id, 1)
        if args.stream:
            texts.on_text = lambda new: print(new, end="", flush=True)
        _sample(args, loaded, ids, texts)
        print(texts.flush(0) if args.stream else texts.text(0), flush=True)
        messages.append({"role": "assistant", "content": texts.text(0).strip()})


class StopStrings:
    """The ``stream`` callback of :func:`jaxfit.sampling.generate` for text: it decodes
    each row's tokens as they come, ends a row whose text reaches one of ``stops`` (the
    text is cut before it; an EOS id is not text) and hands row 0's new text to
    ``on_text`` as it grows (a trailing incomplete UTF-8 character, U+FFFD, is held back
    until the next token completes it).

    Args:
      decode: ``ids -> str``; stops: stop strings; eos: the EOS id or ``None``;
      rows: the batch size.
    """

    def __init__(self, decode, stops, eos, rows: int):
        self.decode, self.stops, self.eos = decode, [s for s in stops if s], eos
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.cut: list[str | None] = [None] * rows
        self.shown = 0
        self.on_text = None

    def text(self, row: int) -> str:
        return self.cut[row] if self.cut[row] is not None else self.decode(self.ids[row])

    def __call__(self, tokens, finished):
        stop = np.zeros(len(tokens), bool)
        for row, (tok, done) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if done or self.cut[row] is not None or tok == self.eos:
                continue
            self.ids[row].append(tok)
            text = self.decode(self.ids[row])
            hits = [text.find(s) for s in self.stops if s in text]
            if hits:
                self.cut[row], stop[row] = text[: min(hits)], True
        if self.on_text is not None:
            text = self.text(0)
            ready = text if self.cut[0] is not None else text.rstrip("\ufffd")
            if len(ready) > self.shown:
                self.on_text(ready[self.shown :])
                self.shown = len(ready)
        return stop

    def flush(self, row: int) -> str:
        """What of row ``row``'s text :attr:`on_text` has not been given yet."""
        return self.text(row)[self.shown :]


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
