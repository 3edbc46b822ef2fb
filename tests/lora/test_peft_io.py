"""PEFT interop: jaxfit adapters -> ``PeftModel.from_pretrained`` and PEFT adapters ->
:func:`jaxfit.lora.load_peft`, logits at 1e-4; parameter counts equal to
``get_nb_trainable_parameters()``.

Tiny random float32 ``transformers`` models (GPT-2 with Conv1D layers and a tied head; a
GQA Llama with biases and an untied head), saved with ``save_pretrained`` and imported by
``jaxfit.hf.load_pretrained``.
"""

import copy
import json
import math

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxfit.hf as jhf
from jaxfit import lora

CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2,
            initializer_range=0.2, bos_token_id=None, eos_token_id=None,
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
            attention_bias=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    ),
}  # fmt: skip
# The "q/k/v/o" attention targets of each family (GPT-2 fuses q/k/v into c_attn).
ATTENTION = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
IDS = np.random.RandomState(0).randint(0, 61, (2, 12))


@pytest.fixture(scope="module")
def apply(jit_fast):
    return jit_fast(lambda model, p, ids: model.apply({"params": p}, ids), static_argnums=0)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, torch model, jaxfit model, jaxfit params)."""
    torch.manual_seed(0)
    hf_model = CASES[request.param]().eval()
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    model, params = jhf.load_pretrained(path)
    return request.param, hf_model, model, params


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _randomise(params, seed=0, std=0.4):
    rng = np.random.default_rng(seed)

    def fill(_, leaf):
        a = rng.normal(0, std, leaf.lora_A.shape).astype(np.float32)
        b = rng.normal(0, std, leaf.lora_B.shape).astype(np.float32)
        return leaf.replace(lora_A=a, lora_B=b)

    return lora.map_lora(fill, params)


def test_kaiming_bound_matches_torch():
    """PEFT's A init, ``kaiming_uniform_(a=sqrt(5))`` on ``[r, in]``, is U(+-1/sqrt(in))."""
    w = torch.empty(8, 300)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    a, _ = lora.init_adapter(jax.random.key(0), (300, 20), 8)
    bound = 1 / math.sqrt(300)
    assert float(w.abs().max()) <= bound and float(np.abs(a).max()) <= bound
    assert abs(float(w.std()) - float(np.std(a))) < 0.05 * bound


