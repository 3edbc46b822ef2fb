"""Conversations: chat / ShareGPT / Alpaca records, bad rows counted by file and line, the
assistant mask checked token by token against transformers' own {% generation %} mask."""

import json
import logging
from pathlib import Path

import pytest

from jaxfit.data.text import default_text_config, load_documents
from jaxfit.data.text.chat import chat_template, encode_chat
from jaxfit.data.text.records import ChatExample
from jaxfit.data.text.tokenizer import TextTokenizer, load_or_train, load_pretrained
from jaxfit.data.text.tokenizer_files import LLAMA3_CHAT_TEMPLATE

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"

# A ChatML-like template in plain-text markers, and the same with {% generation %} around
# what the assistant says (the form transformers' return_assistant_tokens_mask reads).
CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Meta's Llama 3 Instruct template with {% generation %} tags: the same rendering.
LLAMA3_GENERATION = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CONVERSATION = ChatExample(
    (
        ("system", "You are terse."),
        ("user", "What is two plus two?"),
        ("assistant", "Four."),
        ("user", "And three plus three?"),
        ("assistant", " Six, of course. "),
    )
)


def cfg(**kw):
    c = default_text_config()
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> TextTokenizer:
    c = default_text_config().tokenizer
    c.vocab_size = 400
    corpus = [c for _, c in CONVERSATION.messages] * 20 + ["<|user|> <|assistant|> <|end|>"] * 20
    return load_or_train(c, tmp_path_factory.mktemp("tok"), lambda: corpus)


