"""CLIP contrastive training on image-caption data (the task behind ``configs/clip_coco.py``).

Loss: the symmetric InfoNCE of CLIP (``losses.contrastive_loss``) over the FULL batch,
with exact accumulation over micro-batches by GradCache (``losses.gradcache``): with
``batch_size = k * micro_batch_size`` every example sees all ``batch_size - 1`` in-batch
negatives, as if the batch were processed at once. Evaluation: image<->text recall@K over
all captions of the validation split (``evals.retrieval``); ``evaluate_examples`` also gives
each query's rank of the first hit (saved by the trainer to ``WORKDIR/eval/step_<N>.npz``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import config as config_lib
from jaxfit import objectives, sharding, target
from jaxfit import step as step_lib
from jaxfit.data import fingerprint, image_text
from jaxfit.data.image_text import caption_tokenizer as tokenizers
from jaxfit.data.image_text import pipeline, sources
from jaxfit.data.image_text import synthetic_coco as synthetic
from jaxfit.evals import retrieval
from jaxfit.models import attention
from jaxfit.models import clip as clip_model
from jaxfit.tasks.base import ParamSource, Task, base_model

log = logging.getLogger(__name__)


def validate(config) -> None:
    """The CLIP task's rules of a from-scratch config: the vision tower's ``patch_size``
    divides its ``image_size``.

    Raises:
      ConfigError: naming the key, its value and what is allowed.
    """
    vision = config_lib.get_field(config, "model.vision")
    if vision is None:
        return
    image, patch = vision.get("image_size"), vision.get("patch_size")
    if isinstance(image, int) and isinstance(patch, int) and (patch <= 0 or image % patch):
        allowed = f"must divide model.vision.image_size={image}"
        raise config_lib.invalid("model.vision.patch_size", patch, allowed)


# ``--search_seq_len`` does not apply: captions have the tokenizer's fixed context length.
SEARCHES_SEQ_LEN = False


def tokens_per_step(config) -> None:
    """None: a CLIP step is counted in image-text pairs (``batch_size``), not tokens."""
    return None


def model_flops(task, batch_size: int) -> None:
    """None: CLIP has no closed form here; the planner counts the traced step's FLOPs
    without rematerialisation or micro-batching (``jaxfit.plan.core``)."""
    return None


def derive_config(config, workdir, precision: config_lib.Precision):
    """``config`` with the fields a CLIP run derives filled (a copy): the synthetic demo
    set's root (``WORKDIR/synthetic_coco``) when ``data.synthetic.enabled`` and no
    ``data.root`` is given, and ``model.attention_impl`` ``"auto"`` / ``""`` (or absent)
    resolved for this machine's backend (:func:`attention_choice`)."""
    values = {}
    if config.data.synthetic.enabled and not config.data.root:
        values["data.root"] = str(Path(workdir) / "synthetic_coco")
    if config.model.get("attention_impl", "auto") in ("", "auto", None):
        values["model.attention_impl"] = attention_choice(config, precision)[0]
    return config_lib.set_fields(config, values, create=True) if values else config


def attention_choice(config, precision: config_lib.Precision) -> tuple[str, str]:
    """``(implementation, reason)`` for both towers on this machine
    (:func:`jaxfit.models.attention.choose_attention` per tower, in ``precision``'s compute
    dtype; the text tower's padding is key lengths, no dense mask): cuDNN when both towers
    can run it, else the first tower's fallback. Reads ``init_from``'s ``config.json`` (no
    weights). Logged at INFO."""
    if config.init_from:
        c = base_model(config.init_from, precision).config
        text, vision, text_len = c.text, c.vision, c.text.max_position_embeddings
    else:
        text = clip_model.CLIPTextConfig(**config.model.text.to_dict())
        vision = clip_model.CLIPVisionConfig(**config.model.vision.to_dict())
        text_len = config.data.context_length
    towers = (("text", text, text_len), ("vision", vision, vision.num_patches + 1))
    backend, cc = target.backend(), target.compute_capability()
    choices = []
    for name, tower, length in towers:
        impl, reason = attention.choose_attention(
            backend,
            jnp.dtype(precision.compute_dtype),
            tower.hidden_size // tower.num_attention_heads,
            seq_len=int(length),
            batch=int(config.micro_batch_size),
            compute_capability=cc,
        )
        choices.append((impl, f"{name} tower: {reason}"))
    impl = next((i for i, _ in choices if i != "cudnn"), "cudnn")
    reason = "; ".join(r for _, r in choices)
    log.info("attention: %s (%s)", impl, reason)
    return impl, reason