def test_export_loads_in_peft(case, apply, tmp_path):
    name, hf_model, model, params = case
    # GPT-2: attn.c_proj but not mlp.c_proj, so target_modules must be full module names.
    targets = {"gpt2": ["c_attn", "attn/c_proj", "c_fc"], "llama": ATTENTION["llama"]}[name]
    adapted = lora.add_lora(
        params, targets, rank=4, alpha=6, rng=jax.random.key(0), use_rslora=(name == "llama")
    )
    np.testing.assert_array_equal(apply(model, adapted, IDS), apply(model, params, IDS))
    adapted = _randomise(adapted)
    ours = np.asarray(apply(model, adapted, IDS))
    lora.save_peft(
        adapted, model, tmp_path, base_model_name_or_path="tiny",
        use_rslora=(name == "llama"), dropout=0.05,
    )  # fmt: skip
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6 and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] == (name == "gpt2")  # Conv1D
    shapes = {
        k.removeprefix("base_model.model."): v.shape
        for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
    }
    if name == "gpt2":  # Conv1D: the same [r, in] / [out, r] layout as nn.Linear
        assert "transformer.h.1.attn.c_proj" in config["target_modules"]
        assert shapes["transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 16)
        assert shapes["transformer.h.0.attn.c_attn.lora_B.weight"] == (48, 4)
        assert "transformer.h.0.mlp.c_proj.lora_A.weight" not in shapes
    else:
        assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert shapes["model.layers.1.self_attn.k_proj.lora_A.weight"] == (4, 16)
        assert shapes["model.layers.1.self_attn.k_proj.lora_B.weight"] == (8, 4)

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    theirs = _torch_logits(peft_model, IDS)
    assert np.abs(theirs - _torch_logits(hf_model, IDS)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # Merged kernels give the same logits as the adapters.
    np.testing.assert_allclose(apply(model, lora.merge(adapted), IDS), ours, atol=1e-4)


@pytest.mark.parametrize("which", ["attention", "all-linear"])
def test_peft_adapter_loads_and_counts_match(case, apply, tmp_path, which):
    name, hf_model, model, params = case
    target_modules = "all-linear" if which == "all-linear" else ATTENTION[name]
    rslora = which == "all-linear"
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, use_rslora=rslora,
        init_lora_weights=False,  # nn.Linear's init for A and B: a non-zero B
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    peft_model.save_pretrained(tmp_path)
    theirs = _torch_logits(peft_model, IDS)
    assert np.abs(theirs - _torch_logits(hf_model, IDS)).max() > 0.05

    loaded = lora.load_peft(params, model, tmp_path)
    np.testing.assert_allclose(apply(model, loaded, IDS), theirs, rtol=1e-4, atol=1e-4)
    leaf = next(iter(lora.lora_leaves(loaded).values()))
    assert leaf.scale == (8 / 2 if rslora else 8 / 4) and leaf.lora_A.shape[0] == 2  # stacked

    # Same LoRA config on jaxfit's side: the counts PEFT reports.
    fresh = lora.add_lora(params, target_modules, rank=4, alpha=8, rng=jax.random.key(0))
    trainable, total = peft_model.get_nb_trainable_parameters()
    report = lora.trainable_report(fresh)
    assert (report["trainable"], report["total"]) == (trainable, total)
    assert lora.trainable_report(loaded) == report
    summary = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
    assert lora.trainable_summary(fresh) == summary + f"{100 * trainable / total:.4f}"

    # Re-exporting reproduces PEFT's tensors exactly.
    out = tmp_path / "again"
    lora.save_peft(loaded, model, out, use_rslora=rslora)
    ref = load_file(tmp_path / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_patterns_and_layer_subsets_round_trip(case, apply, tmp_path):
    """rank_pattern / alpha_pattern / layers_to_transform: PEFT -> jaxfit -> PEFT."""
    name, hf_model, model, params = case
    second = {"gpt2": "c_fc", "llama": "v_proj"}[name]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[ATTENTION[name][0], second],
        rank_pattern={second: 2}, alpha_pattern={second: 3}, layers_to_transform=[1],
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = _torch_logits(peft_model, IDS)
    loaded = lora.load_peft(params, model, tmp_path / "peft")
    np.testing.assert_allclose(apply(model, loaded, IDS), theirs, rtol=1e-4, atol=1e-4)
    leaves = lora.lora_leaves(loaded)
    small = next(v for k, v in leaves.items() if second in k)
    assert small.rank == 2 and small.scale == 3 / 2
    assert not np.any(small.lora_A[0]) and np.any(small.lora_A[1])  # layer 0: no adapter

    lora.save_peft(loaded, model, tmp_path / "ours")
    exported = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(exported["rank_pattern"].values()) == {2}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ours")
    np.testing.assert_allclose(_torch_logits(reloaded.eval(), IDS), theirs, atol=1e-5)


def test_gpt2_adapter_without_transformer_prefix(case, tmp_path):
    """Adapters made on ``GPT2Model`` name modules ``h.0...`` (no ``transformer.``)."""
    name, _, model, params = case
    if name != "gpt2":
        pytest.skip("GPT-2 naming only")
    adapted = _randomise(lora.add_lora(params, ["c_attn"], rank=2, alpha=4, rng=jax.random.key(0)))
    lora.save_peft(adapted, model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k.replace("model.transformer.", "model."): v for k, v in tensors.items()},
        str(tmp_path / "adapter_model.safetensors"),
    )
    leaf = lora.load_peft(params, model, tmp_path)["h"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(leaf.lora_B, adapted["h"]["attn"]["c_attn"]["kernel"].lora_B)


def test_load_errors(case, tmp_path):
    name, hf_model, model, params = case
    adapted = lora.add_lora(params, "all-linear", rank=2, alpha=4, rng=jax.random.key(0))
    lora.save_peft(adapted, model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]

    def write(t, c):
        save_file(t, str(tmp_path / "adapter_model.safetensors"))
        (tmp_path / "adapter_config.json").write_text(json.dumps(c))

    write({**tensors, key: np.zeros((5, 2), np.float32)}, config)
    with pytest.raises(ValueError, match=key.rsplit(".lora_B", 1)[0].replace(".", r"\.")):
        lora.load_peft(params, model, tmp_path)
    write({k: v for k, v in tensors.items() if k != key}, config)
    with pytest.raises(ValueError, match="lora_B.weight is missing"):
        lora.load_peft(params, model, tmp_path)
    write(tensors, {**config, "r": 8})
    with pytest.raises(ValueError, match="has rank 2, the config says r=8"):
        lora.load_peft(params, model, tmp_path)
    write(tensors, {**config, "use_dora": True})
    with pytest.raises(ValueError, match="DoRA"):
        lora.load_peft(params, model, tmp_path)
    write({**tensors, "base_model.model.nope.lora_A.weight": np.zeros((2, 2))}, config)
    with pytest.raises(ValueError, match="not linear layers"):
        lora.load_peft(params, model, tmp_path)
    with pytest.raises(ValueError, match="would select other modules"):
        lora.save_peft(adapted, model, tmp_path / "x", target_modules=["c_attn", "q_proj"])
    with pytest.raises(ValueError, match=r"rank=4, but the adapters have rank \[2\]"):
        lora.save_peft(adapted, model, tmp_path / "x", rank=4)
    with pytest.raises(ValueError, match="does not give the adapters' scale"):
        lora.save_peft(adapted, model, tmp_path / "x", alpha=3)


def test_qwen2_short_names_round_trip_through_peft(apply, tmp_path):
    """Qwen2 (Llama's module names, q/k/v biases): its PEFT short names select what
    ``"all-linear"`` selects, are written as ``target_modules``, and PEFT's model on the
    transformers Qwen2 computes what jaxfit computes; PEFT's own all-linear adapter loads."""
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
        )
    ).eval()  # fmt: skip
    hf_model.save_pretrained(tmp_path / "base")
    model, params = jhf.load_pretrained(tmp_path / "base")
    names = list(lora.PEFT_SHORT_NAMES["qwen2"])
    assert lora.select(params, names) == lora.select(params, "all-linear")
    adapted = _randomise(lora.add_lora(params, names, rank=4, alpha=8, rng=jax.random.key(0)))
    lora.save_peft(adapted, model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(names)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ours")
    theirs = _torch_logits(peft_model.eval(), IDS)
    assert np.abs(theirs - _torch_logits(hf_model, IDS)).max() > 0.1
    np.testing.assert_allclose(apply(model, adapted, IDS), theirs, rtol=1e-4, atol=1e-4)

    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lora.load_peft(params, model, tmp_path / "peft")
    assert sorted(lora.lora_leaves(loaded)) == sorted(lora.select(params, "all-linear"))
    np.testing.assert_allclose(
        apply(model, loaded, IDS), _torch_logits(peft_model, IDS), rtol=1e-4, atol=1e-4
    )
