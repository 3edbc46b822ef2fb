"""The live peak of XLA's buffer assignment (jaxfit.plan.liveness), on a hand-written dump
and on a real compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxfit.plan import liveness

ASSIGNMENT = """\
allocation 0: size 4096, parameter 0, shape |f32[1024]| at ShapeIndex {}:
 value: <1 p.1 @0> (size=4096,offset=0): f32[1024]{0}
allocation 1: size 1000, preallocated-temp:
 value: <2 a.1 @0> (size=100,offset=0): f32[25]{0}
 value: <3 b.2 @0> (size=50,offset=100): f32[12,1]{1,0}
 value: <4 c.3 @0> (size=200,offset=150): bf16[100]{0}
 value: <5 arg_tuple.8{1} (phi) @0> (size=30,offset=350): f32[7]{0}
 value: <6 unscheduled.9 @0> (size=999,offset=400): f32[250]{0}
"""
LIVE_RANGES = """\
HloLiveRange (max 9):
  InstructionSequence:
    0:p.1
  BufferLiveRange:
    p.1{}:0-9
    a.1{}:0-5
    b.2{}:3-8
    c.3{}:6-9
    arg_tuple.8{}:2-7
    arg_tuple.8{1}:2-7
  Live ranges at 6 (peak):
"""


def test_the_peak_is_the_most_bytes_live_at_once():
    live = liveness.parse(ASSIGNMENT.splitlines(), LIVE_RANGES.splitlines())
    assert live.heap_bytes == 1000
    # parameters are not temporaries; a value without a live range is not scheduled
    assert sorted(v.name for v in live.values) == ["a.1", "arg_tuple.8", "b.2", "c.3"]
    # t = 3..5: a + b + loop state = 180; t = 6, 7: b + c + loop state = 280
    assert live.peak() == (280, 6)
    assert live.peak(lambda v: 0 if v.name == "c.3" else v.size) == (180, 3)
    assert live.peak(lambda v: 0 if v.shape.startswith("f32") else v.size) == (200, 6)
    assert live.peak(lambda v: v.size // 2 if v.name == "c.3" else v.size) == (180, 3)
    assert [v.name for v in live.live_at(6)] == ["c.3", "b.2", "arg_tuple.8"]


def test_a_buffer_updated_in_place_counts_once():
    """A loop's state before the loop, in it and after it: three values at one heap slot
    whose live ranges touch. They are one buffer: the peak counts it once (XLA's heap of
    the 8B generation program held the KV cache once; replaying values, not slots,
    counted it twice where the prefill loop hands it to the decoding loop)."""
    assignment = """\
allocation 0: size 300, preallocated-temp:
 value: <1 init.1 @0> (size=100,offset=0): bf16[50]{0}
 value: <2 loop.2{1} (phi) @0> (size=100,offset=0): bf16[50]{0}
 value: <3 out.3 @0> (size=100,offset=0): bf16[50]{0}
 value: <4 other.4 @0> (size=60,offset=100): f32[15]{0}
 value: <5 later.5 @0> (size=100,offset=0): bf16[50]{0}
"""
    ranges = """\
  BufferLiveRange:
    init.1{}:0-2
    loop.2{1}:2-6
    out.3{}:6-8
    other.4{}:5-7
    later.5{}:20-22
"""
    live = liveness.parse(assignment.splitlines(), ranges.splitlines())
    assert [v.offset for v in live.values] == [0, 0, 0, 100, 0]
    assert live.peak() == (160, 5)  # the slot once + other, never 200 + 60
    assert live.peak(lambda v: 0 if v.name == "other.4" else v.size) == (100, 0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's dump")
def test_a_real_compile_is_read_back(tmp_path):
    def f(x, w):  # [512, 512] @ [512, 2048] -> a 4 MiB float32 product, then reduced
        return jnp.tanh(x @ w).sum() + jnp.exp(x @ w).mean()

    spec = jax.ShapeDtypeStruct
    lowered = jax.jit(f).lower(spec((512, 512), jnp.float32), spec((512, 2048), jnp.float32))
    compiled = lowered.compile({**liveness.DUMP_OPTIONS, "xla_dump_to": str(tmp_path)})
    live = liveness.read_dump(str(tmp_path), module="jit_f")
    assert live is not None
    assert live.heap_bytes == compiled.memory_analysis().temp_size_in_bytes
    peak, _ = live.peak()
    assert 512 * 2048 * 4 <= peak <= live.heap_bytes  # at least the product is live
    assert liveness.read_dump(str(tmp_path / "nothing")) is None
