"""Building blocks shared by every jaxfit model family.

Every projection in every model goes through :class:`Dense`, so that later weight
transforms (LoRA adapter leaves, int8/NF4 quantised leaves) plug in at one place.
Every stack of identical layers goes through :func:`stack_layers`, which applies
``nn.remat`` with a named ``jax.checkpoint_policies`` policy and ``nn.scan`` over the
layer axis (parameters of a scanned stack carry a leading ``[num_layers]`` axis).
Every attention goes through :func:`attention`, which runs cuDNN flash attention, the
blocked form of :mod:`jaxfit.models.flash` or the XLA reference, as
:func:`choose_attention` decides for the backend and shapes (``attention_impl="auto"``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfit import placement
from jaxfit.models import flash

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
        if jax.default_backend() == "cpu":  # no pinned host memory apart from the host
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
      attention_impl: ``implementation`` of :func:`attention`: ``"auto"`` (default; also
        ``None`` / ``""``), ``"xla"``, ``"cudnn"`` or ``"chunked"``.
      mlp_chunk_size: > 0: the MLP runs over blocks of this many positions, each under
        ``jax.checkpoint`` (:func:`sequence_chunked`), so its ``[batch, seq,
        intermediate]`` temporaries exist for one block at a time; 0: at once.

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

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}"
            )
        if (self.attention_impl or "auto") not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        if self.mlp_chunk_size < 0:
            raise ValueError(f"mlp_chunk_size must be >= 0, got {self.mlp_chunk_size}")


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
    if hasattr(kernel, "matmul"):
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


# -- attention ------------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked")
# Block sizes of implementation="chunked" (jaxfit.models.flash): queries and keys per block.
ATTENTION_CHUNK = 512
ATTENTION_KV_CHUNK = 512
# A fallback from cuDNN runs the XLA reference while its [q_len, kv_len] scores have at most
# SHORT_SEQ_LEN**2 entries per head (512 x 512: 1 MiB of float32), the blocked form beyond.
SHORT_SEQ_LEN = 512
# cuDNN through jax.nn takes packed documents only as a dense boolean mask, which jax turns
# into a [batch, 1, q_len, kv_len] bias in the compute dtype and whose gradient (same size)
# the backward pass computes (see cudnn_problems). Allowed while bias + gradient stay below
# this (B=1: up to 8,192 tokens in bf16).
CUDNN_MASK_MAX_BYTES = 256 * 2**20
_CUDNN_DTYPES = ("bfloat16", "float16")

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    """Log ``message`` once per process (attention is traced once per layer stack and
    compile; the choice is the same every time)."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def gpu_compute_capability() -> str | None:
    """The compute capability of the first GPU (``"8.9"`` for an RTX 4070 Ti), or ``None``
    without a GPU backend."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return getattr(devices[0], "compute_capability", None) if devices else None


def _capability(cc: str | None) -> tuple[int, int] | None:
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def cudnn_problems(
    dtype: Any,
    head_dim: int,
    *,
    q_len: int,
    kv_len: int | None = None,
    batch: int = 1,
    dense_mask: bool = False,
    compute_capability: str | None = None,
) -> list[str]:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot (or should not)
    run these shapes; empty when it can. Each reason names the jax 0.10/0.11 source it
    rests on (``jax/_src/cudnn/fused_attention_stablehlo.py``, below ``fused_attention``):

    * dtype: ``check_layout`` raises unless q/k/v are fp16, bf16 (or fp8, not used here).
    * head_dim: ``check_is_flash_attention`` needs ``head_dim % 8 == 0`` and ``head_dim <=
      128`` before Hopper, ``<= 256`` from compute capability 9.0 (cuDNN's support matrix
      says the same for the backward pass; with an unknown capability 128 is assumed).
    * compute capability below 8.0: cuDNN's SDPA "requires SM80 (Ampere) or newer"
      (cuDNN frontend documentation, Attention, support matrix); jax does not check it.
    * ``dense_mask`` (packed documents' segment ids, or any boolean mask beyond a single
      query): ``jax.nn.dot_product_attention`` has no segment ids, and a mask reaches
      cuDNN through ``combine_bias_and_mask`` as a dense ``[batch, 1, q_len, kv_len]``
      bias in the compute dtype; ``should_export_dbias`` returns True, so the backward
      pass materialises its gradient too. Allowed while the two stay within
      :data:`CUDNN_MASK_MAX_BYTES`; ``check_is_flash_attention`` also rejects a bias in
      training with an odd length. (cuDNN's packed ``q_offsets`` layout is reachable
      only through jax's private ``fused_attention_stablehlo.dot_product_attention`` and
      only from compute capability 9.0: not used.)

    Args:
      dtype: the compute dtype of q/k/v.
      head_dim: per-head size.
      q_len, kv_len: query / key lengths (``kv_len`` defaults to ``q_len``).
      batch: sequences per call (the bias is per sequence).
      dense_mask: the call needs a boolean mask (see above).
      compute_capability: ``"major.minor"`` of the GPU, ``None`` if unknown.

    Returns:
      A list of human-readable reasons.
    """
    problems = []
    name = jnp.dtype(dtype).name
    if name not in _CUDNN_DTYPES:
        problems.append(f"cuDNN flash attention takes fp16/bf16, not {name} (check_layout)")
    cap = _capability(compute_capability)
    if cap is not None and cap < (8, 0):
        problems.append(f"cuDNN attention needs compute capability >= 8.0, the GPU has {cap}")
    h_max = 256 if cap is not None and cap >= (9, 0) else 128
    if head_dim % 8 or head_dim > h_max:
        problems.append(
            f"cuDNN flash attention needs head_dim % 8 == 0 and <= {h_max} on this GPU, got "
            f"{head_dim} (check_is_flash_attention)"
        )
    if dense_mask:
        kv_len = kv_len or q_len
        nbytes = 2 * batch * q_len * kv_len * jnp.dtype(dtype).itemsize
        if nbytes > CUDNN_MASK_MAX_BYTES:
            problems.append(
                f"packed documents (segment ids) reach cuDNN as a dense [{batch}, 1, {q_len}, "
                f"{kv_len}] bias and its gradient ({nbytes / 2**20:.0f} MiB > "
                f"{CUDNN_MASK_MAX_BYTES / 2**20:.0f} MiB; combine_bias_and_mask, "
                "should_export_dbias)"
            )
        elif q_len % 2 or kv_len % 2:
            problems.append(
                f"cuDNN with a bias needs even lengths in training, got {q_len} x {kv_len} "
                "(check_is_flash_attention)"
            )
    return problems


