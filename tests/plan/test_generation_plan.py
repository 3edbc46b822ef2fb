"""``python -m jaxfit.plan --generate``: the generation program's plan against closed forms.

KV cache = 2 x layers x kv_heads x head_dim x slots x batch x bytes (int8: head_dim codes +
a float32 scale per token and head); weights = the counted parameters x bits / 8 plus the
quantisation statistics (NF4: bitsandbytes' layout, 4 bits per weight, an 8-bit absmax
per 64-block, a float32 nested absmax per 256 absmax values, a 256-entry float32 code and
a float32 offset per kernel; int8: 8 bits per weight and a float32 scale per output
channel); decode bound = batch x bandwidth / (weights - input embedding + KV cache)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import transformers
from xla_env import fast_subprocess_env

from jaxfit import perf
from jaxfit.plan import generation

L, D, F, H, KV, V = 2, 64, 128, 4, 2, 96
HEAD = D // H


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=4096,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


def _kernels() -> list[tuple[int, int]]:
    """The (in, out) kernels under the layer stack of the tiny Llama."""
    return [(D, D), (D, KV * HEAD), (D, KV * HEAD), (D, D), (D, F), (D, F), (F, D)]


def _nf4_bytes(n: int) -> int:
    blocks = n // 64
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4


@pytest.mark.parametrize("quant", ["bf16", "nf4", "int8"])
@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_closed_forms(llama_dir, quant, kv):
    p = generation.plan_generation(
        llama_dir, quant=quant, context=96, batch=3, kv_cache_format=kv, new_tokens=32,
        prefill_chunk=16,
    )  # fmt: skip
    assert (p.new_tokens, p.prefill_chunk) == (32, 16)
    assert p.slots == 64 + 32 - 1  # 64 prompt tokens (4 chunks), 31 fed-back tokens
    per_head = HEAD + 4 if kv == "int8" else 2 * HEAD
    assert p.kv_cache_bytes == 2 * L * KV * p.slots * 3 * per_head
    kernels = sum(i * o for i, o in _kernels())
    floats = V * D * 2 + L * 2 * D + D  # embed, lm_head; 2 norms per layer, final norm
    assert p.params == L * kernels + floats
    if quant == "bf16":
        assert p.weights_bytes == 2 * p.params
    elif quant == "nf4":
        assert p.weights_by_kind["nf4"] == L * sum(_nf4_bytes(i * o) for i, o in _kernels())
        assert p.weights_by_kind["bfloat16"] == 2 * floats
    else:
        assert p.weights_by_kind["int8"] == L * sum(i * o + 4 * o for i, o in _kernels())
    assert p.weights_bytes == sum(p.weights_by_kind.values())
    assert p.decode_bytes_per_step == p.weights_bytes - V * D * 2 + p.kv_cache_bytes
    bound = 3 * perf.device("rtx4070ti").memory_gbs * 1e9 / p.decode_bytes_per_step
    assert p.decode_tokens_per_s("rtx4070ti") == pytest.approx(bound)
    matmul = p.params - V * D  # the input embedding table is a lookup
    assert p.flops_per_token == 2 * matmul + 4 * L * D * 96
    # the compiled program holds at least its weights and cache
    assert p.peak_bytes >= p.weights_bytes + p.kv_cache_bytes


def test_the_cache_and_weights_grow_as_the_closed_form(llama_dir):
    """Doubling the context doubles the KV slots' bytes; the weights do not move."""
    a = generation.plan_generation(llama_dir, context=256, new_tokens=32, prefill_chunk=32)
    b = generation.plan_generation(llama_dir, context=512, new_tokens=32, prefill_chunk=32)
    assert b.weights_bytes == a.weights_bytes
    assert b.kv_cache_bytes - a.kv_cache_bytes == 2 * L * KV * 2 * HEAD * 256
    assert b.peak_bytes > a.peak_bytes


def test_weights_on_host_leave_the_device(llama_dir):
    """``weights_on_host``: the layer stack's bytes leave the device's peak (the device
    holds one layer at a time) and each decoding step reads them over PCIe."""
    kw = dict(quant="bf16", context=128, new_tokens=32, prefill_chunk=32)
    on_device = generation.plan_generation(llama_dir, **kw)
    on_host = generation.plan_generation(llama_dir, weights_on_host=True, **kw)
    stack = L * (sum(i * o for i, o in _kernels()) + 2 * D) * 2  # bf16 kernels and norms
    assert on_host.host_bytes == stack and on_device.host_bytes == 0
    assert on_host.weights_bytes == on_device.weights_bytes
    assert on_host.decode_bytes_per_step == on_device.decode_bytes_per_step - stack
    assert on_device.peak_bytes - on_host.peak_bytes >= stack // L  # less all but a layer
    dev = perf.device("rtx4070ti")
    seconds = on_host.decode_bytes_per_step / (dev.memory_gbs * 1e9)
    seconds += stack / (perf.PCIE4_X16_GBS * 1e9)
    assert on_host.decode_tokens_per_s("rtx4070ti") == pytest.approx(1 / seconds)


def test_builtin_architectures_count_their_parameters():
    """The built-in sizes give the parameter counts their model cards state (no compile)."""
    counts = {
        "llama2-7b": 6.74e9, "llama2-13b": 13.02e9, "llama2-70b": 68.98e9,
        "llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "gpt2": 124.4e6, "qwen2-7b": 7.62e9,
    }  # fmt: skip
    for name, expected in counts.items():
        _, hf = generation.resolve_model(name)
        model, family = generation._model(hf)
        shapes = generation.abstract_params(model, family)
        n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(shapes))
        assert n == pytest.approx(expected, rel=0.005), name
    with pytest.raises(ValueError, match="not a built-in architecture"):
        generation.resolve_model("llama9-1t")


def test_search_context_finds_the_boundary():
    """Bisection over a fake linear plan: the longest multiple of 1024 under the budget."""

    class Fake:
        def __init__(self, n):
            self.context, self.peak_bytes = n, 1000 * n

    longest, tried = generation.search_context(Fake, 10_500_000, progress=lambda _: None)
    assert longest.context == 10 * 1024 and len(tried) <= 8
    assert generation.search_context(Fake, 10, progress=lambda _: None)[0] is None


def test_cli_json(llama_dir, tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run(
        [sys.executable, "-m", "jaxfit.plan", "--generate", "--model", llama_dir,
         "--quant", "nf4", "--context", "256", "--batch", "2", "--kv_cache", "int8",
         "--json", str(out)],
        capture_output=True, text=True, env=fast_subprocess_env(), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "FITS" in r.stdout and "decode: at most" in r.stdout
    d = json.loads(out.read_text())
    for key in ("weights_bytes", "kv_cache_bytes", "peak_bytes", "fits", "decode_tokens_per_s",
                "prefill_tokens_per_s"):  # fmt: skip
        assert key in d, key
    assert d["fits"] is True and d["kv_cache"] == "int8" and d["batch"] == 2
    r = subprocess.run(
        [sys.executable, "-m", "jaxfit.plan", "--generate", "--model", "nope"],
        capture_output=True, text=True, env=fast_subprocess_env(), timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "not a built-in architecture" in r.stderr, r.stderr
