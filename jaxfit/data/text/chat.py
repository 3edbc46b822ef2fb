"""Chat and Alpaca records for supervised fine-tuning: conversations, rendered with a chat
template, with the loss on the assistant's tokens only.

Records (``data.format``):

* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI style; roles
  ``system``, ``user``, ``assistant``, ``tool``), or ShareGPT's ``{"conversations":
  [{"from": "human" | "gpt" | "system" | ..., "value": ...}, ...]}``.
* ``alpaca``: ``{"instruction", "input", "output"}`` (tatsu-lab/stanford_alpaca): one user
  turn (the instruction, then a blank line and the input when there is one) and one
  assistant turn (the output).

A conversation is rendered with the tokenizer's chat template (``tokenizer_config.json``
``chat_template``, as ``tokenizer.apply_chat_template`` does), or the Jinja template of
``data.chat_template`` when set. The assistant mask is found by rendering prefixes: for
assistant message ``i``, ``render(messages[:i], add_generation_prompt=True)`` ends where
its content starts and ``render(messages[:i + 1])`` where it ends (end-of-turn token
included), both prefixes of the whole rendering; every token of the whole rendering with
a character in such a span is an assistant token (how ``transformers`` maps the
``{% generation %}`` spans of ``return_assistant_tokens_mask`` to tokens). A template that
does not render conversations incrementally (a prefix whose rendering is not a prefix of
the whole) is reported for the row, never guessed.

Rows that cannot be used are skipped, counted and logged with their file and line:
``missing_field`` (no messages, a message without role or content), ``not_string``,
``malformed_rows`` (messages not a list of objects), ``bad_role`` (an unknown role, or a
conversation that opens with the assistant), ``no_assistant`` (nothing to learn),
``empty`` (only empty assistant turns), ``template_error`` (the template raised, or is not
incremental).
"""

from __future__ import annotations

from typing import Any

from jaxfit.data.text.records import ChatExample, TextStats

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT "from" values -> roles (FastChat / axolotl conventions).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant"}
ALPACA_FIELDS = ("instruction", "input", "output")


def _message(m: Any, k: int, stats: TextStats, where: str) -> tuple[str, str] | None:
    if not isinstance(m, dict):
        stats.skip("malformed_rows", where, f"message {k} is not an object")
        return None
    role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
    for name, v in (("role", role), ("content", content)):
        if v is None:
            stats.skip("missing_field", where, f"message {k} has no {name}")
            return None
        if not isinstance(v, str):
            stats.skip("not_string", where, f"message {k}: {name} is {type(v).__name__}")
            return None
    role = SHAREGPT_ROLES.get(role, role)
    if role not in ROLES:
        stats.skip("bad_role", where, f"message {k} has role {role!r}, not one of {ROLES}")
        return None
    return role, content


def chat_example(values: dict, fmt: str, stats: TextStats, where: str) -> ChatExample | None:
    """The conversation of one ``chat`` or ``alpaca`` record, or None (the drop counted)."""
    if fmt == "alpaca":
        got = [values.get(f) for f in ALPACA_FIELDS]
        raw = [
            {"role": "user", "content": got[0]},
            {"role": "assistant", "content": got[2]},
        ]
        for f, v in zip(ALPACA_FIELDS, got):
            if v is None and f != "input":
                stats.skip("missing_field", where, f"no {f!r}")
                return None
            if v is not None and not isinstance(v, str):
                stats.skip("not_string", where, f"{f!r} is {type(v).__name__}, not a string")
                return None
        if got[1] and got[1].strip():
            raw[0]["content"] = f"{got[0]}\n\n{got[1]}"
    else:
        raw = values.get("messages", values.get("conversations"))
        if raw is None:
            stats.skip("missing_field", where, "no 'messages' (or ShareGPT 'conversations')")
            return None
        if not isinstance(raw, list):
            stats.skip("malformed_rows", where, f"messages is {type(raw).__name__}, not a list")
            return None
    messages = []
    for k, m in enumerate(raw):
        msg = _message(m, k, stats, where)
        if msg is None:
            return None
        messages.append(msg)
    roles = [r for r, _ in messages]
    if "assistant" not in roles:
        stats.skip("no_assistant", where, "no assistant message")
        return None
    if roles[0] == "assistant" or roles[: roles.index("assistant")] == ["system"]:
        stats.skip("bad_role", where, "the conversation opens with the assistant")
        return None
    if not any(c.strip() for r, c in messages if r == "assistant"):
        stats.skip("empty", where, "every assistant message is empty")
        return None
    return ChatExample(tuple(messages), where)


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or not incrementally."""


def _render(tokenizer: Any, template: str, messages: list[dict], generation: bool) -> str:
    import jinja2

    try:
        return tokenizer.hf.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template raised: {e}") from e


def assistant_spans(tokenizer: Any, template: str, example: ChatExample) -> tuple[str, list]:
    """The whole rendering and the ``[start, end)`` character span of each assistant turn.

    Raises:
      ChatTemplateError: the template raised, or renders a prefix of the conversation as
        something other than a prefix of the whole.
    """
    full = _render(tokenizer, template, example.dicts(), False)
    spans = []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        start = _render(tokenizer, template, example.dicts(i), True)
        end = _render(tokenizer, template, example.dicts(i + 1), False)
        if not (end.startswith(start) and full.startswith(end)):
            raise ChatTemplateError(
                f"the chat template does not render message {i} incrementally (the rendering "
                "of a prefix of the conversation is not a prefix of the whole)"
            )
        spans.append((len(start), len(end)))
    return full, spans


def encode_chat(tokenizer: Any, template: str, example: ChatExample) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a conversation: the tokens of its rendering (special tokens as
    rendered, none added) and 1 on each assistant token (see the module docstring).

    Raises:
      ChatTemplateError: as :func:`assistant_spans`.
    """
    full, spans = assistant_spans(tokenizer, template, example)
    ids, offsets = tokenizer.encode_with_offsets(full)
    mask = [int(any(s < b and a < e for a, b in spans)) for s, e in offsets]
    return ids, mask


def chat_template(tokenizer: Any, override: str = "") -> str:
    """The template to render with: ``override`` (``data.chat_template``) when set, else
    the tokenizer's own.

    Raises:
      ValueError: neither exists (the message names the tokenizer).
    """
    template = override or tokenizer.chat_template
    if not template:
        raise ValueError(
            f"tokenizer {tokenizer.source!r} has no chat template (tokenizer_config.json "
            "'chat_template'); set data.chat_template to a Jinja template"
        )
    return template
