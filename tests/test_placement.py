"""``jaxfit.placement``: identities without a mesh; under a 4-device FSDP mesh a gathered
weight gives the plain computation's value and gradient, its gradient split as the weight
is (``sharding.fsdp_spec``) and in the weight's dtype after a bfloat16 gather."""

import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
from xla_env import fast_subprocess_env

from jaxfit import placement, sharding


def test_without_a_mesh_everything_is_the_identity():
    w, x = jnp.ones((4, 8)), jnp.ones((3, 4))
    assert placement.gathered(w, jnp.bfloat16) is w  # not even cast
    assert placement.constrain_batch(x) is x
    with placement.spmd_mesh(sharding.make_mesh()):  # one device: nothing to place
        assert placement.gathered(w) is w and placement.constrain_batch(x) is x


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from jaxfit import placement, sharding

    mesh = sharding.make_mesh(axes={"data": 1, "fsdp": 4})
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    split = NamedSharding(mesh, sharding.fsdp_spec(w.shape, 4))

    def loss(w, x, dtype=jnp.float32):
        kernel = placement.gathered(w, dtype)  # under spmd_mesh only
        x = placement.constrain_batch(x)
        return jnp.sum(jnp.tanh(x.astype(dtype) @ kernel.astype(dtype)).astype(jnp.float32) ** 2)

    def placed(w, x, dtype=jnp.float32):
        with placement.spmd_mesh(mesh):
            return loss(w, x, dtype)

    ws = jax.device_put(w, split)
    got = jax.jit(jax.value_and_grad(placed))(ws, x)
    one = jax.devices()[0]  # the reference: one device, no placement at all
    ref = jax.jit(jax.value_and_grad(loss))(jax.device_put(w, one), jax.device_put(x, one))
    bf16 = jax.jit(jax.grad(lambda w, x: placed(w, x, jnp.bfloat16)))(ws, x)
    with placement.spmd_mesh(mesh):
        to_bf16 = jax.eval_shape(lambda w: placement.gathered(w, jnp.bfloat16), ws)
        gathered_dtype = str(to_bf16.dtype)
        kept = placement.gathered(ws, unless_split_on=1)  # split on the output axis: kept
        odd = placement.constrain_batch(jnp.ones((3, 2)))  # 3 rows over 4 devices: as is
    def vocab(x):
        with placement.spmd_mesh(mesh):
            return placement.constrain_vocab(x)

    logits = jax.jit(vocab)(jnp.ones((4, 3, 8)))  # vocabulary 8 over fsdp=4
    odd_vocab = jax.jit(vocab)(jnp.ones((4, 3, 6)))  # 6: not split
    print("RESULT" + json.dumps({
        "vocab_split": [
            logits.sharding.is_equivalent_to(
                NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp")), 3
            ),
            odd_vocab.sharding.is_fully_replicated,
        ],
        "loss": [float(got[0]), float(ref[0])],
        "grad": [np.asarray(got[1]).tolist(), np.asarray(ref[1]).tolist()],
        "grad_split": got[1].sharding.is_equivalent_to(split, 2),
        "bf16": [str(bf16.dtype), bf16.sharding.is_equivalent_to(split, 2), gathered_dtype],
        "kept": kept is ws,
        "odd_rows": odd.shape[0],
    }))
    """
)


def test_gathered_weights_give_the_plain_value_and_a_split_gradient():
    env = {**fast_subprocess_env(), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {env.get('XLA_FLAGS', '')}"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    np.testing.assert_allclose(*out["loss"], rtol=1e-6)  # sums over devices reordered
    np.testing.assert_allclose(*out["grad"], rtol=1e-5, atol=1e-6)
    assert out["grad_split"]
    # gathered in bfloat16, the gradient comes back in the weight's float32, split
    assert out["bf16"] == ["float32", True, "bfloat16"]
    assert out["kept"] and out["odd_rows"] == 3
    # logits of a vocabulary-parallel head stay split over the vocabulary (rows over data)
    assert out["vocab_split"] == [True, True]
