"""The console of a run: the first (compiling) step on a line of its own, then a bar whose
rate excludes it; "already finished"; no internals or CPU MFU; one summary table."""

import jax
import pytest

from jaxfit import metrics
from jaxfit.metrics import MetricWriter, console_postfix, summary_table


def test_bar_starts_after_the_first_step(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=5) as w:
        err = capsys.readouterr().err
        assert "compiling" in err and "%|" not in err  # no bar (and no ETA) yet
        w.first_step(2.0, 0.5)
        w.update_progress(1)
        err = capsys.readouterr().err
        assert "compiled the train step in 2.0 s; ran the first step in 0.50 s" in err
        for step in range(2, 6):
            w.write_scalars(step, {"train/loss": 1.0 / step, "train/loss_weight": 2048.0})
            w.update_progress(step)
    err = capsys.readouterr().err
    assert "5/5" in err and "loss=0.2" in err and "loss_weight" not in err
    assert err.count("5/5") == 1  # the final bar is drawn once


def test_no_rate_from_the_compiling_step(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=4, initial_step=2) as w:
        w.write_scalars(3, {"train/loss": 1.0, "perf/images_per_sec": 3.0})  # compiled here
        w.update_progress(3)
        w.write_scalars(4, {"train/loss": 0.5, "perf/images_per_sec": 900.0})
        w.update_progress(4)
    err = capsys.readouterr().err
    assert "img/s=3" not in err and "img/s=900" in err


def test_already_finished(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=300, initial_step=300):
        pass
    err = capsys.readouterr().err
    assert "already finished at step 300" in err and "compiling" not in err


def test_evaluation_gets_its_own_line(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=4) as w:
        w.update_progress(1)
        w.write_scalars(2, {"eval/i2t_R@10": 50.0, "eval/i2t_R@5": 40.0, "eval/i2t_R@1": 10.0})
    err = capsys.readouterr().err
    assert "step 2 eval: i2t_R@1=10, i2t_R@5=40, i2t_R@10=50" in err


def test_console_postfix_leaves_out_internals_and_cpu_mfu(monkeypatch):
    values = {
        "train/loss": 2.5,
        "train/loss_weight": 2048.0,
        "perf/tokens_per_sec": 1234.0,
        "perf/mfu": 2e-4,
        "perf/step_time_s": 0.5,
        "data/skipped_empty": 0.0,
        "data/skipped_decode": 3.0,
    }
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert console_postfix(values) == {
        "loss": "2.5",
        "tok/s": "1234",
        "skipped_decode": "3",
    }
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert console_postfix(values)["mfu"] == "0.0%"


def test_summary_table(monkeypatch):
    monkeypatch.setattr(metrics, "mfu_shown", lambda: False)
    results = {
        "train/loss": 1.25,
        "eval/i2t_R@10": 60.0,
        "eval/i2t_R@5": 50.0,
        "perf/examples_per_sec": 8.0,
        "perf/images_per_sec": 8.0,
        "perf/mfu": 0.3,
        "train/loss_weight": 10.0,
    }
    table = summary_table(results, title="results:").splitlines()
    assert table[0] == "results:"
    assert table[1].split() == ["metric", "value"]
    names = [line.split()[0] for line in table[3:]]
    assert names == ["eval/i2t_R@5", "eval/i2t_R@10", "train/loss", "perf/images_per_sec"]
    assert summary_table({}) == ""


@pytest.mark.parametrize("backend,shown", [("cpu", False), ("gpu", True)])
def test_mfu_only_on_an_accelerator(monkeypatch, backend, shown):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ("perf/mfu" in summary_table({"perf/mfu": 0.4})) == shown


def test_integral_values_print_as_integers(tmp_path, capsys):
    """An evaluation's token count is 15420, not 1.542e+04; fractions keep 4 digits."""
    table = summary_table({"eval/tokens": 15420.0, "eval/loss": 3.25, "train/lr": 0.0})
    assert "15420" in table and "e+04" not in table and "3.25" in table
    with MetricWriter(tmp_path, total_steps=4) as w:
        w.update_progress(1)
        w.write_scalars(2, {"eval/tokens": 15420.0, "eval/perplexity": 123456.7})
    err = capsys.readouterr().err
    assert "step 2 eval: perplexity=1.235e+05, tokens=15420" in err


def test_recall_rows_have_their_chance_level(monkeypatch):
    """t2i: K/N with N the images of the gallery; i2t: a random ranking of the 5N
    captions holding one of the image's 5 in its top K (chance_recall)."""
    from jaxfit.evals.retrieval import chance_recall

    results = {f"eval/{d}_R@{k}": 50.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    results.update({"eval/num_images": 16.0, "eval/num_captions": 80.0, "train/loss": 2.5})
    table = summary_table(results).splitlines()
    assert table[0].split() == ["metric", "value", "chance"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:-1]}
    assert rows["eval/t2i_R@1"] == ["50", "6.25"]  # 1/16
    assert rows["eval/t2i_R@10"] == ["50", "62.5"]  # 10/16
    assert float(rows["eval/i2t_R@5"][1]) == pytest.approx(chance_recall(16, 5, 5)["i2t"], 1e-3)
    assert rows["train/loss"] == ["2.5"]  # no chance for what is not a recall
    assert [n for n in rows if "R@" in n][:3] == ["eval/i2t_R@1", "eval/i2t_R@5", "eval/i2t_R@10"]
    assert "chance" not in summary_table({"eval/t2i_R@1": 5.0})  # gallery size unknown


def test_progress_in_a_log_file_is_plain_lines_printed_once(tmp_path, capsys, monkeypatch):
    """stderr not a terminal (capsys; ``2> log``): no bar redraws (no ``\\r``, no copy of
    a line after each eval line), a plain progress line per interval and at the end."""
    monkeypatch.setattr(MetricWriter, "PLAIN_INTERVAL_S", 0.0)
    with MetricWriter(tmp_path, total_steps=6) as w:
        w.first_step(1.0, 0.5)
        w.update_progress(1)
        for step in range(2, 7):
            w.write_scalars(step, {"train/loss": 1.0 / step})
            if step % 2 == 0:
                w.write_scalars(step, {"eval/loss": 2.0 / step})
            w.update_progress(step)
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ") and "/6" in line]
    assert [line.split()[1] for line in lines] == ["2/6", "3/6", "4/6", "5/6", "6/6"]
    assert len(set(lines)) == len(lines)
    assert lines[-1].startswith("step 6/6 (100%): ") and lines[-1].endswith("loss=0.1667")
    assert "ETA 0:00:00" in lines[-1]
