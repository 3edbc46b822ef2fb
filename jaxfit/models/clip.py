"""CLIP dual encoder (ViT image tower + causal text transformer), Flax linen.

References:
  Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision" (arXiv:2103.00020), sec. 2.4-2.5 and fig. 3.
  Hugging Face ``transformers/models/clip/modeling_clip.py`` (parameter names, EOT
  pooling, output conventions) and OpenAI ``clip/model.py`` (initialisation).

Parameter tree (names follow the HF module tree; ``[L]`` is the scanned layer axis)::

    logit_scale                                   []
    text_model/token_embedding/embedding          [vocab, Dt]
    text_model/position_embedding/embedding       [max_positions, Dt]
    text_model/layers/{layer_norm1,layer_norm2}/{scale,bias}          [L, Dt]
    text_model/layers/self_attn/{q,k,v,out}_proj/{kernel [L, Dt, Dt], bias [L, Dt]}
    text_model/layers/mlp/fc1/{kernel [L, Dt, F], bias}, mlp/fc2/{kernel [L, F, Dt], bias}
    text_model/final_layer_norm/{scale,bias}      [Dt]
    vision_model/class_embedding                  [Dv]
    vision_model/patch_embedding/kernel           [P, P, C, Dv]
    vision_model/position_embedding/embedding     [num_patches + 1, Dv]
    vision_model/{pre_layrnorm,post_layernorm}/{scale,bias}           [Dv]
    vision_model/layers/...                       (as text_model/layers, width Dv)
    text_projection/kernel [Dt, E], visual_projection/kernel [Dv, E]
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxfit import placement
from jaxfit.models import attention, layers

Dtype = Any

# Upper bound of the learnable log temperature: the logit scale exp(logit_scale) is
# clipped at 100 (Radford et al. 2021, sec. 2.5: "clipped to prevent scaling the logits
# by more than 100"); open_clip clamps the parameter to [0, log(100)].
LOGIT_SCALE_MAX = math.log(100.0)


def logit_scale_value(logit_scale: jax.Array) -> jax.Array:
    """The multiplicative logit scale ``exp(min(logit_scale, log(100)))``, float32 scalar.

    Args:
      logit_scale: the ``logit_scale`` parameter (log of the inverse temperature), any
        float dtype, shape ``[]``.

    Returns:
      float32 ``[]``. Its gradient w.r.t. ``logit_scale`` is 0 above ``LOGIT_SCALE_MAX``.
    """
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), LOGIT_SCALE_MAX))


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||_2`` over the last axis in float32 (norm floored at 1e-12, as
    ``torch.nn.functional.normalize``)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def _check_heads(name: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(
            f"{name}: hidden_size {hidden_size} is not a multiple of num_attention_heads "
            f"{num_heads}"
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower; field names and defaults as HF ``CLIPTextConfig`` (ViT-B/32 text).

    ``eos_token_id`` selects the pooling (see :meth:`CLIPTextTransformer.__call__`).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_heads("CLIPTextConfig", self.hidden_size, self.num_attention_heads)
        layers.activation(self.hidden_act)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Image tower; field names and defaults as HF ``CLIPVisionConfig`` (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_heads("CLIPVisionConfig", self.hidden_size, self.num_attention_heads)
        layers.activation(self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig(layers.ExecutionConfig):
    """CLIP dual encoder. The defaults are OpenAI ViT-B/32 (``openai/clip-vit-base-patch32``).

    Attributes:
      text, vision: the two towers.
      projection_dim: size ``E`` of the joint embedding space.
      logit_scale_init_value: initial log inverse temperature, ``log(1 / 0.07)``
        (Radford et al. 2021, sec. 2.5).
      dtype, param_dtype, remat_policy, scan_layers, attention_impl: as
        :class:`jaxfit.models.layers.ExecutionConfig` (``dtype`` is that of matmuls and
        the residual stream: layer norms, softmax, the normalised embeddings and the logits
        are float32 regardless; ``remat_policy`` applies to every encoder layer).
    """

    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)

    def replace(self, **changes) -> CLIPConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def vit_b32(cls, **changes) -> CLIPConfig:
        """OpenAI CLIP ViT-B/32: 224 px images, 32 px patches, 512-d embeddings."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes) -> CLIPConfig:
        """A CPU-test size: width 32, 2 layers, 4 heads, 32 px images in 8 px patches,
        vocabulary 100 (``eos_token_id`` 99), 16 positions, 16-d embeddings."""
        text = CLIPTextConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=98,
            eos_token_id=99,
        )
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        return cls(**{"text": text, "vision": vision, "projection_dim": 16, **changes})


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (HF ``CLIPAttention``).

    Input and output ``[batch, len, hidden]`` in ``dtype``; scores scaled by
    ``head_dim ** -0.5``, softmax in float32 (``attention.dot_product_attention``).
    """

    tower: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, padding_mask: jax.Array | None) -> jax.Array:
        t = self.tower
        width, heads = t.hidden_size, t.num_attention_heads
        # OpenAI clip/model.py initialize_parameters: attn_std, proj_std.
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * t.num_hidden_layers) ** -0.5
        dense = partial(layers.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda y: y.reshape(*y.shape[:-1], heads, width // heads)
        init = nn.initializers.normal(attn_std)
        q = split(dense(kernel_init=init, name="q_proj")(x))
        k = split(dense(kernel_init=init, name="k_proj")(x))
        v = split(dense(kernel_init=init, name="v_proj")(x))
        y = attention.dot_product_attention(
            q,
            k,
            v,
            causal=self.causal,
            padding_mask=padding_mask,
            implementation=self.attention_impl,
        )
        y = y.reshape(*y.shape[:-2], width)
        return dense(kernel_init=nn.initializers.normal(proj_std), name="out_proj")(y)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with biases (HF ``CLIPMLP``); ``[..., hidden]`` -> same."""

    tower: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t = self.tower
        fc_std = (2 * t.hidden_size) ** -0.5
        proj_std = t.hidden_size**-0.5 * (2 * t.num_hidden_layers) ** -0.5
        dense = partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(t.intermediate_size, kernel_init=nn.initializers.normal(fc_std), name="fc1")(x)
        h = layers.activation(t.hidden_act)(h)
        return dense(t.hidden_size, kernel_init=nn.initializers.normal(proj_std), name="fc2")(h)


