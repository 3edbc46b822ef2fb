"""``jaxfit.hf.load_pretrained`` on bitsandbytes checkpoints saved by transformers.

NF4 (double quantised, single quantised, quantised from bfloat16, sharded) under a float
precision is dequantised bit for bit as ``bitsandbytes.functional.dequantize_4bit``; under
``nf4`` it is kept as stored; both give the bitsandbytes model's logits (its float32
path, ``bnb_testing.float32_reference``). ``int8`` over NF4, LLM.int8 and FP4 checkpoints
are refused with messages naming the format; the task's ``load_base`` / ``base_model``
route every ``precision`` through the same loader.
"""

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bnb_testing import PROJ, reference_weights, require, save_quantized, write_by_hand
from hf_testing import tiny_llama

from jaxfit import config as config_lib
from jaxfit import hf, quant
from jaxfit.tasks import base as task_base

torch, transformers, F = require()

REPO = Path(__file__).resolve().parents[2]
QLORA = str(REPO / "configs" / "llama_qlora.py")
LOGIT_TOLERANCE = 1e-3  # the acceptance bound; measured: ~1e-6 (printed by the test)
VARIANTS = ("q4", "q4_single", "q4_from_bf16")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``root`` with ``float`` and its bitsandbytes saves; ``models[name]``: the
    transformers model of each save (``None`` where made by hand / not made)."""
    root = tmp_path_factory.mktemp("bnb_load")
    float_model = tiny_llama(root / "float")
    models = {
        "q4": save_quantized(root / "float", root / "q4"),
        "q4_sharded": save_quantized(root / "float", root / "q4_sharded", max_shard_size="20KB"),
        "q4_single": save_quantized(root / "float", root / "q4_single", double_quant=False),
        "q4_from_bf16": save_quantized(root / "float", root / "q4_from_bf16", dtype="bfloat16"),
    }
    if models["q4"] is None:  # no CPU quantisation in this transformers / bitsandbytes
        (root / "q4").mkdir(exist_ok=True)
        write_by_hand(float_model, root / "q4")
    ids = np.random.default_rng(0).integers(0, 61, (2, 8))
    return root, models, ids


def _need(root, name):
    if not (root / name / "config.json").is_file():
        pytest.skip(f"transformers could not write the {name} checkpoint on this CPU")
    return root / name


def _logits(jit, model, params, ids):
    return np.asarray(jit(lambda p, x: model.apply({"params": p}, x))(params, ids))


def _kernel(params, i, proj):
    block, p = proj.split(".")
    return params["layers"][block][p]["kernel"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_precision_dequantises_bit_exactly(ckpts, variant, caplog):
    root, _, _ = ckpts
    directory = _need(root, variant)
    state = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert state["load_in_4bit"]
    with caplog.at_level(logging.INFO, logger="jaxfit.hf.load"):
        _, params = hf.load_pretrained(directory)
    assert "dequantised exactly to float32" in caplog.text
    _, bf16 = hf.load_pretrained(directory, dtype=jnp.bfloat16)
    for i in range(2):
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}.weight"
            kernel = np.asarray(_kernel(params, i, proj)[i])
            assert kernel.dtype == np.float32
            np.testing.assert_array_equal(kernel.T, reference_weights(directory, name))
            kernel16 = np.asarray(_kernel(bf16, i, proj)[i])
            assert kernel16.dtype == jnp.bfloat16
            np.testing.assert_array_equal(
                kernel16.T.astype(np.float32),
                reference_weights(directory, name, torch.bfloat16),
            )
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("as_stored", [False, True], ids=["dequantised_f32", "kept_nf4"])
@pytest.mark.parametrize("variant", ["q4", "q4_single"])  # float32 models (q4_from_bf16: bf16)
def test_logits_match_the_bitsandbytes_model(ckpts, variant, as_stored, jit_fast):
    root, models, ids = ckpts
    directory = _need(root, variant)
    if models[variant] is None:
        pytest.skip("no transformers bitsandbytes model on this CPU")
    model, params = hf.load_pretrained(directory, quantize="nf4" if as_stored else None)
    leaves = jax.tree.leaves(params, is_leaf=quant.is_quantized)
    assert sum(isinstance(x, quant.NF4Weight) for x in leaves) == (7 if as_stored else 0)
    ours = _logits(jit_fast, model, params, ids)
    with torch.no_grad():
        theirs = models[variant](torch.from_numpy(ids)).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"{variant} {'kept NF4' if as_stored else 'dequantised'}: max |logit diff| {diff:.2e}")
    assert diff < LOGIT_TOLERANCE


def test_sharded_bnb_checkpoint_loads_like_one_file(ckpts):
    root, _, _ = ckpts
    directory = _need(root, "q4_sharded")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    for quantize in (None, "nf4"):
        _, one = hf.load_pretrained(root / "q4", quantize=quantize)
        _, sharded = hf.load_pretrained(directory, quantize=quantize)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_over_nf4_is_refused_with_the_reason(ckpts):
    root, _, _ = ckpts
    for load in (
        lambda: hf.load_pretrained(root / "q4", quantize="int8"),
        lambda: hf.model_from_config(root / "q4", quantize="int8"),
        lambda: hf.load_quantized(root / "q4", "int8"),
    ):
        with pytest.raises(ValueError, match="re-quantise") as e:
            load()
        assert "compounds" in str(e.value) and "nf4" in str(e.value)
        assert "float precision" in str(e.value)


def _stripped(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose config.json has no quantization_config (tensors alone)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_llm_int8_and_fp4_checkpoints_are_refused_by_name(ckpts, tmp_path):
    root, _, _ = ckpts
    made = {
        "LLM.int8": save_quantized(root / "float", tmp_path / "int8", load_in_8bit=True),
        "FP4": save_quantized(root / "float", tmp_path / "fp4", quant_type="fp4"),
    }
    dirs = {"LLM.int8": tmp_path / "int8", "FP4": tmp_path / "fp4"}
    for fmt, directory in dirs.items():
        if made[fmt] is None:
            continue
        stripped = _stripped(directory, tmp_path / f"{directory.name}_no_config")
        for path in (directory, stripped):
            for quantize in (None, "nf4"):
                with pytest.raises(ValueError, match=fmt.replace(".", r"\.")) as e:
                    hf.load_pretrained(path, quantize=quantize)
                assert "float checkpoint" in str(e.value)  # what to do instead
        with pytest.raises(ValueError, match=fmt.replace(".", r"\.")):
            hf.model_from_config(directory)
    if all(m is None for m in made.values()):
        pytest.skip("transformers could not write 8-bit / FP4 checkpoints on this CPU")


@pytest.mark.parametrize(
    "precision, leaf", [("fp32", None), ("bf16", None), ("nf4", quant.NF4Weight)]
)
def test_task_loader_follows_the_precision(ckpts, precision, leaf):
    root, _, _ = ckpts
    arg = f"{QLORA}:demo,init_from={root / 'q4'}"
    config = config_lib.load_config(arg, [f"precision={precision}"])
    _, p = config_lib.resolve_precision(config)
    model = task_base.base_model(config.init_from, p)
    loaded, params = task_base.load_base(config.init_from, p)
    assert loaded.config == model.config
    leaves = jax.tree.leaves(params, is_leaf=quant.is_quantized)
    if leaf is None:  # dequantised into the frozen LoRA base's dtype
        dtype = jnp.float32 if precision == "fp32" else jnp.bfloat16
        assert all(x.dtype == dtype for x in leaves), {x.dtype for x in leaves}
    else:
        assert sum(isinstance(x, leaf) for x in leaves) == 7
    with pytest.raises(ValueError, match="re-quantise"):
        int8 = config_lib.precision_settings(config_lib.load_config(arg, ["precision=int8"]))
        task_base.base_model(config.init_from, int8)
