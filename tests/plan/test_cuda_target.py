"""Planning for a deviceless XLA:GPU target (``python -m jaxfit.plan --compile_for gpu``).

The compiles run in a subprocess (``cuda_plan_worker.py``): the target needs jax's CPU
platform selected before any backend starts, which this test process (other tests ran
jax) cannot promise. Skipped where jax's CUDA plugin is not installed
(``pip install -r requirements-plan-gpu.txt``), except the tests of that error and of
the card table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxfit import perf, target
from jaxfit.plan import cuda_target

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GPT2_DEMO = str(ROOT / "configs" / "gpt2_scratch.py") + ":demo"
LLAMA_8B = str(ROOT / "configs" / "llama3_8b_qlora.py")

needs_plugin = pytest.mark.skipif(
    not cuda_target.plugin_available(),
    reason="jax's CUDA plugin is not installed (pip install -r requirements-plan-gpu.txt)",
)


def _worker(mode: str, device: str, n: int, spec: str, *overrides: str) -> dict:
    cmd = [sys.executable, str(HERE / "cuda_plan_worker.py"), mode, device, str(n), spec]
    out = subprocess.run(
        [*cmd, *overrides], capture_output=True, text=True, timeout=900, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_planned_card_has_a_cuda_target():
    """Each card of jaxfit.perf.DEVICES compiles for its own description: the compute
    capability of its architecture (Ada 8.9, GA102 8.6, A100 8.0, H100/H200 9.0) and
    its memory within 3% of the table's."""
    expected = {
        **dict.fromkeys(("rtx4070", "rtx4070ti", "rtx4090"), "8.9"),
        "rtx3090": "8.6",
        **dict.fromkeys(("a100-40gb", "a100-80gb"), "8.0"),
        **dict.fromkeys(("h100-sxm", "h200"), "9.0"),
    }
    assert set(cuda_target.CARDS) == set(perf.DEVICES) == set(expected)
    for name, spec in cuda_target.CARDS.items():
        text = cuda_target.target_config(spec)
        major, minor = expected[name].split(".")
        assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text
        gib = spec.device_memory_size / 2**30
        assert abs(gib - perf.DEVICES[name].memory_gib) <= 0.03 * perf.DEVICES[name].memory_gib
    # the RTX 4070 Ti text is the one the feasibility study compiled with
    assert "core_count: 60 " in cuda_target.target_config(cuda_target.CARDS["rtx4070ti"])


def test_target_setting_is_read_in_place_of_the_machine():
    """Inside compiling_for, the machine questions answer for the target; outside, for
    this machine."""
    fake = target.Target(backend="gpu", devices=("d0", "d1"), compute_capability="8.9")
    with target.compiling_for(fake):
        assert target.backend() == "gpu" and target.compute_capability() == "8.9"
        assert target.device_count() == 2
    assert target.current() is None and target.backend() == "cpu"


@pytest.mark.skipif(cuda_target.plugin_available(), reason="the CUDA plugin is installed")
def test_missing_plugin_is_one_error_line():
    out = subprocess.run(
        [sys.executable, "-m", "jaxfit.plan", "--config", GPT2_DEMO, "--compile_for", "gpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr
    assert "pip install -r requirements-plan-gpu.txt" in errors[0]


@needs_plugin
def test_small_gpt2_peak_against_its_arguments():
    """GPT-2 (4 layers, width 512, vocab 512), float32, AdamW, one micro-batch of 4 x 64:
    XLA:GPU's arguments are the weights (4 P bytes), AdamW's mu and nu (8 P) and the
    batch (4 int32 arrays + a float32 loss mask: 5 x 4 x 64 x 4 B) plus a few scalars
    (step counters, < 64 B); the peak adds the gradients (4 P) and the activations, and
    stays within 2x of weights + AdamW + gradients + batch."""
    n_embd, n_layer, vocab, n_pos = 512, 4, 512, 128
    # 2 layer norms (4 D), c_attn D x 3D + 3D, c_proj D x D + D, c_fc D x 4D + 4D, c_proj 4D x D + D
    per_layer = 12 * n_embd * n_embd + 13 * n_embd
    p = vocab * n_embd + n_pos * n_embd + n_layer * per_layer + 2 * n_embd
    overrides = (f"model.config.n_embd={n_embd}", f"model.config.n_layer={n_layer}",
                 "batch_size=4", "micro_batch_size=4")  # fmt: skip
    plan = _worker("plan", "rtx4070ti", 1, GPT2_DEMO, *overrides)["plan"]
    m = plan["memory"]
    assert plan["backend"] == "cuda (deviceless, rtx4070ti)" and plan["caveats"]
    assert plan["params"]["total"] == p
    batch = 5 * 4 * 64 * 4
    assert m["batch"] == batch
    assert 0 <= m["arguments"] - (4 * p + 8 * p + batch) < 64
    closed = 16 * p + batch
    assert m["peak_target"] == m["peak"]  # no CPU terms on a GPU target
    assert closed <= m["peak_target"] <= 2 * closed, (m["peak_target"], closed)


@needs_plugin
def test_offload_keeps_the_layer_input_stacks_on_the_host():
    """remat_policy=offload on the GPU target: XLA's pinned-host temporaries are the
    layer-input stacks, L x B x S x D x 2 bytes (bf16; 2 layers x micro-batch 16 x 64 x
    64), and none of it is on the device's peak."""
    plan = _worker("plan", "rtx4070ti", 1, GPT2_DEMO, "precision=bf16",
                   "model.remat_policy=offload")["plan"]  # fmt: skip
    m = plan["memory"]
    assert m["host_bytes"] == 2 * 16 * 64 * 64 * 2
    assert m["host_on_device"] == 0 and m["peak_target"] == m["peak"]


@needs_plugin
def test_fsdp_plan_on_four_target_devices():
    """--devices 4 --mesh fsdp=4: a 1x1x4 CUDA topology; the parameters are split in
    four (arguments: a quarter of the weights and AdamW states) and gathered for the
    forward pass (all-gather results >= the whole weights, 4 P bytes)."""
    p = 141_056  # the GPT-2 demo's parameters (test_small_gpt2_peak_against_its_arguments)
    plan = _worker("plan", "rtx4070ti", 4, GPT2_DEMO, "mesh.data=1", "mesh.fsdp=4")["plan"]
    assert plan["devices"] == 4 and plan["settings"]["mesh.fsdp"] == 4
    assert plan["memory"]["trainable"] == 4 * p // 4
    assert plan["communication"]["all-gather"] >= 4 * p
    assert plan["communication"]["reduce-scatter"] > 0


@needs_plugin
@pytest.mark.slow
def test_8b_qlora_compiles_as_a_gpu_program():
    """Llama 3.1 8B NF4 QLoRA (configs/llama3_8b_qlora.py, B1 x 2048) for an RTX 4070 Ti:
    the bf16 matmuls stay bf16 (XLA:CPU would compute them in float32) and attention_impl
    auto is cuDNN flash attention (its forward and backward custom calls)."""
    facts = _worker("hlo", "rtx4070ti", 1, LLAMA_8B)
    assert facts["matmuls"].get("bf16", 0) > facts["matmuls"].get("f32", 0)
    calls = facts["custom_calls"]
    assert any(c.startswith("__cudnn$fmha") and "Backward" not in c for c in calls), calls
    assert any(c.startswith("__cudnn$fmha") and "Backward" in c for c in calls), calls
