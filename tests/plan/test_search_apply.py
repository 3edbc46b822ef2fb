"""Search over the memory levers, handing its choice to train, and out-of-memory advice."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from jaxfit import config as config_lib
from jaxfit import oom, trainer
from jaxfit import run as run_lib
from jaxfit import train as train_cli
from jaxfit.plan import apply, core, search

REPO = Path(__file__).resolve().parents[2]
GPT2 = f"{REPO / 'configs' / 'gpt2_scratch.py'}:demo"


@pytest.mark.slow
def test_search_picks_the_fastest_remat_at_the_largest_micro_batch_that_fits():
    config = config_lib.load_config(GPT2, ["model.attention_impl=xla"])
    peaks = {
        (remat, mb): core.plan_config(
            core.set_fields(config, {"model.remat_policy": remat, "micro_batch_size": mb})
        ).peak_bytes
        for remat in ("none", "full")
        for mb in (8, 16)
    }
    assert peaks["none", 16] > peaks["none", 8] > peaks["full", 8]
    usable = (peaks["none", 8] + peaks["none", 16]) // 2  # none fits at 8, not at 16
    found = search.search_batch(
        config, usable, micro_batch_sizes=[8, 16], remat_policies=["full", "none"],
        loss_chunk_sizes=[0],
    )  # fmt: skip
    best = found[0]
    assert best.fits and best.overrides["model.remat_policy"] == "none"  # no recompute
    assert best.overrides["micro_batch_size"] == 8
    assert best.plan.peak_bytes == peaks["none", 8]
    assert [c.fits for c in found] == sorted((c.fits for c in found), reverse=True)
    tried = {(c.overrides["model.remat_policy"], c.overrides["micro_batch_size"]) for c in found}
    assert tried == {("none", 8), ("none", 16), ("full", 8), ("full", 16)}


def test_apply_writes_the_plan_and_train_uses_it(tmp_path, monkeypatch):
    short = ["total_steps=2", "log_every=1", "eval_every=2", "optim.warmup_steps=1"]
    config = config_lib.load_config(GPT2, short)
    # fit_budget: train searches at the start of a fresh run and records the choice
    chosen = {"micro_batch_size": 8, "model.remat_policy": "full"}
    calls = []

    def fake_search(cfg, usable, **kw):
        calls.append(usable)
        return [search.Candidate(chosen, core.plan_config(core.set_fields(cfg, chosen)), True)]

    monkeypatch.setattr(search, "search_batch", fake_search)
    budget = config_lib.load_config(GPT2, ["fit_budget=1GiB"])
    applied = apply.apply_plan(budget, tmp_path)
    assert calls == [apply.usable_bytes(2**30)]
    assert (applied.micro_batch_size, applied.model.remat_policy) == (8, "full")
    assert json.loads((tmp_path / "plan.json").read_text())["overrides"] == chosen
    # a resumed run (plan.json present) reuses it without searching again
    assert apply.apply_plan(budget, tmp_path).micro_batch_size == 8 and len(calls) == 1
    # jaxfit.train applies plan.json and records the values in config.json
    train_cli.run(config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["micro_batch_size"], saved["model"]["remat_policy"]) == (8, "full")
    with pytest.raises(KeyError, match="no field"):
        core.set_fields(config, {"model.no_such_field": 1})


def test_out_of_memory_in_the_first_step_stops_cleanly_with_advice(tmp_path, monkeypatch):
    config = config_lib.load_config(
        GPT2, ["total_steps=2", "precision=bf16", "optim.warmup_steps=1"]
    )

    def jit_oom(*args, **kwargs):
        def step(*a):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB."
            )

        return step

    monkeypatch.setattr(run_lib, "jit_train_step", jit_oom)  # the step build_run jits
    with pytest.raises(oom.OutOfMemoryError) as err:
        trainer.train(config, tmp_path)
    text = str(err.value)
    assert "the first step" in text and "12.50GiB" in text
    for advice in ("micro_batch_size=8", "remat_policy=full", "loss_chunk_size=1024",
                   "precision=nf4", "adamw8bit", "jaxfit.plan"):  # fmt: skip
        assert advice in text, advice
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())
    assert not oom.is_out_of_memory(ValueError("shape mismatch"))