def synthetic_root(config, workdir) -> Path | None:
    """Where the synthetic demo set lives: ``data.root`` when ``data.synthetic.enabled``
    and that root is inside ``workdir`` (``WORKDIR/synthetic_coco`` when the user named
    none, :func:`derive_config`), else ``None``: a root the user named elsewhere is the
    user's data, read as ``data.format`` says and never written to."""
    if not config.data.synthetic.enabled or not config.data.root:
        return None
    root = Path(config.data.root).expanduser().resolve()
    return root if root.is_relative_to(Path(workdir).resolve()) else None


def data_files(config) -> dict[str, list[Path]]:
    """``{"train": [table], "val": [table]}``: the annotation files of a resolved config
    (coco / csv / jsonl; none for hf, nor while the synthetic set is still to be written).
    Images are not listed: their captions and paths are in the records' hash
    (``CLIPTask.data_fingerprint``), their pixels are not hashed."""
    out = {}
    for split in ("train", "val"):
        table = sources.captions_table(config.data, split)
        if table is None or not table.is_file():
            return {}
        out[split] = [table]
    return out


def ensure_synthetic_data(config) -> None:
    """Write the synthetic demo dataset to ``data.root`` unless it is there (once per
    root). Only for a root :func:`synthetic_root` accepts (inside the workdir)."""
    syn = config.data.synthetic
    root = Path(config.data.root)
    if not (root / "annotations").is_dir():
        log.info("writing the synthetic demo dataset to %s", root)
        synthetic.write_synthetic_coco(
            root,
            num_train=syn.num_train,
            num_val=syn.num_val,
            image_size=syn.image_size,
            seed=syn.seed,
            train_split=config.data.train_split,
            val_split=config.data.val_split,
        )


def model_config(spec, tokenizer: tokenizers.CaptionTokenizer) -> clip_model.CLIPConfig:
    """A from-scratch ``CLIPConfig`` from the ``config.model`` of ``spec`` (a
    ``jaxfit.tasks.RunSpec``), in its compute dtype, sized to the tokenizer."""
    config = spec.config
    m = config.model
    text = clip_model.CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.context_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **m.text.to_dict(),
    )
    vision = clip_model.CLIPVisionConfig(**m.vision.to_dict())
    dtype = jnp.dtype(spec.precision.compute_dtype)
    return clip_model.CLIPConfig(
        text=text,
        vision=vision,
        projection_dim=m.projection_dim,
        dtype=dtype,
        param_dtype=jnp.float32,
        remat_policy=m.remat_policy,
        **_execution_overrides(config),
    )


def _execution_overrides(config) -> dict:
    """``model.attention_impl`` / ``model.mlp_chunk_size`` when the config has them."""
    return {k: config.model[k] for k in ("attention_impl", "mlp_chunk_size") if config.model.get(k)}


@dataclasses.dataclass
class CaptionData:
    """What :func:`prepare_data` read and made: the records of both splits (``val``
    trimmed to ``eval.max_images``), their skip counters, the SHA-256 of the records
    before that trim (what a resume compares) and the caption tokenizer."""

    train_records: list
    val_records: list
    train_skips: image_text.SkipCounter
    val_skips: image_text.SkipCounter
    records_digest: dict
    tokenizer: tokenizers.CaptionTokenizer


def prepare_data(spec, workdir) -> CaptionData:
    """The CLIP task's data step (all its I/O; the trainer calls it through
    ``jaxfit.run.build_run``, never a planner): the synthetic demo set written under the
    workdir when it is to be (:func:`ensure_synthetic_data`), both splits' records read
    (``jaxfit.data.image_text.load_source``), and the caption tokenizer loaded (from
    ``data.tokenizer`` or ``init_from``) or trained on the training captions into
    ``WORKDIR/tokenizer``.

    Args:
      spec: the run's ``jaxfit.tasks.RunSpec`` (its resolved config and precision).
      workdir: the run directory.

    Raises:
      jaxfit.errors.DataError: a missing data root or an unreadable annotation file.
    """
    config = spec.config
    data = config.data
    if synthetic_root(config, workdir) is not None:
        ensure_synthetic_data(config)
    elif data.synthetic.enabled:
        log.info(
            "data.root=%s is set outside the workdir: training on it as data.format=%s says "
            "(the synthetic demo set is written only under the workdir)",
            data.root,
            data.format,
        )
    train_records, train_skips = image_text.load_source(data, "train")
    val_records, val_skips = image_text.load_source(data, "val")
    # the data, before eval.max_images (which a resume may change) trims it
    digest = {"train": _records_digest(train_records), "val": _records_digest(val_records)}
    if config.eval.max_images:
        val_records = val_records[: config.eval.max_images]
    if config.init_from:
        context = base_model(config.init_from, spec.precision).config.text.max_position_embeddings
        tokenizer = tokenizers.CaptionTokenizer.from_pretrained(
            data.tokenizer or config.init_from, context
        )
    else:
        captions = lambda: (c for r in train_records for c in r.captions)  # noqa: E731
        tokenizer = tokenizers.tokenizer_from_config(data, Path(workdir) / "tokenizer", captions)
    return CaptionData(train_records, val_records, train_skips, val_skips, digest, tokenizer)


