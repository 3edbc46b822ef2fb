"""LoRA adapters in Hugging Face PEFT's format (``PeftModel.save_pretrained`` directories).

A PEFT LoRA directory holds ``adapter_config.json`` (``LoraConfig.to_dict()``) and
``adapter_model.safetensors`` with, per adapted module (``get_peft_model_state_dict``,
``peft/utils/save_and_load.py``; the adapter name is stripped from the keys)::

    base_model.model.<hf module>.lora_A.weight   [r, in]    (= jaxfit lora_A.T)
    base_model.model.<hf module>.lora_B.weight   [out, r]   (= jaxfit lora_B.T)

``<hf module>`` is the module name in the ``transformers`` model
(``model.layers.3.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``), found through the
family's name map (:mod:`jaxfit.hf.families`): the rule whose tensor ``<module>.weight``
maps to the jaxfit ``.../kernel`` path, per layer for stacked kernels. These shapes hold for
``nn.Linear`` and for GPT-2's ``Conv1D`` alike: PEFT builds ``lora_A = nn.Linear(in, r)``
and ``lora_B = nn.Linear(r, out)`` for both, taking ``(in, out) = Conv1D.weight.shape``
(``peft/tuners/tuners_utils.py``, ``_get_in_out_features``); for ``Conv1D`` it only sets
``fan_in_fan_out=True``, which transposes the merged delta, not the stored adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxfit.hf import families, mapping
from jaxfit.hf.io import as_written_by_open
from jaxfit.lora import adapters
from jaxfit.lora import targets as targets_lib

PyTree = Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class _Module(NamedTuple):
    """One HF linear module: its name, jaxfit kernel path, layer index, Conv1D or not."""

    name: str
    path: str
    layer: int | None
    conv1d: bool


def _modules(model) -> dict[str, _Module]:
    """``{hf module name: _Module}`` of every linear kernel in the family's name map."""
    family = families.for_model(model)
    out = {}
    for rule in family.rules(model.config):
        if rule.path[-1] != "kernel" or not rule.hf.endswith(".weight"):
            continue
        if rule.transform not in (mapping.linear, mapping.IDENTITY):
            continue  # convolutions: no LoRA
        template = rule.hf[: -len(".weight")]
        path = "/".join(rule.path)
        conv1d = rule.transform is mapping.IDENTITY  # [in, out] stored as is: Conv1D
        if rule.num_layers is None:
            out[template] = _Module(template, path, None, conv1d)
        else:
            for i in range(rule.num_layers):
                name = template.format(i=i)
                out[name] = _Module(name, path, i, conv1d)
    return out


