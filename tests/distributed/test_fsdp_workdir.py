"""A workdir trained with FSDP is restored, evaluated and exported both where its mesh fits
(4 devices: parameters placed as the run placed them, split over ``fsdp``) and on one
device (the mesh does not fit: everything on that device), with the same evaluation and
byte-identical exported files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from dist_env import REPO, device_env

SPEC = [
    "configs/gpt2_scratch.py:demo", "total_steps=2", "log_every=1", "eval_every=2",
    "ckpt_every=2", "mesh.fsdp=4", "data.synthetic.num_documents=300",
]  # fmt: skip


def _tools(tmp_path, name: str, devices: int, *train: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(REPO / "tests/distributed/workdir_tools.py"), str(out),
           str(tmp_path / "run"), str(tmp_path / f"export_{name}"), *train]  # fmt: skip
    proc = subprocess.run(
        cmd, env=device_env(devices), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_an_fsdp_workdir_restores_evaluates_and_exports_on_any_device_count(tmp_path):
    four = _tools(tmp_path, "four", 4, *SPEC)
    one = _tools(tmp_path, "one", 1)
    assert (four["devices"], one["devices"]) == (4, 1)
    assert four["split"] > 0 and one["split"] == 0  # placed as trained / all on one device
    assert sorted(four["eval"]) == sorted(one["eval"]) and "eval/loss" in one["eval"]
    for key, value in one["eval"].items():
        np.testing.assert_allclose(four["eval"][key], value, rtol=1e-6, err_msg=key)
    assert four["files"] == one["files"] and "model.safetensors" in one["files"]
