"""The CLIP task: exact GradCache accumulation with the real model, data sharded over 4
devices equals 1 device, corrupt images skipped and counted during training, real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_trainer import CLIP_CONFIG, REPO, tiny_clip_config

from jaxfit import config as config_lib
from jaxfit import sharding, trainer
from jaxfit.data import fingerprint
from jaxfit.evals.retrieval import chance_recall
from jaxfit.tasks import build_task

SHARED = REPO / ".." / "shared" / "data"


def _shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


def test_gradcache_equals_one_large_batch(tmp_path):
    config = tiny_clip_config(tmp_path / "data", "micro_batch_size=4")  # 16 = 4 x 4
    task = build_task(config, tmp_path / "run", sharding.make_mesh())
    params = task.initial_params(jax.random.key(0), None)
    batch = next(task.train_iterator())
    assert task.num_micro_batches == 4
    (loss_k, m_k), grads_k = jax.jit(task.loss_and_grad)(params, batch, jax.random.key(1))
    task.num_micro_batches = 1
    (loss_1, m_1), grads_1 = jax.jit(task.loss_and_grad)(params, batch, jax.random.key(1))
    np.testing.assert_allclose(loss_k, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert float(m_k["accuracy_i2t"]) == float(m_1["accuracy_i2t"])
    # naive accumulation (in-micro-batch negatives only) is a different, smaller-batch loss
    micro = jax.tree.map(lambda x: x[:4], batch)
    (loss_micro, _), _ = jax.jit(task.loss_and_grad)(params, micro, jax.random.key(1))
    assert abs(float(loss_micro) - float(loss_1)) > 0.1


_SHARDED_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from test_trainer import tiny_clip_config
from jaxfit import trainer
from pathlib import Path
assert jax.device_count() == {n}, jax.devices()
cfg = tiny_clip_config(Path({data!r}), "total_steps=3", "log_every=1", "eval_every=3")
trainer.train(cfg, {workdir!r})
"""


def _start(n, tmp_path):
    workdir = tmp_path / f"run{n}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    code = _SHARDED_RUN.format(
        tests=str(REPO / "tests"), n=n, data=str(tmp_path / "data"), workdir=str(workdir)
    )
    return workdir, subprocess.Popen([sys.executable, "-c", code], env=env)


def _metrics(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss = [x["train/loss"] for x in lines if "train/loss" in x]
    return loss, [x["eval/t2i_R@5"] for x in lines if "eval/t2i_R@5" in x]


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path):
    """The same run with the batch sharded over 4 (fake CPU) devices and on 1 device."""
    build_task(tiny_clip_config(tmp_path / "data"), tmp_path / "probe", sharding.make_mesh())
    runs = [_start(n, tmp_path) for n in (4, 1)]  # data written above; run side by side
    for _, proc in runs:
        assert proc.wait(timeout=900) == 0
    (loss4, eval4), (loss1, eval1) = (_metrics(w) for w, _ in runs)
    assert len(loss4) == 3
    np.testing.assert_allclose(loss4, loss1, rtol=1e-4)
    np.testing.assert_allclose(eval4, eval1, atol=1e-6)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    config = tiny_clip_config(data, "total_steps=2", "eval_every=2")
    build_task(config, tmp_path / "probe", sharding.make_mesh())  # writes the synthetic set
    images = sorted((data / "train2017").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    results = trainer.train(config, tmp_path / "run")
    assert results["data/skipped_undecodable_image"] == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"data/skipped_undecodable_image": 1' in x for x in lines)


@pytest.mark.shared_data
def test_coco_mini_real_images(tmp_path):
    """Real COCO: val2017/ holds images the val JSON does not list; they are ignored."""
    root = _shared("coco_mini")
    config = tiny_clip_config(root, "data.synthetic.enabled=False", "total_steps=2", "eval_every=2")
    results = trainer.train(config, tmp_path / "run")
    assert results["eval/num_images"] == 79  # the val JSON lists 79 of the 159 files
    assert np.isfinite(results["train/loss"])


@pytest.mark.slow
@pytest.mark.shared_data
def test_flickr8k_learns_above_chance(tmp_path):
    """A demo-sized CLIP trained on 1,000 real Flickr8k photos retrieves held-out captions
    far above chance."""
    root = _shared("flickr8k_1k_small")
    config = config_lib.load_config(
        f"{CLIP_CONFIG}:demo,steps=300",
        [
            "data.synthetic.enabled=False",
            "data.format=csv",
            f"data.root={root}",
            "data.captions_file=captions.txt",
            "data.image_dir=images",
            "data.holdout_fraction=0.1",
            "data.vocab_size=2048",
            "data.context_length=32",
            "eval_every=300",
        ],
    )
    results = trainer.train(config, tmp_path / "run")
    n = int(results["eval/num_images"])
    assert 60 < n < 140
    chance = chance_recall(n, 5, 10)
    assert results["eval/t2i_R@10"] > 2 * chance["t2i"], results
    assert results["eval/i2t_R@10"] > 1.5 * chance["i2t"], results


def test_sigterm_checkpoints_and_stops(tmp_path):
    import signal

    config = tiny_clip_config(tmp_path / "data", "ckpt_every=100")

    def send_sigterm(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(trainer.StoppedBySignal) as stopped:
        trainer.train(config, tmp_path / "run", on_step=send_sigterm)
    assert (stopped.value.step, stopped.value.exit_code) == (2, 143)
    ckpt_steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpt_steps == [2]  # saved at the signal, not at ckpt_every, and stopped there
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


@pytest.mark.shared_data
def test_finetune_from_hf_clip_and_export(tmp_path):
    """init_from: an HF CLIP directory (random weights, the real CLIP tokenizer) trains and
    exports a directory transformers loads with the fine-tuned weights."""
    torch = pytest.importorskip("torch")
    import transformers

    from jaxfit.data.image_text import clip_tokenizer_from_bpe

    hf_dir = tmp_path / "clip-random"
    clip_tokenizer_from_bpe(_shared("tokenizers", "clip", "bpe_simple_vocab_16e6.txt.gz"), hf_dir)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **text),
        vision_config=dict(image_size=32, patch_size=8, **text),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(hf_dir)
    config = tiny_clip_config(tmp_path / "data", "total_steps=2", "eval_every=2")
    with config.unlocked():
        config.init_from = str(hf_dir)
    results = trainer.train(config, tmp_path / "run")
    assert np.isfinite(results["train/loss"])
    out = tmp_path / "export"
    from jaxfit.export import export

    export(str(tmp_path / "run"), str(out))
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.json").is_file()
    _, task, params, _ = trainer.restore_params(tmp_path / "run")
    ids, mask = task.tokenizer.encode(["a red circle", "two blue squares"])
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = task.model.apply({"params": params}, ids, pixels, mask)
    with torch.no_grad():
        theirs = reloaded(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2)),
        )
    np.testing.assert_allclose(ours["logits_per_image"], theirs.logits_per_image, atol=1e-4)
    start = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    assert not torch.allclose(start.logit_scale, reloaded.logit_scale)