class CLIPTask(Task):
    """See ``jaxfit.tasks`` for the interface. Built from a ``jaxfit.tasks.RunSpec``: its
    precision and LoRA specs, and its config's ``data, model, init_from, batch_size,
    micro_batch_size, eval, seed``.

    Args:
      spec: the run's ``jaxfit.tasks.RunSpec``.
      workdir: the run directory.
      mesh: the device mesh.
      data: :func:`prepare_data`'s result; ``None`` builds the task for planning
        (``abstract``: no records, and the tokenizer's shape only, ``data.vocab_size``
        ids, unless ``data.tokenizer`` names one). The constructor writes nothing and
        reads no data (an ``init_from`` checkpoint's ``config.json`` only).
    """

    peft_task_type = None  # PEFT has no task type for dual encoders

    def __init__(self, spec, workdir, mesh, *, data: CaptionData | None = None):
        self.spec, self.workdir, self.mesh = spec, Path(workdir), mesh
        self.config = config = spec.config
        self.abstract = abstract = data is None
        if abstract:  # planning: no images are read, no tokenizer trained
            self.train_records, self.val_records = [], []
            self.train_skips = self.val_skips = image_text.SkipCounter()
            self._records_digest = {}
            self.tokenizer = None
        else:
            self.train_records, self.val_records = data.train_records, data.val_records
            self.train_skips, self.val_skips = data.train_skips, data.val_skips
            self._records_digest = data.records_digest
            self.tokenizer = data.tokenizer
        if config.init_from:
            self.model = base_model(
                config.init_from,
                spec.precision,
                remat_policy=config.model.remat_policy,
                **_execution_overrides(config),
            )
        else:
            if abstract and config.data.tokenizer:  # a named tokenizer: its own size
                self.tokenizer = tokenizers.CaptionTokenizer.from_pretrained(
                    config.data.tokenizer, config.data.context_length
                )
            elif abstract:  # the BPE this run would train has (at most) data.vocab_size ids
                self.tokenizer = tokenizers.TokenizerShape(
                    config.data.vocab_size, config.data.context_length
                )
            self.model = clip_model.CLIPModel(model_config(spec, self.tokenizer))
        self.image_size = self.model.config.vision.image_size
        self.source = ParamSource(spec, self.model, self._init_base, abstract=abstract, mesh=mesh)
        self.num_micro_batches = config.batch_size // config.micro_batch_size
        self.loss_and_grad = objectives.contrastive_loss_and_grad(
            self.model,
            num_micro_batches=self.num_micro_batches,
            chunk_size=config.get("loss_chunk_size", 0),
        )
        self._eval_counter = image_text.SkipCounter()
        # evaluation: batches split over the mesh, embeddings replicated
        self._encode_image = step_lib.jit_eval(
            lambda p, x: self.model.apply({"params": p}, x, method="encode_image"), mesh
        )
        self._encode_text = step_lib.jit_eval(
            lambda p, ids, mask: self.model.apply({"params": p}, ids, mask, method="encode_text"),
            mesh,
        )

    def _init_base(self, rng: jax.Array):
        c = self.model.config
        ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
        pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3), jnp.float32)
        return self.model.init(rng, ids, pixels)["params"]

    def abstract_batch(self, batch_size: int) -> dict:
        """Shapes of a training batch (what ``train_iterator`` yields) of ``batch_size``
        image-caption pairs."""
        c = self.model.config
        size, context = c.vision.image_size, c.text.max_position_embeddings
        return {
            "pixel_values": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            "input_ids": jax.ShapeDtypeStruct((batch_size, context), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch_size, context), jnp.int32),
        }

    # -- training -----------------------------------------------------------------------
    def train_iterator(self):
        data = self.config.data
        return pipeline.train_iterator(
            self.train_records,
            self.tokenizer,
            image_size=self.image_size,
            global_batch_size=self.config.batch_size,
            seed=self.config.seed,
            augment=pipeline.augment_from_config(data),
            num_threads=data.num_threads,
            counter=self.train_skips,
            process_rows=sharding.process_batch_rows(self.mesh, self.config.batch_size),
        )

    def data_fingerprint(self) -> dict:
        """What a resume compares (``jaxfit.workdir.check_data``): per split, the
        annotation files' sizes and SHA-256 (``files``) and the SHA-256 of the records
        read from them (``records``: image ids and captions, in order, before
        ``eval.max_images``; an image embedded in an HF dataset has its content hash for
        id). Pixels are not hashed."""
        out = {
            split: {"files": fingerprint.files_fingerprint(paths)}
            for split, paths in data_files(self.config).items()
        }
        for split, digest in self._records_digest.items():
            out.setdefault(split, {})["records"] = digest
        return out

    def skip_counts(self) -> dict[str, int]:
        counts = dict(self.train_skips.as_dict())
        for k, v in self._eval_counter.as_dict().items():
            counts[f"eval_{k}"] = v
        return counts

    def throughput(self, examples_per_sec: float) -> dict[str, float]:
        return {"perf/images_per_sec": examples_per_sec}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, params) -> dict[str, float]:
        """Recall@K (percent) on the validation split; ``eval.ks`` gives K."""
        return self.evaluate_examples(params)[0]

    def evaluate_examples(self, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """:meth:`evaluate`'s metrics and the per-query results behind them.

        Returns:
          ``(metrics, examples)``; ``examples`` holds, in evaluation order, ``i2t_rank``
          (int32 per image) and ``t2i_rank`` (int32 per caption): the position of the first
          correct candidate among the query's top ``max(eval.ks)`` (``max(ks)`` when none
          is there), so ``hit@K = rank < K`` and ``R@K = 100 * mean(rank < K)``;
          ``ks``; and ``i2t_key`` / ``t2i_key`` (uint64 hashes of the image id, and of the
          image id and caption text), empty when some images could not be decoded.
        """
        images, texts, text_to_image = [], [], []
        batches = pipeline.eval_batches(
            self.val_records,
            self.tokenizer,
            image_size=self.image_size,
            batch_size=sharding.eval_batch_size(self.config.eval.batch_size, self.mesh),
            num_threads=self.config.data.num_threads,
            counter=self._eval_counter,
        )
        params = self.full_params(params, self.frozen)
        for kind, batch in batches:
            valid = batch["valid"]
            if kind == "image":
                placed = sharding.shard_global_batch(
                    {"pixel_values": batch["pixel_values"]}, self.mesh
                )
                emb = self._encode_image(params, placed["pixel_values"])
                images.append(np.asarray(emb)[valid])
            else:
                keys = ("input_ids", "attention_mask")
                placed = sharding.shard_global_batch({k: batch[k] for k in keys}, self.mesh)
                emb = self._encode_text(params, placed["input_ids"], placed["attention_mask"])
                texts.append(np.asarray(emb)[valid])
                text_to_image.append(batch["image_index"][valid])
        images, texts = np.concatenate(images), np.concatenate(texts)
        text_to_image = np.concatenate(text_to_image)
        ks = tuple(self.config.eval.ks)
        out = retrieval.recall_at_k(images, texts, text_to_image, ks=ks)
        out["num_images"] = float(len(images))
        out["num_captions"] = float(len(texts))
        i2t_rank, t2i_rank = retrieval.first_hit_ranks(images, texts, text_to_image, max(ks))
        examples = {"i2t_rank": i2t_rank, "t2i_rank": t2i_rank, "ks": np.asarray(ks, np.int32)}
        examples.update(_query_keys(self.val_records, len(images)))
        return out, examples


def _records_digest(records) -> dict:
    """``{"sha256", "size"}`` of image-caption records (ids and captions, in order)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.image_id, list(r.captions)]).encode() + b"\n")
    return {"sha256": h.hexdigest(), "size": len(records)}


def _query_keys(records, num_images: int) -> dict[str, np.ndarray]:
    """uint64 keys of the image and caption queries (see ``evaluate_examples``); empty
    when images were skipped (the evaluated images are then not known here)."""
    if num_images != len(records):
        return {"i2t_key": np.zeros(0, np.uint64), "t2i_key": np.zeros(0, np.uint64)}

    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()

    image = b"".join(key(str(r.image_id)) for r in records)
    caption = b"".join(key(f"{r.image_id}\n{c}") for r in records for c in r.captions)
    return {
        "i2t_key": np.frombuffer(image, np.uint64).copy(),
        "t2i_key": np.frombuffer(caption, np.uint64).copy(),
    }
