"""Smoke test of ``experiments/bench/qlora_step.py`` at a tiny size (not a timing test).

Runs the real entry point in a subprocess, as ``tests/test_bench_smoke.py`` does for
``lm_step`` (without ``--record``), and checks that jaxfit and transformers + PEFT +
bitsandbytes held the same NF4 base and computed the same first step (to float rounding in
float32, within the bf16 tolerances in bfloat16), and that every reported number is finite
and positive.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from xla_env import fast_subprocess_env

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden_size", "64", "--intermediate_size", "128", "--num_hidden_layers", "2"]
TINY += ["--num_attention_heads", "4", "--num_key_value_heads", "2", "--vocab_size", "1000"]
TINY += ["--seq_len", "16", "--batch_size", "2", "--rank", "4", "--alpha", "8"]
TINY += ["--steps", "2", "--warmup", "1"]


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "compute_dtype, loss_tol, grad_rtol", [("float32", 1e-5, 1e-5), ("bfloat16", 5e-3, 2e-2)]
)
def test_qlora_step_tiny(tmp_path, compute_dtype, loss_tol, grad_rtol):
    out = tmp_path / "result.json"
    env = fast_subprocess_env()
    # Fast XLA compilation of the tiny step: compile speed is not what this test checks.
    cmd = [sys.executable, "-m", "experiments.bench.qlora_step", *TINY]
    cmd += ["--compute_dtype", compute_dtype, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    res = json.loads(out.read_text())

    assert res["loss_ok"]
    assert res["loss_diff"] <= loss_tol, res["loss_diff"]
    assert res["grad_norm_rdiff"] <= grad_rtol, res["grad_norm_rdiff"]
    jx, pt = res["jax"], res["torch"]
    # the same NF4 base (4-bit codes, block scales) and the same adapters on both sides
    assert jx["nf4_codes_sha256"] == pt["nf4_codes_sha256"]
    assert res["nf4_sq_rdiff"] <= 1e-4
    assert jx["n_nf4"] == pt["n_nf4"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert jx["n_trainable"] == pt["n_trainable"] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    assert pt["adapter_dtypes"] == ["torch.float32"]
    for r in (jx, pt):
        for key in ("step_median_s", "tokens_per_s", "first_step_s", "peak_mib", "first_loss"):
            assert _positive(r[key]), (key, r[key])
        assert r["peak_mib"] >= r["after_imports_mib"] > 0
    assert _positive(jx["compile_s"])
    assert all(_positive(v) for v in res["ratio"].values()), res["ratio"]
    # The printed table carries the same numbers.
    assert "jaxfit/torch" in proc.stdout and "MISMATCH" not in proc.stdout
    assert f"{jx['tokens_per_s']:.1f}" in proc.stdout
