"""Causal language modelling (GPT-2 / Llama-style decoders) on text corpora.

Loss: token-level cross-entropy of next-token prediction over the unmasked tokens of the
whole batch (padding, and prompt tokens of instruction data, are masked), accumulated
exactly over micro-batches (``accumulate.microbatched``). Evaluation: validation loss and
perplexity ``exp(sum loss / tokens)`` over every validation token once; ``evaluate_examples``
also gives the per-sequence sums behind them (the trainer saves them to
``WORKDIR/eval/step_<N>.npz`` for bootstrap intervals: ``experiments/compare_runs.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import config as config_lib
from jaxfit import objectives, perf, sharding, target
from jaxfit import step as step_lib
from jaxfit.data import fingerprint
from jaxfit.data import text as text_data
from jaxfit.data.text import write_synthetic_text
from jaxfit.hf import families
from jaxfit.lora import adapters as lora_adapters
from jaxfit.models import attention, rope
from jaxfit.tasks.base import ParamSource, Task, base_model

log = logging.getLogger(__name__)


def _vocab_size(model) -> int:
    return families.for_model(model).vocab_size(model.config)


def _max_positions(model) -> int:
    return families.for_model(model).max_positions(model.config)


def _shape(model) -> tuple[int, int]:
    """(num_layers, hidden_size) of a decoder of any family (the registry's accessors)."""
    family = families.for_model(model)
    return family.num_layers(model.config), family.hidden_size(model.config)


def validate(config) -> None:
    """The LM task's rules of a from-scratch config: ``model.family`` one of the LM
    families (:func:`jaxfit.hf.families.names`), ``seq_len`` within its
    ``model.config``'s positions.

    Raises:
      ConfigError: naming the key, its value and what is allowed.
    """
    model = config_lib.get_field(config, "model")
    if model is None or "family" not in model:
        return
    if model.family not in families.names("lm"):
        allowed = f"expected one of {families.names('lm')}"
        raise config_lib.invalid("model.family", model.family, allowed)
    if "config" in model:
        field = families.get(model.family, task="lm").decoder.max_positions
        config_lib.check_seq_len(config, model.config.get(field), f"model.config.{field}")


# The planner's ``--search_seq_len`` applies: a step trains on ``seq_len``-token sequences.
SEARCHES_SEQ_LEN = True


def tokens_per_step(config) -> int:
    """Tokens of one optimizer step: ``batch_size`` sequences of ``seq_len`` tokens
    (``config`` a ConfigDict or a ``config.json`` dict)."""
    return int(config["batch_size"]) * int(config["seq_len"])


def model_flops(task: LMTask, batch_size: int) -> float:
    """Model FLOPs of one optimizer step of ``batch_size`` sequences:
    :meth:`LMTask.flops_per_token` x ``batch_size`` x ``seq_len`` (the decoder formula of
    :func:`jaxfit.perf.decoder_flops_per_token`)."""
    return task.flops_per_token() * batch_size * int(task.config.seq_len)


def derive_config(config, workdir, precision: config_lib.Precision):
    """``config`` with the fields an LM run derives filled (a copy): the tokenizer of
    ``init_from`` when none is named, the synthetic corpus's path in ``workdir``, and
    ``model.attention_impl`` ``"auto"`` / ``""`` resolved for this machine's backend
    (:func:`attention_choice`; reads ``init_from``'s ``config.json``, no weights)."""
    data_cfg = config.data
    values = {}
    if config.init_from and not data_cfg.tokenizer.name:
        values["data.tokenizer.name"] = config.init_from
    if data_cfg.get("synthetic") and data_cfg.synthetic.enabled and not data_cfg.path:
        values["data.path"] = str(Path(workdir) / "synthetic_text.txt")
    if config.model.get("attention_impl", "auto") in ("", "auto", None):
        values["model.attention_impl"] = attention_choice(config, precision)[0]
    return config_lib.set_fields(config, values, create=True) if values else config


def synthetic_path(config, workdir) -> Path | None:
    """Where the synthetic demo corpus is written: ``data.path`` when
    ``data.synthetic.enabled`` and that path is inside ``workdir``
    (``WORKDIR/synthetic_text.txt`` when the user named none, :func:`derive_config`),
    else ``None``: a path the user named elsewhere is the user's data, read (a missing
    file stops the run) and never written."""
    data_cfg = config.data
    if not (data_cfg.get("synthetic") and data_cfg.synthetic.enabled and data_cfg.path):
        return None
    path = Path(data_cfg.path).expanduser().resolve()
    return path if path.is_relative_to(Path(workdir).resolve()) else None


def data_files(config) -> dict[str, list[Path]]:
    """``{split: [local source files]}`` of a resolved LM config, read from nothing but the
    directory listings (``{}`` while the synthetic corpus is still to be written)."""
    data_cfg = config.data
    if data_cfg.get("synthetic") and data_cfg.synthetic.enabled:
        if not Path(data_cfg.path).is_file():
            return {}
    out = {"train": text_data.source_files(data_cfg, "train")}
    if text_data.has_validation(data_cfg):
        out["validation"] = text_data.source_files(data_cfg, "validation")
    return out


def _head_dim(config, precision: config_lib.Precision) -> int:
    """Per-head size of the decoder ``config`` trains (``init_from``'s ``config.json``, or
    ``model.config`` over the family's defaults)."""
    if config.init_from:
        return base_model(config.init_from, precision).config.head_dim
    family = families.get(config.model.family, task="lm")
    fields = dict(config.model.config.to_dict())
    fields["vocab_size"] = fields.get("vocab_size") or 1  # irrelevant to the head size
    return family.config_class(**fields).head_dim


def attention_choice(config, precision: config_lib.Precision) -> tuple[str, str]:
    """``(implementation, reason)`` for this machine
    (:func:`jaxfit.models.attention.choose_attention`): ``precision``'s compute dtype, the
    head size, ``seq_len`` queries, ``micro_batch_size`` sequences per call, packed
    documents (LM batches always carry segment ids). Logged at INFO."""
    impl, reason = attention.choose_attention(
        target.backend(),
        jnp.dtype(precision.compute_dtype),
        _head_dim(config, precision),
        seq_len=int(config.seq_len),
        batch=int(config.micro_batch_size),
        segment_ids=True,
        compute_capability=attention.gpu_compute_capability(),
    )
    log.info("attention: %s (%s)", impl, reason)
    return impl, reason


def prepare_data(spec, workdir):
    """The LM task's data step (all its I/O; the trainer calls it through
    ``jaxfit.run.build_run``, never a planner): the synthetic corpus written when it is to
    be (:func:`synthetic_path`), then ``jaxfit.data.text.prepare_text_data`` (the
    tokenizer loaded or trained, the corpus tokenized into ``WORKDIR``'s token files).

    Args:
      spec: the run's ``jaxfit.tasks.RunSpec`` (its resolved config).
      workdir: the run directory.

    Returns:
      ``jaxfit.data.text.prepare_text_data``'s result (``.tokenizer`` among it).
    """
    config = spec.config
    data_cfg = config.data
    if synthetic_path(config, workdir) is not None and not Path(data_cfg.path).is_file():
        write_synthetic_text(
            data_cfg.path,
            num_documents=data_cfg.synthetic.num_documents,
            seed=data_cfg.synthetic.seed,
        )
    return text_data.prepare_text_data(data_cfg, Path(workdir))


class LMTask(Task):
    """See ``jaxfit.tasks`` for the interface. Built from a ``jaxfit.tasks.RunSpec``: its
    precision and LoRA specs, and its config's ``model, init_from, data, seq_len,
    batch_size, micro_batch_size, eval, seed, device`` (not changed here)."""

    def __init__(self, spec, workdir, mesh, *, data=None):
        self.spec, self.workdir, self.mesh = spec, Path(workdir), mesh
        self.config = config = spec.config
        self.abstract = abstract = data is None
        self.data = data  # prepare_data's; None when planning: no corpus, no tokenizer
        self.tokenizer = None if abstract else data.tokenizer
        if config.init_from:
            self.model = base_model(config.init_from, spec.precision, **self._model_overrides())
        else:
            self.model = self._scratch_model()
        if not abstract:
            text_data.check_model_fit(
                self.tokenizer,
                seq_len=config.seq_len,
                max_positions=_max_positions(self.model),
                model_vocab_size=_vocab_size(self.model),
            )
        self.source = ParamSource(spec, self.model, self._init_base, abstract=abstract, mesh=mesh)
        self.num_micro_batches = config.batch_size // config.micro_batch_size
        chunk_size = config.get("loss_chunk_size", 0)
        self.loss_and_grad = objectives.lm_loss_and_grad(
            self.model, num_micro_batches=self.num_micro_batches, chunk_size=chunk_size
        )
        eval_sums = objectives.lm_eval_sums(self.model, chunk_size=chunk_size)
        self._eval_sums = step_lib.jit_eval(eval_sums, mesh)  # batches split over the mesh
        self._flops_per_token = None

    def _init_base(self, rng: jax.Array):
        ids = jnp.zeros((1, 8), jnp.int32)
        return self.model.init(rng, ids)["params"]

    def _model_overrides(self) -> dict:
        """Model-config fields the run sets whatever the model: remat policy, attention,
        MLP chunking (when the config has them)."""
        out = {"remat_policy": self.config.model.remat_policy}
        for field in ("attention_impl", "mlp_chunk_size"):
            if self.config.model.get(field):
                out[field] = self.config.model[field]
        return out

    def _scratch_model(self):
        """The from-scratch decoder of ``config.model``, its vocabulary sized to the
        tokenizer (without data, when planning: ``model.config.vocab_size``, else the
        named tokenizer's size, else the BPE target ``data.tokenizer.vocab_size``)."""
        config = self.config
        family = families.get(config.model.family, task="lm")  # ValueError lists the choices
        cfg_cls, model_cls = family.config_class, family.model_class
        fields = dict(config.model.config.to_dict())
        if isinstance(fields.get("rope_scaling"), dict):  # Llama 3.1's "llama3" scaling
            fields["rope_scaling"] = rope.RopeScaling.from_hf(
                fields["rope_scaling"], fields.get("max_position_embeddings", 2048)
            )
        tokenizer = self.tokenizer
        if tokenizer is None and config.data.tokenizer.name and not fields.get("vocab_size"):
            tokenizer = text_data.load_or_train(config.data.tokenizer, self.workdir)
        if tokenizer is not None:
            fields["vocab_size"] = fields.get("vocab_size") or _pad_vocab(tokenizer.vocab_size)
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            if tokenizer.bos_token_id is not None:
                fields.setdefault("bos_token_id", tokenizer.bos_token_id)
        else:
            fields["vocab_size"] = fields.get("vocab_size") or _pad_vocab(
                config.data.tokenizer.vocab_size
            )
        return model_cls(
            cfg_cls(
                **fields,
                dtype=jnp.dtype(self.spec.precision.compute_dtype),
                param_dtype=jnp.float32,
                **self._model_overrides(),
            )
        )

    def abstract_batch(self, batch_size: int) -> dict:
        """Shapes of a training batch (what ``train_iterator`` yields) of ``batch_size``
        sequences of ``config.seq_len`` tokens."""
        shape = (batch_size, self.config.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in text_data.BATCH_INT_KEYS}
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        return batch

    # -- training -----------------------------------------------------------------------
    def train_iterator(self):
        batches = text_data.train_batches(
            self.data.train,
            batch_size=self.config.batch_size,
            seq_len=self.config.seq_len,
            seed=self.config.seed,
            mask_cut_documents=bool(self.config.data.instruction),
        )
        # this process's rows of each global batch (all of them for one process)
        batches.process_rows = sharding.process_batch_rows(self.mesh, self.config.batch_size)
        return batches

    def data_fingerprint(self) -> dict:
        """What a resume compares (``jaxfit.workdir.check_data``): per split, the source
        files' sizes and SHA-256 (``files``) and the token file's content hash and length
        (``tokens``)."""
        out = {
            split: {"files": fingerprint.files_fingerprint(paths)}
            for split, paths in data_files(self.config).items()
        }
        for split, tf in (("train", self.data.train), ("validation", self.data.validation)):
            if tf is not None:
                tokens = {"sha256": tf.content_sha256, "num_tokens": tf.num_tokens}
                out.setdefault(split, {})["tokens"] = tokens
        return out

    def skip_counts(self) -> dict[str, int]:
        stats = self.data.train.meta.get("stats", {})
        return {k: int(v) for k, v in stats.items() if k != "documents" and v}

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (:func:`jaxfit.perf.decoder_flops_per_token`:
        ``6 N + 12 L d T``, a frozen LoRA / QLoRA base counting ``4 N``), with ``N`` the
        matmul parameters (lookup-only embeddings excluded), adapters included."""
        if self._flops_per_token is None:
            params = self.full_params(self.abstract_params(), self.abstract_frozen())
            lookup = self.model.lookup_only_params()
            matmul = {k: v for k, v in params.items() if k not in lookup}
            report = lora_adapters.trainable_report(matmul)
            frozen = report["total"] - report["trainable"] if self.frozen_base else 0
            n_layers, hidden = _shape(self.model)
            self._flops_per_token = perf.decoder_flops_per_token(
                report["total"], n_layers, hidden, self.config.seq_len, frozen_params=frozen
            )
        return self._flops_per_token

    def throughput(self, examples_per_sec: float) -> dict[str, float]:
        """``perf/tokens_per_sec`` and ``perf/mfu`` against ``config.device``'s peak."""
        tokens = examples_per_sec * self.config.seq_len
        flops = tokens * self.flops_per_token()
        return {"perf/tokens_per_sec": tokens, "perf/mfu": perf.mfu(flops, self.config.device)}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        """Validation ``loss`` (mean per token) and ``perplexity`` over the whole split."""
        return self.evaluate_examples(params)[0]

    def evaluate_examples(self, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """:meth:`evaluate`'s metrics and the per-example results they are the mean of.

        Returns:
          ``(metrics, examples)``. ``examples`` (empty without a validation split) holds,
          per validation sequence with at least one loss token, in evaluation order:
          ``loss_sum`` (float64, summed token losses in nats), ``tokens`` (float64, loss
          tokens) and ``key`` (uint64, a hash of the sequence's labels and mask: two runs
          evaluated the same examples when their keys are equal). ``loss == sum(loss_sum)
          / sum(tokens)``.
        """
        if self.data.validation is None:
            return {}, {}
        batches = text_data.eval_batches(
            self.data.validation,
            batch_size=sharding.eval_batch_size(self.config.eval.batch_size, self.mesh),
            seq_len=self.config.seq_len,
        )
        sums, counts, keys = [], [], []
        for i, batch in enumerate(batches):
            if self.config.eval.max_batches and i >= self.config.eval.max_batches:
                break
            placed = sharding.shard_global_batch(batch, self.mesh)
            s, n = jax.device_get(self._eval_sums(params, self.frozen, placed))
            keep = n > 0  # padding rows (and sequences without loss tokens) are no examples
            sums.append(np.asarray(s, np.float64)[keep])
            counts.append(np.asarray(n, np.float64)[keep])
            keys.append(_row_keys(batch["labels"][keep], batch["loss_mask"][keep]))
        examples = {
            "loss_sum": np.concatenate(sums),
            "tokens": np.concatenate(counts),
            "key": np.concatenate(keys),
        }
        count = float(examples["tokens"].sum())
        loss = float(examples["loss_sum"].sum()) / max(count, 1.0)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
        return metrics, examples


def _row_keys(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint64 hash per row of ``labels`` and ``mask`` (identifies an evaluation example)."""
    rows = [
        hashlib.blake2b(y.tobytes() + m.tobytes(), digest_size=8).digest()
        for y, m in zip(np.ascontiguousarray(labels, np.int32), np.ascontiguousarray(mask > 0))
    ]
    return np.frombuffer(b"".join(rows), np.uint64).copy() if rows else np.zeros(0, np.uint64)


def _pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple of 64 (nanoGPT's 50304 trick: MXU/tensor-core
    friendly shapes); the extra ids are never produced by the tokenizer."""
    return int(math.ceil(n / multiple) * multiple)
