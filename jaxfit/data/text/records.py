"""What the LM readers produce: documents of each kind, and the counts of what they dropped.

A *document* is a ``str`` (plain language modelling: the loss covers every token), an
:class:`InstructionExample` ``(prompt, completion)`` (the loss covers the completion only)
or a :class:`ChatExample` (a conversation; the loss covers the assistant's turns).
:class:`TextStats` counts the documents kept and dropped while reading one split; each
drop is also logged, naming the file and line it came from where there is one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

logger = logging.getLogger(__name__)

LOG_FIRST = 10  # skips logged one by one at WARNING per reason; later ones at DEBUG


class InstructionExample(NamedTuple):
    """One instruction-tuning record. ``prompt`` already has ``prompt_template`` applied."""

    prompt: str
    completion: str


class ChatExample(NamedTuple):
    """One conversation (``text.chat``): ``(role, content)`` pairs, and where it came from
    (``line 17 of /path/chat.jsonl``, for logs)."""

    messages: tuple[tuple[str, str], ...]
    source: str = ""

    def dicts(self, n: int | None = None) -> list[dict[str, str]]:
        """The first ``n`` (all) messages as ``{"role", "content"}`` dicts."""
        return [{"role": r, "content": c} for r, c in self.messages[:n]]


Document = str | InstructionExample | ChatExample

# TextStats fields that count dropped documents, in the order they are reported.
DROP_REASONS = (
    "empty",
    "missing_field",
    "not_string",
    "malformed_rows",
    "decode_skipped",
    "bad_role",
    "no_assistant",
    "template_error",
    "too_long",
)


@dataclasses.dataclass
class TextStats:
    """Counts of documents kept and dropped while loading one split (all counts >= 0).

    Dropped (the :data:`DROP_REASONS`): ``empty`` (empty or whitespace-only; for
    instruction data an empty completion), ``missing_field`` (field absent or null),
    ``not_string``, ``malformed_rows`` (a line that is not a JSON object, a CSV row with
    the wrong number of fields), ``decode_skipped`` (bytes not UTF-8 with
    ``decode_errors="skip"``); for conversations ``bad_role``, ``no_assistant``,
    ``template_error`` (``text.chat``); ``too_long`` (examples longer than ``seq_len``
    with ``too_long="drop"``, counted by the batches). Kept: ``documents``;
    ``decode_replaced`` of them had bytes that are not UTF-8 replaced by U+FFFD (kept, so
    never reported as skipped).

    ``split_by_tokens`` is not a count: set when ``val_fraction`` holds out less than one
    document, so the documents are the whole source and the token-file builder cuts its
    token stream instead (``text.documents.split_by_tokens``).
    """

    documents: int = 0
    empty: int = 0
    missing_field: int = 0
    not_string: int = 0
    malformed_rows: int = 0
    decode_skipped: int = 0
    bad_role: int = 0
    no_assistant: int = 0
    template_error: int = 0
    too_long: int = 0
    decode_replaced: int = 0
    split_by_tokens: bool = False

    @property
    def skipped(self) -> int:
        """Documents dropped for any reason."""
        return sum(self.dropped().values())

    def dropped(self) -> dict[str, int]:
        """``{reason: count}`` of dropped documents, every reason of :data:`DROP_REASONS`."""
        return {r: getattr(self, r) for r in DROP_REASONS}

    def skip(self, reason: str, where: str, why: str) -> None:
        """Count one dropped document under ``reason`` and log ``skipped <where>: <why>``
        (e.g. ``skipped line 17 of /data/chat.jsonl: not JSON (...)``); the first
        :data:`LOG_FIRST` per reason at WARNING, the rest at DEBUG."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {DROP_REASONS}")
        count = getattr(self, reason) + 1
        setattr(self, reason, count)
        level = logging.WARNING if count <= LOG_FIRST else logging.DEBUG
        logger.log(level, "skipped %s: %s", where, why)
        if count == LOG_FIRST + 1:
            logger.warning("more %s skips are logged at DEBUG level only", reason)

    def as_dict(self) -> dict[str, int]:
        """Every count (not ``split_by_tokens``)."""
        return {f.name: int(getattr(self, f.name)) for f in _COUNTS}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> TextStats:
        return cls(**{f.name: int(d.get(f.name, 0)) for f in _COUNTS})

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Metric dict in the project's namespace: ``data/skipped_<reason>`` for dropped
        documents, ``data/documents`` and ``data/decode_replaced`` for kept ones."""
        names = {"decode_skipped": "decode_error"}
        out = {f"{prefix}documents": self.documents}
        out |= {f"{prefix}skipped_{names.get(r, r)}": n for r, n in self.dropped().items()}
        out[f"{prefix}decode_replaced"] = self.decode_replaced
        return out

    def log(self, where: str) -> None:
        """Log one line; at WARNING level when anything was dropped or replaced."""
        level = logging.WARNING if (self.skipped or self.decode_replaced) else logging.INFO
        others = "".join(
            f", {n} {r.replace('_', ' ')}" for r, n in self.dropped().items() if n and r in _LATER
        )
        logger.log(
            level,
            "%s: kept %d documents; dropped %d empty, %d missing field, %d not a string, "
            "%d malformed rows, %d undecodable%s; %d kept with undecodable bytes replaced",
            where,
            self.documents,
            self.empty,
            self.missing_field,
            self.not_string,
            self.malformed_rows,
            self.decode_skipped,
            others,
            self.decode_replaced,
        )


_COUNTS = [f for f in dataclasses.fields(TextStats) if f.type in ("int", int)]
_LATER = DROP_REASONS[5:]  # reported only when counted


def document_text(doc: Document) -> str:
    """The full text of a document (prompt + completion for instruction examples, the
    contents one per line for conversations): what a tokenizer is trained on."""
    if isinstance(doc, ChatExample):
        return "\n".join(c for _, c in doc.messages)
    return doc if isinstance(doc, str) else doc.prompt + doc.completion
