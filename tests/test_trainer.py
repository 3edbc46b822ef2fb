"""The training loop end to end on the CLIP task: resume, learning, evaluation CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import run as run_lib
from jaxfit import trainer, validation
from jaxfit.evals.retrieval import chance_recall
from jaxfit.evaluate import main as evaluate_main
from jaxfit.tasks import clip as clip_task
from jaxfit.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
CLIP_CONFIG = str(REPO / "configs" / "clip_coco.py")


def tiny_clip_config(data_root: Path, *overrides: str):
    """The demo config shrunk further for fast tests (synthetic data written into
    ``data_root`` here, once, for runs to share: a run writes it only into its workdir)."""
    config = config_lib.load_config(
        f"{CLIP_CONFIG}:demo",
        [
            f"data.root={data_root}",
            "data.synthetic.num_train=64",
            "data.synthetic.num_val=16",
            "data.synthetic.image_size=32",
            "model.text.num_hidden_layers=1",
            "model.vision.num_hidden_layers=1",
            "model.vision.image_size=16",
            "batch_size=16",
            "micro_batch_size=8",
            "eval.batch_size=16",
            "total_steps=6",
            "log_every=2",
            "eval_every=6",
            "ckpt_every=3",
            "data.num_threads=2",
            "optim.warmup_steps=1",
            *overrides,
        ],
    )
    if config.data.synthetic.enabled:
        clip_task.ensure_synthetic_data(config)
    return config


def _params(workdir):
    return trainer.restore_params(workdir)[2]


def test_resume_is_exact(tmp_path):
    data = tmp_path / "data"
    straight = tmp_path / "straight"
    trainer.train(tiny_clip_config(data), straight)

    class Interrupt(Exception):
        pass

    def stop_at_5(step, state):
        if step == 5:
            raise Interrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        trainer.train(tiny_clip_config(data), resumed, on_step=stop_at_5)
    # step 3 was checkpointed; steps 4-5 are lost (step 4 was logged) and must be redone
    # identically, and metrics.jsonl must hold step 4 once.
    assert trainer.restore_params(resumed)[3] == 3
    trainer.train(tiny_clip_config(data), resumed)
    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert "resuming from checkpoint at step 3" in (resumed / "train.log").read_text()
    a, b = _params(straight), _params(resumed)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    # the changes were real: the final params differ from the step-3 params
    p3 = trainer.restore_params(resumed, step=3)[2]
    assert not np.allclose(np.asarray(p3["logit_scale"]), np.asarray(a["logit_scale"]))


def test_logs_checkpoints_and_config(tmp_path):
    workdir = tmp_path / "run"
    results = trainer.train(tiny_clip_config(tmp_path / "data"), workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps_with_loss = [x["step"] for x in lines if "train/loss" in x]
    assert steps_with_loss == [2, 4, 6]
    assert any("eval/i2t_R@1" in x for x in lines)
    assert list(workdir.glob("events.out.tfevents*")) or list(workdir.rglob("events.out.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["batch_size"] == 16 and saved["task"] == "clip"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        3,
        6,
    ]
    assert results["eval/num_images"] == 16


def test_config_errors_name_the_key(capsys):
    with pytest.raises(config_lib.ConfigError, match="optim.nope|nope"):
        config_lib.load_config(f"{CLIP_CONFIG}:demo", ["optim.nope=1"])
    with pytest.raises(config_lib.ConfigError, match="total_steps"):
        config_lib.load_config(f"{CLIP_CONFIG}:demo", ["total_steps=abc"])
    with pytest.raises(config_lib.ConfigError, match="precision"):
        config_lib.load_config(f"{CLIP_CONFIG}:demo", ["precision=fp8"])
    with pytest.raises(config_lib.ConfigError, match="micro_batch_size"):
        config_lib.load_config(f"{CLIP_CONFIG}:demo", ["micro_batch_size=5"])
    with pytest.raises(config_lib.ConfigError, match="unknown"):
        config_lib.load_config(f"{CLIP_CONFIG}:demo,stepz=3")
    with pytest.raises(config_lib.ConfigError, match="nofile.py"):
        config_lib.load_config(str(REPO / "configs" / "nofile.py"))
    # the CLI turns them into one clear line and exit status 2
    code = train_main(["train", f"--config={CLIP_CONFIG}:demo", "--config.optim.nope=1"])
    assert code == 2 and "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-0.1", r"optim.lr=-0.1 is invalid: must be a number > 0"),
        ("optim.b2=1.0", r"optim.b2=1.0 is invalid: must be a number >= 0 and < 1"),
        ("model.text.num_attention_heads=3", r"num_attention_heads=3 .* must divide"),
        ("model.vision.patch_size=5", r"patch_size=5 .* must divide .*image_size=32"),
        ("keep_checkpoints=0", r"keep_checkpoints=0 .* integer >= 1"),
        ("init_from=./no/such/dir", r"init_from='./no/such/dir' .* no such local directory"),
        ("init_from=no_such_name", r"not a Hugging Face Hub name"),
    ],
)
def test_values_are_checked_before_any_work(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        validation.load_config(f"{CLIP_CONFIG}:demo", [override])


def test_hub_names_and_local_dirs_pass_without_the_hub(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for value in ("openai/clip-vit-base-patch32", "gpt2", str(tmp_path)):
        validation.load_config(f"{CLIP_CONFIG}:demo", [f"init_from={value}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(config_lib.ConfigError, match="has no config.json"):
        validation.load_config(f"{CLIP_CONFIG}:demo", [f"init_from={tmp_path / 'empty'}"])


def test_warmup_longer_than_the_run_is_clamped(caplog):
    with caplog.at_level("WARNING", logger="jaxfit.validation"):
        cfg = validation.load_config(CLIP_CONFIG, ["total_steps=60"])  # the recipe warms 500
    assert cfg.optim.warmup_steps == 59
    assert "optim.warmup_steps=500 is not shorter than total_steps=60: clamped to 59" in (
        caplog.text
    )


def test_missing_data_root_stops_at_start(tmp_path):
    cfg = tiny_clip_config(tmp_path / "data", "data.synthetic.enabled=False")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data")):
        trainer.train(cfg, tmp_path / "run")


def test_cli_train_then_evaluate(tmp_path, capsys):
    cfg = tiny_clip_config(tmp_path / "data")
    overrides = [
        f"--config.{k}={v}"
        for k, v in {
            "data.root": tmp_path / "data",
            "data.synthetic.num_train": 64,
            "data.synthetic.num_val": 16,
            "model.text.num_hidden_layers": 1,
            "model.vision.num_hidden_layers": 1,
            "model.vision.image_size": 16,
            "batch_size": 16,
            "micro_batch_size": 8,
            "total_steps": 2,
            "eval_every": 2,
            "ckpt_every": 2,
            "optim.warmup_steps": 1,
        }.items()
    ]
    assert cfg.total_steps == 6  # sanity: the helper config differs from the CLI one
    workdir = tmp_path / "run"
    code = train_main(["train", f"--config={CLIP_CONFIG}:demo", f"--workdir={workdir}", *overrides])
    assert code == 0
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(workdir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    last_train_eval = [
        json.loads(x)
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
        if "eval/t2i_R@1" in x
    ][0]
    # the same checkpoint evaluated twice gives the same numbers
    assert printed["eval/t2i_R@1"] == pytest.approx(last_train_eval["eval/t2i_R@1"])
    assert printed["eval/i2t_R@5"] == pytest.approx(last_train_eval["eval/i2t_R@5"])


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The embedded default, at its real size, ends far above chance."""
    cfg = config_lib.load_config(f"{CLIP_CONFIG}:demo")  # synthetic set in the workdir
    results = trainer.train(cfg, tmp_path / "run")
    n = int(results["eval/num_images"])
    chance = chance_recall(n, 5, 10)
    assert results["eval/t2i_R@10"] > 5 * chance["t2i"]
    assert results["eval/i2t_R@10"] > 2.5 * chance["i2t"]
    assert results["train/loss"] < 2.0


