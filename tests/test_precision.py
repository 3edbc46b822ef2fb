"""``precision`` as a shorthand for compute_dtype / base_format / lora.enabled, and the
resolved config (every derived field filled before config.json is written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest

from jaxfit import config as config_lib
from jaxfit import sharding, tasks
from jaxfit.config import ConfigError, Precision, precision_settings
from jaxfit.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
GPT2 = f"{REPO / 'configs' / 'gpt2_scratch.py'}:demo"
CLIP = f"{REPO / 'configs' / 'clip_coco.py'}:demo"


@pytest.mark.parametrize(
    "precision, expected",
    [
        ("fp32", Precision("float32", "float", False)),
        ("bf16", Precision("bfloat16", "float", False)),
        ("int8", Precision("bfloat16", "int8", True)),
        ("nf4", Precision("bfloat16", "nf4", True)),
    ],
)
def test_the_shorthand_stands_for_three_settings(precision, expected):
    config = config_lib.load_config(GPT2, [f"precision={precision}"])
    assert precision_settings(config) == expected
    spelled = config_lib.load_config(
        GPT2,
        ["precision=", f"compute_dtype={expected.compute_dtype}",
         f"base_format={expected.base_format}", f"lora.enabled={expected.lora}"],
    )  # fmt: skip
    assert precision_settings(spelled) == expected


def test_explicit_fields_refine_the_shorthand():
    # QLoRA with float32 compute (the CPU benchmark's setting) and bf16 LoRA over a float base
    cfg = config_lib.load_config(GPT2, ["precision=nf4", "compute_dtype=float32"])
    assert precision_settings(cfg) == Precision("float32", "nf4", True)
    cfg = config_lib.load_config(GPT2, ["precision=bf16", "lora.enabled=True"])
    assert precision_settings(cfg) == Precision("bfloat16", "float", True)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["precision=nf4", "base_format=int8"], ("precision='nf4'", "base_format='int8'")),
        (["compute_dtype=float16"], ("compute_dtype='float16'",)),
        (["precision=fp8"], ("precision='fp8'",)),
    ],
)
def test_impossible_combinations_are_refused_by_name(overrides, names):
    with pytest.raises(ConfigError) as err:
        config_lib.load_config(GPT2, overrides)
    for name in names:
        assert name in str(err.value)


def test_a_quantised_base_needs_a_lora_section():
    config = config_lib.load_config(GPT2, ["precision=nf4"])
    with config.unlocked():
        del config["lora"]
    with pytest.raises(ConfigError, match="no `lora` section"):
        precision_settings(config)


def test_resolve_fills_every_derived_field_in_a_copy(tmp_path):
    config = config_lib.load_config(GPT2, ["precision=nf4"])
    before = config.to_dict()
    spec = tasks.resolve_config(config, tmp_path)
    resolved = spec.config
    assert config.to_dict() == before  # the caller's config is never changed
    assert (resolved.compute_dtype, resolved.base_format) == ("bfloat16", "nf4")
    assert resolved.lora.enabled is True
    assert resolved.data.path == str(tmp_path / "synthetic_text.txt")
    again = tasks.resolve_config(resolved, tmp_path)  # idempotent
    assert again.config.to_dict() == resolved.to_dict() and again == dataclasses.replace(
        spec, config=again.config
    )
    assert tasks.resolve_config(spec, tmp_path) is spec
    clip = tasks.resolve_config(config_lib.load_config(CLIP), tmp_path).config
    assert clip.data.root == str(tmp_path / "synthetic_coco")


def test_resolve_gives_frozen_specs(tmp_path):
    """The run's precision, LoRA and mesh specs and its task entry, made once; frozen."""
    config = config_lib.load_config(GPT2, ["precision=nf4", "lora.rank=4", "mesh.fsdp=1"])
    spec = tasks.resolve_config(config, tmp_path)
    assert spec.task is tasks.TASKS["lm"]
    assert spec.precision == config_lib.Precision("bfloat16", "nf4", True)
    assert spec.precision.base_dtype == "bfloat16"
    assert spec.lora.rank == 4 and spec.lora.alpha == float(config.lora.alpha)
    assert spec.mesh == sharding.MeshSpec(data=-1, fsdp=1)
    for frozen, field, value in ((spec, "lora", None), (spec.precision, "lora", False),
                                 (spec.lora, "rank", 8), (spec.mesh, "fsdp", 2)):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, field, value)
    full = tasks.resolve_config(config_lib.load_config(GPT2, ["precision=fp32"]), tmp_path)
    assert full.lora is None and full.precision.base_dtype == "float32"


