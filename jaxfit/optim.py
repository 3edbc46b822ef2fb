"""Optimizer: AdamW with linear warmup + cosine decay, a weight-decay mask and clipping.

The chain is ``clip_by_global_norm(grad_clip_norm) -> adamw(schedule, mask=decay_mask)``;
``name="adamw8bit"`` stores Adam's moments in 8 bits (:mod:`jaxfit.quant.optim8bit`,
bitsandbytes' ``AdamW8bit``: ~2 bytes per parameter instead of 8), all else equal.
Which leaves are decayed is decided by regex rules over parameter paths
(:mod:`jaxfit.params`), like every other per-parameter choice in jaxfit.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import optax

from jaxfit import params as params_lib
from jaxfit.quant import optim8bit

PyTree = Any

# optim_cfg.name -> the AdamW transformation (same arguments as optax.adamw).
OPTIMIZERS = {"adamw": optax.adamw, "adamw8bit": optim8bit.adamw_8bit}

# Leaves NOT weight-decayed. open_clip's rule (src/training/main.py, now
# open_clip_train/main.py: ``exclude = p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in
# name``): biases, norm gains and the temperature are never decayed. We name them instead of
# using ``ndim < 2`` so that the rule survives scanned layers (a stacked bias is 2-D).
# Positional / class embeddings are excluded too, following timm's
# ``VisionTransformer.no_weight_decay() = {"pos_embed", "cls_token", "dist_token"}`` and
# big_vision (default ``wd_mults = [(".*/kernel$", 1.0)]``: only kernels decay).
# Kernels and token embeddings are decayed (open_clip; nanoGPT's ``dim >= 2`` rule).
DEFAULT_NO_DECAY = (
    r"(^|/)bias$",  # every bias, including LayerNorm's
    r"(^|/)scale$",  # LayerNorm / RMSNorm gains (flax names them "scale")
    r"(norm|ln)[^/]*/weight$",  # norm gains if a model keeps PyTorch's "weight" name
    r"(^|/)logit_(scale|bias)$",  # CLIP temperature, SigLIP bias
    r"(position|pos)_?(embedding|embed)|class_embedding|cls_token",
)


def default_optim_config() -> ml_collections.ConfigDict:
    """Defaults for fine-tuning CLIP-sized models.

    Betas/eps follow CLIP (Radford et al. 2021, Appendix F, Tables 18-20: Adam beta1 0.9,
    beta2 0.98, eps 1e-6, cosine schedule, warmup); clipping at global norm 1.0 as in
    open_clip's ``--grad-clip-norm`` recipes and nanoGPT.
    """
    cfg = ml_collections.ConfigDict()
    # "adamw" (float32 moments, 8 bytes per parameter) or "adamw8bit" (bitsandbytes-style
    # blockwise 8-bit moments, ~2 bytes per parameter; leaves < 4096 elements stay float32).
    cfg.name = "adamw"
    # Peak learning rate, reached at the end of warmup.
    cfg.lr = 1e-5
    # Linear warmup from 0 to lr over this many steps (lr at step 0 is 0).
    cfg.warmup_steps = 100
    # Cosine decays from lr to lr * min_lr_ratio at total_steps.
    cfg.min_lr_ratio = 0.0
    # Adam moments decay rates and epsilon (CLIP paper values).
    cfg.b1 = 0.9
    cfg.b2 = 0.98
    cfg.eps = 1e-6
    # Decoupled weight decay (Loshchilov & Hutter 2019), multiplied by the schedule's lr.
    cfg.weight_decay = 0.1
    # Clip gradients to this global L2 norm before Adam; 0 or None disables.
    cfg.grad_clip_norm = 1.0
    # Regexes (re.search on "a/b/kernel" paths) of leaves excluded from weight decay.
    cfg.no_decay = list(DEFAULT_NO_DECAY)
    return cfg


def make_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> ``lr`` over ``warmup_steps``, cosine to ``lr * min_lr_ratio``.

    ``optax.warmup_cosine_decay_schedule`` with ``decay_steps=total_steps`` (which includes
    the warmup). Values: ``schedule(0) == 0``, ``schedule(warmup_steps) == lr``,
    ``schedule(total_steps) == lr * min_lr_ratio`` (constant afterwards).

    Raises:
      ValueError: ``total_steps <= warmup_steps`` or a negative warmup.
    """
    warmup = int(optim_cfg.warmup_steps)
    if warmup < 0 or total_steps <= warmup:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup}, "
            f"total_steps={total_steps}"
        )
    lr = float(optim_cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=int(total_steps),
        end_value=lr * float(optim_cfg.min_lr_ratio),
    )


def decay_mask(params: PyTree, no_decay: list[str] | tuple[str, ...]) -> PyTree:
    """Bool tree: True for leaves that ARE weight-decayed (no ``no_decay`` pattern matches)."""
    return jax.tree.map(lambda excluded: not excluded, params_lib.match(params, no_decay))


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, total_steps: int, params: PyTree
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimizer and its learning-rate schedule.

    Args:
      optim_cfg: fields as in :func:`default_optim_config`.
      total_steps: length of the run in optimizer steps (end of the cosine).
      params: the parameter tree (arrays or ``ShapeDtypeStruct``); used to log which
        ``no_decay`` patterns match nothing and how many parameters are decayed.

    Returns:
      ``(optimizer, schedule)``. ``schedule(step)`` is the learning rate applied at
      optimizer step ``step`` (0-based); the weight-decay mask is recomputed from the tree
      given to ``optimizer.init``/``update`` (so it follows tree changes such as LoRA).

    Raises:
      ValueError: unknown ``name`` or bad schedule lengths.
    """
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optim_cfg.name!r}; supported: "
            + ", ".join(repr(name) for name in OPTIMIZERS)
        )
    schedule = make_schedule(optim_cfg, total_steps)
    no_decay = tuple(optim_cfg.no_decay or ())
    if bad := params_lib.unmatched(params, no_decay):
        logging.info("no_decay patterns matching no parameter: %s", bad)
    mask = decay_mask(params, no_decay)
    n_decay = params_lib.count(
        [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    )
    logging.info(
        "weight decay %g on %d of %d parameters",
        optim_cfg.weight_decay,
        n_decay,
        params_lib.count(params),
    )
    adamw = OPTIMIZERS[optim_cfg.name](
        learning_rate=schedule,
        b1=float(optim_cfg.b1),
        b2=float(optim_cfg.b2),
        eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay),
        mask=lambda p: decay_mask(p, no_decay),
    )
    if not optim_cfg.grad_clip_norm:
        return adamw, schedule
    clip = optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm))
    return optax.chain(clip, adamw), schedule
