"""FLOP counting of traced steps against closed forms, and the time estimate."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxfit import perf
from jaxfit.perf import decoder_flops_per_token
from jaxfit.plan import estimate, report
from jaxfit.plan.core import Plan
from jaxfit.plan.flops import traced_flops

L, B, D = 8, 64, 256
FORWARD = L * 2 * B * D * D  # one matmul [B, D] x [D, D] per layer


def _layer(c, w):
    return jnp.tanh(c @ w), None


def _net(w, x, remat):
    return jax.lax.scan(jax.checkpoint(_layer) if remat else _layer, x, w)[0].sum()


W = jax.ShapeDtypeStruct((L, D, D), jnp.float32)
X = jax.ShapeDtypeStruct((B, D), jnp.float32)


def test_scan_bodies_count_times_their_length_and_remat_adds_a_forward():
    # forward + input gradient + weight gradient = 3 forwards (Kaplan et al. 2020)
    assert traced_flops(jax.grad(lambda w, x: _net(w, x, False)), W, X) == 3 * FORWARD
    # full remat recomputes the forward once in the backward pass
    assert traced_flops(jax.grad(lambda w, x: _net(w, x, True)), W, X) == 4 * FORWARD
    # frozen weights: no weight gradient (the 4N of a LoRA base)
    assert traced_flops(jax.grad(lambda x, w: _net(w, x, False)), X, W) == 2 * FORWARD


def test_xla_cost_analysis_counts_a_loop_body_once():
    # why the planner traces: XLA's count of the same program is L times too small
    fn = jax.grad(lambda w, x: _net(w, x, False))
    xla = jax.jit(fn).lower(W, X).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list | tuple) else xla
    assert xla["flops"] == pytest.approx(3 * FORWARD / L, rel=0.01)


def test_decoder_formula():
    n, layers, d, t = 1000, 2, 16, 32
    assert decoder_flops_per_token(n, layers, d, t) == 6 * n + 12 * layers * d * t
    assert decoder_flops_per_token(n, layers, d, t, training=False) == 2 * n + 4 * layers * d * t
    lora = decoder_flops_per_token(n, layers, d, t, frozen_params=900)
    assert lora == 6 * 100 + 4 * 900 + 12 * layers * d * t


def _plan(executed, model, examples=8, tokens=8 * 1024):
    return Plan(
        settings={}, params={}, memory={}, flops={"executed": executed, "model": model},
        examples_per_step=examples, tokens_per_step=tokens, compile_seconds=0.0,
        backend="cpu",
    )  # fmt: skip


def test_time_estimate_closed_form():
    # RTX 4070: 58.3 TFLOP/s dense bf16 (FP32 accumulate), Ada whitepaper Appendix A
    plan = _plan(executed=4e15, model=3e15)
    est = estimate.estimate_time(plan, "rtx4070", utilisation=0.5, total_steps=10, tokens=1e9)
    step = 4e15 / (58.3e12 * 0.5)
    assert est.step_seconds == pytest.approx(step)
    assert est.tokens_per_second == pytest.approx(8 * 1024 / step)
    assert est.mfu == pytest.approx(0.5 * 3 / 4)  # recompute costs time, not model FLOPs
    assert est.run_seconds == pytest.approx(10 * step)
    assert est.budget_seconds == pytest.approx(1e9 / (8 * 1024 / step))
    with pytest.raises(ValueError, match="utilisation"):
        estimate.estimate_time(plan, "rtx4070", utilisation=1.5)
    with pytest.raises(ValueError, match="unknown device"):
        estimate.estimate_time(plan, "rtx9999")


def test_nanochat_d32_on_one_rtx4070():
    # nanochat d32: 1.9B parameters, 38B tokens (20 per parameter), sequence 2048, depth 32,
    # width 2048. 6N + 12LdT per token at 40% of the RTX 4070's 58.3 TFLOP/s.
    per_token = decoder_flops_per_token(1.88e9, 32, 2048, 2048)
    plan = _plan(executed=per_token * 2048, model=per_token * 2048, examples=1, tokens=2048)
    est = estimate.estimate_time(plan, "rtx4070", tokens=38e9)
    days = est.budget_seconds / 86400
    assert days == pytest.approx(38e9 * per_token / (58.3e12 * 0.4) / 86400)
    assert 200 < days < 300  # about eight months on one card, if it fit (it does not)


def test_parse_and_format_bytes():
    assert estimate.parse_bytes("12GiB") == 12 * 2**30
    assert estimate.parse_bytes("12 GB") == 12 * 10**9
    assert estimate.parse_bytes("1.5mib") == int(1.5 * 2**20)
    assert estimate.format_bytes(3 * 2**30) == "3.00 GiB"
    for bad in ("12", "twelve GiB", "12 GiBs"):
        with pytest.raises(ValueError, match="memory size"):
            estimate.parse_bytes(bad)


def test_collectives_on_the_devices_link():
    # ring algorithms over n = 4 devices: (n-1)/n of an all-gather's result on the wire,
    # twice that of an all-reduce's, n-1 times a reduce-scatter's piece
    comm = {"all-gather": 8e9, "all-reduce": 2e9, "reduce-scatter": 1e9, "total": 11e9}
    wire = 0.75 * 8e9 + 2 * 0.75 * 2e9 + 3 * 1e9
    assert estimate.collective_seconds(comm, 4, 31.5) == pytest.approx(wire / 31.5e9)
    assert estimate.collective_seconds(comm, 1, 31.5) == 0.0
    # RTX 4070 Ti: PCIe 4.0 x16, 31.5 GB/s per direction; H100 SXM: NVLink, 450 GB/s
    assert perf.device("rtx4070ti").link_gbs == 31.5 and perf.device("h100-sxm").link_gbs == 450
    plan = dataclasses.replace(_plan(executed=4e15, model=3e15), devices=4, communication=comm)
    plan.flops["xla_cost_analysis"] = float("nan")  # read by the report only
    compute = 4e15 / (4 * 80.2e12 * 0.4)
    over_pcie = estimate.estimate_time(plan, "rtx4070ti")
    assert over_pcie.compute_seconds == pytest.approx(compute)
    assert over_pcie.collective_seconds == pytest.approx(wire / 31.5e9)
    assert over_pcie.step_seconds == pytest.approx(max(compute, wire / 31.5e9))  # overlapped
    over_nvlink = estimate.estimate_time(plan, "h100-sxm")
    assert over_nvlink.collective_seconds == pytest.approx(wire / 450e9)
    text = report.time_report(plan, over_pcie, 10)
    assert "collectives at least" in text and "31.5 GB/s" in text
