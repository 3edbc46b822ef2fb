"""Data for the two kinds of run, one subpackage each (see docs/DESIGN.md, Data).

* ``jaxfit.data.image_text``: image-caption data for CLIP (sources, decoding and CLIP
  preprocessing, grain pipelines, the caption tokenizer, synthetic COCO-layout images).
* ``jaxfit.data.text``: text for causal language models (documents from files or
  datasets, the LM tokenizer, cached token files, batches, a synthetic demo corpus).

``jaxfit.data.bpe`` is the byte-level BPE training both tokenizers share.
"""
