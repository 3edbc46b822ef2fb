"""Throughput accounting: FLOPs per token of a decoder, model FLOPs utilisation (MFU), and
the table of devices (peak bf16 rate and memory) both are measured against.

MFU (Chowdhery et al. 2022, PaLM, Appendix B) is the achieved rate of *model* FLOPs
(the FLOPs the architecture needs, without rematerialisation) over the device's peak.
"""

from __future__ import annotations

import dataclasses

# Dense bf16 tensor-core peak without sparsity, TFLOP/s, and memory, GiB. Sources: NVIDIA
# product pages / architecture whitepapers ("Ada Lovelace architecture" whitepaper,
# Appendix A for GeForce RTX 40 cards, FP16/BF16 tensor with FP32 accumulate, dense; A100
# and H100/H200 datasheets, dense = half the "with sparsity" figure). ``link_gbs``: the
# bandwidth between two devices of one machine, GB/s in each direction: PCIe 4.0 x16 for
# GeForce cards (16 GT/s x 16 lanes x 128b/130b / 8 = 31.5 GB/s, PCI-SIG's PCIe 4.0
# specification; RTX 40 cards have no NVLink, an RTX 3090's optional bridge is not
# assumed), NVLink for A100 (600 GB/s both directions, A100 datasheet) and H100 / H200 SXM
# (900 GB/s both directions, H100 / H200 datasheets).
PCIE4_X16_GBS = 31.5


# ``memory_gbs``: DRAM bandwidth, GB/s (10^9 bytes): the product pages' "memory
# bandwidth" (GeForce: data rate x bus width / 8, e.g. RTX 4070 Ti 21 Gbps x 192 bit = 504
# GB/s; A100 / H100 / H200 datasheets). Decoding a token reads every weight once, so
# bandwidth / bytes read per token bounds the decode rate (jaxfit.plan.generation).
@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peak_bf16_tflops: float
    memory_gib: float
    source: str
    link_gbs: float = PCIE4_X16_GBS
    memory_gbs: float = 0.0


DEVICES = {
    d.name: d
    for d in (
        Device("rtx4070", 58.3, 12, "Ada whitepaper App. A: RTX 4070, FP16 tensor FP32 acc",
               memory_gbs=504.2),
        Device("rtx4070ti", 80.2, 12, "Ada whitepaper App. A: RTX 4070 Ti, FP16 tensor FP32 acc",
               memory_gbs=504.2),
        Device("rtx4090", 165.2, 24, "Ada whitepaper App. A: RTX 4090, FP16 tensor FP32 acc",
               memory_gbs=1008.0),
        Device("rtx3090", 71.0, 24, "Ampere GA102 whitepaper: RTX 3090, FP16 tensor FP32 acc",
               memory_gbs=936.2),
        Device("a100-40gb", 312.0, 40, "A100 datasheet: BF16 tensor core, dense", 300.0, 1555.0),
        Device("a100-80gb", 312.0, 80, "A100 datasheet: BF16 tensor core, dense", 300.0, 2039.0),
        Device("h100-sxm", 989.4, 80, "H100 datasheet: BF16 tensor core SXM, dense", 450.0,
               3350.0),
        Device("h200", 989.4, 141, "H200 datasheet: BF16 tensor core, dense", 450.0, 4800.0),
    )
}  # fmt: skip


def device(name: str) -> Device:
    """Look a device up by name; ``ValueError`` listing the known names otherwise."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}") from None


def mfu(flops_per_second: float, device_name: str) -> float:
    """Fraction (0-1) of the device's dense bf16 peak that ``flops_per_second`` reaches."""
    return flops_per_second / (device(device_name).peak_bf16_tflops * 1e12)


def decoder_flops_per_token(
    num_params: int,
    num_layers: int,
    hidden_size: int,
    seq_len: int,
    *,
    training: bool = True,
    frozen_params: int = 0,
) -> float:
    """Model FLOPs per token of a decoder-only transformer (no rematerialisation).

    Forward: ``2 N + 4 L d T`` (the weight matmuls, Kaplan et al. 2020 sec. 2.1, plus the
    attention scores and the attention-weighted values, PaLM Appendix B; nanoGPT's
    ``estimate_mfu``). Training multiplies the forward by 3 (the backward pass computes
    gradients w.r.t. activations AND weights: ``6 N + 12 L d T``). Weights that are frozen
    (a LoRA / QLoRA base) get no weight gradient: ``4 N_frozen``. So a LoRA step costs
    ``4 N_frozen + 6 N_trainable + 12 L d T``.

    Args:
      num_params: ``N``, matmul parameters (embedding lookups excluded; a tied LM head
        counts once), trainable AND frozen.
      num_layers: ``L``.
      hidden_size: ``d`` (= heads x head_dim).
      seq_len: context length ``T``.
      training: forward + backward, or forward only.
      frozen_params: the part of ``num_params`` that is frozen.
    """
    attention = 4 * num_layers * hidden_size * seq_len
    if not training:
        return float(2 * num_params + attention)
    trainable = num_params - frozen_params
    return float(6 * trainable + 4 * frozen_params + 3 * attention)
