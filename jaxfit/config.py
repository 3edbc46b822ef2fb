"""Experiment configs: loading ``file.py[:arg]`` with ``--config.x=y`` overrides, checks, saving.

A config file defines ``get_config(arg: str | None) -> ml_collections.ConfigDict`` (the
big_vision / Flax-examples convention). ``arg`` is the text after the colon in
``--config configs/clip_coco.py:demo,batch=32`` and is parsed by
``configs.common.parse_arg``. Overrides use ``ml_collections.config_flags``: every field is
overridable as ``--config.optim.lr=3e-4`` with its type checked, and unknown keys are
rejected. The resolved config is written to ``WORKDIR/config.json``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

# `precision` is a shorthand for three settings, each a field of its own:
#   compute_dtype  the dtype of activations and matmuls ("float32" | "bfloat16"; float32
#                  master weights either way when weights train);
#   base_format    how the pretrained / base weights are stored: "float", or a quantised
#                  format registered in jaxfit.quant.base ("int8", "nf4"); a quantised base
#                  is frozen, so it turns LoRA on;
#   lora.enabled   whether LoRA adapters over a frozen base are what trains.
# fp32 / bf16 train all weights (or LoRA adapters when lora.enabled); int8 / nf4 train LoRA
# adapters over a frozen base quantised to int8 or NF4 (QLoRA), computing in bf16.
PRECISIONS: dict[str, tuple[str, str]] = {
    "fp32": ("float32", "float"),
    "bf16": ("bfloat16", "float"),
    "int8": ("bfloat16", "int8"),
    "nf4": ("bfloat16", "nf4"),
}
COMPUTE_DTYPES = ("float32", "bfloat16")
RHYTHM_FIELDS = ("total_steps", "log_every", "eval_every", "ckpt_every", "seed", "precision")


class ConfigError(ValueError):
    """A config file, argument or override is invalid; the message names the key."""


def parse_argv(
    argv: Sequence[str],
    *,
    extra_flags: dict[str, str] | None = None,
    bool_flags: dict[str, str] | None = None,
):
    """Parse ``--config FILE[:ARG] [--config.key=value ...]`` and extra string flags.

    Args:
      argv: command line including the program name (``sys.argv``).
      extra_flags: names and help texts of additional string flags (e.g. ``workdir``);
        their values are returned in a dict (``None`` when absent).
      bool_flags: names and help texts of boolean flags (``--search``; default False),
        returned in the same dict.

    Returns:
      ``(config, values)``: the locked ``ConfigDict`` and a dict of the extra flags.

    Raises:
      ConfigError: missing or unloadable config file, an unknown override key, or a
        value of the wrong type; the message names the key or file.
    """
    argv = list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file: path.py[:arg].",
        flag_values=fv,
        sys_argv=argv,
        lock_config=True,
    )
    for name, help_text in (extra_flags or {}).items():
        flags.DEFINE_string(name, None, help_text, flag_values=fv)
    for name, help_text in (bool_flags or {}).items():
        flags.DEFINE_bool(name, False, help_text, flag_values=fv)
    try:
        fv(argv)
    except AttributeError as e:  # config_flags: override of a key the config lacks
        key = str(e).strip("\"'")
        bad = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        raise ConfigError(
            f"unknown config key {key!r} in {bad[0] if bad else 'an override'}; "
            "see the config file for the available fields"
        ) from None
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"could not load the config file: {e}") from None
    if fv["config"].value is None:
        raise ConfigError("--config FILE[:ARG] is required")
    config = fv["config"].value
    try:
        validate(config)
    except OSError as e:  # config_flags defers a failed get_config to first access
        cause = e.__cause__ or e
        raise ConfigError(f"could not load the config file: {cause}") from None
    names = [*(extra_flags or {}), *(bool_flags or {})]
    return config, {name: fv[name].value for name in names}


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Programmatic form of :func:`parse_argv`.

    Args:
      spec: ``"configs/clip_coco.py:demo"``.
      overrides: ``["optim.lr=3e-4", "total_steps=10"]`` (no ``--config.`` prefix).
    """
    argv = ["jaxfit", f"--config={spec}"] + [f"--config.{o}" for o in overrides]
    return parse_argv(argv)[0]


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the fields every training config shares.

    Raises:
      ConfigError: a missing run-rhythm field, an unknown precision, a non-positive step
        count or interval.
    """
    for name in RHYTHM_FIELDS:
        if name not in config:
            raise ConfigError(f"config lacks the required field {name!r}")
    if config.precision not in (*PRECISIONS, ""):
        raise ConfigError(
            f"precision={config.precision!r}; expected one of {sorted(PRECISIONS)} (or '' "
            "with compute_dtype / base_format set)"
        )
    precision_settings(config)  # rejects impossible combinations by name
    for name in ("total_steps", "log_every", "eval_every", "ckpt_every"):
        if config[name] <= 0:
            raise ConfigError(f"{name}={config[name]} must be positive")
    if "batch_size" in config and "micro_batch_size" in config:
        if config.micro_batch_size <= 0 or config.batch_size % config.micro_batch_size:
            raise ConfigError(
                f"batch_size={config.batch_size} must be a positive multiple of "
                f"micro_batch_size={config.micro_batch_size}"
            )


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Write ``WORKDIR/config.json`` atomically and return its path."""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def load_saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read the ``config.json`` a training run wrote into ``workdir``.

    Raises:
      FileNotFoundError: naming the expected path.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in workdir {str(workdir)!r}")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse a config argument ``"demo,batch=32,lr=1e-4"`` into typed fields.

    Each comma-separated item is ``key=value`` or a bare ``flag`` (set to True). A value
    takes the type of its default (``bool`` accepts true/false/1/0); keys without a
    default are rejected so a typo cannot pass silently. (Convention of big_vision's
    ``parse_arg``.)

    Raises:
      ValueError: an unknown key or a value that does not parse as the default's type.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, str):
            out[key] = value
        else:
            try:
                parsed = ast.literal_eval(value)
                out[key] = type(default)(parsed)
            except (ValueError, SyntaxError, TypeError):
                raise ValueError(
                    f"config argument {key}={value!r} is not a {type(default).__name__}"
                ) from None
    return out


