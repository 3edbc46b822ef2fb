"""LoRA as a pure transform of the parameter tree (Hu et al. 2021, arXiv 2106.09685).

A target kernel ``W0 [in, out]`` is replaced by a :class:`LoraWeight` leaf holding the
frozen ``base`` (any kernel: a float array or a quantised weight leaf, so QLoRA is LoRA
over an NF4 base) and the adapter ``lora_A [in, r]``, ``lora_B [r, out]``. The model code
does not change: :class:`jaxfit.models.layers.Dense` calls ``kernel.matmul(x, dtype)``,
which computes eq. 3 of the paper in jaxfit's ``x @ W`` layout::

    h = x W0 + scale * (dropout(x) A) B,   scale = alpha / r   (paper, sec. 4.1)
                                           scale = alpha / sqrt(r)   with rsLoRA
                                           (Kalajdzievski 2023, arXiv 2312.03732)

without materialising ``W0 + A B``. Leaves of an ``nn.scan`` stack carry the layer axis
first (``base [L, in, out]``, ``lora_A [L, in, r]``, ``lora_B [L, r, out]``) and are sliced
per layer by ``nn.scan`` like any other parameter.

Typical use::

    params = add_lora(params, ["q_proj", "v_proj"], rank=8, alpha=16, rng=key)
    trainable, frozen = split_trainable(params)    # optimizer state: trainable only

    def loss(trainable, frozen, batch, rng):       # frozen: a jit argument, not a constant
        p = with_dropout_rng(combine(trainable, frozen), rng)
        return task_loss(p, batch)

    grads = jax.grad(loss)(trainable, frozen, batch, rng)   # lora_A / lora_B only
    merged = merge(combine(trainable, frozen))     # plain kernels for export

Dropout (PEFT's ``lora_dropout``, on the input of the adapter path only) needs a key
inside a leaf method. The leaf carries an optional raw key ``dropout_rng``:
:func:`with_dropout_rng` attaches a fresh key per leaf (and per layer of a stack) at step
time, inside the jitted loss. Without a key the adapter path is deterministic, which is
the evaluation behaviour; :func:`split_trainable` drops keys, so neither half holds one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from jaxfit import params as params_lib
from jaxfit import placement
from jaxfit.lora import targets as targets_lib
from jaxfit.models import layers

PyTree = Any
Dtype = Any


@struct.dataclass
class LoraWeight:
    """A kernel with a low-rank adapter: ``x @ base + scale * (dropout(x) @ lora_A) @ lora_B``.

    Attributes:
      base: the frozen kernel ``[in, out]`` (``[L, in, out]`` stacked): a float array or a
        weight leaf with ``matmul(x, dtype)`` (:mod:`jaxfit.quant`'s ``Int8Weight`` /
        ``NF4Weight``, or any leaf with a logical ``.shape``).
      lora_A: ``[in, r]`` (``[L, in, r]``), PEFT's ``lora_A.weight`` transposed; ``None``
        in the frozen half of :func:`split_trainable`.
      lora_B: ``[r, out]`` (``[L, r, out]``), PEFT's ``lora_B.weight`` transposed; ``None``
        likewise.
      scale: ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); static (part of the treedef).
      dropout: probability of zeroing an input element of the adapter path; static.
      dropout_rng: ``None`` (deterministic) or a raw ``uint32`` key ``[2]`` (``[L, 2]``
        stacked) attached by :func:`with_dropout_rng`.

    ``base`` is the first field so that ``flax``'s parameter shape check (``Scope.param``
    compares the first leaf with the ``[in, out]`` the initialiser would create) sees the
    base kernel; a quantised base passes it by unboxing to a view of shape ``[in, out]``
    (see :mod:`jaxfit.quant.base`), which ``Scope.param`` does inside this node too.
    """

    base: Any
    lora_A: jax.Array | None
    lora_B: jax.Array | None
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    dropout_rng: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical kernel shape ``[(L,) in, out]`` (that of ``base``)."""
        return targets_lib.kernel_shape(self.base)

    @property
    def rank(self) -> int:
        """Adapter rank ``r``."""
        return int(self.lora_A.shape[-1])

    def matmul(self, x: jax.Array, dtype: Dtype) -> jax.Array:
        """``x @ base + scale * (dropout(x) @ lora_A) @ lora_B`` in ``dtype``.

        The base product goes through :func:`jaxfit.models.layers.matmul` (a quantised base
        computes its own); ``W0 + A B`` is never formed. Dropout scales kept inputs by
        ``1 / (1 - dropout)`` (inverted dropout, as ``torch.nn.Dropout`` in PEFT) and runs
        only when a key is attached.

        Args:
          x: ``[..., in]``.
          dtype: compute dtype of both products.

        Returns:
          ``[..., out]`` in ``dtype``.

        Raises:
          ValueError: the leaf is still stacked (``lora_A`` not 2-D) or lacks its adapter.
        """
        if self.lora_A is None or self.lora_B is None:
            raise ValueError("LoraWeight without lora_A/lora_B: combine(trainable, frozen) first")
        if self.lora_A.ndim != 2:
            raise ValueError(
                f"LoraWeight.matmul needs a per-layer leaf (lora_A [in, r]), got lora_A of shape "
                f"{self.lora_A.shape}: stacked leaves are sliced by nn.scan"
            )
        y = layers.matmul(x, self.base, dtype)
        h = x
        if self.dropout > 0.0 and self.dropout_rng is not None:
            keep = 1.0 - self.dropout
            key = jax.random.wrap_key_data(self.dropout_rng)
            mask = jax.random.bernoulli(key, keep, x.shape)
            h = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
        a = jnp.asarray(placement.gathered(self.lora_A, dtype), dtype)  # whole under FSDP
        b = jnp.asarray(placement.gathered(self.lora_B, dtype), dtype)
        delta = jnp.matmul(jnp.matmul(h.astype(dtype), a), b)
        return y + (delta * jnp.asarray(self.scale, dtype)).astype(dtype)


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``alpha / r`` (Hu et al. 2021, sec. 4.1) or ``alpha / sqrt(r)`` (rsLoRA,
    Kalajdzievski 2023, arXiv 2312.03732), as PEFT's ``LoraLayer.update_layer``."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def lora_leaves(params: PyTree) -> dict[str, LoraWeight]:
    """``{path_str: LoraWeight}`` of every adapted kernel, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
    return {params_lib.path_str(p): leaf for p, leaf in flat if is_lora(leaf)}


def map_lora(fn, params: PyTree) -> PyTree:
    """Replace every ``LoraWeight`` of ``params`` with ``fn(path_str, leaf)``."""

    def visit(path, leaf):
        return fn(params_lib.path_str(path), leaf) if is_lora(leaf) else leaf

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_lora)


def _path_key(rng: jax.Array, path: str) -> jax.Array:
    """A key for one parameter, a function of (rng, path) only (typed or raw ``rng``)."""
    if not jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_adapter(
    rng: jax.Array, shape: Sequence[int], rank: int, dtype: Dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """PEFT's default initialisation (``init_lora_weights=True``) for a kernel ``shape``.

    PEFT's ``LoraLayer.reset_lora_parameters`` runs
    ``nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5))`` on the ``[r, in]`` weight:
    gain ``sqrt(2 / (1 + a^2)) = 1/sqrt(3)``, bound ``gain * sqrt(3 / fan_in) = 1/sqrt(in)``,
    so ``A ~ U(-1/sqrt(in), 1/sqrt(in))``; ``B = 0`` (Hu et al. 2021, sec. 4.1: "random
    Gaussian initialization for A and zero for B"), so ``A B = 0`` at the start.

    Args:
      rng: PRNG key.
      shape: ``[in, out]`` or ``[L, in, out]``.
      rank: ``r``.
      dtype: storage dtype of ``A`` and ``B``.

    Returns:
      ``(lora_A [(L,) in, r], lora_B [(L,) r, out])``.
    """
    *lead, d_in, d_out = shape
    bound = 1.0 / math.sqrt(d_in)
    a_shape = (*lead, d_in, rank)
    # Drawn as a flat vector whose length is rounded up to a power of two, then cut: the
    # threefry program compiles once per length bucket instead of once per shape (~1 s
    # each on a CPU), and the values do not depend on the other adapters.
    n = math.prod(a_shape)
    u = jax.random.uniform(rng, (1 << max(n - 1, 1).bit_length(),), jnp.float32, -bound, bound)
    a = u[:n].reshape(a_shape)
    return a.astype(dtype), jnp.zeros((*lead, rank, d_out), dtype)


def add_lora(
    params: PyTree,
    targets: str | Sequence[str],
    *,
    rank: int,
    alpha: float,
    rng: jax.Array,
    use_rslora: bool = False,
    dropout: float = 0.0,
    dtype: Dtype = jnp.float32,
) -> PyTree:
    """Replace the target kernels of ``params`` with fresh :class:`LoraWeight` leaves.

    Pure: ``params`` is not modified. A fresh adapter leaves the model's output unchanged
    (``B = 0``, see :func:`init_adapter`). Each adapter's key is ``fold_in(rng,
    crc32(path))``, so an adapter does not depend on which other kernels are targeted.

    Args:
      params: parameter tree; target kernels are ``[in, out]`` or ``[L, in, out]`` arrays or
        weight leaves (quantised) with a logical ``.shape``.
      targets: rules of :mod:`jaxfit.lora.targets` (short names such as ``"q_proj"``,
        ``"all-linear"``, path regexes).
      rank: ``r >= 1``, at most ``min(in, out)`` of every target.
      alpha: LoRA ``alpha``; ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
      rng: PRNG key (typed or raw) for ``A``.
      use_rslora: rank-stabilised scale (Kalajdzievski 2023, arXiv 2312.03732).
      dropout: adapter-input dropout probability in ``[0, 1)`` (see :func:`with_dropout_rng`).
      dtype: storage dtype of ``A``/``B`` (float32 master weights by default).

    Returns:
      The tree with ``LoraWeight`` leaves at the targets.

    Raises:
      ValueError: ``rank < 1``, ``dropout`` outside ``[0, 1)``, a target that matches no
        linear kernel, a kernel that already has an adapter, or ``rank > min(in, out)``
        (the message names the kernel).
    """
    if not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    kernels = targets_lib.linear_kernels(params)
    specs = []
    for name in targets_lib.select(params, targets):
        if is_lora(kernels[name]):
            raise ValueError(f"{name} already has a LoRA adapter")
        shape = targets_lib.kernel_shape(kernels[name])
        if rank > min(shape[-2:]):
            raise ValueError(
                f"LoRA rank {rank} exceeds min(in, out) = {min(shape[-2:])} of {name} "
                f"(kernel shape {shape})"
            )
        specs.append((name, shape))
    inits = {n: init_adapter(_path_key(rng, n), shape, int(rank), dtype) for n, shape in specs}
    scale = lora_scale(alpha, int(rank), use_rslora)

    def visit(path, leaf):
        name = params_lib.path_str(path)
        if name not in inits:
            return leaf
        a, b = inits[name]
        return LoraWeight(leaf, a, b, scale=scale, dropout=float(dropout))

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=layers.is_weight_leaf)


def with_dropout_rng(params: PyTree, rng: jax.Array) -> PyTree:
    """Attach a dropout key to every ``LoraWeight`` with ``dropout > 0``.

    Call it on each step inside the jitted loss (and per micro-batch when accumulating)
    with that step's key: ``model.apply({"params": with_dropout_rng(p, rng)}, ...)``. Leaves
    of a stack get ``[L, 2]`` keys (one per layer, sliced by ``nn.scan``), others ``[2]``.
    Keys are a function of ``(rng, path, layer)``; leaves with ``dropout == 0`` are left
    as they are, so that path stays exact.

    Args:
      params: tree with ``LoraWeight`` leaves.
      rng: typed or raw PRNG key.

    Returns:
      The tree with raw ``uint32`` keys in ``dropout_rng``.
    """

    def attach(name, leaf):
        if leaf.dropout <= 0.0:
            return leaf
        key = _path_key(rng, name)
        if leaf.lora_A is not None and leaf.lora_A.ndim == 3:
            key = jax.random.split(key, leaf.lora_A.shape[0])
        return leaf.replace(dropout_rng=jax.random.key_data(key))

    return map_lora(attach, params)


def without_dropout_rng(params: PyTree) -> PyTree:
    """Remove attached dropout keys (evaluation / saving)."""
    return map_lora(lambda _, leaf: leaf.replace(dropout_rng=None), params)


def split_trainable(params: PyTree) -> tuple[dict, PyTree]:
    """Split into ``(trainable, frozen)``: the adapters, and everything else.

    ``trainable`` is a plain nested dict holding only the adapter arrays, keyed by the
    parameter path of each adapted kernel::

        {"layers": {"self_attn": {"q_proj": {"kernel": {"lora_A": [L, in, r],
                                                        "lora_B": [L, r, out]}}}}}

    so optax (state and updates exist for adapters only), orbax and safetensors handle it
    as any parameter tree. ``frozen`` is ``params`` with ``lora_A``/``lora_B`` set to
    ``None`` in each ``LoraWeight`` (base, scale and dropout kept; dropout keys dropped).
    Pass ``frozen`` to the jitted step as an argument (not a closure constant, which XLA
    would embed in the program) and keep only ``trainable`` in the optimizer state.

    Returns:
      ``(trainable, frozen)``; ``combine(trainable, frozen)`` restores ``params`` (without
      dropout keys).
    """
    flat = {}
    for name, leaf in lora_leaves(params).items():
        parts = tuple(name.split("/"))
        flat[(*parts, "lora_A")] = leaf.lora_A
        flat[(*parts, "lora_B")] = leaf.lora_B
    trainable = traverse_util.unflatten_dict(flat) if flat else {}
    frozen = map_lora(
        lambda _, leaf: leaf.replace(lora_A=None, lora_B=None, dropout_rng=None), params
    )
    return trainable, frozen


def combine(trainable: dict, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split_trainable`: put the adapters back into their leaves.

    Args:
      trainable: nested dict ``{...path...: {"lora_A", "lora_B"}}`` (or gradients /
        updates of the same structure).
      frozen: tree whose ``LoraWeight`` leaves have ``lora_A = lora_B = None``.

    Returns:
      The full parameter tree.

    Raises:
      ValueError: an adapted kernel of ``frozen`` has no adapter in ``trainable`` or
        ``trainable`` holds adapters for kernels ``frozen`` does not adapt.
    """
    flat = traverse_util.flatten_dict(trainable) if trainable else {}
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        pairs.setdefault("/".join(key[:-1]), {})[key[-1]] = value
    used = set()

    def put(name, leaf):
        ab = pairs.get(name)
        if ab is None or set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"no lora_A/lora_B for the adapted kernel {name} in `trainable`")
        used.add(name)
        return leaf.replace(lora_A=ab["lora_A"], lora_B=ab["lora_B"])

    out = map_lora(put, frozen)
    if extra := sorted(set(pairs) - used):
        raise ValueError(f"`trainable` holds adapters for kernels `frozen` does not adapt: {extra}")
    return out


