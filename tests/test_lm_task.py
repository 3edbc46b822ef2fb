"""Language-model training end to end: from scratch, fine-tuning an HF GPT-2, export, sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfit import config as config_lib
from jaxfit import sharding, trainer
from jaxfit.export import main as export_main
from jaxfit.generate import main as generate_main
from jaxfit.inference import load_model_and_tokenizer
from jaxfit.sampling import generate
from jaxfit.tasks import build_task

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
SCRATCH = str(REPO / "configs" / "gpt2_scratch.py")
FINETUNE = str(REPO / "configs" / "gpt2_finetune.py")


def _shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


def _initial_eval(config, workdir):
    task = build_task(config, workdir, sharding.make_mesh())
    params = task.initial_params(jax.random.key(config.seed), None)
    return task.evaluate(params)


def test_demo_lowers_perplexity_and_samples_its_grammar(tmp_path, capsys):
    config = config_lib.load_config(f"{SCRATCH}:demo,steps=120", ["eval_every=120"])
    workdir = tmp_path / "run"
    start = _initial_eval(config, workdir)
    results = trainer.train(config, workdir)
    assert start["perplexity"] > 100  # ~ vocabulary size for random weights
    assert results["eval/perplexity"] < 0.05 * start["perplexity"]
    assert "perf/tokens_per_sec" in results and 0 < results["perf/mfu"] < 1
    # greedy samples follow the story grammar the model was trained on
    code = generate_main(
        [
            "--model",
            str(workdir),
            "--prompt",
            "Ada went to",
            "--temperature",
            "0",
            "--max_new_tokens",
            "24",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert re.search(r"Ada went to the (forest|river|hill|garden|market|lake) and", text), text
    # an int8 KV cache and a prompt prefilled in 4-token chunks: the same greedy text
    args = ["--model", str(workdir), "--prompt", "Ada went to", "--temperature", "0"]
    args += ["--max_new_tokens", "24", "--kv_cache", "int8", "--prefill_chunk", "4"]
    assert generate_main(args) == 0
    assert capsys.readouterr().out == text
    # a stop string ends the sample before it, streamed (one sample) or not (two samples)
    place = re.search(r"Ada went to the (\w+)", text).group(1)
    stop = ["--max_new_tokens", "24", "--temperature", "0", "--stop", " and"]
    assert generate_main(args[:4] + stop) == 0
    assert capsys.readouterr().out == f"Ada went to the {place}\n"
    assert generate_main(args[:4] + stop + ["--num_samples", "2"]) == 0
    assert capsys.readouterr().out == f"Ada went to the {place}\n" * 2


@pytest.mark.slow
@pytest.mark.shared_data
def test_tinyshakespeare_from_scratch(tmp_path):
    path = _shared("tinyshakespeare", "input.txt")
    config = config_lib.load_config(
        f"{SCRATCH}:demo,steps=250",
        [
            "data.synthetic.enabled=False",
            f"data.path={path}",
            "data.split_by_blank_lines=False",
            "data.val_fraction=0.1",
            "data.tokenizer.vocab_size=1024",
            "model.config.n_layer=2",
            "model.config.n_embd=96",
            "eval_every=250",
            "eval.max_batches=10",
        ],
    )
    # one document: val_fraction needs several, so split the play into blank-line blocks
    with config.unlocked():
        config.data.split_by_blank_lines = True
    workdir = tmp_path / "run"
    start = _initial_eval(config, workdir)
    results = trainer.train(config, workdir)
    assert results["eval/perplexity"] < 0.25 * start["perplexity"], (start, results)
    model, params, encode, decode, eos, _ = load_model_and_tokenizer(str(workdir))
    prompt = np.repeat(np.asarray(encode("ROMEO:\n"))[None], 8, axis=0)
    out = generate(
        model,
        params,
        prompt,
        max_new_tokens=40,
        temperature=0.8,
        top_k=40,
        eos_token_id=eos,
        rng=jax.random.key(0),
    )
    words = []
    for row in out.tolist():
        row = row[: row.index(eos)] if eos in row else row
        words += re.findall(r"[A-Za-z']+", decode(row))
    corpus_words = set(re.findall(r"[A-Za-z']+", path.read_text()))
    assert len(words) > 10
    assert np.mean([w in corpus_words for w in words]) > 0.6, words


@pytest.mark.shared_data
def test_finetune_local_gpt2_then_export_loads_in_transformers(tmp_path, capsys):
    tok_dir = _shared("tokenizers", "gpt2")
    torch = pytest.importorskip("torch")
    import transformers

    hf_dir = tmp_path / "gpt2-random"
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir)
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    tok.save_pretrained(hf_dir)
    text = tmp_path / "train.txt"
    text.write_text(
        "\n\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200))
    )
    config = config_lib.load_config(
        f"{FINETUNE}:init_from={hf_dir},steps=6",
        [
            f"data.path={text}",
            "data.split_by_blank_lines=True",
            "seq_len=32",
            "batch_size=4",
            "micro_batch_size=2",
            "eval_every=6",
            "ckpt_every=3",
            "log_every=3",
            "precision=fp32",
            "eval.max_batches=4",
        ],
    )
    workdir = tmp_path / "run"
    results = trainer.train(config, workdir)
    assert np.isfinite(results["eval/loss"])
    assert json.loads((workdir / "config.json").read_text())["init_from"] == str(hf_dir)
    out = tmp_path / "export"
    assert export_main(["--workdir", str(workdir), "--out", str(out)]) == 0
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (out / "tokenizer.json").is_file()
    _, task, params, _ = trainer.restore_params(workdir)
    ids = np.asarray([tok("the quick brown fox")["input_ids"]])
    ours = np.asarray(task.model.apply({"params": params}, ids))
    with torch.no_grad():
        theirs = reloaded(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # the CLI samples the exported HF directory exactly as transformers' greedy generate
    capsys.readouterr()
    args = ["--model", str(out), "--prompt", "the quick", "--temperature", "0"]
    assert generate_main([*args, "--max_new_tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    prompt = torch.as_tensor([tok("the quick")["input_ids"]])
    with torch.no_grad():
        ref = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert printed == tok.decode(ref[0])
    # the fine-tuned weights differ from the starting ones
    start = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        before = start(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(before - theirs).max() > 1e-3


@pytest.mark.shared_data
def test_lora_finetune_checkpoints_adapters_and_exports_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from jaxfit.tasks.base import ParamSource

    tok_dir = _shared("tokenizers", "gpt2")
    hf_dir = tmp_path / "gpt2-random"
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir)
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    tok.save_pretrained(hf_dir)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"Item {i}: a small green frog sat on a log." for i in range(200)))
    config = config_lib.load_config(
        f"{FINETUNE}:init_from={hf_dir},steps=8",
        [
            f"data.path={text}",
            "data.split_by_blank_lines=True",
            "seq_len=32",
            "batch_size=4",
            "micro_batch_size=2",
            "eval_every=8",
            "ckpt_every=8",
            "log_every=4",
            "precision=fp32",
            "eval.max_batches=4",
            "optim.lr=1e-2",
            "lora.enabled=True",
            "lora.rank=4",
            "lora.dropout=0.1",
        ],
    )
    with config.unlocked():
        config.lora.targets = ("c_attn", "c_fc")
    workdir = tmp_path / "run"
    trainer.train(config, workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses_ = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses_[-1] < losses_[0]
    _, task, params, _ = trainer.restore_params(workdir)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)  # adapters only
    assert len(names) == 2 * 2  # c_attn and c_fc, stacked over the 2 layers
    # PEFT export: PeftModel on the transformers base computes what jaxfit computes
    out = tmp_path / "peft"
    assert export_main(["--workdir", str(workdir), "--out", str(out), "--format", "peft"]) == 0
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["peft_type"] == "LORA"
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = np.asarray([tok("a small green frog")["input_ids"]])
    full = ParamSource.full_params(params, task.frozen)
    ours = np.asarray(task.model.apply({"params": full}, ids))
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    plain = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert np.abs(plain(torch.as_tensor(ids)).logits.numpy() - theirs).max() > 1e-3
    # hf export merges the adapters: transformers alone gives the same logits
    merged = tmp_path / "merged"
    assert export_main(["--workdir", str(workdir), "--out", str(merged)]) == 0
    with torch.no_grad():
        m = transformers.GPT2LMHeadModel.from_pretrained(merged).eval()
        np.testing.assert_allclose(m(torch.as_tensor(ids)).logits.numpy(), theirs, atol=1e-4)
