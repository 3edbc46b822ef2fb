"""bitsandbytes 4-bit checkpoints: read (bit-exact), write (byte-identical), errors.

The checkpoint is written by transformers + bitsandbytes on CPU
(``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double
quant))`` then ``save_pretrained``); should that path be unavailable, the same tensors
are built with ``bitsandbytes.functional.quantize_4bit`` + ``QuantState.as_dict(packed=True)``
as ``Linear4bit._save_to_state_dict`` does.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bnb_testing import PROJ, bnb_config, float32_reference, write_by_hand
from hf_testing import tiny_llama

from jaxfit import hf
from jaxfit.hf import load_quantized
from jaxfit.hf.bnb import nf4_from_bnb, nf4_to_bnb, save_bnb_pretrained
from jaxfit.quant import NF4Weight

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

NF4_REL_TOLERANCE = 0.25  # relative logit error vs the float model (see test_quantized_model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    float_model = tiny_llama(root / "float", intermediate_size=64, num_key_value_heads=4)
    try:
        qmodel = transformers.LlamaForCausalLM.from_pretrained(
            root / "float",
            quantization_config=bnb_config(),
            device_map="cpu",
            dtype=torch.float32,
        ).eval()
        float32_reference(qmodel)
        qmodel.save_pretrained(root / "q4")
    except Exception:  # bitsandbytes / transformers without 4-bit CPU support
        (root / "q4").mkdir(exist_ok=True)
        write_by_hand(float_model, root / "q4")
        qmodel = None
    ids = np.random.default_rng(0).integers(0, float_model.config.vocab_size, (2, 8))
    return root, qmodel, ids


@pytest.fixture(scope="module")
def loaded(checkpoint):
    root, _, _ = checkpoint
    return load_quantized(root / "q4", dtype=jnp.float32)


def _logits(jit, model, params, ids):
    return np.asarray(jit(lambda p, x: model.apply({"params": p}, x))(params, ids))


def test_dequantized_weights_are_bit_exact(checkpoint, loaded):
    root, _, _ = checkpoint
    _, params = loaded
    sd = safetensors_torch.load_file(str(root / "q4" / "model.safetensors"))
    for i in range(2):
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}.weight"
            stats = {
                k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")
            }
            ref = F.dequantize_4bit(sd[name], F.QuantState.from_dict(stats, device="cpu"))
            block, p = proj.split(".")
            leaf = jax.tree.map(lambda a, i=i: a[i], params["layers"][block][p]["kernel"])
            assert isinstance(leaf, NF4Weight) and leaf.double_quant
            np.testing.assert_array_equal(np.asarray(leaf.dequantize_hf()), ref.numpy())
    assert params["lm_head"]["kernel"].dtype == jnp.float32  # stored float, read float


def test_logits_match_bitsandbytes_model(checkpoint, loaded, jit_fast):
    root, qmodel, ids = checkpoint
    model, params = loaded
    logits = _logits(jit_fast, model, params, ids)
    fmodel, fparams = hf.load_pretrained(root / "float")
    ref = _logits(jit_fast, fmodel, fparams, ids)
    rel = np.linalg.norm(logits - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))
    assert 0 < rel < NF4_REL_TOLERANCE
    if qmodel is not None:
        with torch.no_grad():
            bnb_logits = qmodel(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(logits, bnb_logits, atol=1e-5)


def test_save_is_byte_identical_and_loads_in_transformers(checkpoint, loaded, tmp_path):
    root, qmodel, ids = checkpoint
    model, params = loaded
    save_bnb_pretrained(model, params, tmp_path)
    ours = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    theirs = safetensors_torch.load_file(str(root / "q4" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["llm_int8_skip_modules"] == ["lm_head"]
    if qmodel is not None:
        again = float32_reference(
            transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu")
        )
        with torch.no_grad():
            np.testing.assert_array_equal(
                again(torch.from_numpy(ids)).logits.numpy(),
                qmodel(torch.from_numpy(ids)).logits.numpy(),
            )


def test_missing_statistics_are_named(checkpoint):
    root, _, _ = checkpoint
    sd = safetensors_torch.load_file(str(root / "q4" / "model.safetensors"))
    tensors = {k: v.numpy() for k, v in sd.items()}
    name = "model.layers.1.mlp.up_proj.weight"
    assert isinstance(nf4_from_bnb(tensors, name), NF4Weight)
    for missing in ("absmax", "nested_absmax", "quant_state.bitsandbytes__nf4"):
        broken = {k: v for k, v in tensors.items() if k != f"{name}.{missing}"}
        with pytest.raises(ValueError, match=f"missing statistics tensor '{name}.{missing}'"):
            nf4_from_bnb(broken, name)
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "config.json").write_text((root / "q4" / "config.json").read_text())
    del sd[f"{name}.nested_absmax"]
    safetensors_torch.save_file(sd, str(root / "broken" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name}.nested_absmax"):
        load_quantized(root / "broken")


def test_single_quantised_state_round_trip():
    """No double quantisation: float32 absmax; our tensors equal ``QuantState.as_dict``."""
    w = torch.randn(128, 256)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    tensors = {"w": packed.numpy()} | {f"w.{k}": v.numpy() for k, v in state.as_dict(True).items()}
    leaf = nf4_from_bnb(tensors, "w")
    assert not leaf.double_quant and leaf.hf_shape == (128, 256)
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize_hf()), F.dequantize_4bit(packed, state).numpy()
    )
    ours = NF4Weight.quantize(w.numpy(), layout="hf", double_quant=False)
    exported = nf4_to_bnb(ours, "w")
    assert sorted(exported) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    bad = dict(
        tensors,
        **{
            "w.quant_state.bitsandbytes__nf4": np.frombuffer(
                json.dumps(
                    {"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [128, 256]}
                ).encode(),
                np.uint8,
            )
        },
    )
    with pytest.raises(ValueError, match="NF4 weights only"):
        nf4_from_bnb(bad, "w")
