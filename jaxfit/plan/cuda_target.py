"""Compile for a GPU on a machine without one: a deviceless XLA:GPU target.

``python -m jaxfit.plan --compile_for gpu --device rtx4070ti`` compiles the train step
for the CUDA card named by ``--device`` with no GPU present: jax's CUDA PJRT plugin
(``jax-cuda12-pjrt`` + ``jax-cuda12-plugin``, ``requirements-plan-gpu.txt``) builds a
compile-only topology from a ``GpuTargetConfigProto`` (the card's description: SM
count, compute capability, shared memory, L2, bandwidth, memory), and
``jax.jit(...).lower(...).compile()`` runs XLA:GPU's whole pipeline for it (bf16
matmuls stay bf16, GPU fusion, cuDNN flash attention's custom call, pinned-host offload)
up to the buffer assignment the plan reads. :func:`cuda_target` returns the
:class:`jaxfit.target.Target` the planner compiles inside.

What such a compile does not see (:data:`CAVEATS`): no autotuning (no device to time
kernels on: the GEMM backend is XLA's default, Triton, where a GPU might pick cuBLAS and
its workspace), cuDNN's workspace (XLA sizes it on a device: counted 0), and nothing of
the CUDA context, library handles or the allocator's fragmentation (the planner's
reserve, 512 MiB + 5%, stands for those). It is a compile, not a measurement.

Card descriptions (:data:`TARGET_CONFIGS`), from public specifications: SM counts,
L2 sizes, boost clocks and memory bandwidth from NVIDIA's "Ada Lovelace architecture"
whitepaper (Appendix A: RTX 4090, 4070 Ti, 4070), the "Ampere GA102" whitepaper (RTX
3090), the A100 / H100 / H200 datasheets and the A100 / H100 architecture whitepapers;
shared memory per SM / per block (opt-in), threads and registers per SM from the CUDA C
Programming Guide, "Compute Capabilities" table (8.0, 8.6, 8.9, 9.0). ``device_memory_size``
is what CUDA reports where known (RTX 4070 Ti: 12,568,887,296 B, also taken for the RTX
4070's same 12 GB; H100 80GB: 84,929,347,584 B; H200: 150,754,820,096 B, its 143,771 MiB),
else the nominal size (``memory_gib`` of ``jaxfit.perf.DEVICES``). It matters: XLA:GPU
sets the memory limit of its HLO rematerialization pass and its scheduler from it (a step
over the limit is recomputed more, as on the card), so a wrong size moves the plan.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
from jax.experimental import topologies

from jaxfit import perf, target

# What a deviceless compile does not count, one line for reports.
CAVEATS = (
    "deviceless compile: cuDNN workspace not counted, GEMM backends untuned (Triton, no "
    "autotuning); CUDA context, handles and fragmentation are the reserve's"
)
INSTALL = "pip install -r requirements-plan-gpu.txt"


@dataclasses.dataclass(frozen=True)
class CardSpec:
    """One card's ``gpu_device_info`` fields (units: bytes, bytes/s, GHz)."""

    description: str
    compute_capability: tuple[int, int]
    core_count: int  # SMs
    fpus_per_core: int  # FP32 lanes per SM
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    threads_per_core_limit: int
    memory_bandwidth: int
    l2_cache_size: int
    clock_rate_ghz: float
    device_memory_size: int


_MB = 2**20
CARDS: dict[str, CardSpec] = {
    # AD104, 60 SMs, 48 MB L2, 21 Gbps x 192-bit = 504 GB/s, 2.61 GHz boost
    "rtx4070ti": CardSpec("NVIDIA GeForce RTX 4070 Ti", (8, 9), 60, 128, 102400, 101376, 1536,
                          504_000_000_000, 48 * _MB, 2.61, 12_568_887_296),
    # AD104, 46 SMs, 36 MB L2, 21 Gbps x 192-bit = 504 GB/s, 2.475 GHz boost
    "rtx4070": CardSpec("NVIDIA GeForce RTX 4070", (8, 9), 46, 128, 102400, 101376, 1536,
                        504_000_000_000, 36 * _MB, 2.475, 12_568_887_296),
    # AD102, 128 SMs, 72 MB L2, 21 Gbps x 384-bit = 1008 GB/s, 2.52 GHz boost
    "rtx4090": CardSpec("NVIDIA GeForce RTX 4090", (8, 9), 128, 128, 102400, 101376, 1536,
                        1_008_000_000_000, 72 * _MB, 2.52, 24 * 2**30),
    # GA102, 82 SMs, 6 MB L2, 19.5 Gbps x 384-bit = 936 GB/s, 1.695 GHz boost
    "rtx3090": CardSpec("NVIDIA GeForce RTX 3090", (8, 6), 82, 128, 102400, 101376, 1536,
                        936_000_000_000, 6 * _MB, 1.695, 24 * 2**30),
    # GA100, 108 SMs, 40 MB L2, 164 KB shared/SM (163 KB per block), 64 FP32/SM, 1.41 GHz
    "a100-40gb": CardSpec("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 167936, 166912, 2048,
                          1_555_000_000_000, 40 * _MB, 1.41, 40 * 2**30),
    "a100-80gb": CardSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 2048,
                          2_039_000_000_000, 40 * _MB, 1.41, 80 * 2**30),
    # GH100 SXM5, 132 SMs, 50 MB L2, 228 KB shared/SM (227 KB per block), 1.98 GHz
    "h100-sxm": CardSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 2048,
                         3_352_320_000_000, 50 * _MB, 1.98, 84_929_347_584),
    "h200": CardSpec("NVIDIA H200", (9, 0), 132, 128, 233472, 232448, 2048,
                     4_800_000_000_000, 50 * _MB, 1.98, 150_754_820_096),
}  # fmt: skip


