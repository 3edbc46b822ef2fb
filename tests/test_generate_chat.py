"""``jaxfit.generate --chat``: conversations rendered with the tokenizer's chat template
(as transformers renders them), answered turn by turn from the whole conversation, each
answer the greedy continuation cut at the template's end of turn."""

import io

import numpy as np
import pytest
from hf_testing import tiny_llama

from jaxfit import generate, inference, sampling
from jaxfit.data.text import train_text_bpe

# A ChatML-like template: each turn ends with the EOS token's text.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = train_text_bpe(["hello world, how are you? fine, thanks."], root / "tok", vocab_size=257)
    hf_tok = tok.hf
    hf_tok.chat_template = TEMPLATE
    tiny_llama(root / "model", vocab_size=257, tokenizer=hf_tok, bos_token_id=0, eos_token_id=0)
    return root / "model", hf_tok


def test_render_and_end_of_turn_match_transformers(chat_model):
    path, hf_tok = chat_model
    loaded = inference.load_model_and_tokenizer(path)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "how are you?"},
    ]
    ref = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert loaded.render_chat(messages) == list(ref)
    assert generate.end_of_turn(loaded) == "<|endoftext|>"


def test_chat_answers_each_turn_from_the_whole_conversation(chat_model, monkeypatch, capsys):
    path, _ = chat_model
    loaded = inference.load_model_and_tokenizer(path)
    seen = []

    def render(messages, generation_prompt=True):
        seen.append([dict(m) for m in messages])
        return loaded.render_chat(messages, generation_prompt)

    spy = loaded._replace(render_chat=render)
    args = generate.parser().parse_args(
        ["--model", str(path), "--chat", "--temperature", "0", "--max_new_tokens", "6",
         "--system", "be brief", "--prompt", "hello"]
    )  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("how are you?\n\n"))
    assert generate._chat(args, spy) == 0
    turns = [s for s in seen if s[-1]["role"] == "user"]
    assert [m["content"] for m in turns[0]] == ["be brief", "hello"]
    answer = turns[1][2]
    assert answer["role"] == "assistant" and [m["content"] for m in turns[1]][3] == "how are you?"
    # the first answer: the greedy continuation of the rendered first turn, cut at the
    # end of turn (EOS id 0 ends it in the program; its text is the template's end)
    ids = np.asarray(loaded.render_chat(turns[0]), np.int32)
    out = sampling.generate(
        loaded.model, loaded.params, ids, max_new_tokens=6, temperature=0, eos_token_id=0
    )
    tokens = list(out[: list(out).index(0)] if 0 in out else out)
    assert answer["content"] == loaded.decode(tokens).split("<|endoftext|>")[0].strip()
    assert capsys.readouterr().out.count("\n") == 2  # one line per answer


def test_chat_without_a_template_is_a_clear_error(tmp_path):
    tok = train_text_bpe(["hello world"], tmp_path / "tok", vocab_size=257)
    tiny_llama(tmp_path / "m", vocab_size=257, tokenizer=tok.hf, eos_token_id=0)
    loaded = inference.load_model_and_tokenizer(tmp_path / "m")
    with pytest.raises(ValueError, match="has no chat template"):
        loaded.render_chat([{"role": "user", "content": "hi"}])
    model, params, encode, decode, eos, render = loaded  # still unpacks as a tuple
    assert eos == 0 and decode(encode("hello")) == "hello"
