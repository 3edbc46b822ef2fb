"""The task registry (``jaxfit.tasks.TASKS``) is the one list of tasks and the one place a
task's name decides anything: every model family names a registered task, the validation
and the planner ask the registry, and no module outside ``jaxfit/tasks`` compares
``config.task`` with a task's name."""

from __future__ import annotations

import ast
from pathlib import Path

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
