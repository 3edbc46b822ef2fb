"""Config field comments read from the source (``--help``): config files, shared defaults."""

from pathlib import Path

import pytest

from jaxfit import config as config_lib
from jaxfit import config_docs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_documents_its_rhythm_and_optimiser(path):
    comments = config_docs.field_comments(path)
    config = config_lib.load_config(str(path))
    fields = config_docs.flatten(config)
    assert set(comments) - set(fields) <= {k for k in comments if k.split(".")[0] in config}
    for name in ("total_steps", "eval_every", "optim.lr", "optim.warmup_steps"):
        assert comments.get(name), name
    text = config_docs.describe(config, path)
    assert "total_steps = " in text and all(len(line) < 140 for line in text.splitlines())


def test_comments_follow_helpers_and_prefer_the_config_file():
    comments = config_docs.field_comments(REPO / "configs" / "gpt2_scratch.py")
    assert comments["optim.lr"].startswith("nanoGPT")  # the config's own comment
    assert comments["optim.grad_clip_norm"].startswith("Clip gradients")  # jaxfit/optim.py
    assert "steps between checkpoints" in comments["ckpt_every"]  # config.run_rhythm
    assert "device" in comments and "lora.targets" in comments


def test_sibling_config_files_are_followed():
    comments = config_docs.field_comments(REPO / "configs" / "llama_qlora.py")
    assert "QLoRA" in comments["optim.grad_clip_norm"]  # its own
    assert comments.get("data.path")  # from llama_finetune.py's default_text_config()


def test_one_line():
    assert config_docs.one_line("Peak lr. Reached at warmup.") == "Peak lr. Reached at warmup"
    text = "GPT-2 small (Radford et al. 2019, Table 2). Second sentence."
    assert config_docs.one_line(text) == "GPT-2 small (Radford et al. 2019, Table 2)"
    assert config_docs.one_line("word " * 40, width=30).endswith("...")
