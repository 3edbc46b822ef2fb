"""Image-caption data for CLIP: sources, CLIP preprocessing, grain pipelines, tokenizers.

See docs/DESIGN.md (Data). Modules: ``image_text`` (sources -> ``ImageCaptions`` records),
``images`` (decode + CLIP preprocessing), ``pipeline`` (grain train/eval streams),
``tokenizers`` (``CaptionTokenizer``), ``synthetic`` (demo data in COCO layout).
"""

from jaxfit.data.image_text import ImageCaptions, SkipCounter, default_data_config, load_source
from jaxfit.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Augment, ImageDecodeError
from jaxfit.data.pipeline import TrainIterator, augment_from_config, eval_batches, train_iterator
from jaxfit.data.synthetic import write_synthetic_coco
from jaxfit.data.tokenizers import (
    CaptionTokenizer,
    clip_tokenizer_from_bpe,
    load_or_train,
    tokenizer_from_config,
    train_bpe,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Augment",
    "CaptionTokenizer",
    "ImageCaptions",
    "ImageDecodeError",
    "SkipCounter",
    "TrainIterator",
    "augment_from_config",
    "clip_tokenizer_from_bpe",
    "default_data_config",
    "eval_batches",
    "load_or_train",
    "load_source",
    "tokenizer_from_config",
    "train_bpe",
    "train_iterator",
    "write_synthetic_coco",
]