def dense_kernel(kernel: Any, dtype: Dtype = jnp.float32) -> jax.Array:
    """A kernel leaf as a float array ``[(L,) in, out]``.

    Arrays are returned as they are (cast to ``dtype``); a weight leaf uses its
    ``dequantize(dtype)`` (the :mod:`jaxfit.quant` protocol) if it has one, else its own
    ``matmul`` with the identity (``I @ W = W``), vmapped over the layer axis of a stack.
    """
    if not layers.is_weight_leaf(kernel):
        return jnp.asarray(kernel, dtype)
    if hasattr(kernel, "dequantize"):
        return jnp.asarray(kernel.dequantize(dtype), dtype)
    shape = targets_lib.kernel_shape(kernel)
    eye = jnp.eye(shape[-2], dtype=dtype)
    if len(shape) == 3:
        return jax.vmap(lambda k: layers.matmul(eye, k, dtype))(kernel)
    return layers.matmul(eye, kernel, dtype)


def delta(leaf: LoraWeight) -> jax.Array:
    """``scale * A @ B`` in float32, ``[(L,) in, out]``."""
    a = jnp.asarray(leaf.lora_A, jnp.float32)
    b = jnp.asarray(leaf.lora_B, jnp.float32)
    return leaf.scale * jnp.matmul(a, b)