def _layer_norm(eps: float, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Statistics and output in float32; the following Dense casts to the compute dtype.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block (HF ``CLIPEncoderLayer``), ``nn.scan`` convention.

    ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; the input is tagged ``layer_input`` (the
    ``offload`` remat policy), the attention and MLP outputs ``attn_out`` / ``mlp_out``
    (``names``); ``mlp_chunk_size`` as :func:`jaxfit.models.layers.sequence_chunked`.

    Args (call):
      x: ``[batch, len, hidden]`` in ``dtype``.
      padding_mask: ``[batch, len]`` (1 = real token) or ``None``.

    Returns:
      ``(x, None)`` with ``x`` as the input.
    """

    tower: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"
    mlp_chunk_size: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, padding_mask: jax.Array | None):
        t, kw = self.tower, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = checkpoint_name(placement.constrain_batch(x), "layer_input")
        h = _layer_norm(t.layer_norm_eps, self.param_dtype, "layer_norm1")(x)
        h = SelfAttention(
            t, self.causal, attention_impl=self.attention_impl, name="self_attn", **kw
        )(h, padding_mask)
        x = x + checkpoint_name(h.astype(x.dtype), "attn_out")
        h = _layer_norm(t.layer_norm_eps, self.param_dtype, "layer_norm2")(x)
        h = layers.sequence_chunked(MLP(t, name="mlp", **kw), h, self.mlp_chunk_size)
        x = x + checkpoint_name(h.astype(x.dtype), "mlp_out")
        return x, None


def _encoder(config: CLIPConfig, tower, *, causal: bool) -> nn.Module:
    """The scanned (and rematerialised) stack of ``tower.num_hidden_layers`` blocks."""
    stack = layers.stack_layers(
        EncoderLayer,
        num_layers=tower.num_hidden_layers,
        remat=config.remat_policy,
        scan=config.scan_layers,
    )
    return stack(
        tower,
        causal,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        mlp_chunk_size=config.mlp_chunk_size,
        name="layers",
    )


class CLIPTextTransformer(nn.Module):
    """Causal text transformer pooled at the end-of-text token (HF ``CLIPTextModel``).

    Attributes:
      config: the full :class:`CLIPConfig` (dtypes, remat); the tower is ``config.text``.
    """

    config: CLIPConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """Pooled text features.

        Args:
          input_ids: int ``[batch, len]``, ``len <= max_position_embeddings``.
          attention_mask: optional int/bool ``[batch, len]``, 1 for real tokens.

        Returns:
          ``[batch, Dt]`` float32: ``final_layer_norm`` of the hidden state at the EOT
          token. As transformers does it: if ``eos_token_id == 2`` (the legacy value of
          OpenAI conversions, before transformers PR #24773) the position of the largest
          id (``argmax(input_ids)``, the EOT id being the largest of the vocabulary), else
          the first position where ``input_ids == eos_token_id`` (0 if absent).

        Raises:
          ValueError: ``len > max_position_embeddings``.
        """
        c, t = self.config, self.config.text
        batch, length = input_ids.shape
        if length > t.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{t.max_position_embeddings}"
            )
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        # OpenAI clip/model.py initialize_parameters: token std 0.02, positions std 0.01.
        tok = layers.Embed(
            t.vocab_size,
            t.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embedding",
            **kw,
        )(input_ids)
        pos = layers.Embed(
            t.max_position_embeddings,
            t.hidden_size,
            embedding_init=nn.initializers.normal(0.01),
            name="position_embedding",
            **kw,
        )(jnp.arange(length))
        x = (tok + pos[None]).astype(c.dtype)
        x, _ = _encoder(c, t, causal=True)(x, attention_mask)
        x = _layer_norm(t.layer_norm_eps, c.param_dtype, "final_layer_norm")(x)
        if t.eos_token_id == 2:
            eot = jnp.argmax(input_ids, axis=-1)
        else:
            eot = jnp.argmax((input_ids == t.eos_token_id).astype(jnp.int32), axis=-1)
        return x[jnp.arange(batch), eot]


class CLIPVisionTransformer(nn.Module):
    """ViT image encoder pooled at the class token (HF ``CLIPVisionModel``).

    Attributes:
      config: the full :class:`CLIPConfig`; the tower is ``config.vision``.
    """

    config: CLIPConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Pooled image features.

        Args:
          pixel_values: float ``[batch, image_size, image_size, num_channels]`` (NHWC,
            CLIP-normalised).

        Returns:
          ``[batch, Dv]`` float32: ``post_layernorm`` of the class-token output.

        Raises:
          ValueError: an image size or channel count other than the config's.
        """
        c, v = self.config, self.config.vision
        expected = (v.image_size, v.image_size, v.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NHWC [batch, {v.image_size}, {v.image_size}, "
                f"{v.num_channels}], got {tuple(pixel_values.shape)}"
            )
        width, p = v.hidden_size, v.patch_size
        scale = width**-0.5  # OpenAI clip/model.py VisionTransformer
        x = nn.Conv(
            width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="patch_embedding",
        )(pixel_values.astype(c.dtype))
        x = x.reshape(x.shape[0], -1, width)  # row-major patches, as HF's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (width,), c.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, c.dtype), (x.shape[0], 1, width))
        x = jnp.concatenate([cls, x], axis=1)
        pos = layers.Embed(
            v.num_patches + 1,
            width,
            embedding_init=nn.initializers.normal(scale),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="position_embedding",
        )(jnp.arange(v.num_patches + 1))
        x = x + pos[None]
        x = _layer_norm(v.layer_norm_eps, c.param_dtype, "pre_layrnorm")(x).astype(c.dtype)
        x, _ = _encoder(c, v, causal=False)(x, None)
        return _layer_norm(v.layer_norm_eps, c.param_dtype, "post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """CLIP dual encoder with HF ``CLIPModel`` semantics (Radford et al. 2021, fig. 3).

    ``model.apply({"params": p}, input_ids, pixel_values, attention_mask)`` returns the
    normalised embeddings and scaled cosine-similarity logits; ``method="encode_image"``,
    ``"encode_text"`` or ``"embed"`` give the embeddings alone.

    Attributes:
      config: a :class:`CLIPConfig`.
    """

    config: CLIPConfig

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c)
        self.vision_model = CLIPVisionTransformer(c)
        self.text_projection = layers.Dense(
            c.projection_dim,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.text.hidden_size**-0.5),
        )
        self.visual_projection = layers.Dense(
            c.projection_dim,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.vision.hidden_size**-0.5),
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), c.param_dtype
        )

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """``[n_img, H, W, C]`` float (NHWC) -> L2-normalised ``[n_img, E]`` float32."""
        return l2_normalize(self.visual_projection(self.vision_model(pixel_values)))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """int ``[n_txt, L]`` (+ optional mask ``[n_txt, L]``) -> L2-normalised
        ``[n_txt, E]`` float32."""
        return l2_normalize(self.text_projection(self.text_model(input_ids, attention_mask)))

    def embed(self, input_ids, pixel_values, attention_mask=None):
        """``(image_embeds [n_img, E], text_embeds [n_txt, E])``, normalised, float32."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> dict[str, jax.Array]:
        """Embeddings and similarity logits (HF ``CLIPModel.forward`` without the loss).

        Args:
          input_ids: int ``[n_txt, L]``.
          pixel_values: float32 ``[n_img, H, W, C]`` (NHWC).
          attention_mask: optional ``[n_txt, L]``, 1 for real tokens.

        Returns:
          dict of float32 arrays: ``image_embeds [n_img, E]``, ``text_embeds [n_txt, E]``
          (unit norm), ``logits_per_text [n_txt, n_img] = s * text_embeds @ image_embeds.T``
          with ``s = logit_scale_value(logit_scale)``, ``logits_per_image`` its transpose.
        """
        image_embeds, text_embeds = self.embed(input_ids, pixel_values, attention_mask)
        # HIGHEST: a float32 matmul on GPU may otherwise run in TF32 (10-bit mantissa).
        cos = jnp.matmul(text_embeds, image_embeds.T, precision=jax.lax.Precision.HIGHEST)
        logits_per_text = logit_scale_value(self.logit_scale) * cos
        return {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logits_per_text": logits_per_text,
            "logits_per_image": logits_per_text.T,
        }