def target_config(spec: CardSpec) -> str:
    """The ``GpuTargetConfigProto`` text of a card (``xla/stream_executor/device_description
    .proto``), as ``jax.experimental.topologies.get_topology_desc(target_config=...)``
    takes it. cuDNN 9.7 and CUDA runtime 12.8 are stated (the pinned plugin's)."""
    major, minor = spec.compute_capability
    return (
        "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 "
        f"shared_memory_per_block: 49152 shared_memory_per_core: {spec.shared_memory_per_core} "
        f"threads_per_core_limit: {spec.threads_per_core_limit} core_count: {spec.core_count} "
        f"fpus_per_core: {spec.fpus_per_core} block_dim_limit_x: 2147483647 "
        "block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        f"memory_bandwidth: {spec.memory_bandwidth} l2_cache_size: {spec.l2_cache_size} "
        f"clock_rate_ghz: {spec.clock_rate_ghz} device_memory_size: {spec.device_memory_size} "
        f"shared_memory_per_block_optin: {spec.shared_memory_per_block_optin} "
        f"cuda_compute_capability {{ major: {major} minor: {minor} }} "
        "registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
        'platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 } '
        "runtime_version { major: 12 minor: 8 patch: 0 } "
        f'device_description_str: "{spec.description}"'
    )


def plugin_available() -> bool:
    """jax's CUDA PJRT plugin (``jax_plugins.xla_cuda12``) and its CUDA plugin
    (``jax_cuda12_plugin``) are importable."""
    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("jax_plugins.xla_cuda12", "jax_cuda12_plugin")
        )
    except ModuleNotFoundError:
        return False


def cuda_target(device: str, num_devices: int = 1) -> target.Target:
    """A deviceless CUDA target of ``num_devices`` cards ``device`` (topology ``1x1xN``).

    Selects jax's CPU platform for this process first (a CUDA backend would call
    ``cuInit`` and fail without a GPU), so it must run before anything initialises jax's
    backends.

    Args:
      device: a card of :data:`CARDS` (names of ``jaxfit.perf.DEVICES``).
      num_devices: cards in the mesh.

    Returns:
      A :class:`jaxfit.target.Target` with backend ``"gpu"``, the topology's devices,
      the card's compute capability and ``"cuda (deviceless, <device>)"``.

    Raises:
      ValueError: an unknown card, no CUDA plugin (the message says what to install), or
        jax's backends already initialised with another platform.
    """
    if device not in CARDS:
        known = sorted(set(CARDS) & set(perf.DEVICES))
        raise ValueError(f"--compile_for gpu: no CUDA target for device {device!r}; known: {known}")
    if not plugin_available():
        raise ValueError(
            "--compile_for gpu needs jax's CUDA plugin (jax-cuda12-plugin, jax-cuda12-pjrt), "
            f"which is not installed: {INSTALL}"
        )
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        if jax.default_backend() != "cpu":
            raise ValueError(
                f"--compile_for gpu: jax already runs on {jax.default_backend()}; "
                "plan on that backend (--compile_for local) instead"
            ) from None
    spec = CARDS[device]
    try:
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(spec), topology=f"1x1x{int(num_devices)}"
        )
    except (NotImplementedError, RuntimeError) as e:  # the plugin did not initialise
        raise ValueError(
            f"--compile_for gpu: jax's CUDA plugin built no topology ({' '.join(str(e).split())}); "
            "jax's backends were started before the CPU platform was selected, or the "
            f"plugin is broken: {INSTALL}"
        ) from None
    major, minor = spec.compute_capability
    return target.Target(
        backend="gpu",
        devices=tuple(topo.devices),
        compute_capability=f"{major}.{minor}",
        description=f"cuda (deviceless, {device})",
        caveats=CAVEATS,
    )
