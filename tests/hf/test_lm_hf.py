"""GPT-2 / Llama parity with ``transformers``: import, export, sharded and legacy checkpoints.

Tiny random float32 models; weights drawn with a large ``initializer_range`` and norms /
biases perturbed so logits are O(1) and a wrong layout or formula shows up far above the
1e-4 tolerance.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import jaxfit.hf as jhf
from jaxfit.hf import io

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            initializer_range=0.2, bos_token_id=None, eos_token_id=None,
        )
    ),
    "gpt2_untied": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
            initializer_range=0.2, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None,
        )
    ),
    # GQA, untied head, biases on every projection.
    "llama_gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        )
    ),
    # llama3 RoPE scaling, multi-query attention, tied head, head_dim != hidden / heads.
    "llama3_tied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            initializer_range=0.2, tie_word_embeddings=True, max_position_embeddings=64,
            rope_parameters=dict(LLAMA3_ROPE),
        )
    ),
    # Qwen2: biases on q/k/v (not o_proj), GQA, untied head, Qwen2's rope_theta.
    "qwen2_gqa": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            rms_norm_eps=1e-5, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    ),
    # Qwen2.5-0.5B's layout: tied head, few KV heads.
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, initializer_range=0.2,
            tie_word_embeddings=True, max_position_embeddings=64,
        )
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def apply(jit_fast):
    """Jitted ``model.apply``: one compile per (model config, input shape) for the module."""
    return jit_fast(
        lambda model, params, ids: model.apply({"params": params}, ids), static_argnums=0
    )


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(case: str):
    torch.manual_seed(0)
    return _perturb(CASES[case]())


def _ids(vocab: int, batch: int = 2, length: int = 24) -> np.ndarray:
    return np.random.RandomState(0).randint(0, vocab, (batch, length))


def _torch_logits(model, ids) -> tuple[np.ndarray, float]:
    with torch.no_grad():
        t = torch.tensor(ids)
        out = model(t, labels=t)
    return out.logits.numpy(), float(out.loss)


def _lm_loss(logits, ids) -> float:
    """Mean next-token cross-entropy (HF ``ForCausalLMLoss``: shift by one)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return float(jnp.mean(ce))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    hf_model = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    ids = _ids(hf_model.config.vocab_size)
    ref_logits, ref_loss = _torch_logits(hf_model, ids)
    return request.param, hf_model, path, ids, ref_logits, ref_loss


def test_import_parity(case, apply):
    name, _, path, ids, ref_logits, ref_loss = case
    model, params = jhf.load_pretrained(path)
    logits = apply(model, params, ids)
    assert logits.dtype == jnp.float32 and logits.shape == ref_logits.shape
    assert np.std(ref_logits) > 0.5  # O(1) logits, so 1e-4 is a real test
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=0)
    assert abs(_lm_loss(logits, jnp.asarray(ids)) - ref_loss) < 1e-4


def test_export_reloads_in_transformers(case, tmp_path):
    name, hf_model, path, ids, ref_logits, _ = case
    model, params = jhf.load_pretrained(path)
    out = jhf.save_pretrained(model, params, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf_model).__name__]
    with io.TensorReader(out) as reader:
        has_head = "lm_head.weight" in reader
    assert has_head == (not hf_model.config.tie_word_embeddings)
    reloaded = type(hf_model).from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    np.testing.assert_allclose(_torch_logits(reloaded, ids)[0], ref_logits, atol=1e-5, rtol=0)


def test_llama3_scaling_matters(tmp_path, apply):
    """The llama3 case would fail if the scaling were ignored (positions up to 23 > 16)."""
    hf_model = _hf_model("llama3_tied")
    hf_model.save_pretrained(tmp_path)
    ids = _ids(97)
    model, params = jhf.load_pretrained(tmp_path)
    assert model.config.rope_scaling.rope_type == "llama3"
    plain = model.clone(config=dataclasses.replace(model.config, rope_scaling=None))
    diff = np.abs(apply(plain, params, ids) - _torch_logits(hf_model, ids)[0])
    assert diff.max() > 1e-2


def test_sharded_checkpoint(tmp_path, apply):
    hf_model = _hf_model("llama_gqa")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / io.INDEX_FILE).is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = _ids(97)
    model, params = jhf.load_pretrained(tmp_path)
    np.testing.assert_allclose(
        apply(model, params, ids), _torch_logits(hf_model, ids)[0], atol=1e-4
    )


def test_legacy_gpt2_names_and_buffers(tmp_path, apply):
    """The original ``gpt2`` Hub layout: no ``transformer.`` prefix, ``attn.bias`` buffers."""
    hf_model = _hf_model("gpt2")
    tensors = {k: v.numpy() for k, v in hf_model.transformer.state_dict().items()}
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(tmp_path / io.SINGLE_FILE))
    hf_model.config.save_pretrained(tmp_path)
    ids = _ids(97)
    model, params = jhf.load_pretrained(tmp_path)
    np.testing.assert_allclose(
        apply(model, params, ids), _torch_logits(hf_model, ids)[0], atol=1e-4
    )


def test_tied_checkpoint_with_lm_head_tensor(tmp_path, apply):
    """A tied checkpoint that still stores ``lm_head.weight`` loads (the tensor is ignored)."""
    hf_model = _hf_model("llama3_tied")
    tensors = {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, str(tmp_path / io.SINGLE_FILE))
    hf_model.config.save_pretrained(tmp_path)
    model, params = jhf.load_pretrained(tmp_path)
    assert "lm_head" not in params
    ids = _ids(97)
    np.testing.assert_allclose(
        apply(model, params, ids), _torch_logits(hf_model, ids)[0], atol=1e-4
    )


def test_legacy_llama_rope_scaling_spelling():
    """transformers 4.x configs: ``rope_theta`` + ``rope_scaling`` with ``type``."""
    from jaxfit.hf import llama

    cfg = llama.config_from_hf(
        {
            "model_type": "llama",
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [128001, 128009],
        }
    )  # fmt: skip
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_id == (128001, 128009)
    back = llama.config_to_hf(cfg)
    assert back["rope_parameters"]["rope_type"] == "llama3"
    assert llama.config_from_hf(back) == cfg
    with pytest.raises(ValueError, match="rope_type"):
        llama.config_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_qwen2_config_conversion():
    """HF ``Qwen2Config`` dicts: no ``head_dim`` / ``attention_bias`` keys (derived from the
    checkpoint's own sizes), sliding-window attention refused by name, a round trip."""
    from jaxfit.hf import llama, qwen2
    from jaxfit.models.llama import LlamaConfig

    hf = transformers.Qwen2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ).to_dict()  # fmt: skip
    assert "head_dim" not in hf and hf["use_sliding_window"] is False
    cfg = qwen2.config_from_hf(hf)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (16, 2, 1e6)
    assert cfg.qkv_bias and not cfg.attention_bias and cfg.vocab_size == 151936
    back = qwen2.config_to_hf(cfg)
    assert back["model_type"] == "qwen2" and back["layer_types"] == ["full_attention"] * 3
    assert qwen2.config_from_hf(back) == cfg
    sliding = dict(hf, use_sliding_window=True, sliding_window=128)
    with pytest.raises(ValueError, match="use_sliding_window"):
        jhf.families.for_model_type("qwen2").config_from_hf(sliding)
    with pytest.raises(ValueError, match="qkv_bias"):  # HF Llama cannot express it
        llama.config_to_hf(LlamaConfig(qkv_bias=True))
