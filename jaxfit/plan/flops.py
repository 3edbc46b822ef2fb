"""FLOP counts of a traced step (the closed-form FLOPs of a decoder are
:func:`jaxfit.perf.decoder_flops_per_token`).

XLA's ``compiled.cost_analysis()["flops"]`` counts the body of every loop ONCE: a step
whose layers run in an ``nn.scan`` (and whose micro-batches run in a ``lax.scan``) is
under-counted by the trip counts. :func:`traced_flops` walks the step's jaxpr instead and
multiplies every ``scan`` body by its length, so it counts what actually executes,
rematerialised forward passes included. It counts matrix multiplications
(``dot_general``, convolutions), which are all but a few percent of a transformer's FLOPs
and all of what MFU counts (PaLM, Chowdhery et al. 2022, Appendix B).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

# Primitives whose sub-jaxprs run once per call (control flow without a trip count,
# transformations, custom derivatives, pjit, remat).
_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr")


def _dot_general_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = np.prod([lhs.shape[d] for d in lc], dtype=np.float64)
    batch = np.prod([lhs.shape[d] for d in lb], dtype=np.float64)
    lhs_free = np.prod(
        [s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb], dtype=np.float64
    )
    rhs_free = np.prod(
        [s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb], dtype=np.float64
    )
    return float(2.0 * batch * lhs_free * rhs_free * contract)


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    # rhs spec: (out_features, in_features, *spatial); each output element takes
    # in_features/groups * prod(kernel spatial) multiply-adds.
    kernel = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]], dtype=np.float64)
    in_per_group = rhs.shape[dn.rhs_spec[1]]
    return float(2.0 * np.prod(out.shape, dtype=np.float64) * kernel * in_per_group)


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr, loops multiplied by their trip counts.

    ``scan`` bodies count ``length`` times; ``while`` loops (trip count unknown before
    run time) count once; ``cond`` counts its most expensive branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            for key in _SUBJAXPR_PARAMS:
                sub = eqn.params.get(key)
                if isinstance(sub, jex_core.ClosedJaxpr | jex_core.Jaxpr):
                    total += jaxpr_flops(sub)
    return total


def traced_flops(fn: Callable, *args: Any) -> float:
    """Matmul FLOPs of one call of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``),
    from its jaxpr (:func:`jaxpr_flops`); nothing is compiled or run."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))