def merge(params: PyTree) -> PyTree:
    """Fold every adapter into its kernel: ``W = W0 + scale * A @ B`` (paper, sec. 4.1).

    The sum is formed in float32. A float base keeps its dtype; a quantised base is
    dequantised (:func:`dense_kernel`) and the result is a float32 kernel (re-quantise it
    if wanted; merging into 4-bit codes would round the adapter away). The model's outputs
    are unchanged up to float rounding (without dropout).

    Returns:
      A tree with plain kernel arrays in place of ``LoraWeight`` leaves.
    """

    def fold(_, leaf):
        base = leaf.base
        out_dtype = jnp.float32 if layers.is_weight_leaf(base) else jnp.result_type(base)
        return (dense_kernel(base, jnp.float32) + delta(leaf)).astype(out_dtype)

    return map_lora(fold, params)


def unwrap(params: PyTree) -> PyTree:
    """Drop the adapters and return the base kernels (the model before :func:`add_lora`)."""
    return map_lora(lambda _, leaf: leaf.base, params)


def _size(x: Any) -> int:
    if x is None:
        return 0
    if layers.is_weight_leaf(x):
        return int(np.prod(targets_lib.kernel_shape(x), dtype=np.int64))
    return int(np.prod(np.shape(x)))


def trainable_report(params: PyTree) -> dict:
    """Parameter counts as PEFT's ``PeftModel.get_nb_trainable_parameters()``.

    ``trainable`` counts ``lora_A`` and ``lora_B`` elements; ``total`` counts every
    parameter including adapters. A quantised weight leaf counts its logical ``[in, out]``
    elements (as PEFT doubles the packed ``Params4bit`` count); dropout keys are not counted.

    Returns:
      ``{"trainable": int, "total": int, "percent": float}`` (``100 * trainable / total``).
    """
    trainable = total = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=layers.is_weight_leaf):
        if is_lora(leaf):
            n = _size(leaf.lora_A) + _size(leaf.lora_B)
            trainable += n
            total += n + _size(leaf.base)
        else:
            total += _size(leaf)
    percent = 100.0 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent}


def trainable_summary(params: PyTree) -> str:
    """PEFT's ``print_trainable_parameters`` line:
    ``"trainable params: 2,816 || all params: 33,440 || trainable%: 8.4211"``."""
    r = trainable_report(params)
    return (
        f"trainable params: {r['trainable']:,d} || all params: {r['total']:,d} || "
        f"trainable%: {r['percent']:.4f}"
    )