def peft_matches(target_modules: str | Sequence[str], name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name (no layer filters).

    A string is ``re.fullmatch``-ed against the name; a list matches a name equal to an
    entry or ending in ``"." + entry``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key`` lookup: first key ``k`` with ``(.*\\.)?(k)$`` matching."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _tidy(x: float) -> float | int:
    """``8.000000000000002 -> 8`` (an alpha recovered from ``scale * r``)."""
    return int(round(x)) if math.isclose(x, round(x)) else float(x)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    as_written_by_open(tmp)  # safetensors writes 0600
    os.replace(tmp, path)


def save_peft(
    params: PyTree,
    model,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    use_rslora: bool = False,
    task_type: str | None = "CAUSAL_LM",
    dtype: Any = None,
) -> Path:
    """Write the adapters of ``params`` as a PEFT LoRA directory.

    ``peft.PeftModel.from_pretrained(transformers_model, out_dir)`` then computes what
    jaxfit computes. Adapters of scanned stacks are written per layer.

    Args:
      params: parameter tree with :class:`~jaxfit.lora.adapters.LoraWeight` leaves.
      model: the jaxfit model (its family's name map gives the HF module names).
      out_dir: created if needed.
      base_model_name_or_path: recorded in the config (Hub name or path of the base).
      target_modules: PEFT ``target_modules``. ``None`` derives it: the adapted modules'
        short names (``["c_attn", "c_fc"]``) when those select exactly the adapted
        modules in the HF model, else the list of full module names. Given explicitly, it
        must select exactly the adapted modules (else PEFT would build other adapters).
      rank: ``r``; ``None`` takes the most common adapter rank. Other ranks are written
        to ``rank_pattern`` (full module names).
      alpha: ``lora_alpha``; ``None`` derives it from each leaf's scale
        (``scale * r``, or ``scale * sqrt(r)`` with rsLoRA). Given, it must reproduce the
        leaves' scale. Modules whose alpha differs go to ``alpha_pattern``.
      dropout: ``lora_dropout``; ``None`` takes the leaves' (must agree).
      use_rslora: how ``scale`` relates to ``alpha`` (``alpha / sqrt(r)`` when True).
      task_type: PEFT task type (``"CAUSAL_LM"``; ``None`` for CLIP/feature models).
      dtype: dtype of the written tensors (default: the adapters' dtype).

    Returns:
      ``out_dir`` as a ``Path``.

    Raises:
      ValueError: no adapters, an adapted kernel without an HF linear module, adapters
        that disagree on dropout, an ``alpha``/``rank``/``target_modules`` inconsistent
        with the leaves.
    """
    leaves = adapters.lora_leaves(params)
    if not leaves:
        raise ValueError("params hold no LoRA adapters (use add_lora or load_peft first)")
    modules = _modules(model)
    by_path: dict[str, list[_Module]] = {}
    for m in modules.values():
        by_path.setdefault(m.path, []).append(m)

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    conv1d = False
    for path, leaf in leaves.items():
        if path not in by_path:
            raise ValueError(f"adapted kernel {path} has no Hugging Face linear module")
        a = np.asarray(jax.device_get(leaf.lora_A))
        b = np.asarray(jax.device_get(leaf.lora_B))
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        r = leaf.rank
        leaf_alpha = leaf.scale * (math.sqrt(r) if use_rslora else r)
        dropouts.add(leaf.dropout)
        for m in by_path[path]:
            ai, bi = (a, b) if m.layer is None else (a[m.layer], b[m.layer])
            tensors[f"{PREFIX}{m.name}.lora_A.weight"] = np.asarray(ai.T, order="C")
            tensors[f"{PREFIX}{m.name}.lora_B.weight"] = np.asarray(bi.T, order="C")
            ranks[m.name] = r
            alphas[m.name] = leaf_alpha
            conv1d |= m.conv1d

    if dropout is None:
        if len(dropouts) > 1:
            raise ValueError(f"adapters disagree on dropout {sorted(dropouts)}; pass dropout=")
        dropout = dropouts.pop()
    if rank is None:
        rank = Counter(ranks.values()).most_common(1)[0][0]
    elif rank not in ranks.values():
        raise ValueError(f"rank={rank}, but the adapters have rank {sorted(set(ranks.values()))}")
    rank_pattern = {n: r for n, r in ranks.items() if r != rank}
    if alpha is None:
        common = Counter(a for n, a in alphas.items() if ranks[n] == rank).most_common(1)
        alpha = common[0][0]
    else:
        wrong = {n: a for n, a in alphas.items() if ranks[n] == rank and not math.isclose(a, alpha)}
        if wrong:
            raise ValueError(
                f"alpha={alpha} (use_rslora={use_rslora}) does not give the adapters' scale; "
                f"their alpha would be {sorted(set(wrong.values()))}"
            )
    alpha = _tidy(alpha)
    alpha_pattern = {n: _tidy(a) for n, a in alphas.items() if not math.isclose(a, alpha)}

    adapted = set(ranks)
    if target_modules is None:
        short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
        matched = {n for n in modules if peft_matches(short, n)}
        target_modules = short if matched == adapted else sorted(adapted)
    else:
        if not isinstance(target_modules, str):
            target_modules = sorted(target_modules)
        matched = {n for n in modules if peft_matches(target_modules, n)}
        if matched != adapted:
            raise ValueError(
                f"target_modules={target_modules!r} would select other modules than the adapted "
                f"ones: not adapted {sorted(matched - adapted)[:10]}, "
                f"not selected {sorted(adapted - matched)[:10]}"
            )

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "target_modules": target_modules,
        "use_rslora": bool(use_rslora),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": conv1d,  # PEFT sets it for transformers' Conv1D (GPT-2)
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    _write_atomic(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return out


_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


def _read_config(directory: Path) -> dict:
    f = directory / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(directory)!r}")
    config = json.loads(f.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{f}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{f}: {what} ({key}={config[key]!r}) is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{f}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    f = directory / WEIGHTS_FILE
    if not f.is_file():
        extra = " (adapter_model.bin is not read: re-save with safetensors)"
        raise FileNotFoundError(
            f"no {WEIGHTS_FILE} in {str(directory)!r}"
            + (extra if (directory / "adapter_model.bin").exists() else "")
        )
    # framework="flax" as jaxfit.hf.io.TensorReader: numpy cannot return bfloat16.
    with jax.default_device(jax.devices("cpu")[0]):
        with safe_open(f, framework="flax", device="cpu") as st:
            return {k: np.asarray(st.get_tensor(k)) for k in st.keys()}


def _get(tree: PyTree, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _set(tree: PyTree, path: str, value: Any) -> PyTree:
    """Copy of a nested dict with one entry replaced (the input is not modified)."""
    head, *rest = path.split("/")
    new = dict(tree)
    new[head] = _set(tree[head], "/".join(rest), value) if rest else value
    return new


def load_peft(
    params: PyTree, model, adapter_dir: str | os.PathLike, *, dtype: Any = jnp.float32
) -> PyTree:
    """Read a PEFT LoRA directory into :class:`~jaxfit.lora.adapters.LoraWeight` leaves.

    Args:
      params: the base model's parameter tree (nested dicts; kernels may be quantised
        weight leaves: the adapter goes on top, QLoRA).
      model: the jaxfit model (its family's name map gives the HF module names).
      adapter_dir: a directory written by ``PeftModel.save_pretrained`` or
        :func:`save_peft`.
      dtype: storage dtype of ``lora_A``/``lora_B``.

    Returns:
      ``params`` with ``LoraWeight`` leaves (``scale`` from ``lora_alpha``/``r``,
      ``rank_pattern``/``alpha_pattern`` and ``use_rslora``; ``dropout`` from
      ``lora_dropout``). Layers of a stack absent from the file (``layers_to_transform``)
      get zero adapters.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
      ValueError: not LoRA, an unsupported PEFT option (DoRA, bias, modules_to_save, ...),
        tensors that are not LoRA A/B of a linear module of this model, a missing A or B,
        shapes that do not fit the kernel (the message names the tensor), a rank that
        disagrees with the config, or layers of one stack with different rank/scale.
    """
    directory = Path(adapter_dir)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    modules = _modules(model)
    family = families.for_model(model)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            bad.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if bad:
        raise ValueError(f"{directory}: tensors that are not LoRA A/B weights: {bad[:10]}")
    stored = list(pairs)
    # e.g. GPT-2 adapters made on GPT2Model (no ``transformer.`` prefix)
    names = family.stored_names([n + ".weight" for n in stored])
    canonical = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in names.items()}
    if unknown := sorted(n for n in canonical if n not in modules):
        raise ValueError(
            f"{directory}: adapters for modules that are not linear layers of this "
            f"{type(model).__name__}: {unknown[:10]}"
        )

    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    per_path: dict[str, dict[int | None, tuple]] = {}
    for name, stored_name in canonical.items():
        ab = pairs[stored_name]
        for part in ("lora_A", "lora_B"):
            if part not in ab:
                raise ValueError(f"{directory}: {PREFIX}{stored_name}.{part}.weight is missing")
        mod = modules[name]
        shape = targets_lib.kernel_shape(_get(params, mod.path))
        d_in, d_out = shape[-2:]
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(
                f"{directory}: {PREFIX}{stored_name}.lora_A/B.weight have shapes "
                f"{tuple(a.shape)}/{tuple(b.shape)}; the kernel {mod.path} is [in, out] = "
                f"[{d_in}, {d_out}], so PEFT stores lora_A [r, {d_in}] and lora_B [{d_out}, r]"
            )
        expected_r = _pattern_value(config.get("rank_pattern"), name, config.get("r", r))
        if r != expected_r:
            raise ValueError(
                f"{directory}: {PREFIX}{stored_name}.lora_A.weight has rank {r}, the config "
                f"says r={expected_r}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scale = adapters.lora_scale(alpha, r, use_rslora)
        per_path.setdefault(mod.path, {})[mod.layer] = (a.T, b.T, r, scale)

    for path, layers_ in per_path.items():
        base = _get(params, path)
        if adapters.is_lora(base):
            raise ValueError(f"{path} already has a LoRA adapter")
        shape = targets_lib.kernel_shape(base)
        if None in layers_:
            a, b, r, scale = layers_[None]
            leaf = adapters.LoraWeight(
                base, jnp.asarray(a, dtype), jnp.asarray(b, dtype), scale=scale, dropout=dropout
            )
            params = _set(params, path, leaf)
            continue
        num_layers = shape[0]
        got = {(r, scale) for _, _, r, scale in layers_.values()}
        if len(got) > 1:
            raise ValueError(
                f"{directory}: the layers of {path} have different (rank, scale) {sorted(got)}; "
                "a scanned stack needs one"
            )
        r, scale = got.pop()
        missing = [i for i in range(num_layers) if i not in layers_]
        if missing and not config.get("layers_to_transform"):
            raise ValueError(
                f"{directory}: adapters of {path} lack layers {missing} (and the config has no "
                "layers_to_transform)"
            )
        a_stack = np.zeros((num_layers, shape[-2], r), np.float32)
        b_stack = np.zeros((num_layers, r, shape[-1]), np.float32)
        for i, (a, b, _, _) in layers_.items():
            a_stack[i], b_stack[i] = a, b
        leaf = adapters.LoraWeight(
            base,
            jnp.asarray(a_stack, dtype),
            jnp.asarray(b_stack, dtype),
            scale=scale,
            dropout=dropout,
        )
        params = _set(params, path, leaf)
    return params