def fallback_attention(q_len: int, kv_len: int | None = None) -> str:
    """The implementation used where cuDNN is not: ``"xla"`` while the scores have at most
    ``SHORT_SEQ_LEN**2`` entries per head, else ``"chunked"`` (no ``[q_len, kv_len]``
    array at all)."""
    return "xla" if q_len * (kv_len or q_len) <= SHORT_SEQ_LEN**2 else "chunked"


def choose_attention(
    backend: str,
    dtype: Any,
    head_dim: int,
    *,
    seq_len: int,
    kv_len: int | None = None,
    batch: int = 1,
    segment_ids: bool = False,
    compute_capability: str | None = None,
) -> tuple[str, str]:
    """The attention implementation ``"auto"`` stands for, and why.

    * Not a GPU: ``"xla"``, the reference (``jax.nn.dot_product_attention`` with
      ``implementation=None`` is also XLA: "defaults to XLA for now",
      ``jax/_src/nn/functions.py``), on TPU ``"chunked"`` past :data:`SHORT_SEQ_LEN`.
    * GPU and :func:`cudnn_problems` finds none: ``"cudnn"``; a causal mask becomes cuDNN's
      ``MaskType.CAUSAL``, key padding becomes sequence lengths (``PADDING_CAUSAL`` /
      ``PADDING``; ``jax.nn.dot_product_attention``'s ``case 'cudnn'``), GQA is native.
    * GPU otherwise: :func:`fallback_attention`, with the problems as the reason.

    Args:
      backend: ``jax.default_backend()`` of the machine that will run it.
      dtype: compute dtype; head_dim: per-head size.
      seq_len: query length (training: the sequence length); kv_len: key length
        (default ``seq_len``).
      batch: sequences per call (the micro-batch).
      segment_ids: the calls pass packed-document ids.
      compute_capability: the GPU's (``gpu_compute_capability()``), ``None`` if unknown.

    Returns:
      ``(implementation, reason)``: one of ``"xla"``, ``"cudnn"``, ``"chunked"``, and a
      sentence for the log.
    """
    kv_len = kv_len or seq_len
    if backend != "gpu":
        if backend == "tpu" and seq_len * kv_len > SHORT_SEQ_LEN**2:
            return "chunked", f"{backend}: no cuDNN; blocked attention past {SHORT_SEQ_LEN} tokens"
        return "xla", f"{backend}: the XLA reference (cuDNN flash attention is GPU-only)"
    problems = cudnn_problems(
        dtype,
        head_dim,
        q_len=seq_len,
        kv_len=kv_len,
        batch=batch,
        dense_mask=segment_ids,
        compute_capability=compute_capability,
    )
    if problems:
        impl = fallback_attention(seq_len, kv_len)
        return impl, f"{impl} instead of cuDNN: " + "; ".join(problems)
    how = "causal as MaskType.CAUSAL, padding as sequence lengths"
    if segment_ids:
        nbytes = 2 * batch * seq_len * kv_len * jnp.dtype(dtype).itemsize
        how += f", packed documents as a dense bias (+ gradient: {nbytes / 2**20:.0f} MiB)"
    return "cudnn", f"cuDNN flash attention ({how})"


