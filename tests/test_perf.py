"""FLOPs-per-token and MFU accounting against closed-form values."""

import pytest

from jaxfit import perf


def test_decoder_flops_match_nanogpt_formula():
    # nanoGPT model.estimate_mfu: 6N + 12 L H Q T with H*Q = d
    n, layers, d, t = 124_000_000, 12, 768, 1024
    assert perf.decoder_flops_per_token(n, layers, d, t) == 6 * n + 12 * layers * d * t
    assert (
        perf.decoder_flops_per_token(n, layers, d, t, training=False) == 2 * n + 4 * layers * d * t
    )


def test_mfu_and_device_table():
    dev = perf.device("rtx4070ti")
    assert dev.memory_gib == 12
    assert perf.mfu(dev.peak_bf16_tflops * 1e12 / 4, "rtx4070ti") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="rtx4070ti"):
        perf.device("rtx9999")
