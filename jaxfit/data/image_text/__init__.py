"""Image-caption data for CLIP: sources, CLIP preprocessing, grain pipelines, tokenizer.

Modules: ``sources`` (COCO / CSV / JSONL / HF -> ``ImageCaptions`` records, with a
``SkipCounter``), ``images`` (decode + CLIP preprocessing), ``pipeline`` (grain train and
eval streams), ``caption_tokenizer`` (``CaptionTokenizer``: HF, OpenAI's BPE file, or a BPE
trained on the captions), ``synthetic_coco`` (demo images in COCO layout).
"""

from jaxfit.data.image_text.caption_tokenizer import (
    CaptionTokenizer,
    TokenizerShape,
    clip_tokenizer_from_bpe,
    load_or_train_caption_bpe,
    tokenizer_from_config,
    train_caption_bpe,
)
from jaxfit.data.image_text.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Augment,
    ImageDecodeError,
    decode_image,
    load_image,
)
from jaxfit.data.image_text.pipeline import (
    TrainIterator,
    augment_from_config,
    eval_batches,
    train_iterator,
)
from jaxfit.data.image_text.sources import (
    ImageCaptions,
    SkipCounter,
    default_data_config,
    load_source,
)
from jaxfit.data.image_text.synthetic_coco import write_synthetic_coco

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Augment",
    "CaptionTokenizer",
    "ImageCaptions",
    "ImageDecodeError",
    "SkipCounter",
    "TokenizerShape",
    "TrainIterator",
    "augment_from_config",
    "clip_tokenizer_from_bpe",
    "decode_image",
    "default_data_config",
    "eval_batches",
    "load_image",
    "load_or_train_caption_bpe",
    "load_source",
    "tokenizer_from_config",
    "train_caption_bpe",
    "train_iterator",
    "write_synthetic_coco",
]
