"""Plan a config for a deviceless CUDA target and print JSON (used by test_cuda_target.py
in a subprocess: the target needs jax's CPU platform selected before any backend starts,
which a test process that already ran jax cannot do).

``python cuda_plan_worker.py MODE DEVICE NUM_DEVICES CONFIG OVERRIDE...``; MODE ``plan``
prints ``{"plan": Plan.to_dict()}``, ``hlo`` compiles the step once and prints facts of
its optimised HLO: ``{"matmuls": {"<result dtype>": count}, "custom_calls":
[targets], "memory": {...}}``; matmuls are ``dot`` instructions (in Triton GEMM fusions
among others) and cuBLAS GEMM custom calls.
"""

import collections
import json
import re
import sys

from jaxfit import config as config_lib
from jaxfit import target
from jaxfit.plan import core, cuda_target

_MATMUL = re.compile(r"= \(?([a-z0-9]+)\[")  # the (first) result's element type
_CUSTOM = re.compile(r'custom_call_target="([^"]+)"')


def main(mode, device, num_devices, spec, *overrides):
    config = config_lib.load_config(spec, overrides)
    with target.compiling_for(cuda_target.cuda_target(device, int(num_devices))):
        if mode == "plan":
            print(json.dumps({"plan": core.plan_config(config).to_dict()}, default=str))
            return
        step, _, (_, state, batch, frozen, _, _) = core._trace(config)
        compiled = step.lower(state, batch, frozen).compile()
    hlo = compiled.as_text()
    ma = compiled.memory_analysis()
    matmuls = collections.Counter(
        m.group(1)
        for line in hlo.splitlines()
        if " dot(" in line or "__cublas$" in line
        for m in [_MATMUL.search(line)]
        if m
    )
    out = {
        "matmuls": dict(matmuls),
        "custom_calls": sorted(set(_CUSTOM.findall(hlo))),
        "memory": {
            k: int(getattr(ma, k))
            for k in ("argument_size_in_bytes", "temp_size_in_bytes", "host_temp_size_in_bytes")
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
