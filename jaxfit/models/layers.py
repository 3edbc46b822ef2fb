"""Building blocks shared by every jaxfit model family.

Every projection in every model goes through :class:`Dense`, so that later weight
transforms (LoRA adapter leaves, int8/NF4 quantised leaves) plug in at one place.
Every stack of identical layers goes through :func:`stack_layers`, which applies
``nn.remat`` with a named ``jax.checkpoint_policies`` policy and ``nn.scan`` over the
layer axis (parameters of a scanned stack carry a leading ``[num_layers]`` axis).
Every attention goes through :func:`jaxfit.models.attention.dot_product_attention`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfit import placement, target
from jaxfit.models import attention

Dtype = Any

# Names saved for the backward pass by the ``names`` policy. Models tag tensors with
# ``checkpoint_name(x, NAME)``.
SAVEABLE_NAMES = ("attn_out", "mlp_out")
# Names the ``offload`` policy moves to pinned host memory: each block's input (the
# residual stream entering the layer), the one activation per layer that full remat keeps
# on the device ([layers, batch, seq, hidden] in all: 8 GiB for Llama-3-8B at 32k tokens).
# A block must use only the tagged value, so that the untagged input is not kept as well.
OFFLOAD_NAMES = ("layer_input",)

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
        ``offload``: the tensors tagged with a name in ``OFFLOAD_NAMES`` (each layer's
        input) moved to pinned host memory after the forward pass and back for the
        backward pass, everything else recomputed as ``full``
        (``save_and_offload_only_these_names(names_which_can_be_saved=[],
        names_which_can_be_offloaded=OFFLOAD_NAMES, offload_src="device",
        offload_dst="pinned_host")``, MaxText's ``decoder_layer_input`` offload). On CPU
        (host memory is device memory) it warns and saves the same tensors in place.

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
        if target.backend() == "cpu":  # no pinned host memory apart from the host (jaxfit.target)
            warnings.warn(
                "remat policy 'offload' needs a GPU/TPU (pinned host memory); on CPU the "
                f"tensors it would offload ({', '.join(OFFLOAD_NAMES)}) stay in place",
                stacklevel=2,
            )
            return policies.save_only_these_names(*OFFLOAD_NAMES)
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(OFFLOAD_NAMES),
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
      attention_impl: the ``implementation`` argument of
        :func:`jaxfit.models.attention.dot_product_attention`: ``"auto"`` (default; also
        ``None`` / ``""``; :func:`jaxfit.models.attention.choose_attention` decides),
        ``"xla"``, ``"cudnn"`` or ``"chunked"``.
      mlp_chunk_size: > 0: the MLP runs over blocks of this many positions, each under
        ``jax.checkpoint`` (:func:`sequence_chunked`), so its ``[batch, seq,
        intermediate]`` temporaries exist for one block at a time; 0: at once.
      weights_on_host: the layer stacks' parameters live in host memory (pinned, passed
        in by the caller: :func:`host_stack`) and each layer's are copied to the device
        inside the scan, just before the layer runs (:func:`stack_layers`): the device
        holds one layer's weights at a time, for models larger than the card
        (``jaxfit.sampling.generate``). Every token then reads the stack over the host
        link (PCIe).

    Raises:
      ValueError: an unknown ``remat_policy`` or ``attention_impl``, a negative
        ``mlp_chunk_size``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_impl: str | None = "auto"
    mlp_chunk_size: int = 0
    weights_on_host: bool = False

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}"
            )
        if (self.attention_impl or "auto") not in attention.ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; expected one of "
                f"{attention.ATTENTION_IMPLS}"
            )
        if self.mlp_chunk_size < 0:
            raise ValueError(f"mlp_chunk_size must be >= 0, got {self.mlp_chunk_size}")


def to_device(tree: Any) -> Any:
    """``tree``'s arrays copied to the device's own memory (inside ``jit``: a host-to-device
    transfer of arrays that live in pinned host memory; a no-op for device arrays)."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def host_stack(params: dict, stack: str) -> dict:
    """``params`` with the subtree ``params[stack]`` (a layer stack) moved to pinned host
    memory of its device(s), the rest as it is (for ``weights_on_host``)."""

    def to_host(x):
        sharding = x.sharding.with_memory_kind("pinned_host")
        return jax.device_put(x, sharding)

    return {**params, stack: jax.tree.map(to_host, params[stack])}


