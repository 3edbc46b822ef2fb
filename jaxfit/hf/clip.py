"""Hugging Face interop for CLIP (``model_type: clip``, ``transformers.CLIPModel``).

The name map follows ``transformers/models/clip/modeling_clip.py``: ``nn.Linear`` weights
are transposed, the patch embedding ``nn.Conv2d`` weight ``[D, C, P, P]`` becomes an NHWC
kernel ``[P, P, C, D]``, ``nn.LayerNorm.weight`` is Flax's ``scale``, ``nn.Embedding.weight``
is ``embedding``, and ``class_embedding`` / ``logit_scale`` are copied as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxfit.hf.mapping import IDENTITY, Rule, conv2d, linear
from jaxfit.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# Non-persistent buffers that older transformers versions wrote into checkpoints.
IGNORE = ("position_ids",)


def _square(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"CLIP vision {name} {value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def _single_id(name: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"CLIP text {name} {value!r}: a single token id is required")
        value = value[0]
    return value


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


def config_from_hf(hf_config: dict) -> CLIPConfig:
    """:class:`CLIPConfig` from an HF CLIP ``config.json`` dict.

    Missing fields take the HF defaults; the legacy ``text_config_dict`` /
    ``vision_config_dict`` entries override ``text_config`` / ``vision_config`` (as
    ``transformers.CLIPConfig`` does). Unknown fields are ignored.

    Raises:
      ValueError: non-square image/patch size, several ``eos_token_id`` values, or an
        invalid architecture (see the config classes).
    """
    text = dict(hf_config.get("text_config") or {})
    text.update(hf_config.get("text_config_dict") or {})
    vision = dict(hf_config.get("vision_config") or {})
    vision.update(hf_config.get("vision_config_dict") or {})
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if k in text:
            text[k] = _single_id(k, text[k])
    for k in ("image_size", "patch_size"):
        if k in vision:
            vision[k] = _square(k, vision[k])
    top = {
        k: hf_config[k]
        for k in ("projection_dim", "logit_scale_init_value")
        if hf_config.get(k) is not None
    }
    return CLIPConfig(
        text=CLIPTextConfig(**_fields(CLIPTextConfig, text)),
        vision=CLIPVisionConfig(**_fields(CLIPVisionConfig, vision)),
        **top,
    )


def config_to_hf(config: CLIPConfig) -> dict:
    """HF ``config.json`` dict for ``config`` that ``transformers.CLIPModel`` loads."""
    common = {"attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0}
    text = {
        "model_type": "clip_text_model",
        **dataclasses.asdict(config.text),
        "projection_dim": config.projection_dim,
        **common,
    }
    vision = {
        "model_type": "clip_vision_model",
        **dataclasses.asdict(config.vision),
        "projection_dim": config.projection_dim,
        **common,
    }
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": float(config.logit_scale_init_value),
        "initializer_factor": 1.0,
        "text_config": text,
        "vision_config": vision,
        "dtype": jnp.dtype(config.param_dtype).name,
    }


def _encoder_rules(hf_prefix: str, tower: str, num_layers: int) -> list[Rule]:
    rules = []
    layer = f"{hf_prefix}.encoder.layers.{{i}}"
    for ln in ("layer_norm1", "layer_norm2"):
        rules.append(
            Rule(f"{layer}.{ln}.weight", (tower, "layers", ln, "scale"), IDENTITY, num_layers)
        )
        rules.append(
            Rule(f"{layer}.{ln}.bias", (tower, "layers", ln, "bias"), IDENTITY, num_layers)
        )
    dense = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    dense += [("mlp", "fc1"), ("mlp", "fc2")]
    for block, proj in dense:
        path = (tower, "layers", block, proj)
        rules.append(Rule(f"{layer}.{block}.{proj}.weight", (*path, "kernel"), linear, num_layers))
        rules.append(Rule(f"{layer}.{block}.{proj}.bias", (*path, "bias"), IDENTITY, num_layers))
    return rules


def _layer_norm_rules(hf_name: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{hf_name}.weight", (*path, "scale")), Rule(f"{hf_name}.bias", (*path, "bias"))]


def rules(config: CLIPConfig) -> list[Rule]:
    """The CLIP name map: one :class:`Rule` per HF tensor (per-layer ones with ``{i}``)."""
    t, v = "text_model", "vision_model"
    return [
        Rule("logit_scale", ("logit_scale",)),
        Rule("text_projection.weight", ("text_projection", "kernel"), linear),
        Rule("visual_projection.weight", ("visual_projection", "kernel"), linear),
        # text tower
        Rule(f"{t}.embeddings.token_embedding.weight", (t, "token_embedding", "embedding")),
        Rule(f"{t}.embeddings.position_embedding.weight", (t, "position_embedding", "embedding")),
        *_encoder_rules(t, t, config.text.num_hidden_layers),
        *_layer_norm_rules(f"{t}.final_layer_norm", (t, "final_layer_norm")),
        # vision tower
        Rule(f"{v}.embeddings.class_embedding", (v, "class_embedding")),
        Rule(f"{v}.embeddings.patch_embedding.weight", (v, "patch_embedding", "kernel"), conv2d),
        Rule(f"{v}.embeddings.position_embedding.weight", (v, "position_embedding", "embedding")),
        *_layer_norm_rules(f"{v}.pre_layrnorm", (v, "pre_layrnorm")),
        *_encoder_rules(v, v, config.vision.num_hidden_layers),
        *_layer_norm_rules(f"{v}.post_layernorm", (v, "post_layernorm")),
    ]


def init_inputs(config: CLIPConfig) -> dict:
    """Keyword inputs for ``CLIPModel.init``: one short caption and one image (zeros)."""
    v = config.vision
    return {
        "input_ids": jnp.zeros((1, min(4, config.text.max_position_embeddings)), jnp.int32),
        "pixel_values": jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
    }
