"""Building blocks shared by every jaxfit model family.

Every projection in every model goes through :class:`Dense`, so that later weight
transforms (LoRA adapter leaves, int8/NF4 quantised leaves) plug in at one place.
Every stack of identical layers goes through :func:`stack_layers`, which applies
``nn.remat`` with a named ``jax.checkpoint_policies`` policy and ``nn.scan`` over the
layer axis (parameters of a scanned stack carry a leading ``[num_layers]`` axis).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Names saved for the backward pass by the ``names`` / ``offload`` policies. Models tag
# tensors with ``checkpoint_name(x, NAME)``.
SAVEABLE_NAMES = ("attn_out", "mlp_out")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "names", "offload")


def remat_policy(name: str) -> Callable | None:
    """Map a remat policy name to a ``jax.checkpoint_policies`` policy.

    Args:
      name: one of ``REMAT_POLICIES``.
        ``none``: no rematerialisation (every activation kept; ``nn.remat`` not applied).
        ``full``: nothing saveable, everything recomputed in the backward pass.
        ``dots``: matmul outputs saved (``dots_saveable``).
        ``dots_no_batch``: matmuls without batch dimensions saved (weights x activations).
        ``names``: only tensors tagged with a name in ``SAVEABLE_NAMES`` saved.
        ``offload``: tagged tensors offloaded to pinned host memory (GPU/TPU; on CPU
        it warns and falls back to ``names``).

    Returns:
      The policy callable, or ``None`` for ``full`` (``jax.checkpoint``'s default) and
      ``none``.

    Raises:
      ValueError: unknown name.
    """
    policies = jax.checkpoint_policies
    if name in ("none", "full"):
        return None
    if name == "dots":
        return policies.dots_saveable
    if name == "dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    if name == "names":
        return policies.save_only_these_names(*SAVEABLE_NAMES)
    if name == "offload":
        if jax.default_backend() == "cpu":  # no pinned host memory apart from the host
            warnings.warn(
                "remat policy 'offload' needs a GPU/TPU (pinned host memory); on CPU it "
                "falls back to 'names' (the same activations saved, in place)",
                stacklevel=2,
            )
            return policies.save_only_these_names(*SAVEABLE_NAMES)
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(SAVEABLE_NAMES),
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How a model runs, whatever its architecture: the fields every model config shares
    (each family's config subclasses this and adds its architecture fields).

    Attributes:
      dtype: compute dtype; param_dtype: parameter storage dtype.
      remat_policy: a name from :data:`REMAT_POLICIES`, applied to every layer stack.
      scan_layers: ``nn.scan`` the layer stacks (:func:`stack_layers`).
      attention_impl: ``implementation`` of :func:`attention` (``None``, ``"xla"``,
        ``"cudnn"`` or ``"chunked"``).

    Raises:
      ValueError: an unknown ``remat_policy``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str | None = None

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}"
            )


def stack_layers(
    block: type[nn.Module],
    *,
    num_layers: int,
    remat: str = "none",
    scan: bool = True,
    static_argnums: tuple[int, ...] = (),
    in_axes: Any = nn.broadcast,
) -> type[nn.Module]:
    """Return a module class that applies ``block`` ``num_layers`` times.

    The returned class is constructed with the same keyword arguments as ``block`` and
    called as ``stack(carry, *args)``; ``block.__call__`` must have the signature
    ``(carry, *args) -> (carry, None)`` (the ``nn.scan`` convention). With ``scan=True``
    the parameters of all layers are stacked along a new leading axis of size
    ``num_layers`` under the single name the caller gives the stack.

    Args:
      block: linen module class of one layer.
      num_layers: number of layers.
      remat: a name from ``REMAT_POLICIES``; ``none`` disables ``nn.remat``.
      scan: stack with ``nn.scan`` (one compiled layer body); ``False`` is not supported
        yet and raises, kept as a field so configs can name it.
      static_argnums: forwarded to ``nn.remat`` (argument indices counted with ``self``).
      in_axes: ``nn.scan`` axes of the extra positional args (default: every extra arg
        is broadcast to all layers, e.g. masks and positions).

    Raises:
      ValueError: unknown remat policy, or ``scan=False``.
    """
    if not scan:
        raise ValueError("stack_layers: only scan=True is implemented")
    layer = block
    if remat != "none":
        layer = nn.remat(
            block, policy=remat_policy(remat), prevent_cse=False, static_argnums=static_argnums
        )
    else:
        remat_policy(remat)  # validate the name
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def matmul(x: jax.Array, kernel: Any, dtype: Dtype) -> jax.Array:
    """``x @ kernel`` in ``dtype`` for a plain kernel array or a weight leaf.

    A *weight leaf* is a pytree node stored in the parameter tree in place of a kernel
    array (a LoRA adapter over a frozen base, an int8 or NF4 quantised weight). It
    implements ``matmul(x, dtype) -> y`` itself, so the same model code runs float,
    quantised or adapted weights. Inside ``nn.scan`` stacks the node's arrays carry the
    layer axis first and are sliced per layer like any other parameter.

    Args:
      x: ``[..., in]``.
      kernel: ``[in, out]`` array, or a weight leaf with a ``matmul`` method.
      dtype: compute dtype.

    Returns:
      ``[..., out]`` in ``dtype``.
    """
    if hasattr(kernel, "matmul"):
        return kernel.matmul(x, dtype)
    return jnp.matmul(x.astype(dtype), jnp.asarray(kernel, dtype))


class Dense(nn.Module):
    """``y = x @ kernel + bias`` over the last axis of ``x``.

    The single projection layer of every jaxfit model. Parameters are named like
    ``nn.Dense`` (``kernel [in, out]``, ``bias [out]``) so HF name maps only transpose
    (PyTorch ``nn.Linear.weight`` is ``[out, in]``). The kernel may be a weight leaf (see
    :func:`matmul`): LoRA and quantisation replace leaves, never model code.

    Attributes:
      features: output size ``out``.
      use_bias: add a bias.
      dtype: compute dtype (inputs and kernel are cast to it); ``None`` keeps the input's.
      param_dtype: storage dtype of the parameters (float32 master weights by default).
      kernel_init: initialiser of ``kernel``.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        y = matmul(x, kernel, dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, dtype)
        return y


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI CLIP (``clip/model.py``)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
    """Activation by its Hugging Face ``hidden_act`` name; raises ``ValueError`` if unknown."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# Queries per block of implementation="chunked" attention.
ATTENTION_CHUNK = 512


def _chunked_attention(q, k, v, causal, padding_mask, segment_ids, mask):
    """``attention`` over blocks of :data:`ATTENTION_CHUNK` queries (see its docstring)."""
    b, q_len, h, d = q.shape
    n = q_len // ATTENTION_CHUNK
    kv_len = k.shape[1]
    blocks = q.reshape(b, n, ATTENTION_CHUNK, h, d).swapaxes(0, 1)

    def rows(x, start):  # the block's query rows of a [..., q_len, ...]-shaped array
        return jax.lax.dynamic_slice_in_dim(x, start, ATTENTION_CHUNK, axis=1)

    @jax.checkpoint
    def block(i, q_block):
        start = i * ATTENTION_CHUNK
        allowed = jnp.ones((1, 1, ATTENTION_CHUNK, kv_len), bool)
        if causal:
            q_pos = start + jnp.arange(ATTENTION_CHUNK)
            allowed = allowed & (jnp.arange(kv_len)[None, :] <= q_pos[:, None])[None, None]
        if segment_ids is not None:
            seg = rows(segment_ids, start)[:, :, None] == segment_ids[:, None, :]
            allowed = allowed & seg[:, None]
        if mask is not None:
            m = jnp.broadcast_to(mask.astype(bool), (*mask.shape[:2], q_len, kv_len))
            allowed = allowed & jax.lax.dynamic_slice_in_dim(m, start, ATTENTION_CHUNK, axis=2)
        return attention(
            q_block, k, v, causal=False, padding_mask=padding_mask, mask=allowed,
            implementation="xla",
        )  # fmt: skip

    out = jax.lax.map(lambda x: block(*x), (jnp.arange(n), blocks))
    return out.swapaxes(0, 1).reshape(b, q_len, h, d)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    padding_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention through ``jax.nn.dot_product_attention``.

    On GPU with ``implementation=None`` XLA may pick cuDNN flash attention; on CPU it
    runs the XLA reference. Grouped-query attention is handled by the callee when
    ``k``/``v`` have fewer heads than ``q`` (``num_heads % num_kv_heads == 0``).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``.
      causal: apply a causal mask (query ``i`` sees keys ``<= i``).
      padding_mask: optional ``[batch, kv_len]`` bool/int, 1 for real tokens.
      segment_ids: optional ``[batch, len]`` int; tokens attend only within equal ids
        (packed documents); requires ``q_len == kv_len``.
      mask: optional bool array broadcastable to ``[batch, num_heads, q_len, kv_len]``,
        True where a query may attend a key; combined (AND) with the masks above (used by
        KV-cached decoding, where query ``s`` sits at absolute position ``index + s``).
      implementation: ``None``, ``"xla"`` or ``"cudnn"`` (``jax.nn.dot_product_attention``),
        or ``"chunked"``: the XLA attention computed for blocks of
        :data:`ATTENTION_CHUNK` queries at a time, each block under ``jax.checkpoint``,
        so the ``[batch, heads, q_len, kv_len]`` scores never exist at once (forward or
        backward): memory ``O(q_chunk x kv_len)`` instead of ``O(q_len x kv_len)``, for a
        second pass over the scores in the backward pass (query chunking of Rabe &
        Staats 2021, "Self-attention Does Not Need O(n^2) Memory", arXiv:2112.05682). For
        devices without cuDNN flash attention, and for planning on a CPU (``jaxfit.plan``)
        the memory a GPU's flash attention needs. Falls back to ``"xla"`` when ``q_len``
        is not a multiple of the chunk.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q``'s dtype.
    """
    q_len = q.shape[1]
    if implementation == "chunked":
        if q_len > ATTENTION_CHUNK and q_len % ATTENTION_CHUNK == 0:
            return _chunked_attention(q, k, v, causal, padding_mask, segment_ids, mask)
        implementation = "xla"
    extra_mask, mask = mask, None
    if padding_mask is not None:
        mask = padding_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        seg = segment_ids[:, :, None] == segment_ids[:, None, :]
        seg = seg[:, None, :, :]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    if extra_mask is not None:
        extra_mask = extra_mask.astype(bool)
        mask = extra_mask if mask is None else jnp.logical_and(mask, extra_mask)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation=implementation
    )
