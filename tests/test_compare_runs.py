"""Bootstrap intervals against closed forms, per-example evaluation files, compare_runs.

The end-to-end part trains two tiny GPT-2 runs and one tiny CLIP run in-process (a few
steps each), checks that the per-example arrays the trainer saves in ``eval/step_N.npz``
reproduce the logged metrics exactly, then compares the two LM runs with
``experiments/compare_runs.py``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import trainer
from jaxfit.data.text import write_synthetic_text

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``experiments`` is not installed (plain ``pytest``)
    sys.path.insert(0, str(REPO))

from experiments import bootstrap, compare_runs, results  # noqa: E402

TINY_LM = [
    "data.synthetic.num_documents=300",
    "model.config.n_layer=1",
    "model.config.n_embd=32",
    "model.config.n_head=2",
    "seq_len=32",
    "batch_size=8",
    "micro_batch_size=8",
    "eval.batch_size=16",
    "eval.max_batches=3",
    "total_steps=3",
    "log_every=1",
    "eval_every=3",
    "ckpt_every=3",
    "optim.warmup_steps=1",
]

TINY_CLIP = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=16",
    "data.synthetic.image_size=32",
    "model.text.num_hidden_layers=1",
    "model.vision.num_hidden_layers=1",
    "model.vision.image_size=16",
    "batch_size=16",
    "micro_batch_size=8",
    "eval.batch_size=16",
    "total_steps=2",
    "log_every=1",
    "eval_every=2",
    "ckpt_every=2",
    "data.num_threads=2",
    "optim.warmup_steps=1",
]


def _mean_stat(x):
    return bootstrap.Statistic(x, np.ones_like(x), np.zeros(0, np.uint64))


def test_bootstrap_mean_matches_normal_theory():
    x = np.random.default_rng(1).standard_normal(2000)
    boot = bootstrap.resample([_mean_stat(x)], resamples=10_000, seed=0)[0]
    lo, hi = bootstrap.percentile_ci(boot)
    half = 1.96 * x.std() / np.sqrt(len(x))  # ~ 1.96 / sqrt(n) for N(0, 1)
    assert abs(half - 1.96 / np.sqrt(len(x))) < 0.05 * half
    assert lo == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.08 * half)
    # deterministic for a seed
    again = bootstrap.resample([_mean_stat(x)], resamples=10_000, seed=0)[0]
    np.testing.assert_array_equal(boot, again)


def test_ratio_statistics_and_paired_differences():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, 300).astype(np.float64)
    loss = tokens * rng.uniform(1.5, 2.5, 300)
    keys = np.arange(300, dtype=np.uint64)
    examples = {"loss_sum": loss, "tokens": tokens, "key": keys}
    stats = bootstrap.statistics(examples)
    assert stats["loss"].value() == pytest.approx(loss.sum() / tokens.sum())
    assert stats["perplexity"].value() == pytest.approx(np.exp(loss.sum() / tokens.sum()))

    # identical runs: the paired difference is exactly 0, interval [0, 0]
    same = bootstrap.compare({"a": stats, "b": stats}, "a", ["loss", "perplexity"])
    for c in same:
        if c.run == "b":
            assert c.paired and c.diff == 0.0 and c.diff_ci == (0.0, 0.0)
            assert not c.significant
        else:
            assert c.diff_ci is None and c.ci[0] < c.value < c.ci[1]

    # a small consistent improvement: invisible to unpaired intervals, clear when paired
    better = bootstrap.statistics({**examples, "loss_sum": loss - 0.01 * tokens})
    paired = bootstrap.compare({"a": stats, "b": better}, "a", ["loss"])[1]
    assert paired.paired and paired.significant and paired.diff == pytest.approx(-0.01)
    assert paired.diff_ci[0] < -0.0099 and paired.diff_ci[1] > -0.0101
    other = {**examples, "loss_sum": loss - 0.01 * tokens, "key": keys + 1}
    unpaired = bootstrap.compare({"a": stats, "b": bootstrap.statistics(other)}, "a", ["loss"])
    assert unpaired[1].paired is False and not unpaired[1].significant


def test_recall_statistics():
    ranks = np.array([0, 3, 10, 1, 5], np.int32)  # 10 = not in the top max(ks)
    ex = {"t2i_rank": ranks, "i2t_rank": ranks[:3], "ks": np.array([1, 5, 10])}
    stats = bootstrap.statistics(ex)
    assert stats["t2i_R@1"].value() == pytest.approx(20.0)
    assert stats["t2i_R@5"].value() == pytest.approx(60.0)
    assert stats["i2t_R@10"].value() == pytest.approx(200 / 3)


def test_step_timing_excludes_compilation():
    records = [{"step": 1, "perf/step_time_s": 9.0}] + [
        {"step": s, "perf/step_time_s": 1.0 + 0.01 * s} for s in range(2, 12)
    ]
    t = results.step_timing(records)
    assert t["step_time_s"] == pytest.approx(1.065) and t["compile_s"] == 9.0
    # logged every 5 steps: the first interval = compile + 4 steady steps
    t = results.step_timing([{"step": 5, "perf/step_time_s": 3.0}] + [
        {"step": s, "perf/step_time_s": 1.0} for s in (10, 15)
    ])  # fmt: skip
    assert t["step_time_s"] == 1.0 and t["compile_s"] == pytest.approx(15.0 - 4.0)


def _logged_eval(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "eval/loss" in r or "eval/t2i_R@1" in r)


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_runs")
    data = root / "corpus.txt"  # shared: a run writes the synthetic corpus only in its workdir
    write_synthetic_text(data, num_documents=300, seed=0)
    runs = []
    for name, lr in (("control", "3e-3"), ("higher_lr", "1e-2")):
        overrides = TINY_LM + [f"optim.lr={lr}", f"data.path={data}"]
        config = config_lib.load_config(f"{REPO}/configs/gpt2_scratch.py:demo", overrides)
        trainer.train(config, root / name)
        runs.append(root / name)
    return runs


def test_lm_eval_examples_reproduce_logged_metrics(lm_runs):
    for workdir in lm_runs:
        step, ex = results.latest_examples(workdir)
        assert step == 3 and set(ex) == {"loss_sum", "tokens", "key"}
        logged = _logged_eval(workdir)
        assert len(ex["key"]) == len(ex["tokens"]) > 10 and np.all(ex["tokens"] > 0)
        assert ex["tokens"].sum() == logged["eval/tokens"]
        assert ex["loss_sum"].sum() / ex["tokens"].sum() == pytest.approx(logged["eval/loss"])
    # the same validation data: the same example keys (so comparisons pair)
    a, b = (results.latest_examples(w)[1] for w in lm_runs)
    np.testing.assert_array_equal(a["key"], b["key"])


def test_compare_runs_cli(lm_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [str(w) for w in lm_runs] + ["--out", str(out), "--resamples", "2000"]
    assert compare_runs.main(args) == 0
    text = capsys.readouterr().out
    assert "control (reference)" in text and "| loss | higher_lr |" in text
    for name in ("results.md", "results.csv", "bootstrap.csv", "loss.png", "throughput.png"):
        assert (out / name).is_file(), name
    assert not (out / "memory.png").exists()  # plain runs: no memory measured
    assert (out / "tb" / "control").is_dir() and (out / "tb" / "higher_lr").is_dir()
    rows = list(csv.DictReader(open(out / "bootstrap.csv")))
    diff = next(r for r in rows if r["metric"] == "loss" and r["run"] == "higher_lr")
    assert diff["paired"] == "True"
    lo, hi = float(diff["diff_lo"]), float(diff["diff_hi"])
    assert lo <= float(diff["diff"]) <= hi
    assert diff["significant"] == str(not lo <= 0.0 <= hi)
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [r["name"] for r in table] == ["control", "higher_lr"]
    for r in table:
        for key in ("step_time_s", "compile_s", "tokens_per_s", "final_train_loss", "eval/loss"):
            assert np.isfinite(float(r[key])), key
    # errors: an unknown metric, a directory that is not a run
    assert compare_runs.main([str(w) for w in lm_runs] + ["--metric", "t2i_R@1"]) == 2
    assert compare_runs.main([str(lm_runs[0]), str(tmp_path)]) == 2


def test_clip_eval_examples_reproduce_recall(tmp_path):
    workdir = tmp_path / "clip"
    config = config_lib.load_config(f"{REPO}/configs/clip_coco.py:demo", TINY_CLIP)
    trainer.train(config, workdir)
    step, ex = results.latest_examples(workdir)
    logged = _logged_eval(workdir)
    assert step == 2 and len(ex["i2t_rank"]) == logged["eval/num_images"]
    assert len(ex["t2i_rank"]) == len(ex["t2i_key"]) == logged["eval/num_captions"]
    for name, stat in bootstrap.statistics(ex).items():
        assert stat.value() == pytest.approx(logged[f"eval/{name}"]), name
    # re-evaluating the checkpoint (python -m jaxfit.evaluate) rewrites the same file
    (workdir / "eval" / "step_2.npz").unlink()
    trainer.evaluate(workdir)
    again = results.latest_examples(workdir)[1]
    np.testing.assert_array_equal(again["t2i_rank"], ex["t2i_rank"])


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_lm_per_row_sums_add_up_to_the_batch_sums(chunk_size, jit_fast):
    """``objectives.lm_sum_loss(per_row=True)`` (evaluation) vs the batch sums training
    uses."""
    import jax

    from jaxfit import objectives
    from jaxfit.models import gpt2

    model = gpt2.GPT2LMHeadModel(
        gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    )
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 64, (3, 16), dtype=np.int32),
        "labels": rng.integers(0, 64, (3, 16), dtype=np.int32),
        "loss_mask": (rng.random((3, 16)) > 0.3).astype(np.float32),
        "segment_ids": np.ones((3, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (3, 1)),
    }
    batch["loss_mask"][2] = 0.0  # a padding row: no tokens, zero loss

    def sums(per_row):
        return jit_fast(
            lambda p: objectives.lm_sum_loss(
                model, p, batch, chunk_size=chunk_size, per_row=per_row
            )
        )

    total, count, _ = sums(False)(params)
    rows, counts, _ = sums(True)(params)
    assert rows.shape == counts.shape == (3,)
    np.testing.assert_array_equal(counts, batch["loss_mask"].sum(1))
    assert rows[2] == 0.0 and counts.sum() == count
    np.testing.assert_allclose(rows.sum(), total, rtol=1e-5)
