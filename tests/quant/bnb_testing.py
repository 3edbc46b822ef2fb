"""Helpers of the bitsandbytes checkpoint tests: tiny Llama checkpoints saved by
transformers + bitsandbytes on a CPU, and the float32 reference of their logits.

Importable from the tests in ``tests/quant`` as ``bnb_testing`` (pytest puts a test
file's directory on ``sys.path``). Needs torch, transformers and bitsandbytes: call
:func:`require` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

PROJ = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def require():
    """``(torch, transformers, bitsandbytes.functional)``, or skip the test."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    F = pytest.importorskip("bitsandbytes.functional")
    return torch, transformers, F


def bnb_config(*, quant_type="nf4", double_quant=True, compute_dtype="float32", load_in_8bit=False):
    """transformers' ``BitsAndBytesConfig`` of a 4-bit (or LLM.int8) CPU save."""
    torch, transformers, _ = require()
    if load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def float32_reference(model):
    """On CPUs with AVX512-BF16, bitsandbytes' inference path repacks the weights and
    computes in bfloat16 whatever ``bnb_4bit_compute_dtype`` says ("cpu fused op only
    support bf16", ``bitsandbytes/backends/cpu/ops.py``), so its logits depend on the CPU:
    the float32 reference is the generic path (dequantize, then a float32 matmul)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def save_quantized(float_dir: Path, out: Path, *, dtype="float32", max_shard_size=None, **kw):
    """Load ``float_dir`` in transformers with bitsandbytes quantisation (:func:`bnb_config`
    keywords) on the CPU, save it to ``out``; returns the quantised model (float32
    reference path) or ``None`` where transformers cannot quantise on this CPU."""
    torch, transformers, _ = require()
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(
            float_dir,
            quantization_config=bnb_config(**kw),
            device_map="cpu",
            dtype=getattr(torch, dtype),
        ).eval()
    except Exception:  # bitsandbytes / transformers without CPU quantisation
        return None
    float32_reference(model)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **extra)
    return model


def write_by_hand(float_model, out):
    """The tensors transformers writes for a double-quantised NF4 save, built with
    bitsandbytes directly (``Linear4bit._save_to_state_dict``)."""
    torch, transformers, F = require()
    import safetensors.torch

    sd = {}
    for name, value in float_model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith("_proj.weight") and ".layers." in name:
            packed, state = F.quantize_4bit(
                value, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            sd[name] = packed
            sd.update({f"{module}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        else:
            sd[name] = value.contiguous()
    safetensors.torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = float_model.config.to_dict()
    config["quantization_config"] = bnb_config().to_dict()
    (out / "config.json").write_text(json.dumps(config))


def reference_weights(directory: Path, name: str, dtype=None) -> np.ndarray:
    """``bitsandbytes.functional.dequantize_4bit`` of the stored NF4 weight ``name`` (HF
    layout ``[out, in]``), cast to ``dtype`` (a torch dtype) when given, as float32 numpy."""
    torch, _, F = require()
    import safetensors.torch

    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(safetensors.torch.load_file(str(f)))
    stats = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
    w = F.dequantize_4bit(sd[name], F.QuantState.from_dict(stats, device="cpu"))
    if dtype is not None:
        w = w.to(dtype)
    return w.float().numpy()
