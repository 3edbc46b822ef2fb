"""CLIP Hugging Face interop: parity with transformers.CLIPModel, export, name-map errors.

A tiny random ``transformers.CLIPModel`` (layer norms and logit_scale moved away from
their initial values, so that a mapping bug cannot hide behind ones/zeros) is saved with
``save_pretrained``; jaxfit must reproduce its outputs at 1e-4 in float32, and
transformers must reload what jaxfit exports.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxfit.hf
from jaxfit.hf import clip as hf_clip
from jaxfit.models.clip import CLIPConfig, CLIPModel

OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")
LEN = 7

# (hidden_act, eos_token_id): both activations and both EOT pooling modes of transformers.
VARIANTS = {"quick_gelu-eos2": ("quick_gelu", 2), "gelu-eos50": ("gelu", 50)}


def _hf_model(hidden_act: str, eos: int) -> transformers.CLIPModel:
    common = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    text = dict(
        vocab_size=100,
        max_position_embeddings=16,
        eos_token_id=eos,
        bos_token_id=98,
        pad_token_id=0,
    )
    config = transformers.CLIPConfig(
        text_config={**common, **text},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the init value, below the clamp at log(100)
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm weights 1 and biases 0 at init
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _inputs(eos: int):
    """Token ids with padding after the EOT, the attention mask, NCHW and NHWC pixels."""
    rng = np.random.default_rng(0)
    eot = 99 if eos == 2 else eos  # with eos_token_id 2, the EOT must be the largest id
    lengths = [4, LEN, 2]  # tokens up to and including the EOT
    ids = np.zeros((len(lengths), LEN), np.int64)
    for row, n in enumerate(lengths):
        ids[row, 0] = 98
        words = rng.integers(3, 90, n - 2)  # ids above 50: argmax would differ
        ids[row, 1 : n - 1] = np.where(words == eos, eos + 1, words)
        ids[row, n - 1] = eot
        if eos != 2:
            ids[row, n:] = eot  # pad == eos: the first EOT counts
    mask = (np.arange(LEN)[None] < np.array(lengths)[:, None]).astype(np.int64)
    nchw = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    return ids, mask, nchw, nchw.transpose(0, 2, 3, 1)


def _torch_outputs(model, ids, mask, nchw) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(nchw),
        )
    return {k: getattr(out, k).numpy() for k in OUTPUTS}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """``(directory, eos, torch outputs)`` of a saved tiny transformers CLIPModel."""
    hidden_act, eos = VARIANTS[request.param]
    model = _hf_model(hidden_act, eos)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids, mask, nchw, _ = _inputs(eos)
    return path, eos, _torch_outputs(model, ids, mask, nchw)


def _jax_outputs(jit_fast, model, params, eos):
    ids, mask, _, nhwc = _inputs(eos)
    fwd = jit_fast(lambda p: model.apply({"params": p}, ids.astype(np.int32), nhwc, mask))
    return {k: np.asarray(v) for k, v in fwd(params).items()}


def _assert_close(got, want, atol=1e-4):
    for k in OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=k)


def test_load_matches_transformers(jit_fast, checkpoint):
    path, eos, want = checkpoint
    model, params = jaxfit.hf.load_pretrained(path)
    assert isinstance(model, CLIPModel) and model.config.text.eos_token_id == eos
    assert float(params["logit_scale"]) == pytest.approx(3.1)
    _assert_close(_jax_outputs(jit_fast, model, params, eos), want)


def test_export_loads_in_transformers(checkpoint, tmp_path):
    path, eos, want = checkpoint
    model, params = jaxfit.hf.load_pretrained(path)
    out = jaxfit.hf.save_pretrained(model, params, tmp_path / "export")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "clip" and hf_config["architectures"] == ["CLIPModel"]
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    assert reloaded.logit_scale.shape == ()
    ids, mask, nchw, _ = _inputs(eos)
    _assert_close(_torch_outputs(reloaded, ids, mask, nchw), want)
    # every tensor survives the round trip bit for bit
    before, after = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before) - {k for k in before if "position_ids" in k}
    for name, value in after.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_config_round_trip():
    config = CLIPConfig.tiny(projection_dim=8, logit_scale_init_value=2.0)
    assert hf_clip.config_from_hf(hf_clip.config_to_hf(config)) == config
    hf = transformers.CLIPConfig(**hf_clip.config_to_hf(config))
    assert hf.text_config.eos_token_id == 99 and hf.vision_config.patch_size == 8
    # legacy text_config_dict overrides text_config (as transformers.CLIPConfig does)
    legacy = {
        "model_type": "clip",
        "text_config": {"hidden_size": 64, "eos_token_id": 2},
        "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4},
        "vision_config": {"image_size": [32, 32], "patch_size": 8},
    }
    c = hf_clip.config_from_hf(legacy)
    assert (c.text.hidden_size, c.text.eos_token_id, c.vision.image_size) == (32, 2, 32)
    assert c.text.vocab_size == 49408 and c.projection_dim == 512  # transformers defaults
    with pytest.raises(ValueError, match="square"):
        hf_clip.config_from_hf({"vision_config": {"image_size": [32, 64]}})


def _tamper(path, name, value=None):
    tensors = load_file(path / "model.safetensors")
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_checkpoint_errors_name_the_tensor(tmp_path):
    model = _hf_model("quick_gelu", 2)
    model.save_pretrained(tmp_path)
    bad = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    _tamper(tmp_path, bad, np.zeros((32, 33), np.float32))
    with pytest.raises(ValueError, match=rf"{bad}.*\(33, 32\).*\(32, 32\)"):
        jaxfit.hf.load_pretrained(tmp_path)
    _tamper(tmp_path, bad)
    with pytest.raises(KeyError, match=bad):
        jaxfit.hf.load_pretrained(tmp_path)
    _tamper(tmp_path, bad, np.zeros((32, 32), np.float32))
    _tamper(tmp_path, "vision_model.extra.weight", np.zeros((3,), np.float32))
    with pytest.raises(ValueError, match="vision_model.extra.weight"):
        jaxfit.hf.load_pretrained(tmp_path)


def test_load_with_overrides_and_dtype(checkpoint):
    path, _, _ = checkpoint
    model, params = jaxfit.hf.load_pretrained(
        path, dtype=jax.numpy.bfloat16, compute_dtype=jax.numpy.float32, remat_policy="full"
    )
    assert model.config.remat_policy == "full"
    assert (
        model.config.param_dtype == jax.numpy.bfloat16 and model.config.dtype == jax.numpy.float32
    )
    assert {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}