def test_shorthand_and_explicit_fields_build_the_same_frozen_base(tmp_path):
    mesh = make_mesh()
    short = config_lib.load_config(GPT2, ["precision=nf4", "lora.targets=c_attn"])
    spelled = config_lib.load_config(
        GPT2, ["precision=", "compute_dtype=bfloat16", "base_format=nf4", "lora.targets=c_attn"]
    )
    a = tasks.build_task(short, tmp_path / "a", mesh, abstract=True)
    b = tasks.build_task(spelled, tmp_path / "b", mesh, abstract=True)
    fa, fb = a.abstract_frozen(), b.abstract_frozen()
    assert jax.tree.structure(fa) == jax.tree.structure(fb)
    assert jax.tree.leaves(fa) == jax.tree.leaves(fb)
    kinds = {leaf.kind for leaf in jax.tree.leaves(fa, is_leaf=lambda x: hasattr(x, "kind"))
             if hasattr(leaf, "kind")}  # fmt: skip
    assert kinds == {"nf4"}


@pytest.mark.parametrize(
    "precision, lora, storage",
    [("fp32", False, "float32"), ("bf16", False, "float32"), ("bf16", True, "bfloat16"),
     ("nf4", False, "bfloat16"), ("int8", False, "bfloat16")],
)  # fmt: skip
def test_the_storage_dtype_rule_lives_in_precision(precision, lora, storage):
    """Float base weights are float32 master weights when they train, the compute dtype
    when frozen under LoRA (``Precision.base_dtype``; what the loaders are given)."""
    config = config_lib.load_config(
        str(REPO / "configs" / "gpt2_lora.py"), [f"precision={precision}", f"lora.enabled={lora}"]
    )
    p = precision_settings(config)
    assert p.base_dtype == storage
    assert p.quantize == (precision if precision in ("nf4", "int8") else None)


def test_lora_takes_a_spec_not_the_config(tmp_path):
    """``jaxfit.lora`` reads no config: resolving the run builds a ``LoraSpec`` once
    (``None`` when LoRA is off) and ``split`` takes it."""
    import ast

    from jaxfit.lora import training as lora_training

    for path in (REPO / "jaxfit" / "lora").glob("*.py"):
        imported = {
            n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
        } | {
            a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
            for a in n.names
        }  # fmt: skip
        assert "jaxfit.config" not in imported and "ml_collections" not in imported, path
        assert "config_lib" not in path.read_text(), path
    # an explicit attention: resolving reads nothing of the (Hub) init_from
    overrides = ["lora.rank=4", "model.attention_impl=xla"]
    config = config_lib.load_config(str(REPO / "configs" / "gpt2_lora.py"), overrides)
    spec = tasks.resolve_config(config, tmp_path).lora
    assert spec == lora_training.LoraSpec(
        targets=tuple(config.lora.targets), rank=4, alpha=float(config.lora.alpha),
        dropout=float(config.lora.dropout), use_rslora=bool(config.lora.use_rslora),
    )  # fmt: skip
    assert lora_training.LoraSpec(targets="all-linear", rank=2, alpha=4.0).targets == (
        "all-linear",
    )
    off = config_lib.set_fields(config, {"lora.enabled": False, "precision": "fp32"})
    assert tasks.resolve_config(off, tmp_path).lora is None
    base = {"w": jax.numpy.ones((2, 2))}
    assert lora_training.split(base, None, jax.random.key(0)) == (base, None)
