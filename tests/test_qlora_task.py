"""QLoRA end to end: NF4 / int8 frozen bases with LoRA adapters in the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_testing import tiny_llama

from jaxfit import config as config_lib
from jaxfit import quant, trainer

REPO = Path(__file__).resolve().parents[1]
QLORA = str(REPO / "configs" / "llama_qlora.py")
SHARED = REPO / ".." / "shared" / "data"


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


def test_qlora_demo_lowers_the_loss_with_an_nf4_base(tmp_path):
    config = config_lib.load_config(f"{QLORA}:demo,steps=40", ["log_every=5"])
    workdir = tmp_path / "run"
    results = trainer.train(config, workdir)
    losses = _losses(workdir)
    assert losses[-1] < losses[0] - 0.3, losses
    assert np.isfinite(results["eval/perplexity"])
    _, task, params, _ = trainer.restore_params(workdir)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)  # adapters only
    frozen_leaves = jax.tree.leaves(task.frozen, is_leaf=quant.is_quantized)
    nf4 = [x for x in frozen_leaves if isinstance(x, quant.NF4Weight)]
    assert len(nf4) == 7  # q, k, v, o, gate, up, down of the (scanned) layer stack


@pytest.mark.shared_data
@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_qlora_from_a_local_hf_llama(tmp_path, precision, capsys):
    transformers = pytest.importorskip("transformers")

    tok_dir = SHARED / "tokenizers" / "gpt2"
    if not tok_dir.exists():
        pytest.skip("shared tokenizer files not found")
    hf_dir = tmp_path / "llama-random"
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    tiny_llama(hf_dir, vocab_size=50257, max_positions=128, bos_token_id=50256,
               eos_token_id=50256, tokenizer=tokenizer)  # fmt: skip
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"Note {i}: the owl counts stars." for i in range(200)))
    config = config_lib.load_config(
        f"{QLORA}:init_from={hf_dir},steps=6",
        [
            f"data.path={text}",
            "data.split_by_blank_lines=True",
            "seq_len=32",
            "batch_size=4",
            "micro_batch_size=2",
            "log_every=1",
            "eval_every=6",
            "ckpt_every=6",
            "eval.max_batches=2",
            f"precision={precision}",
            "optim.lr=1e-2",
            "optim.warmup_steps=1",
        ],
    )
    workdir = tmp_path / "run"
    trainer.train(config, workdir)
    losses = _losses(workdir)
    assert losses[-1] < losses[0], losses
    out = tmp_path / "adapter"
    from jaxfit.export import export

    export(str(workdir), str(out), fmt="peft")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(hf_dir)
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # generation: the HF base quantised on load + the PEFT adapter = the trained run
    from jaxfit.generate import main as generate_main

    args = ["--prompt", "Note 7:", "--temperature", "0", "--max_new_tokens", "6"]
    capsys.readouterr()
    assert generate_main(["--model", str(workdir), *args]) == 0
    from_run = capsys.readouterr().out
    hf_args = ["--model", str(hf_dir), "--quant", precision, "--adapter", str(out)]
    assert generate_main([*hf_args, *args]) == 0
    assert capsys.readouterr().out == from_run
    # further training from the exported adapter (lora.peft_dir) starts where the run ended
    config2 = config_lib.load_config(
        f"{QLORA}:init_from={hf_dir},steps=2",
        [
            f"data.path={text}",
            "data.split_by_blank_lines=True",
            "seq_len=32",
            "batch_size=4",
            "micro_batch_size=2",
            "log_every=1",
            "eval_every=2",
            "ckpt_every=2",
            "eval.max_batches=2",
            f"precision={precision}",
            "optim.lr=1e-2",
            "optim.warmup_steps=1",
            f"lora.peft_dir={out}",
        ],
    )
    trainer.train(config2, tmp_path / "run2")
    assert _losses(tmp_path / "run2")[0] < losses[0] - 0.05  # not a fresh adapter
