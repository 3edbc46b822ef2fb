"""``experiments/ablate_precision.py`` end to end on tiny demo models, plus its argument logic.

The end-to-end tests run the real script in a subprocess (as a user would; each arm then
runs in a fresh worker process of its own) with the fast-compile XLA flags of the other
subprocess tests, on GPT-2 and CLIP demo configs shrunk further: a base stage of a few
steps, then each arm for 4 steps.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from xla_env import fast_subprocess_env

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``experiments`` is not installed (plain ``pytest``)
    sys.path.insert(0, str(REPO))

from experiments import ablate_precision  # noqa: E402

SCRIPT = str(REPO / "experiments" / "ablate_precision.py")
TINY_GPT2 = [
    "--config.data.synthetic.num_documents=300",
    "--config.model.config.n_layer=1",
    "--config.model.config.n_embd=32",
    "--config.model.config.n_head=2",
    "--config.seq_len=32",
    "--config.batch_size=8",
    "--config.micro_batch_size=8",
    "--config.eval.batch_size=16",
    "--config.eval.max_batches=2",
    "--config.lora.targets=c_attn",  # the config's default names Llama's projections
]
TINY_CLIP = [
    "--config.data.synthetic.num_train=64",
    "--config.data.synthetic.num_val=16",
    "--config.data.synthetic.image_size=32",
    "--config.model.text.num_hidden_layers=1",
    "--config.model.vision.num_hidden_layers=1",
    "--config.model.vision.image_size=16",
    "--config.batch_size=16",
    "--config.micro_batch_size=16",
    "--config.eval.batch_size=16",
]
NUMERIC = (
    "planned_peak_bytes",
    "measured_peak_bytes",
    "step_time_s",
    "examples_per_s",
    "compile_s",
    "final_train_loss",
    "quant_rel_error",
)


def _ablate(config: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = fast_subprocess_env()
    cmd = [sys.executable, SCRIPT, "--config", config, "--out", str(out), "--steps", "4"]
    cmd += ["--base_steps", "6", "--resamples", "1000", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def _check_ok(row: dict, *eval_keys: str) -> None:
    assert row["status"] == "ok", row
    for key in NUMERIC + eval_keys:
        assert math.isfinite(float(row[key])), (row["name"], key, row[key])
    assert (float(row["quant_rel_error"]) > 0) == (row["precision"] in ("int8", "nf4"))


@pytest.mark.slow
def test_gpt2_demo_all_arms_and_resume(tmp_path):
    out = tmp_path / "ablation"
    config = f"{REPO}/configs/gpt2_scratch.py:demo"
    proc = _ablate(config, out, *TINY_GPT2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    arms = ["fp32", "bf16", "int8", "nf4", "nf4+adam8"]
    assert list(rows) == arms
    for arm in arms:
        _check_ok(rows[arm], "tokens_per_s", "eval/loss", "eval/perplexity")
        assert (out / "tb" / arm).is_dir() and list((out / "tb" / arm).glob("events.out.*"))
        assert (out / "runs" / arm / "eval" / "step_4.npz").is_file()
    assert rows["nf4+adam8"]["optimizer"] == "adamw8bit"
    assert rows["nf4"]["trainable"] == "lora" and rows["bf16"]["trainable"] == "full"
    assert float(rows["nf4"]["planned_peak_bytes"]) < float(rows["bf16"]["planned_peak_bytes"])
    # NF4 (4.13 bits) loses more than int8 (8 bits + a scale per channel)
    assert float(rows["nf4"]["quant_rel_error"]) > float(rows["int8"]["quant_rel_error"]) > 0
    for name in ("results.md", "bootstrap.csv", "loss.png", "memory.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "fp32 (reference)" in md and "| loss | nf4 |" in md

    # resume: a second invocation retrains nothing and rewrites the same table
    stamps = {a: (out / "runs" / a / "result.json").stat().st_mtime_ns for a in arms}
    base = (out / "base" / "done.json").stat().st_mtime_ns
    again = _ablate(config, out, *TINY_GPT2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == len(arms)
    assert "[base]" not in again.stdout
    assert {a: (out / "runs" / a / "result.json").stat().st_mtime_ns for a in arms} == stamps
    assert (out / "base" / "done.json").stat().st_mtime_ns == base
    assert _rows(out)["nf4"]["planned_peak_bytes"] == rows["nf4"]["planned_peak_bytes"]


@pytest.mark.slow
def test_clip_demo_failing_arm_is_recorded(tmp_path):
    out = tmp_path / "ablation"
    config = f"{REPO}/configs/clip_coco.py:demo"
    bad = "--arm_override=int8:optim.no_such_field=1"  # this arm alone fails at start
    proc = _ablate(config, out, "--arms", "bf16,int8,nf4", bad, *TINY_CLIP)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert list(rows) == ["bf16", "int8", "nf4"]
    assert rows["int8"]["status"] == "failed" and "no_such_field" in rows["int8"]["error"]
    assert not (out / "runs" / "int8" / "result.json").exists()
    recall = ("eval/i2t_R@1", "eval/t2i_R@1", "eval/t2i_R@5")
    for arm in ("bf16", "nf4"):
        _check_ok(rows[arm], *recall)
    assert float(rows["nf4"]["planned_peak_bytes"]) < float(rows["bf16"]["planned_peak_bytes"])
    md = (out / "results.md").read_text()
    assert "bf16 (reference)" in md and "**int8** failed" in md and "| t2i_R@1 | nf4 |" in md


def test_arm_names_and_overrides():
    assert ablate_precision.arm_overrides("nf4+adam8") == ["precision=nf4", "optim.name=adamw8bit"]
    assert ablate_precision.arm_overrides("bf16") == ["precision=bf16"]
    for bad in ("fp16", "nf4+adam4", ""):
        with pytest.raises(ValueError, match="unknown arm"):
            ablate_precision.arm_overrides(bad)
    args, overrides = ablate_precision.parse_args(
        ["--config", "c.py", "--out", "o", "--config.optim.lr=1e-3", "--arm_override=nf4:seed=3"]
    )
    assert overrides == ["optim.lr=1e-3"] and args.arm_override == ["nf4:seed=3"]
    with pytest.raises(SystemExit):
        ablate_precision.parse_args(["--config", "c.py", "--out", "o", "--bogus"])


def test_stage_overrides():
    from jaxfit import config as config_lib

    config = config_lib.load_config(f"{REPO}/configs/gpt2_scratch.py:demo")  # warmup 20
    args, _ = ablate_precision.parse_args(
        ["--config", "c", "--out", "/o", "--steps", "10", "--arm_override=nf4:seed=3"]
    )
    arm = ablate_precision.stage_overrides(args, config, "nf4", "/base/hf")
    assert arm[:4] == ["total_steps=10", "log_every=1", "eval_every=10", "ckpt_every=10"]
    assert "optim.warmup_steps=1" in arm and "init_from=/base/hf" in arm
    assert "precision=nf4" in arm and "data.path=/o/data/synthetic_text.txt" in arm
    assert arm[-1] == "seed=3"  # the arm's own overrides come last
    base = ablate_precision.stage_overrides(args, config, "base", "")
    assert "total_steps=300" in base and "precision=fp32" in base and "lora.enabled=False" in base
    assert not any(o.startswith(("init_from", "log_every")) for o in base)
    # the failure of an invalid arm name stops the script before any work
    assert ablate_precision.main(["--config", "c.py", "--out", "/o", "--arms", "fp8"]) == 2