def _dense_mask(segment_ids, mask):
    """The boolean ``[batch, 1, q_len, kv_len]`` mask of segment ids AND ``mask``, or None."""
    out = None
    if segment_ids is not None:
        out = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        out = mask if out is None else out & mask
    return out


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    padding_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    q_offset: jax.Array | int | None = None,
    implementation: str | None = "auto",
) -> jax.Array:
    """Scaled dot-product attention (``softmax(q k^T / sqrt(head_dim)) v``), by one of
    three implementations.

    * ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the reference;
      it materialises the ``[batch, heads, q_len, kv_len]`` float32 scores.
    * ``"cudnn"``: the same call with ``implementation="cudnn"``: cuDNN's fused flash
      attention (GPU; fp16/bf16): causal as its causal mask, ``padding_mask`` as key
      sequence lengths (it must be right padding: ones, then zeros), a single decoding
      query at ``q_offset`` as key length ``q_offset + 1``; segment ids and ``mask`` as a
      dense bias (:func:`cudnn_problems`). Where cuDNN cannot run the call (a
      :func:`cudnn_problems` reason, not a GPU, or several queries at a traced
      ``q_offset``, which cuDNN's causal mask cannot shift) it falls back to
      :func:`fallback_attention`'s choice and logs why.
    * ``"chunked"``: :func:`jaxfit.models.flash.blocked_attention` in blocks of
      :data:`ATTENTION_CHUNK` queries x :data:`ATTENTION_KV_CHUNK` keys: flash attention's
      algorithm and ``O(seq)`` memory in plain XLA, any device, every mask, any length.
    * ``"auto"`` (also ``None`` / ``""``): :func:`choose_attention` for this backend and
      these shapes. ``jax.nn.dot_product_attention``'s own default (``implementation=None``)
      is the XLA reference on every backend in jax 0.10/0.11; it never picks cuDNN.

    Grouped-query attention: ``k``/``v`` may have fewer heads than ``q`` (query head ``h``
    reads key/value head ``h // (num_heads // num_kv_heads)``) in all three.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``.
      causal: query ``s`` sees keys ``<= s`` (``<= q_offset + s`` with ``q_offset``).
      padding_mask: optional ``[batch, kv_len]`` bool/int, 1 for real tokens.
      segment_ids: optional ``[batch, len]`` int; tokens attend only within equal ids
        (packed documents); requires ``q_len == kv_len``.
      mask: optional bool array broadcastable to ``[batch, num_heads, q_len, kv_len]``,
        True where a query may attend a key; combined (AND) with the masks above.
      q_offset: position of query 0 among the keys (int32 scalar; KV-cached decoding,
        where query ``s`` of a step sits at ``index + s`` of the cache), with ``causal``.
      implementation: ``"auto"``, ``"xla"``, ``"cudnn"`` or ``"chunked"``.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
      ValueError: an unknown implementation.
    """
    impl = implementation or "auto"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; one of {ATTENTION_IMPLS}")
    b, t, _, d = q.shape
    s = k.shape[1]
    backend = jax.default_backend()
    dense = segment_ids is not None or (mask is not None and t > 1)
    stepped = q_offset is not None and t > 1  # several queries at a traced position
    if impl == "auto":
        impl, reason = choose_attention(
            backend,
            q.dtype,
            d,
            seq_len=t,
            kv_len=s,
            batch=b,
            segment_ids=dense,
            compute_capability=gpu_compute_capability() if backend == "gpu" else None,
        )
        if impl == "cudnn" and stepped:
            impl = fallback_attention(t, s)
        _log_once(logging.DEBUG, f"attention [{b}, {t}/{s}, {d}] auto -> {impl}: {reason}")
    elif impl == "cudnn":
        problems = [] if backend == "gpu" else [f"the {backend} backend has no cuDNN"]
        cc = gpu_compute_capability() if backend == "gpu" else None
        problems += cudnn_problems(
            q.dtype, d, q_len=t, kv_len=s, batch=b, dense_mask=dense, compute_capability=cc
        )
        if problems or stepped:
            fallback = fallback_attention(t, s)
            level = logging.WARNING if problems else logging.DEBUG
            why = "; ".join(problems) or "several queries at a cache offset"
            _log_once(level, f"attention [{b}, {t}/{s}, {d}]: {fallback} instead of cuDNN: {why}")
            impl = fallback
    if impl == "chunked":
        return flash.blocked_attention(
            q,
            k,
            v,
            causal=causal,
            q_offset=q_offset,
            kv_mask=None if padding_mask is None else padding_mask.astype(bool),
            segment_ids=segment_ids,
            mask=mask,
            q_chunk=ATTENTION_CHUNK,
            kv_chunk=ATTENTION_KV_CHUNK,
        )
    kv_lengths = None
    if impl == "cudnn":
        is_causal = causal and q_offset is None
        if q_offset is not None and causal:  # one query at position q_offset
            kv_lengths = jnp.full((b,), q_offset, jnp.int32) + 1
        if padding_mask is not None:  # right padding: the number of real tokens
            lengths = padding_mask.astype(jnp.int32).sum(-1)
            kv_lengths = lengths if kv_lengths is None else jnp.minimum(kv_lengths, lengths)
        dense_mask = _dense_mask(segment_ids, mask)
    else:
        is_causal = causal and q_offset is None
        dense_mask = _dense_mask(segment_ids, mask)
        if padding_mask is not None:
            pad = padding_mask.astype(bool)[:, None, None, :]
            dense_mask = pad if dense_mask is None else dense_mask & pad
        if q_offset is not None and causal:
            q_pos = q_offset + jnp.arange(t, dtype=jnp.int32)
            shifted = (jnp.arange(s)[None, :] <= q_pos[:, None])[None, None]
            dense_mask = shifted if dense_mask is None else dense_mask & shifted
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=dense_mask,
        is_causal=is_causal,
        key_value_seq_lengths=kv_lengths,
        implementation=impl,
    )
