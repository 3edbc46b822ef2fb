"""Experiment configs: loading ``file.py[:arg]`` with ``--config.x=y`` overrides, checks, saving.

A config file defines ``get_config(arg: str | None) -> ml_collections.ConfigDict`` (the
big_vision / Flax-examples convention). ``arg`` is the text after the colon in
``--config configs/clip_coco.py:demo,batch=32`` and is parsed by :func:`parse_arg`
(``demo`` flags and ``key=value`` pairs over the file's defaults). Overrides use
``ml_collections.config_flags``: every field is overridable as ``--config.optim.lr=3e-4``
with its type checked, and unknown keys are rejected. The resolved config is written to
``WORKDIR/config.json``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxfit.errors import Error, ShowHelp

log = logging.getLogger(__name__)

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


class ConfigError(Error, ValueError):
    """A config file, argument or override is invalid; the message names the key
    (exit status 2)."""


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """The error of a bad value: ``"<key>=<value> is invalid: <allowed>, set --config.<key>"``."""
    return ConfigError(f"{key}={value!r} is invalid: {allowed}, set --config.{key}")


def check_seq_len(config, positions: Any, where: str) -> None:
    """Refuse a ``seq_len`` longer than the model's ``positions`` (named by ``where``);
    nothing to check when either is not an integer.

    Raises:
      ConfigError: naming ``seq_len``, its value and the model's limit.
    """
    seq_len = get_field(config, "seq_len")
    if isinstance(positions, int) and isinstance(seq_len, int) and seq_len > positions:
        raise invalid("seq_len", seq_len, f"must be <= the model's {where}={positions}")


HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


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
        returned in the same dict. ``--verbose`` (tracebacks of errors, see
        ``jaxfit.cli``) is always accepted.

    Returns:
      ``(config, values)``: the locked ``ConfigDict`` and a dict of the extra flags.

    Raises:
      ShowHelp: ``-h`` / ``--help`` is in ``argv`` (with the config when ``--config``
        loads); ``jaxfit.cli.run`` prints the help.
      ConfigError: a missing or unloadable config file, a bad config argument, an unknown
        override key, a value of the wrong type, an unknown flag or a stray argument; the
        message names the file, argument or key and what to do.
    """
    argv = list(argv)
    verbose = (
        "Show the traceback of an error, and the library's INFO lines (data, tokenizer, "
        "runtime settings) on the console."
    )
    bool_flags = {**(bool_flags or {}), "verbose": verbose}
    spec, rest = _split_config_flag(argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        helps = {"config": "Config file: path.py[:arg].", **(extra_flags or {}), **bool_flags}
        config, problem = None, ""
        if spec:
            try:
                config = _load_config_file(spec)
            except ConfigError as e:
                problem = str(e)
        raise ShowHelp(helps, config, spec or "", problem)
    if not spec:
        raise ConfigError(
            "--config FILE[:ARG] is required, e.g. --config configs/clip_coco.py:demo; "
            "add --help for the flags"
        )
    config = _load_config_file(spec)
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config", config, "Config file: path.py[:arg].", flag_values=fv, sys_argv=rest
        )
        for name, help_text in (extra_flags or {}).items():
            flags.DEFINE_string(name, None, help_text, flag_values=fv)
        for name, help_text in bool_flags.items():
            flags.DEFINE_bool(name, False, help_text, flag_values=fv)
        positional = fv(rest)[1:]
    except AttributeError as e:  # config_flags: override of a key the config lacks
        raise _unknown_key(e, rest, spec) from None
    except KeyError:  # config_flags: a missing PARENT of the key (--config.optimizer.lr)
        raise _unknown_parent(rest, config, spec) from None
    except flags.Error as e:
        raise ConfigError(f"{e}, in the command line; add --help for the flags") from None
    if positional:
        raise ConfigError(
            f"unexpected argument {positional[0]!r}, in the command line; flags are "
            "--name=value (add --help for the list)"
        )
    validate(config)
    names = [*(extra_flags or {}), *bool_flags]
    return config, {name: fv[name].value for name in names}


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(spec, argv without it)`` for ``--config SPEC`` / ``--config=SPEC``."""
    rest, spec, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if i and name in ("--config", "-config"):
            if eq:
                spec = value
            elif i + 1 < len(argv):
                spec, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a value, e.g. --config configs/clip_coco.py")
        else:
            rest.append(arg)
        i += 1
    return spec, rest


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the file in ``spec`` (``"path.py[:arg]"``), locked.

    Raises:
      ConfigError: the file is missing or fails to import, or ``get_config`` rejects its
        argument; the message names the file (and line) and what to do.
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if file.is_dir():
        near = sorted(p.name for p in file.glob("*.py"))
        hint = f"it has {', '.join(near)}" if near else "pass a .py file"
        raise ConfigError(
            f"config file {path!r} is a directory, not a file, in --config {spec}, {hint}"
        )
    if not file.is_file():
        parent = file.parent if file.parent.is_dir() else None
        near = sorted(p.name for p in parent.glob("*.py")) if parent else []
        hint = f"{parent} has {', '.join(near)}" if near else "check the path"
        raise ConfigError(f"config file {path!r} does not exist, in --config {spec}, {hint}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"{file.stem}_config", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(
            f"{type(e).__name__}: {e}, in {_line_in(e, file)}, fix the config file"
        ) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path!r} defines no get_config(arg), in --config {spec}, add one")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{e}, in --config {spec} ({_line_in(e, file)}), see {path}'s docstring for "
            "its arguments"
        ) from None
    except Exception as e:  # a bug in the config file: where, not a traceback
        raise ConfigError(
            f"get_config raised {type(e).__name__}: {e}, in {_line_in(e, file)} "
            f"(--config {spec}), fix the config file"
        ) from None
    config.lock()
    return config


def _line_in(exc: BaseException, file: Path) -> str:
    """``"file:line"`` of the innermost traceback frame (or syntax error) in ``file``."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == file.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{file}:{line}" if line else str(file)


