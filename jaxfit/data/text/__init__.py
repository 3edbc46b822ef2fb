"""Text data for causal language models: documents -> tokenizer -> token files -> batches.

Modules: ``prepare`` (``default_text_config``, ``prepare_text_data``, ``check_model_fit``),
``documents`` (the documents of a split, validation held out), ``sources`` (path specs,
formats, fingerprints), ``readers`` (one reader per format), ``records`` (document types,
``TextStats``), ``tokenizer``
(``TextTokenizer``: pretrained, or a BPE trained on the text), ``token_file`` (cached flat
token files), ``batches`` (``[B, seq_len]`` train / eval windows), ``packing`` (batches of
whole examples, packed or one per row), ``epochs`` (their shared resumable order),
``chat`` (conversations rendered with a chat template, assistant-only loss),
``tokenizer_files`` (Llama 3 tiktoken / Llama 2 SentencePiece files as HF tokenizers),
``synthetic_corpus`` (the demo story corpus and chats).
"""

from jaxfit.data.text.batches import (
    BATCH_INT_KEYS,
    EvalBatches,
    TrainBatches,
    eval_batches,
    train_batches,
)
from jaxfit.data.text.documents import load_documents
from jaxfit.data.text.prepare import (
    TextData,
    check_model_fit,
    default_text_config,
    prepare_text_data,
)
from jaxfit.data.text.records import (
    ChatExample,
    Document,
    InstructionExample,
    TextStats,
    document_text,
)
from jaxfit.data.text.sources import has_validation, source_files
from jaxfit.data.text.synthetic_corpus import write_synthetic_chat, write_synthetic_text
from jaxfit.data.text.token_file import TokenFile, build_token_file, token_dtype
from jaxfit.data.text.tokenizer import (
    TextTokenizer,
    default_tokenizer_config,
    load_or_train,
    load_pretrained,
    train_text_bpe,
)

__all__ = [
    "BATCH_INT_KEYS",
    "ChatExample",
    "Document",
    "EvalBatches",
    "InstructionExample",
    "TextData",
    "TextStats",
    "TextTokenizer",
    "TokenFile",
    "TrainBatches",
    "build_token_file",
    "check_model_fit",
    "default_text_config",
    "default_tokenizer_config",
    "document_text",
    "eval_batches",
    "has_validation",
    "load_documents",
    "load_or_train",
    "load_pretrained",
    "prepare_text_data",
    "source_files",
    "token_dtype",
    "train_batches",
    "train_text_bpe",
    "write_synthetic_chat",
    "write_synthetic_text",
]