class _ExamplesTask:
    """A task whose evaluation gives ``metrics`` and per-example results (the shape of
    ``run_evaluation``'s contract, without a model)."""

    def __init__(self, metrics):
        self.metrics = metrics

    def evaluate_examples(self, params):
        return dict(self.metrics), {"loss": np.array([1.0, 2.0])}


def test_evaluation_with_nan_writes_nothing(tmp_path):
    """With ``require_finite`` (what ``jaxfit.evaluate`` uses) a NaN metric raises before
    anything is written: a good ``eval/step_N.npz`` keeps its content; finite metrics
    are written through a temporary named after the process (none left over)."""
    good = trainer.run_evaluation(_ExamplesTask({"loss": 1.5}), None, tmp_path, 12)
    assert good == {"loss": 1.5}
    path = tmp_path / "eval" / "step_12.npz"
    before = path.read_bytes()
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["step_12.npz"]
    with pytest.raises(trainer.NonFiniteError, match=r"step 12 .*loss=nan.*nothing was written"):
        trainer.run_evaluation(
            _ExamplesTask({"loss": float("nan")}), None, tmp_path, 12, require_finite=True
        )
    assert path.read_bytes() == before
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["step_12.npz"]


def test_long_run_notice_says_how_long_and_how_to_shorten():
    # GPT-2 124M's full recipe on a 2-core CPU (issue 22): 5,000 steps of minutes
    text = trainer.long_run_notice(390.0, 4999, "cpu")
    assert "about 541.6 h on this CPU (4999 more steps of 390 s)" in text, text
    assert "--config.total_steps=1 " in text and ":small" in text and "plan --search" in text
    text = trainer.long_run_notice(7.2, 4999, "cpu")
    assert "10.0 h" in text and "--config.total_steps=83 (about 10 min" in text, text
    assert trainer.long_run_notice(0.5, 4999, "cpu") is None  # 42 min: no notice
    assert trainer.long_run_notice(390.0, 4999, "gpu") is None


