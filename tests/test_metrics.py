import json

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from jaxfit.metrics import MetricWriter, check_finite


def _events(workdir):
    acc = EventAccumulator(str(workdir))
    acc.Reload()
    return acc


def test_scalars_reach_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, total_steps=10, console=False) as w:
        for s in (1, 2, 3):
            w.write_scalars(
                s, {"train/loss": jnp.float32(1.0 / s), "train/lr": 1e-4 * s, "perf/n": np.int32(s)}
            )
            w.update_progress(s)
        w.write_scalars(5, {"eval/val/recall@1": 0.25})

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 5]
    assert lines[1]["train/loss"] == pytest.approx(0.5) and lines[2]["perf/n"] == 3.0
    assert lines[3]["eval/val/recall@1"] == 0.25 and "time" in lines[3]

    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "perf/n", "eval/val/recall@1"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/lr")], [1e-4, 2e-4, 3e-4])


def test_text_and_hparams(tmp_path):
    hp = {"optim": {"lr": 1e-4, "no_decay": ["bias"]}, "total_steps": 10}
    with MetricWriter(tmp_path, total_steps=10, console=True) as w:
        w.write_hparams(hp)
        w.write_text(4, "samples/caption", "a photo of a **cat**")
        w.update_progress(4)
    assert json.loads((tmp_path / "hparams.json").read_text()) == hp
    acc = _events(tmp_path)
    assert set(acc.Tags()["tensors"]) == {"hparams", "samples/caption"}
    (event,) = acc.Tensors("samples/caption")
    assert event.step == 4
    assert tensor_util.make_ndarray(event.tensor_proto).item() == b"a photo of a **cat**"
    hp_text = tensor_util.make_ndarray(acc.Tensors("hparams")[0].tensor_proto).item().decode()
    assert '"lr": 0.0001' in hp_text


def test_jsonl_appends_on_resume(tmp_path):
    with MetricWriter(tmp_path, total_steps=4, console=False) as w:
        w.write_scalars(1, {"train/loss": 1.0})
    with MetricWriter(tmp_path, total_steps=4, console=False, initial_step=2) as w:
        w.write_scalars(3, {"train/loss": 0.5})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3]


def test_check_finite():
    check_finite({"loss": jnp.float32(1.0), "n": 3, "v": np.ones(2)}, step=7)
    with pytest.raises(FloatingPointError, match=r"train/loss=nan at step 12"):
        check_finite({"train/lr": 1e-3, "train/loss": jnp.float32(np.nan)}, step=12)
    with pytest.raises(FloatingPointError, match="grad_norm=inf"):
        check_finite({"grad_norm": np.inf}, step=0)