def test_clip_with_lora_trains_adapters_only(tmp_path):
    config = tiny_clip_config(
        tmp_path / "data", "total_steps=4", "eval_every=4", "lora.enabled=True", "lora.rank=4"
    )
    results = trainer.train(config, tmp_path / "run")
    assert results["eval/num_images"] == 16
    _, task, params, _ = trainer.restore_params(tmp_path / "run")
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    # q/k/v/out projections of the single layer of each tower, A and B each
    assert len(names) == 2 * 4 * 2 and all("lora_" in n for n in names)
    out = task.export_peft(params, tmp_path / "peft")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["task_type"] is None


def test_data_fingerprint_sees_a_changed_caption(tmp_path):
    """The annotation file's hash and the records' hash change with one caption's words,
    its length kept; the images themselves are not hashed (documented)."""
    data = tmp_path / "data"
    config = tiny_clip_config(data)
    mesh = sharding.make_mesh()
    before = build_task(config, tmp_path / "run", mesh).data_fingerprint()
    ann = data / "annotations" / "captions_train2017.json"
    coco = json.loads(ann.read_text())
    first = coco["annotations"][0]["caption"]
    coco["annotations"][0]["caption"] = first[::-1]  # same length, other words
    ann.write_text(json.dumps(coco))
    after = build_task(config, tmp_path / "run", mesh).data_fingerprint()
    changed = fingerprint.differences(before, after)
    assert set(changed) == {f"train.files.{ann.resolve()}", "train.records"}
    assert before["train"]["records"]["size"] == 64 and before["val"]["records"]["size"] == 16
    # eval.max_images (a resume may change it) evaluates fewer images of the same data
    fewer = build_task(tiny_clip_config(data, "eval.max_images=4"), tmp_path / "run", mesh)
    assert len(fewer.val_records) == 4 and fewer.data_fingerprint() == after


def test_planning_the_demo_writes_nothing_and_reads_no_data(tmp_path, monkeypatch):
    """Constructors build; data preparation is a step (``jaxfit.tasks.prepare_data``) only
    a run takes. Planning the CLIP demo from an empty directory, on a data root that does
    not exist (and on the synthetic set it would write into its workdir), writes nothing
    there and reads no records, trains no tokenizer and writes no synthetic data."""
    from jaxfit.data import image_text
    from jaxfit.data.image_text import caption_tokenizer, synthetic_coco
    from jaxfit.plan import core as plan_core
    from jaxfit.tasks import clip as clip_task

    def refused(*args, **kwargs):
        raise AssertionError(f"data I/O while planning: {args}")

    for module, name in ((image_text, "load_source"), (clip_task.image_text, "load_source"),
                         (caption_tokenizer, "load_or_train_caption_bpe"),
                         (synthetic_coco, "write_synthetic_coco"),
                         (clip_task.synthetic, "write_synthetic_coco")):  # fmt: skip
        monkeypatch.setattr(module, name, refused)
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    missing = tmp_path / "no_such_root"
    spec = str(REPO / "configs" / "clip_coco.py") + ":demo"
    for overrides in ([f"data.root={missing}", "data.synthetic.enabled=False"], []):
        config = config_lib.load_config(spec, overrides)
        plan = plan_core.plan_config(config)
        assert plan.memory["peak"] > 0 and plan.params["total"] > 0
        workdir = tmp_path / "workdir"
        task = build_task(config, workdir, sharding.make_mesh(), abstract=True)
        assert task.abstract and task.train_records == [] and not workdir.exists()
    assert list(empty.iterdir()) == [] and not missing.exists()