def hf_mask(tokenizer: TextTokenizer, template: str, example: ChatExample):
    out = tokenizer.hf.apply_chat_template(
        example.dicts(),
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_assistant_mask_equals_transformers_generation_mask(bpe):
    ids, mask = encode_chat(bpe, CHATML, CONVERSATION)
    ref_ids, ref_mask = hf_mask(bpe, CHATML_GENERATION, CONVERSATION)
    assert ids == ref_ids and mask == ref_mask  # token by token
    assert 0 < sum(mask) < len(mask)
    said = bpe.decode([t for t, m in zip(ids, mask) if m])
    assert said == "Four.<|end|>\n Six, of course. <|end|>\n"


def test_records_chat_sharegpt_alpaca_and_bad_rows(tmp_path, caplog):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"},
        {"text": "no messages"},
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        docs, stats = load_documents(cfg(path=str(p), format="chat"), "train")
    assert [d.messages for d in docs] == [
        (("user", "hi"), ("assistant", "yo")),
        (("user", "q"), ("assistant", "a")),
    ]
    assert docs[1].source == f"line 2 of {p}"
    assert stats.dropped() == {
        "empty": 0,
        "missing_field": 2,
        "not_string": 1,
        "malformed_rows": 2,
        "decode_skipped": 0,
        "bad_role": 1,
        "no_assistant": 1,
        "template_error": 0,
        "too_long": 0,
    }
    assert f"skipped line 3 of {p}: no assistant message" in caplog.text
    assert f"skipped line 4 of {p}: message 0 has no content" in caplog.text
    assert f"skipped line 5 of {p}: message 0: content is int" in caplog.text
    assert f"skipped line 6 of {p}: message 0 has role 'robot'" in caplog.text
    assert f"skipped line 9 of {p}: not JSON" in caplog.text

    a = tmp_path / "alpaca.json"  # Alpaca's own layout: one JSON array
    a.write_text(
        json.dumps(
            [
                {"instruction": "Add.", "input": "2 and 2", "output": "4"},
                {"instruction": "Greet.", "input": "", "output": "Hello!"},
                {"instruction": "Missing output."},
            ],
            indent=1,
        )
    )
    docs, stats = load_documents(cfg(path=str(a), format="alpaca"), "train")
    assert [d.messages for d in docs] == [
        (("user", "Add.\n\n2 and 2"), ("assistant", "4")),
        (("user", "Greet."), ("assistant", "Hello!")),
    ]
    assert stats.missing_field == 1


def test_template_override_and_missing_template(bpe):
    assert chat_template(bpe, CHATML) == CHATML
    with pytest.raises(ValueError, match=f"tokenizer {bpe.source!r} has no chat template"):
        chat_template(bpe)


def test_chat_token_file_mask_sources_and_too_long(tmp_path, bpe, caplog):
    from jaxfit.data.text import build_token_file, eval_batches, train_batches

    msgs = [{"role": "user", "content": "What is two plus two?"}]
    rows = [{"messages": msgs + [{"role": "assistant", "content": "Four." * k}]} for k in (1, 30)]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg(path=str(p), format="chat", chat_template=CHATML)
    tf = build_token_file(c, bpe, "train", tmp_path / "cache")
    assert tf.meta["kind"] == "chat" and tf.by_example and tf.meta["documents"] == 2
    assert tf.sources() == [f"line 1 of {p}", f"line 2 of {p}"]
    ids, mask = encode_chat(
        bpe, CHATML, ChatExample(tuple((m["role"], m["content"]) for m in rows[0]["messages"]))
    )
    first = slice(0, len(ids))
    assert tf.tokens[first].tolist() == ids and tf.loss_mask[first].tolist() == mask
    short = len(ids)
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        batches = train_batches(tf, batch_size=2, seq_len=short, seed=0)
    assert batches.num_rows == 1 and tf.meta["stats"]["too_long"] == 1
    assert f"skipped line 2 of {p}: " in caplog.text and "longer than seq_len" in caplog.text
    b = next(batches)
    assert b["segment_ids"][0, : short - 1].tolist() == [1] * (short - 1)
    assert b["loss_mask"][0].sum() == sum(mask[1:])
    tf.too_long = "truncate"
    ev = eval_batches(tf, batch_size=4, seq_len=short)
    assert ev.num_rows == 2 and len(list(ev)) == 1


@pytest.mark.shared_data
def test_llama3_template_special_tokens_and_assistant_mask():
    d = SHARED / "tokenizers" / "llama3"
    if not d.exists():
        pytest.skip(f"shared data {d} not available")
    tok = load_pretrained(str(d))
    template = chat_template(tok)
    assert template == LLAMA3_CHAT_TEMPLATE
    ids, mask = encode_chat(tok, template, CONVERSATION)
    special = {
        t: tok.hf.convert_tokens_to_ids(t)
        for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    }
    assert special == {
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
    }
    assert ids[0] == 128000 and ids.count(128006) == ids.count(128007) == ids.count(128009) == 5
    ref_ids, ref_mask = hf_mask(tok, LLAMA3_GENERATION, CONVERSATION)
    assert ids == ref_ids and mask == ref_mask  # token by token, real Llama 3 template
    said = tok.decode([t for t, m in zip(ids, mask) if m])
    assert said == "Four.<|eot_id|>Six, of course.<|eot_id|>"  # content trimmed, eot kept


@pytest.mark.slow
def test_demo_chat_finetune_lowers_validation_loss(tmp_path):
    """configs/llama_qlora.py:demo,chat: a tiny random NF4 Llama + LoRA on synthetic chats,
    packed, loss on the assistant's turns; the CLI run lowers the validation loss."""
    import subprocess
    import sys

    import jax
    from xla_env import fast_subprocess_env

    from jaxfit import config as config_lib
    from jaxfit import sharding
    from jaxfit.data.text import write_synthetic_chat
    from jaxfit.tasks import build_task

    repo = Path(__file__).resolve().parents[3]
    data = write_synthetic_chat(tmp_path / "chat.jsonl", num_conversations=800)
    spec, overrides = "configs/llama_qlora.py:demo,chat,steps=60", [f"data.path={data}"]
    config = config_lib.load_config(str(repo / spec), overrides)
    assert (config.data.format, config.data.packing) == ("chat", True)
    workdir = tmp_path / "run"
    task = build_task(config, workdir, sharding.make_mesh())
    before = task.evaluate(task.initial_params(jax.random.key(config.seed), None))["loss"]
    cmd = [sys.executable, "-m", "jaxfit.train", "--config", spec, "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides]
    subprocess.run(cmd, cwd=repo, env=fast_subprocess_env(), check=True, capture_output=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    after = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert after < before - 0.4, (before, after)  # measured: 6.25 -> 5.50
