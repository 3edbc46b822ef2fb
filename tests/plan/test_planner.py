"""The planner against measurements and references: CPU peak memory of a real step,
parameter counts of PEFT, the frozen base's real shapes, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import quant, sharding
from jaxfit.plan import __main__ as plan_cli
from jaxfit.plan import core
from jaxfit.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
GPT2 = str(REPO / "configs" / "gpt2_scratch.py")
QLORA = str(REPO / "configs" / "llama_qlora.py")
LLAMA3_8B = str(REPO / "configs" / "llama3_8b_qlora.py")
# Activations dominate this step (a few hundred MB), so RSS noise stays small beside it.
BIG_ACTIVATIONS = ["batch_size=64", "micro_batch_size=64", "model.config.n_embd=256"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.attention_impl=xla", "model.remat_policy=none"],
        [
            "model.attention_impl=xla",
            "model.remat_policy=full",
            "micro_batch_size=32",
            "model.config.n_embd=768",
            "seq_len=128",
            "model.config.n_positions=128",
        ],
    ],
    ids=["no_remat", "full_remat_accumulated"],
)
def test_planned_peak_matches_a_measured_cpu_step(overrides, tmp_path):
    spec = f"{GPT2}:demo"
    config = config_lib.load_config(spec, BIG_ACTIVATIONS + overrides)
    plan = core.plan_config(config)
    m = plan.memory
    planned_extra = m["temporaries"] + m["outputs"] - m["aliased"]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("measure_step.py")), spec,
         *BIG_ACTIVATIONS, *overrides],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["step_extra_bytes"]
    # Measured here: +4.5% (no remat) and +17% (remat inside the micro-batch loop, where
    # the CPU runtime's matmul scratch is allocated outside XLA's buffer assignment).
    assert measured == pytest.approx(planned_extra, rel=0.25), (measured, planned_extra)
    # the arguments are exactly the state, batch and (absent) frozen base
    state_bytes = m["trainable"] + m["optimizer"]
    assert m["arguments"] == pytest.approx(state_bytes + m["batch"], abs=1024)


def test_qlora_counts_match_peft_and_frozen_shapes_are_real(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = config_lib.load_config(f"{QLORA}:demo")
    plan = core.plan_config(config)
    c = config.model.config
    mesh = sharding.make_mesh()
    task = build_task(config, tmp_path, mesh)
    # the abstract frozen base has the real one's structure, shapes and dtypes
    real = jax.tree.map(lambda x: (x.shape, x.dtype), task.frozen)
    abstract = jax.tree.map(lambda x: (x.shape, x.dtype), task.abstract_frozen())
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    assert jax.tree.leaves(real) == jax.tree.leaves(abstract)
    nf4 = [x for x in jax.tree.leaves(task.frozen, is_leaf=quant.is_quantized)
           if isinstance(x, quant.NF4Weight)]  # fmt: skip
    assert plan.memory["frozen_nf4"] == sum(core.tree_bytes(x) for x in nf4)
    # planning sizes a BPE still to be trained by its target vocabulary (512 here; the
    # tokenizer trained on the small synthetic corpus may come out smaller)
    vocab = build_task(config, tmp_path / "plan", mesh, abstract=True).model.config.vocab_size
    hf = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    lora = peft.LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                           target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    trainable, total = peft.get_peft_model(model, lora).get_nb_trainable_parameters()
    assert (plan.params["trainable"], plan.params["total"]) == (trainable, total)
    assert plan.params["frozen"] == total - trainable


HLO = """
HloModule jit_f

ENTRY %main.1 (head.1: bf16[8,4], x.2: bf16[2,4], norm.3: bf16[4]) -> f32[] {
  %head.1 = bf16[8,4]{1,0} parameter(0)
  %x.2 = bf16[2,4]{1,0} parameter(1)
  %norm.3 = bf16[4]{0} parameter(2)
  %wrapped_convert = f32[8,4]{1,0} fusion(%head.1), kind=kLoop, calls=%wrapped_convert_computation
  %convert.2 = f32[4]{0} convert(%norm.3)
  %convert.3 = f32[2,2]{1,0} fusion(%x.2), kind=kLoop, calls=%slice_convert
  ROOT %while = f32[] while(%wrapped_convert)
}
"""


def test_hoisted_upcasts_counts_whole_copies_of_16bit_arguments():
    # the [8, 4] head and the [4] norm are copied whole to float32; x only in part
    assert core.hoisted_upcast_bytes(HLO) == (8 * 4 + 4) * 4
    assert core.hoisted_upcast_bytes("no entry computation here") == 0


def test_cli_reports_plan_and_time(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["jaxfit.plan", f"--config={GPT2}:demo", "--device=rtx4070", "--tokens=1e9",
            f"--json={out}"]  # fmt: skip
    assert plan_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "FITS" in text and "tokens/s" in text and "1e+09 tokens" in text
    res = json.loads(out.read_text())
    est, plan = res["estimate"], res["plan"]
    assert est["budget_seconds"] == pytest.approx(1e9 / est["tokens_per_second"])
    assert plan["params"]["total"] == plan["params"]["trainable"] > 0
    assert res["usable"] < res["budget"] == 12 * 2**30  # the RTX 4070's 12 GiB
    assert plan_cli.main(["jaxfit.plan", f"--config={GPT2}:demo", "--budget=12"]) == 2


@pytest.mark.slow
def test_llama3_8b_qlora_plans_on_cpu_in_under_two_minutes_and_fits_12gib():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    t0 = time.perf_counter()
    config = config_lib.load_config(LLAMA3_8B)
    plan = core.plan_config(config)
    seconds = time.perf_counter() - t0
    assert seconds < 120, seconds
    assert config.seq_len >= 2048
    from jaxfit.plan.apply import usable_bytes

    assert plan.peak_bytes <= usable_bytes(12 * 2**30), plan.memory
    # XLA:CPU's float32 copies of the frozen bf16 embedding and LM head are not planned
    assert plan.memory["cpu_upcasts"] >= 2 * 128256 * 4096 * 4
    # NF4 with double quantisation: 4.127 bits per quantised weight (QLoRA, sec. 2)
    quantised = plan.params["frozen"] - 2 * 128256 * 4096 - 65 * 4096  # less emb, head, norms
    assert plan.memory["frozen_nf4"] * 8 / quantised == pytest.approx(4.127, abs=0.01)
    hf = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                           task_type="CAUSAL_LM")  # fmt: skip
    trainable, total = peft.get_peft_model(model, lora).get_nb_trainable_parameters()
    assert (plan.params["trainable"], plan.params["total"]) == (41_943_040, 8_072_204_288)
    assert (plan.params["trainable"], plan.params["total"]) == (trainable, total)
    assert np.isfinite(plan.flops["executed"]) and plan.flops["executed"] > plan.flops["model"]
