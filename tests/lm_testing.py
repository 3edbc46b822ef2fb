"""Helpers shared by the decoder-LM tests (GPT-2, Llama, Qwen2; ``tests/models``).

Importable from every test directory as ``lm_testing`` (``tests/`` is on ``sys.path``,
as for ``xla_env``).
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, seed=0):
    """Random parameters without compiling ``init``: N(0, 0.2), norm scales 1 + N(0, 0.2)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.RandomState(seed)

    def draw(path, x):
        value = rng.normal(0.0, 0.2, x.shape) + (path[-1].key == "scale")
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def forward(run, model, params, ids, segment_ids=None, positions=None):
    """Always pass segment_ids and positions (all ones / 0..S-1 by default): one compile."""
    if segment_ids is None:
        segment_ids = jnp.ones(ids.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return run(model, params, ids, segment_ids, positions)
