"""The planner for long contexts: the CPU stand-in for a GPU's attention, host memory of
the ``offload`` remat policy, XLA:CPU's float32 copies of stacked activations, and the
sequence-length search falling back to offload."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import pytest

from jaxfit import config as config_lib
from jaxfit.plan import core, search

REPO = Path(__file__).resolve().parents[2]
GPT2_DEMO = str(REPO / "configs" / "gpt2_scratch.py") + ":demo"
CLIP_DEMO = str(REPO / "configs" / "clip_coco.py") + ":demo"
ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.skipif(not ON_CPU, reason="the stand-in is for planning on a CPU")
def test_the_cpu_stand_in_is_the_blocked_attention_unless_one_is_configured():
    gpt2 = config_lib.load_config(GPT2_DEMO)
    assert gpt2.model.attention_impl == "auto"  # the configs' default
    assert core.cpu_stand_in(gpt2).model.attention_impl == "chunked"
    auto = config_lib.load_config(GPT2_DEMO, ["model.attention_impl=auto"])
    assert core.cpu_stand_in(auto).model.attention_impl == "chunked"
    for impl in ("xla", "cudnn", "chunked"):
        explicit = config_lib.load_config(GPT2_DEMO, [f"model.attention_impl={impl}"])
        assert core.cpu_stand_in(explicit).model.attention_impl == impl
    clip = config_lib.load_config(CLIP_DEMO)  # no attention_impl field: "auto"
    assert core.cpu_stand_in(clip).model.attention_impl == "chunked"


@pytest.mark.skipif(not ON_CPU, reason="host bytes are counted from the jaxpr on a CPU")
def test_offload_plans_the_layer_inputs_on_the_host():
    common = ["batch_size=8", "micro_batch_size=4", "model.attention_impl=xla"]
    full = core.plan_config(config_lib.load_config(GPT2_DEMO, [*common, "model.remat_policy=full"]))
    off = core.plan_config(
        config_lib.load_config(GPT2_DEMO, [*common, "model.remat_policy=offload"])
    )
    cfg = config_lib.load_config(GPT2_DEMO)
    layers, width, seq = cfg.model.config.n_layer, cfg.model.config.n_embd, cfg.seq_len
    # one micro-batch's layer inputs (float32 here): the micro-batch loop runs the backward
    # pass of one micro-batch before the next
    assert off.memory["host_bytes"] == layers * 4 * seq * width * 4
    assert full.memory["host_bytes"] == 0
    m = off.memory
    taken_off = m["cpu_fragmentation"] + m["cpu_upcasts"] + m["cpu_rng_loops"]
    assert m["peak_target"] == m["peak"] - taken_off - m["host_on_device"]
    # what leaves the device is at most the offloaded bytes, and only what is live at
    # the peak (jaxfit.plan.liveness)
    assert 0 < m["host_on_device"] <= m["host_bytes"]
    # on a CPU the policy saves the same tensors as full remat, in place
    assert m["temporaries"] == full.memory["temporaries"]


@pytest.mark.skipif(not ON_CPU, reason="counts the CPU-only float32 copies")
def test_whole_float32_copies_of_stacked_loop_outputs_are_not_planned():
    hlo = """