def test_first_step_time_is_its_run_and_compilation_is_apart(tmp_path, monkeypatch, caplog):
    """Each step spends SLOW seconds inside XLA (a ``pure_callback`` that sleeps, so the
    host's dispatch returns long before the step ends): the reported first-step time is
    that run (within 10%), the compilation is reported apart, and the pace of the steps
    after (``perf/step_time_s``, what the ETA uses) is that of a steady step. With the
    long-run threshold lowered below the run's 2 steps x SLOW, the notice comes after the
    first step, from its measured time."""
    import time

    import jax.numpy as jnp

    slow = 2.0
    ran = []  # the measured run of each step's sleep, in seconds

    def sleep(loss):
        t0 = time.perf_counter()
        time.sleep(slow)
        ran.append(time.perf_counter() - t0)
        return np.asarray(loss, np.float32)

    real = run_lib.jit_train_step

    def slow_step(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch, frozen):
            state, metrics = step_fn(state, batch, frozen)
            out = jax.ShapeDtypeStruct((), jnp.float32)
            return state, {**metrics, "loss": jax.pure_callback(sleep, out, metrics["loss"])}

        return jax.jit(step, donate_argnums=0)

    monkeypatch.setattr(run_lib, "jit_train_step", slow_step)  # the step build_run jits
    monkeypatch.setattr(trainer, "LONG_CPU_RUN_S", 1.5 * slow)
    workdir = tmp_path / "run"
    config = tiny_clip_config(tmp_path / "data", "total_steps=3", "log_every=1", "eval_every=3")
    with caplog.at_level("WARNING", logger="jaxfit.trainer"):
        trainer.train(config, workdir)
    notices = [r.getMessage() for r in caplog.records if "this run will take" in r.getMessage()]
    if jax.default_backend() == "cpu":
        assert len(notices) == 1 and "(2 more steps of 2." in notices[0], notices
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "perf/first_step_time_s" in r)
    assert first["step"] == 1 and len(ran) == 3
    compile_s = first["perf/compile_time_s"]
    assert compile_s > 0
    # the first step's time is its run: the sleep plus a tiny step, never the compilation
    # (the bounds scale with the compilation, so a loaded machine stretches both alike)
    assert ran[0] <= first["perf/first_step_time_s"] < ran[0] + 0.5 * compile_s, (first, ran)
    steady = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r and r["step"] > 1]
    # the compilation is in none of them; the second step retraces the jit once
    assert len(steady) == 2, steady
    assert all(slow <= t < slow + 0.5 * compile_s for t in steady), (steady, compile_s)


def test_evaluate_prints_recalls_in_order_with_chance(tmp_path, capsys):
    """``jaxfit.evaluate``: the JSON lists R@1, R@5, R@10 in that order (not as sorted
    strings), and stderr's table gives each recall row its chance level."""
    workdir = tmp_path / "run"
    trainer.train(tiny_clip_config(tmp_path / "data", "total_steps=2", "eval_every=2"), workdir)
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(workdir)]) == 0
    captured = capsys.readouterr()
    keys = list(json.loads(captured.out))
    recalls = [k for k in keys if k.startswith("eval/i2t_R@")]
    assert recalls == ["eval/i2t_R@1", "eval/i2t_R@5", "eval/i2t_R@10"]
    assert captured.out.index('"eval/t2i_R@5"') < captured.out.index('"eval/t2i_R@10"')
    line = next(x for x in captured.err.splitlines() if x.startswith("eval/t2i_R@10 "))
    assert line.split()[-1] == "62.5"  # 10 of the 16 validation images
