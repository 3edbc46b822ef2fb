"""The task registry (``jaxfit.tasks.TASKS``) is the one list of tasks and the one place a
task's name decides anything: every model family names a registered task, the validation
and the planner ask the registry, and no module outside ``jaxfit/tasks`` compares
``config.task`` with a task's name."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import ml_collections
import pytest

from jaxfit import config as config_lib
from jaxfit import tasks
from jaxfit.hf import families

REPO = Path(__file__).resolve().parents[1]


def test_every_family_names_a_registered_task_and_each_task_lists_its_families():
    assert {f.task for f in families.FAMILIES.values()} <= set(tasks.TASKS)
    for name, entry in tasks.TASKS.items():
        assert entry.name == name
        assert entry.families == sorted(
            f.name for f in families.FAMILIES.values() if f.task == name
        )
    assert {"gpt2", "llama", "qwen2"} <= set(tasks.TASKS["lm"].families)
    assert tasks.TASKS["clip"].families == ["clip"]


def test_unknown_task_is_a_config_error_listing_the_tasks():
    with pytest.raises(config_lib.ConfigError, match=r"config.task='dpo'; expected one of"):
        tasks.entry(ml_collections.ConfigDict({"task": "dpo"}))


def test_tokens_per_step():
    lm = {"task": "lm", "batch_size": 16, "seq_len": 1024}
    assert tasks.TASKS["lm"].tokens_per_step(lm) == 16 * 1024
    assert tasks.TASKS["clip"].tokens_per_step({"task": "clip", "batch_size": 16}) is None


def test_the_tasks_own_rules():
    lm = config_lib.load_config(str(REPO / "configs" / "gpt2_scratch.py") + ":demo")
    tasks.entry(lm).validate(lm)
    bad = config_lib.set_fields(lm, {"model.family": "clip"})
    with pytest.raises(config_lib.ConfigError, match=r"model.family='clip' is invalid: expected"):
        tasks.entry(bad).validate(bad)
    positions = lm.model.config.n_positions
    long = config_lib.set_fields(lm, {"seq_len": positions + 1})
    with pytest.raises(config_lib.ConfigError, match=rf"must be <= the model's .*={positions}"):
        tasks.entry(long).validate(long)
    clip = config_lib.load_config(str(REPO / "configs" / "clip_coco.py") + ":demo")
    tasks.entry(clip).validate(clip)
    odd = config_lib.set_fields(clip, {"model.vision.patch_size": 5})
    with pytest.raises(config_lib.ConfigError, match=r"patch_size=5 is invalid: must divide"):
        tasks.entry(odd).validate(odd)


def _task_name_compares(path: Path) -> list[str]:
    """``x == "lm"`` / ``"clip" != y`` / ``x in ("lm", ...)`` in a file: a task-name check."""
    names = set(tasks.TASKS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            consts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_task_name_compares_outside_the_registry():
    """``task == "lm"`` (the trap of a new task) only inside ``jaxfit/tasks``."""
    files = [*(REPO / "jaxfit").rglob("*.py"), *(REPO / "experiments").rglob("*.py")]
    inside = REPO / "jaxfit" / "tasks"
    found = [hit for p in files if not p.is_relative_to(inside) for hit in _task_name_compares(p)]
    assert not found, found
    assert _task_name_compares(REPO / "tests" / "test_task_registry.py")  # the scan sees one


def _calls(path: Path, name: str) -> list[str]:
    """Calls of a function or attribute ``name`` (``f(...)`` / ``x.f(...)``) in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
            if called == name:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_precision_is_decoded_once_and_tasks_are_not_probed():
    """After ``tasks.resolve_config`` the library reads ``RunSpec.precision``: in
    ``jaxfit/`` the decoder is called by ``config.py`` alone (load-time check,
    ``resolve_precision``); experiments that read a raw or recorded config call the same
    decoder, and nothing outside ``config.py`` looks the shorthand up itself
    (``PRECISIONS.get``). No code asks a task object what it has
    (``hasattr(task, ...)``): what differs between tasks is a registry hook."""
    files = [*(REPO / "jaxfit").rglob("*.py"), *(REPO / "experiments").rglob("*.py")]
    decoders = [hit for p in files for hit in _calls(p, "precision_settings")]
    in_library = {h.split(":")[0] for h in decoders if h.startswith("jaxfit/")}
    assert in_library == {"jaxfit/config.py"}, decoders
    lookups = [p for p in files if "PRECISIONS.get(" in p.read_text()]
    assert lookups == [REPO / "jaxfit" / "config.py"], lookups
    probes = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr":
                target = node.args[0]
                text = ast.unparse(target)
                if text == "task" or text.endswith(".task"):
                    probes.append(f"{p.relative_to(REPO)}:{node.lineno}: {text}")
    assert not probes, probes
    assert _calls(REPO / "tests" / "test_task_registry.py", "precision_settings") == []
    assert _calls(REPO / "jaxfit" / "config.py", "precision_settings")  # the scan sees them


def test_plan_hooks(tmp_path):
    """The planner's task facts come from the registry: tokens per step, the model FLOPs
    formula (LM: the decoder's ``6 N + 12 L d T`` per token, ``jaxfit.perf``; CLIP: none,
    the traced step counts) and whether ``--search_seq_len`` applies."""
    from jaxfit import perf, sharding
    from jaxfit.plan import search

    mesh = sharding.MeshSpec().build()
    lm_config = config_lib.load_config(str(REPO / "configs" / "gpt2_scratch.py") + ":demo")
    lm = tasks.build_task(lm_config, tmp_path / "lm", mesh, abstract=True)
    assert lm.spec.task is tasks.TASKS["lm"] and tasks.TASKS["lm"].searches_seq_len
    c = lm.model.config
    n = sum(x.size for x in jax.tree.leaves(lm.abstract_params()))
    n -= c.n_positions * c.n_embd  # the position table is a lookup, not a matmul
    per_token = perf.decoder_flops_per_token(n, c.n_layer, c.n_embd, lm_config.seq_len)
    assert tasks.TASKS["lm"].model_flops(lm, 4) == 4 * lm_config.seq_len * per_token
    clip_config = config_lib.load_config(str(REPO / "configs" / "clip_coco.py") + ":demo")
    clip = tasks.build_task(clip_config, tmp_path / "clip", mesh, abstract=True)
    assert tasks.TASKS["clip"].model_flops(clip, 4) is None
    assert not tasks.TASKS["clip"].searches_seq_len
    with pytest.raises(ValueError, match=r"task 'clip' has no sequence length to search"):
        search.search_seq_len(clip_config, 1 << 30)
