"""A bitsandbytes 4-bit checkpoint through the command lines a user runs.

``python -m jaxfit.train`` with ``configs/llama_qlora.py:demo`` and ``init_from`` = a tiny
NF4 checkpoint saved by transformers + bitsandbytes: bf16 LoRA over the base dequantised
exactly, and QLoRA (``precision=nf4``) over the base kept as stored, each exported with
``python -m jaxfit.export``; ``python -m jaxfit.generate --model BNB_DIR`` samples the
greedy tokens of the bitsandbytes model.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bnb_testing import require, save_quantized
from hf_testing import tiny_llama
from xla_env import fast_subprocess_env

torch, transformers, F = require()
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]
EOS = "<|endoftext|>"


def _tokenizer(texts):
    """A byte-level BPE of ~300 entries (EOS id 0) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory):
    """A tiny Llama (vocab 320, 128 positions) quantised to NF4 by transformers and saved
    with its tokenizer; ``(directory, bitsandbytes model, tokenizer)``."""
    root = tmp_path_factory.mktemp("bnb_cli")
    tok = _tokenizer([f"the owl counts {i} stars over the quiet hill" for i in range(200)])
    tiny_llama(
        root / "float",
        vocab_size=320,
        max_positions=128,
        eos_token_id=0,
        bos_token_id=0,
        initializer_range=0.1,  # spread logits: greedy ties are far apart
    )
    qmodel = save_quantized(root / "float", root / "q4")
    if qmodel is None:
        pytest.skip("transformers cannot quantise to 4 bits on this CPU")
    tok.save_pretrained(root / "q4")
    return root / "q4", qmodel, tok


def _run(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=fast_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, log_line",
    [("bf16", "dequantised exactly to bfloat16"), ("nf4", "weights kept as stored")],
)
def test_lora_trains_over_a_bnb_checkpoint(bnb_dir, tmp_path, precision, log_line):
    directory, _, _ = bnb_dir
    workdir = tmp_path / "run"
    done = _run(
        "jaxfit.train",
        "--config", f"{REPO / 'configs' / 'llama_qlora.py'}:demo,init_from={directory},steps=4",
        "--workdir", str(workdir),
        f"--config.precision={precision}",
        "--config.log_every=1",
        "--config.eval.max_batches=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # how the checkpoint was loaded: in train.log (the console shows library INFO lines
    # only with --verbose)
    assert log_line in (workdir / "train.log").read_text()
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 4 and np.all(np.isfinite(losses)), losses
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["init_from"] == str(directory) and saved["lora"]["enabled"]
    # the run exports as a float HF directory (adapters merged) that transformers loads
    out = tmp_path / "hf"
    done = _run("jaxfit.export", "--workdir", str(workdir), "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = exported(torch.tensor([[1, 2, 3]])).logits.float().numpy()
    assert np.all(np.isfinite(logits))


def test_generate_cli_samples_the_bitsandbytes_models_greedy_tokens(bnb_dir):
    directory, qmodel, tok = bnb_dir
    prompt = "the owl counts"
    done = _run(
        "jaxfit.generate",
        "--model", str(directory),
        "--prompt", prompt,
        "--temperature", "0",
        "--max_new_tokens", "8",
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        ref = qmodel.generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=0, pad_token_id=0
        )
    new = ref[0, ids.shape[1] :].tolist()
    new = new[: new.index(0)] if 0 in new else new
    assert new, "the reference stopped at once"
    assert done.stdout.strip() == prompt + tok.decode(new)
