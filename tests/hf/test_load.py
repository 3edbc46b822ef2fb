"""The one loader, ``jaxfit.hf.load_pretrained``: sharded checkpoints, what
``config.json``'s ``quantization_config`` makes it do, and the import layering of
``jaxfit.hf`` over ``jaxfit.quant``."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_testing import tiny_llama

from jaxfit import hf, quant

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny transformers Llama saved as one file and as shards (``max_shard_size``)."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_llama(root / "one")  # vocabulary 61, 64 positions, seed 0
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root, model


def test_sharded_plain_checkpoint_loads(checkpoints, jit_fast):
    root, torch_model = checkpoints
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, params = hf.load_pretrained(root / "sharded")
    _, one = hf.load_pretrained(root / "one")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.random.default_rng(0).integers(0, 61, (2, 8))
    ours = np.asarray(jit_fast(lambda p, x: model.apply({"params": p}, x))(params, ids))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    _, q = hf.load_pretrained(root / "sharded", quantize="nf4")  # quantised while streaming
    leaves = jax.tree.leaves(q, is_leaf=quant.is_quantized)
    assert sum(isinstance(x, quant.NF4Weight) for x in leaves) == 7


def _with_quantization_config(src, dst, qc):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


BNB = {"quant_method": "bitsandbytes"}


@pytest.mark.parametrize(
    "qc, named",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ({**BNB, "load_in_8bit": True}, r"LLM\.int8"),
        ({**BNB, "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "FP4"),
    ],
)
def test_unsupported_quantization_configs_are_refused_by_name(checkpoints, tmp_path, qc, named):
    root, _ = checkpoints
    d = _with_quantization_config(root / "one", tmp_path / "q", qc)
    for call in (hf.load_pretrained, hf.model_from_config, hf.stored_quantization):
        with pytest.raises(ValueError, match=named):
            call(d)


def test_stored_quantization_and_quantize_argument(checkpoints, tmp_path):
    root, _ = checkpoints
    assert hf.stored_quantization(root / "one") is None
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert hf.stored_quantization(_with_quantization_config(root / "one", tmp_path / "q", nf4))
    with pytest.raises(ValueError, match="quantize='fp8'"):
        hf.load_pretrained(root / "one", quantize="fp8")


@pytest.mark.parametrize("first", ["jaxfit.hf", "jaxfit.quant", "jaxfit.hf.bnb"])
def test_either_package_imports_first(first):
    """``jaxfit.hf`` imports ``jaxfit.quant``, which imports nothing of ``jaxfit.hf``: a
    fresh interpreter imports either first, and ``jaxfit.quant`` alone loads no ``hf``."""
    code = "\n".join(
        [
            "import sys",
            f"import {first}",
            "hf = sorted(m for m in sys.modules if m.startswith('jaxfit.hf'))",
            f"assert {first!r} != 'jaxfit.quant' or not hf, hf",
            "import jaxfit.hf, jaxfit.quant",
            "jaxfit.hf.load_pretrained, jaxfit.quant.names",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