def stack_layers(
    block: type[nn.Module],
    *,
    num_layers: int,
    remat: str = "none",
    scan: bool = True,
    static_argnums: tuple[int, ...] = (),
    in_axes: Any = nn.broadcast,
    weights_on_host: bool = False,
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
      weights_on_host: each layer's parameters are copied to the device as the layer
        runs (``nn.map_variables`` with :func:`to_device`; the stack itself stays where
        the caller put it: pinned host memory, :func:`host_stack`).

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
    if weights_on_host:
        layer = nn.map_variables(layer, "params", trans_in_fn=to_device, init=True)
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def is_weight_leaf(x: Any) -> bool:
    """True for a *weight leaf* (see :func:`matmul`): a pytree node standing in the
    parameter tree for a kernel and implementing ``matmul(x, dtype)`` (a LoRA leaf, a
    quantised leaf; ``jaxfit.quant.is_quantized`` tells the quantised ones apart)."""
    return hasattr(x, "matmul")


def matmul(x: jax.Array, kernel: Any, dtype: Dtype, *, output_parallel: bool = False) -> jax.Array:
    """``x @ kernel`` in ``dtype`` for a plain kernel array or a weight leaf.

    A *weight leaf* is a pytree node stored in the parameter tree in place of a kernel
    array (a LoRA adapter over a frozen base, an int8 or NF4 quantised weight). It
    implements ``matmul(x, dtype) -> y`` itself, so the same model code runs float,
    quantised or adapted weights. Inside ``nn.scan`` stacks the node's arrays carry the
    layer axis first and are sliced per layer like any other parameter.

    Under FSDP the kernel is gathered whole first (:func:`jaxfit.placement.gathered`; a
    weight leaf gathers its own arrays, in their storage format). With
    ``output_parallel`` a plain kernel split over ``fsdp`` on its output axis stays split
    and XLA splits the product's output features instead, gathering the (smaller) input.

    Args:
      x: ``[..., in]``.
      kernel: ``[in, out]`` array, or a weight leaf with a ``matmul`` method.
      dtype: compute dtype.
      output_parallel: see above.

    Returns:
      ``[..., out]`` in ``dtype``.
    """
    if is_weight_leaf(kernel):
        return kernel.matmul(x, dtype)
    kernel = placement.gathered(kernel, dtype, unless_split_on=-1 if output_parallel else None)
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
      output_parallel: under FSDP every kernel is gathered whole where it is used;
        True keeps a kernel split on its output axis split, so are the output features:
        for the LM head, whose ``[hidden, vocab]`` kernel is far larger than the hidden
        states XLA gathers instead (vocabulary-parallel logits, as Megatron-LM's).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    output_parallel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        y = matmul(x, kernel, dtype, output_parallel=self.output_parallel)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            bias = placement.gathered(
                bias, dtype, unless_split_on=0 if self.output_parallel else None
            )
            y = y + jnp.asarray(bias, dtype)
        return y


class Embed(nn.Embed):
    """``flax.linen.Embed`` (same parameter, ``embedding [num_embeddings, features]``)
    placed for FSDP (:func:`jaxfit.placement.gathered`): a table split over its rows (the
    vocabulary) stays split, each device looks up the ids in its rows and XLA adds the
    pieces (``[batch, seq, features]`` activations move, far fewer bytes than the table);
    a table split over its features is gathered whole, so the lookup is local."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"Embed: integer ids expected, got {inputs.dtype}")
        dtype = self.dtype or self.embedding.dtype
        table = placement.gathered(self.embedding, dtype, unless_split_on=0)
        return jnp.take(jnp.asarray(table, dtype), inputs, axis=0)


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


def _fold_dropout_keys(params: Any, index: jax.Array) -> Any:
    """``params`` with every weight leaf's ``dropout_rng`` (LoRA adapters, see
    ``jaxfit.lora.adapters.LoraWeight``) folded with ``index``: a block of positions draws
    its own dropout mask instead of repeating the first block's."""

    def fold(leaf):
        rng = getattr(leaf, "dropout_rng", None)
        if rng is None or not hasattr(leaf, "replace"):
            return leaf
        keys = jax.random.wrap_key_data(rng)  # one key, or one per layer of a stack
        flat = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys.reshape(-1))
        return leaf.replace(dropout_rng=jax.random.key_data(flat.reshape(keys.shape)))

    return jax.tree.map(fold, params, is_leaf=lambda x: hasattr(x, "dropout_rng"))


def sequence_chunked(module: nn.Module, x: jax.Array, chunk_size: int) -> jax.Array:
    """``module(x)`` for a position-wise ``module`` (an MLP), computed over blocks of
    ``chunk_size`` positions of ``x [batch, seq, ...]``.

    The blocks run in an ``nn.scan`` (parameters broadcast, not copied) whose body is
    ``nn.remat``: the forward pass keeps only each block's input, and the backward pass
    recomputes one block's ``[batch, chunk_size, intermediate]`` temporaries at a time, so
    they never exist for the whole sequence. The output and the gradients equal the
    unchunked module's up to float summation order (the weight gradients add the blocks'
    contributions). Cost: one more forward pass of the module in the backward pass. A
    length that ``chunk_size`` does not divide is padded with zeros (the padded positions
    are dropped). LoRA dropout keys (if attached) are folded with the block index, so
    every block draws its own mask.

    Args:
      module: an unbound submodule created in the caller's compact method (its
        parameters keep the name they would have unchunked).
      x: ``[batch, seq, ...]``.
      chunk_size: positions per block; ``<= 0`` or ``>= seq``: ``module(x)`` directly.

    Returns:
      ``module(x)``, ``[batch, seq, ...]``.
    """
    if chunk_size <= 0 or x.shape[1] <= chunk_size:
        return module(x)
    b, s = x.shape[:2]
    n = -(-s // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - s)] + [(0, 0)] * (x.ndim - 2))
    xs = x.reshape(b, n, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    def body(mdl, carry, inputs):
        index, block = inputs
        fold = nn.map_variables(
            lambda m, y: m(y),
            "params",
            trans_in_fn=lambda p: _fold_dropout_keys(p, index),
            init=mdl.is_initializing(),
        )
        return carry, fold(mdl, block)

    scan = nn.scan(
        nn.remat(body, prevent_cse=False),
        variable_broadcast="params",
        split_rngs={"params": False},
        length=n,
    )
    _, ys = scan(module, None, (jnp.arange(n, dtype=jnp.int32), xs))
    return ys.swapaxes(0, 1).reshape(b, n * chunk_size, *ys.shape[3:])[:, :s]
