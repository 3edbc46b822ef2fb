"""The family registry (:mod:`jaxfit.hf.families`): every entry agrees with its model and
name map, and the lookups and derived tables (PEFT names, quantisation rules) follow it.

Shapes only (``jax.eval_shape``): nothing is compiled.
"""

import re

import pytest
from flax import traverse_util

from jaxfit import hf, lora
from jaxfit.hf import families
from jaxfit.models.clip import CLIPConfig
from jaxfit.models.gpt2 import GPT2Config
from jaxfit.models.llama import LlamaConfig
from jaxfit.models.qwen2 import Qwen2Config

# A tiny config per family; a new family must add one here.
TINY = {
    "clip": CLIPConfig.tiny(),
    "gpt2": GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2),
    "llama": LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=32,
    ),
    "qwen2": Qwen2Config(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    ),
}  # fmt: skip


def test_every_family_has_a_tiny_config():
    assert sorted(TINY) == families.names()
    assert families.names("lm") == ["gpt2", "llama", "qwen2"]
    assert families.names("clip") == ["clip"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_entry_agrees_with_model_and_name_map(name):
    family, config = families.FAMILIES[name], TINY[name]
    assert isinstance(config, family.config_class)
    model = family.model_class(config)
    assert families.for_model(model) is family
    for model_type in family.model_types:
        assert families.for_model_type(model_type) is family
    paths = {"/".join(p) for p in traverse_util.flatten_dict(hf.abstract_params(model, family))}
    assert {"/".join(r.path) for r in family.rules(config)} == paths  # the map covers the tree
    hf_config = family.config_to_hf(config)
    assert hf_config["model_type"] in family.model_types
    assert family.config_from_hf(hf_config) == config
    # the stack name is a path component, and the default quantisation rules select
    # exactly the kernels under it
    kernels = [p for p in paths if p.endswith("/kernel")]
    under_stack = {p for p in kernels if family.stack in p.split("/")}
    assert under_stack
    (rule,) = families.DEFAULT_QUANT_RULES
    assert {p for p in kernels if re.search(rule, p)} == under_stack
    # every PEFT short name selects a linear kernel
    shapes = hf.abstract_params(model, family)
    for target in family.peft_targets:
        assert lora.select(shapes, target), target
    assert lora.PEFT_SHORT_NAMES[name] == family.peft_targets


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_decoder_accessors(name):
    family, config = families.FAMILIES[name], TINY[name]
    model = family.model_class(config)
    shapes = hf.abstract_params(model, family)
    embedding = shapes[model.EMBEDDING]["embedding"].shape
    assert family.vocab_size(config) == 61 == embedding[0]
    assert family.hidden_size(config) == 16 == embedding[1]
    stack = traverse_util.flatten_dict(shapes[family.stack])
    assert {v.shape[0] for v in stack.values()} == {family.num_layers(config)}
    assert family.max_positions(config) in (16, 32)


def test_lookup_errors():
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        families.for_model_type("mamba")
    with pytest.raises(TypeError, match="no jaxfit family"):
        families.for_model(object())
    with pytest.raises(ValueError, match=r"unknown 'lm' model family 'clip'"):
        families.get("clip", task="lm")
    with pytest.raises(TypeError, match="not a decoder"):
        families.get("clip").num_layers(TINY["clip"])