%body (p: (s32[], bf16[3,2,8])) -> (s32[], bf16[3,2,8]) {
}
ENTRY %main {
  %while.7 = (s32[], bf16[3,2,8]{2,1,0}) while(%tuple.1), condition=%cond, body=%body
  %get-tuple-element.9 = bf16[3,2,8]{2,1,0} get-tuple-element(%while.7), index=1
  %get-tuple-element.10 = s32[] get-tuple-element(%while.7), index=0
  %wrapped_convert.6 = f32[3,2,8]{2,1,0} fusion(%get-tuple-element.9), kind=kLoop
  %convert.3 = f32[3,2]{1,0} fusion(%get-tuple-element.9), kind=kLoop, calls=%slice
}
"""
    assert core.loop_upcast_bytes(hlo) == 3 * 2 * 8 * 4
    assert core.loop_upcast_bytes("ENTRY %main { }") == 0


class _Plan:
    def __init__(self, peak, host=0):
        self.peak_bytes = peak
        self.memory = {"host_bytes": host}
        self.compile_seconds = 0.0


def test_seq_len_search_pulls_one_more_lever_where_the_config_does_not_fit(monkeypatch):
    tried = []
    # bytes per token: full remat 4, offload 2, + MLP blocks 1.5, + small loss chunks 1
    cost = {(): 4, ("offload",): 2, ("offload", 2048): 1.5, ("offload", 2048, 256): 1}

    def fake_try(config, overrides, usable, progress):
        n = overrides["seq_len"]
        key = tuple(overrides[k] for k in ("model.remat_policy", "model.mlp_chunk_size",
                                           "loss_chunk_size") if k in overrides)  # fmt: skip
        tried.append((n, key))
        plan = _Plan(int(n * cost[key]))
        return search.Candidate(dict(overrides), plan, plan.peak_bytes <= usable)

    monkeypatch.setattr(search, "_try", fake_try)
    monkeypatch.setattr(search, "seq_len_step", lambda config: 512)
    config = ml_collections.ConfigDict(
        {"task": "lm", "seq_len": 2048, "loss_chunk_size": 1024,
         "model": {"remat_policy": "full", "mlp_chunk_size": 0}}
    )  # fmt: skip
    assert search.seq_len_levers(config) == [
        {},
        {"model.remat_policy": "offload"},
        {"model.remat_policy": "offload", "model.mlp_chunk_size": 2048},
        {"model.remat_policy": "offload", "model.mlp_chunk_size": 2048, "loss_chunk_size": 256},
    ]
    rows = search.search_seq_len(config, usable_bytes=20000, max_seq_len=65536, progress=print)
    best = max((r for r in rows if r.fits), key=lambda r: r.overrides["seq_len"])
    assert best.overrides == {"seq_len": 19968, "model.remat_policy": "offload",
                              "model.mlp_chunk_size": 2048, "loss_chunk_size": 256}  # fmt: skip
    assert (4096, ()) in tried and (8192, ("offload",)) in tried
    assert all(k == () for n, k in tried if n <= 5000)  # levers only where the config fails
    ladder = list(cost)
    for n in {n for n, _ in tried}:  # at each length: the ladder up to the first fit
        keys = [k for m, k in tried if m == n]
        assert keys == ladder[: len(keys)]
        fit = [k for k in ladder if n * cost[k] <= 20000]
        assert keys[-1] == (fit[0] if fit else ladder[-1])
    assert [r.overrides["seq_len"] for r in rows] == sorted(r.overrides["seq_len"] for r in rows)
    # levers the config already pulls, or lacks, are not tried
    pulled = ml_collections.ConfigDict({"seq_len": 2048, "model": {"remat_policy": "offload"}})
    assert search.seq_len_levers(pulled) == [{}]


@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="the CPU estimate")
def test_llama3_8b_qlora_longest_context_on_cpu():
    """``python -m jaxfit.plan --config configs/llama3_8b_qlora.py --search_seq_len`` (12
    GiB): the CPU estimate of the longest batch-1 context, as docs/BENCHMARKS.md publishes
    it: 7,680 tokens with the layer inputs offloaded and the MLP in blocks of 2,048 (5,120
    while the plan kept the state of jax's rolled Threefry loops, the LoRA dropout masks'
    hash on a CPU; longer: XLA:CPU's float32 activations). The deviceless XLA:GPU compile
    of the same steps finds 36,864 (BENCHMARKS)."""
    from jaxfit.plan.apply import usable_bytes

    config = config_lib.load_config(str(REPO / "configs" / "llama3_8b_qlora.py"))
    rows = search.search_seq_len(config, usable_bytes(12 * 2**30), max_seq_len=8192,
                                 progress=print)  # fmt: skip
    best = max((r for r in rows if r.fits), key=lambda r: r.overrides["seq_len"])
    assert best.overrides == {
        "seq_len": 7680, "model.remat_policy": "offload", "model.mlp_chunk_size": 2048
    }  # fmt: skip


@pytest.mark.skipif(not ON_CPU, reason="jax's CPU lowering of Threefry")
def test_threefry_loop_state_is_taken_off_the_cpu_estimate():
    """jax hashes Threefry in a rolled ``while`` loop on a CPU only (a GPU fuses the
    unrolled hash into the op using the bits): the planner finds those loops in the
    optimised HLO by their state (two ``uint32`` arrays of the hashed shape) and takes the
    state live at the peak off the CPU estimate (``cpu_rng_loops``). A LoRA run with
    dropout has such loops, one without has none."""
    import jax
    import jax.numpy as jnp

    def masked(x, keys):
        def body(h, k):
            keep = jax.random.bernoulli(jax.random.wrap_key_data(k), 0.9, h.shape)
            return jnp.tanh(jnp.where(keep, h, 0.0)), None

        return jax.lax.scan(body, x, keys)[0].sum()

    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 3))
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    hlo = jax.jit(jax.grad(masked)).lower(x, keys).compile().as_text()
    loops = core.threefry_loops(hlo)
    assert loops, "no rolled Threefry loop found"
    for name in loops:  # each loop's state holds the hashed [64, 256] counters
        line = next(t for t in hlo.splitlines() if t.lstrip().startswith(f"%{name} = "))
        assert line.count("u32[64,256]") == 2, line


@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="jax's CPU lowering of Threefry")
def test_the_8b_plan_leaves_out_the_dropout_hash_state():
    """The 8B QLoRA plan (dropout 0.05) takes at least one MLP-input mask's loop state
    (two uint32 [1, 2048, 14336] arrays, 224 MiB) off the CPU estimate; with dropout 0
    there is nothing to take off."""
    cfg = str(REPO / "configs" / "llama3_8b_qlora.py")
    m = core.plan_config(config_lib.load_config(cfg)).memory
    assert m["cpu_rng_loops"] >= 2 * 4 * 2048 * 14336, m["cpu_rng_loops"]
    taken_off = sum(m[k] for k in ("cpu_fragmentation", "cpu_upcasts", "cpu_rng_loops"))
    assert m["peak_target"] == m["peak"] - taken_off - m["host_on_device"]
    no_dropout = core.plan_config(config_lib.load_config(cfg, ["lora.dropout=0.0"])).memory
    assert no_dropout["cpu_rng_loops"] == 0
    assert no_dropout["peak_target"] < m["peak_target"]