def run_rhythm(
    config: ml_collections.ConfigDict,
    *,
    total_steps: int,
    log_every: int,
    eval_every: int,
    ckpt_every: int,
    seed: int = 0,
    precision: str = "bf16",
    keep_checkpoints: int = 3,
) -> None:
    """Set the top-level fields every training config shares (see jaxfit.config)."""
    config.total_steps = total_steps  # optimizer steps (one step = one effective batch)
    config.log_every = log_every  # steps between train-metric writes
    config.eval_every = eval_every  # steps between evaluations (and at the end)
    config.ckpt_every = ckpt_every  # steps between checkpoints (also at the end / on signal)
    config.keep_checkpoints = keep_checkpoints  # newest checkpoints kept on disk
    config.seed = seed  # one seed for init, data order and dropout
    config.precision = precision  # fp32 | bf16 | int8 | nf4: shorthand, see jaxfit.config
    config.compute_dtype = ""  # "float32" | "bfloat16"; "" = from precision
    config.base_format = ""  # "float" | "int8" | "nf4"; "" = from precision
    # "12GiB": at the start of a fresh run, let the planner (jaxfit.plan) choose
    # micro_batch_size, model.remat_policy and loss_chunk_size to fit this much device
    # memory; "" = use the values of the config as they are.
    config.fit_budget = ""


def get_field(config, path: str, default: Any = None) -> Any:
    """``config.a.b`` for ``path="a.b"``; ``default`` when a part is missing."""
    node = config
    for part in path.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def set_fields(config, values: dict[str, Any], *, create: bool = False):
    """A copy of ``config`` with dotted-path fields replaced (added when ``create``).

    Raises:
      KeyError: a path the config does not have (named), unless ``create``.
    """
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for path, value in values.items():
            *parents, last = path.split(".")
            node = config
            for part in parents:
                node = node[part]
            if last not in node and not create:
                raise KeyError(f"config has no field {path!r}")
            node[last] = value
    return config


@dataclasses.dataclass(frozen=True)
class Precision:
    """The three settings ``precision`` stands for (see :data:`PRECISIONS`).

    Attributes:
      compute_dtype: ``"float32"`` or ``"bfloat16"``.
      base_format: ``"float"`` or a quantisation format name (``"int8"``, ``"nf4"``).
      lora: whether only LoRA adapters train (over a frozen base).
    """

    compute_dtype: str
    base_format: str
    lora: bool

    @property
    def quantised(self) -> bool:
        return self.base_format != "float"


def precision_settings(config) -> Precision:
    """The run's :class:`Precision`: the ``compute_dtype`` / ``base_format`` fields where
    set, else what the ``precision`` shorthand stands for; LoRA on when ``lora.enabled``
    or the base is quantised. Pure: the config is not changed.

    Raises:
      ConfigError: an explicit field contradicting the shorthand (``precision=nf4`` with
        ``base_format=int8``), an unknown ``compute_dtype``, or a quantised base in a
        config without a ``lora`` section; the message names the fields.
    """
    shorthand = get_field(config, "precision", "") or ""
    compute, base = PRECISIONS.get(shorthand, ("float32", "float"))
    explicit_compute = get_field(config, "compute_dtype", "") or ""
    explicit_base = get_field(config, "base_format", "") or ""
    if explicit_compute and explicit_compute not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype={explicit_compute!r}; expected one of {COMPUTE_DTYPES}")
    if explicit_base and shorthand and explicit_base != base:
        raise ConfigError(
            f"precision={shorthand!r} means base_format={base!r}, but base_format="
            f"{explicit_base!r} is set; set precision='' to use the explicit fields"
        )
    compute, base = explicit_compute or compute, explicit_base or base
    lora = get_field(config, "lora")
    if base != "float" and lora is None:
        raise ConfigError(
            f"base_format={base!r} quantises a frozen base, which needs LoRA adapters to "
            "train, but this config has no `lora` section"
        )
    return Precision(compute, base, bool(base != "float" or (lora is not None and lora.enabled)))


def resolve_precision(config):
    """A copy of ``config`` with ``compute_dtype``, ``base_format`` and ``lora.enabled``
    filled from :func:`precision_settings` (what ``config.json`` records)."""
    p = precision_settings(config)
    values = {"compute_dtype": p.compute_dtype, "base_format": p.base_format}
    if get_field(config, "lora") is not None:
        values["lora.enabled"] = p.lora
    return set_fields(config, values, create=True)


def sibling_config(config_file: str | os.PathLike, name: str, arg: str | None = None):
    """``get_config(arg)`` of the config file ``name`` (e.g. ``"llama_finetune.py"``) next
    to ``config_file`` (pass ``__file__``): how one recipe builds on another, from any
    working directory (config files are loaded by path, not imported as a package).

    Raises:
      FileNotFoundError: no such file beside ``config_file``.
    """
    path = Path(config_file).with_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
