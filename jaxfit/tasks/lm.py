"""Causal language modelling (GPT-2 / Llama-style decoders) on text corpora.

Loss: token-level cross-entropy of next-token prediction over the unmasked tokens of the
whole batch (padding, and prompt tokens of instruction data, are masked), accumulated
exactly over micro-batches (``accumulate.microbatched``). Evaluation: validation loss and
perplexity ``exp(sum loss / tokens)`` over every validation token once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import accumulate, losses, perf
from jaxfit.data import text as text_data
from jaxfit.data.synthetic_text import write_synthetic_text
from jaxfit.models import gpt2, llama
from jaxfit.tasks.base import COMPUTE_DTYPES, ParamsMixin, load_base

log = logging.getLogger(__name__)

FAMILIES = {
    "gpt2": (gpt2.GPT2Config, gpt2.GPT2LMHeadModel),
    "llama": (llama.LlamaConfig, llama.LlamaForCausalLM),
}


def _vocab_size(model) -> int:
    return model.config.vocab_size


def _max_positions(model) -> int:
    c = model.config
    return getattr(c, "n_positions", None) or c.max_position_embeddings


def _shape(model) -> tuple[int, int]:
    """(num_layers, hidden_size) of a decoder config of either family."""
    c = model.config
    if hasattr(c, "n_layer"):
        return c.n_layer, c.n_embd
    return c.num_hidden_layers, c.hidden_size


class LMTask(ParamsMixin):
    """See ``jaxfit.tasks`` for the interface. Reads ``config.{model, init_from, data,
    seq_len, batch_size, micro_batch_size, eval, precision, seed, device}``."""

    def __init__(self, config, workdir, mesh):
        self.config = config
        self.workdir = Path(workdir)
        self.mesh = mesh
        dtype = COMPUTE_DTYPES[config.precision]
        data_cfg = config.data
        if data_cfg.get("synthetic") and data_cfg.synthetic.enabled:
            path = Path(data_cfg.path or self.workdir / "synthetic_text.txt")
            if not path.is_file():
                write_synthetic_text(
                    path,
                    num_documents=data_cfg.synthetic.num_documents,
                    seed=data_cfg.synthetic.seed,
                )
            data_cfg.path = str(path)
        if config.init_from and not data_cfg.tokenizer.name:
            with data_cfg.unlocked():
                data_cfg.tokenizer.name = config.init_from
        self.data = text_data.prepare_text_data(data_cfg, self.workdir)
        self.tokenizer = self.data.tokenizer
        self._pretrained = None
        if config.init_from:
            self._pretrained = load_base(config, remat_policy=config.model.remat_policy)
            self.model = self._pretrained[0]
        else:
            family = config.model.family
            if family not in FAMILIES:
                raise ValueError(f"model.family={family!r}; expected one of {sorted(FAMILIES)}")
            cfg_cls, model_cls = FAMILIES[family]
            fields = dict(config.model.config.to_dict())
            fields["vocab_size"] = fields.get("vocab_size") or _pad_vocab(self.tokenizer.vocab_size)
            fields.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            if self.tokenizer.bos_token_id is not None:
                fields.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            self.model = model_cls(
                cfg_cls(
                    **fields,
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    remat_policy=config.model.remat_policy,
                )
            )
        text_data.check_model_fit(
            self.tokenizer,
            seq_len=config.seq_len,
            max_positions=_max_positions(self.model),
            model_vocab_size=_vocab_size(self.model),
        )
        self.num_micro_batches = config.batch_size // config.micro_batch_size
        self._loss_and_grad = accumulate.microbatched(self._sum_loss, self.num_micro_batches)
        self._eval_sums = jax.jit(lambda p, f, b: self._sum_loss(p, b, None, f)[:2])
        self._num_params = None

    # -- parameters (init_params, initial_params, frozen, export: ParamsMixin) -----------
    def _init_base(self, rng: jax.Array):
        ids = jnp.zeros((1, 8), jnp.int32)
        return self.model.init(rng, ids)["params"]

    # -- training -----------------------------------------------------------------------
    def _sum_loss(self, params, batch, rng, frozen):
        # rng: LoRA dropout keys (the decoders themselves have no dropout); None = eval
        variables = {"params": self.full_params(params, frozen, rng)}
        inputs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
        chunk_size = self.config.get("loss_chunk_size", 0)
        if chunk_size > 0:
            # LM head + loss chunk by chunk: the [B, S, vocab] logits never exist at once.
            hidden = self.model.apply(
                variables, batch["input_ids"], method="hidden_states", **inputs
            )
            loss_sum, count = losses.chunked_cross_entropy(
                hidden,
                lambda h: self.model.apply(variables, h, method="logits"),
                batch["labels"],
                batch["loss_mask"],
                chunk_size=chunk_size,
            )
        else:
            logits = self.model.apply(variables, batch["input_ids"], **inputs)
            loss_sum, count = losses.cross_entropy(logits, batch["labels"], batch["loss_mask"])
        return loss_sum, count.astype(jnp.float32), {}

    def loss_and_grad(self, params, batch, rng, frozen=None):
        return self._loss_and_grad(params, batch, rng, frozen)

    def train_iterator(self):
        return text_data.train_batches(
            self.data.train,
            batch_size=self.config.batch_size,
            seq_len=self.config.seq_len,
            seed=self.config.seed,
            mask_cut_documents=bool(self.config.data.instruction),
        )

    def skip_counts(self) -> dict[str, int]:
        stats = self.data.train.meta.get("stats", {})
        return {k: int(v) for k, v in stats.items() if k != "documents" and v}

    def throughput(self, examples_per_sec: float) -> dict[str, float]:
        """``perf/tokens_per_sec`` and ``perf/mfu`` against ``config.device``'s peak."""
        if self._num_params is None:
            shapes = jax.eval_shape(self._init_base, jax.random.key(0))
            total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
            wpe = shapes.get("wpe", {}).get("embedding")
            self._num_params = total - (int(np.prod(wpe.shape)) if wpe is not None else 0)
        tokens = examples_per_sec * self.config.seq_len
        n_layers, hidden = _shape(self.model)
        flops = tokens * perf.decoder_flops_per_token(
            self._num_params, n_layers, hidden, self.config.seq_len
        )
        return {"perf/tokens_per_sec": tokens, "perf/mfu": perf.mfu(flops, self.config.device)}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        """Validation ``loss`` (mean per token) and ``perplexity`` over the whole split."""
        if self.data.validation is None:
            return {}
        batches = text_data.eval_batches(
            self.data.validation,
            batch_size=self.config.eval.batch_size,
            seq_len=self.config.seq_len,
        )
        total, count = 0.0, 0.0
        for i, batch in enumerate(batches):
            if self.config.eval.max_batches and i >= self.config.eval.max_batches:
                break
            s, n = self._eval_sums(params, self.frozen, batch)
            total += float(s)
            count += float(n)
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def _pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple of 64 (nanoGPT's 50304 trick: MXU/tensor-core
    friendly shapes); the extra ids are never produced by the tokenizer."""
    return int(math.ceil(n / multiple) * multiple)
