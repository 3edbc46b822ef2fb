"""``--help`` / ``-h`` on every CLI: exit 0, the flags, examples and a config's fields."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxfit import evaluate, export, generate, quantize
from jaxfit import train as train_cli
from jaxfit.plan import __main__ as plan_cli

REPO = Path(__file__).resolve().parents[2]
GPT2 = str(REPO / "configs" / "gpt2_scratch.py")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_flags_and_configs(flag, capsys):
    assert train_cli.main(["jaxfit.train", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m jaxfit.train")
    for text in ("--workdir", "--config", "--verbose", "examples:", "configs/clip_coco.py"):
        assert text in out


def test_train_help_with_config_shows_its_fields_defaults_and_comments(capsys):
    assert train_cli.main(["jaxfit.train", f"--config={GPT2}:demo", "--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    # the demo's value, and the comment above the field in jaxfit/optim.py
    assert "optim.warmup_steps = 20" in lines["optim.warmup_steps"]
    assert "Linear warmup" in lines["optim.warmup_steps"]
    # a comment from the config file itself, and one from config.run_rhythm
    assert "nanoGPT" in lines["optim.lr"]
    assert "optimizer steps" in lines["total_steps"]
    assert "seq_len = 64" in lines["seq_len"]


def test_help_with_a_broken_config_still_helps(capsys):
    assert train_cli.main(["jaxfit.train", f"--config={GPT2}:dmeo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "the config did not load" in out and "dmeo" in out


def test_plan_help(capsys):
    assert plan_cli.main(["jaxfit.plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--search_seq_len" in out and "--budget" in out and "--device" in out


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        (evaluate, ["--workdir", "--step"]),
        (generate, ["--model", "--prompt", "--temperature", "--quant", "--adapter"]),
        (export, ["--workdir", "--out", "--format"]),
        (quantize, ["--model", "--method", "--json"]),
    ],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_argparse_cli_help(module, flags, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main([flag])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--verbose" in out
    for name in flags:
        assert name in out
    # the docstring's layout is kept (not re-flowed into one paragraph)
    assert "\n  python -m jaxfit." in out


@pytest.mark.parametrize("module", ["train", "plan", "evaluate", "generate", "export", "quantize"])
def test_help_as_a_user_runs_it(module):
    """The real entry point (``python -m``), as the README shows it."""
    proc = subprocess.run(
        [sys.executable, "-m", f"jaxfit.{module}", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # nothing, not even a log line, before the help
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    assert "Traceback" not in proc.stdout and "INFO jaxfit" not in proc.stdout


def test_plan_help_keeps_the_examples_line_continuations():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxfit.plan", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--budget 12GiB --search \\\n      --apply runs/llama3_8b" in proc.stdout


def test_no_docstring_swallows_a_line_continuation():
    """A lone ``\\`` at the end of a docstring line joins the lines (Python's string
    continuation): an example shown by --help would lose its ``\\``; write ``\\\\``."""
    import ast
    import re

    for path in sorted([*(REPO / "jaxfit").rglob("*.py"), *(REPO / "configs").glob("*.py")]):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if not isinstance(body, list) or not body:
                continue
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                segment = ast.get_source_segment(source, first.value) or ""
                bad = re.search(r"(?<!\\)(?:\\\\)*\\\n", segment)
                if bad and not segment.startswith(("r", "R")):
                    raise AssertionError(f"{path.relative_to(REPO)}: a docstring line ends in \\")