def _unknown_key(error: AttributeError, argv: list[str], spec: str) -> ConfigError:
    """The ConfigError for ``--config.a.b=...`` where the config has no ``a.b``."""
    text = str(error.args[0].args[0] if error.args and error.args[0].args else error)
    key = (re.findall(r"'([^']+)'", text) or [text])[0]
    overrides = [a.split("=")[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
    bad = next((o for o in overrides if o.split(".")[-1] == key), f"config.{key}")
    field = bad.removeprefix("config.")
    suggestion = re.findall(r'Did you mean "([^"]+)"', text)
    parent = field.rpartition(".")[0]
    mean = f" (did you mean {parent + '.' if parent else ''}{suggestion[0]}?)" if suggestion else ""
    return ConfigError(
        f"unknown config key {field!r}{mean}, in --{bad}, see --config {spec} --help for the fields"
    )


def _unknown_parent(argv: list[str], config, spec: str) -> ConfigError:
    """The ConfigError for ``--config.a.b=...`` where the config has no ``a`` (no section
    of that name): names the first override whose path leaves the config, and the closest
    existing name."""
    for arg in argv:
        name = arg.split("=")[0].lstrip("-")
        if not name.startswith("config."):
            continue
        node, parts = config, name.split(".")[1:]
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, known, n=1, cutoff=0.5)
                prefix = ".".join(parts[:i])
                mean = (
                    f" (did you mean {'.'.join(filter(None, [prefix, close[0]]))}?)"
                    if close
                    else ""
                )
                return ConfigError(
                    f"unknown config key {'.'.join(parts[: i + 1])!r}{mean}, in --{name}, "
                    f"see --config {spec} --help for the fields"
                )
            node = node[part]
    return ConfigError(f"an override names an unknown config key, see --config {spec} --help")


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
    # Device mesh (jaxfit.sharding): the batch splits over data x fsdp devices, whose
    # product is the device count of all processes; one of them may be -1 (the rest).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel devices (parameters replicated over them)
    config.mesh.fsdp = 1  # devices splitting parameters, gradients, optimizer state (FSDP)


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
        """Whether the frozen base is stored in a quantisation format."""
        return self.base_format != "float"

    @property
    def quantize(self) -> str | None:
        """The format the base is quantised to while loading (``None``: kept float)."""
        return self.base_format if self.quantised else None

    @property
    def base_dtype(self) -> str:
        """Storage dtype of the float base weights: ``"float32"`` master weights when they
        train; the compute dtype when the base is frozen under LoRA (half the memory in
        bf16; QLoRA's float leaves, norms and embeddings, stay in bf16 too)."""
        return self.compute_dtype if self.lora else "float32"


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


def resolve_precision(config) -> tuple[Any, Precision]:
    """``(copy, precision)``: ``config`` with ``compute_dtype``, ``base_format`` and
    ``lora.enabled`` filled from :func:`precision_settings` (what ``config.json``
    records), and that :class:`Precision`. The one place a resolved run's precision is
    decoded (``jaxfit.tasks.resolve_config`` keeps it in the run's specs); code after it
    reads the specs, never the shorthand.

    Raises:
      ConfigError: as :func:`precision_settings`.
    """
    p = precision_settings(config)
    values = {"compute_dtype": p.compute_dtype, "base_format": p.base_format}
    if get_field(config, "lora") is not None:
        values["lora.enabled"] = p.lora
    return set_fields(config, values, create=True), p


def default_lora_config() -> ml_collections.ConfigDict:
    """``config.lora`` with the defaults of jaxfit's QLoRA recipe: r=16, alpha=32,
    dropout 0.05, the attention projections q/k/v/o (PEFT short names; Dettmers et al.
    2023, "QLoRA", train adapters on every linear layer for their best results:
    ``targets="all-linear"``). The run's ``LoraSpec`` is built from it once
    (``jaxfit.tasks.resolve_config``)."""
    c = ml_collections.ConfigDict()
    c.enabled = False  # train adapters over a frozen base (forced on by a quantised base_format)
    c.rank = 16
    c.alpha = 32.0
    c.dropout = 0.05
    c.use_rslora = False  # scale alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r
    # PEFT short names, "all-linear", or regexes over parameter paths (jaxfit.lora.targets)
    c.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    # a PEFT adapter directory to start from (trained elsewhere); its rank, alpha and
    # targets replace the fields above
    c.peft_dir = ""
    return c


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
