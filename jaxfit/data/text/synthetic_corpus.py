"""A synthetic text corpus (and chats) for the language-model demos: no download needed.

Documents are short stories from a small probabilistic grammar with long-range structure
(a character named in the first sentence is referred to later, counts go up by one), so
a small GPT can visibly lower its perplexity in minutes on a CPU and its samples show
whether it learned the grammar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "duck", "goat"]
COLOURS = ["red", "blue", "green", "yellow", "brown", "white"]
PLACES = ["the forest", "the river", "the hill", "the garden", "the market", "the lake"]
VERBS = ["found", "saw", "fed", "followed", "painted", "counted"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[rng.integers(len(words))]


def story(rng: np.random.Generator, **fixed: str) -> str:
    """One story of 4-7 sentences (``name``, ``animal``, ``colour``, ``place`` drawn unless
    given)."""
    name = fixed.get("name") or _pick(rng, NAMES)
    animal = fixed.get("animal") or _pick(rng, ANIMALS)
    colour = fixed.get("colour") or _pick(rng, COLOURS)
    place = fixed.get("place") or _pick(rng, PLACES)
    lines = [f"{name} went to {place} and {_pick(rng, VERBS)} a {colour} {animal}."]
    start = int(rng.integers(0, 6))
    for i in range(int(rng.integers(2, 5))):
        n = NUMBERS[min(start + i, len(NUMBERS) - 1)]
        lines.append(f"{name} counted {n} {colour} {animal}s near {place}.")
    lines.append(f"The {animal} was happy, and {name} went home.")
    return " ".join(lines)


def write_synthetic_text(
    path: str | os.PathLike, *, num_documents: int = 4000, seed: int = 0
) -> Path:
    """Write ``num_documents`` stories separated by blank lines to ``path`` (atomically).

    Returns the path. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n\n".join(story(rng) for _ in range(num_documents)) + "\n")
    os.replace(tmp, path)
    return path


def conversation(rng: np.random.Generator) -> list[dict[str, str]]:
    """One chat of 1-3 exchanges about a story: the user names a character and a place,
    the assistant tells a story about them, then may answer questions whose answers are
    in the story (learnable only by reading the conversation so far)."""
    name, animal = _pick(rng, NAMES), _pick(rng, ANIMALS)
    colour, place = _pick(rng, COLOURS), _pick(rng, PLACES)
    tale = story(rng, name=name, animal=animal, colour=colour, place=place)
    turns = [
        {"role": "user", "content": f"Tell me a story about {name} at {place}."},
        {"role": "assistant", "content": tale},
    ]
    if rng.random() < 0.7:
        turns += [
            {"role": "user", "content": f"What colour was the {animal}?"},
            {"role": "assistant", "content": f"The {animal} was {colour}."},
        ]
    if rng.random() < 0.5:
        turns += [
            {"role": "user", "content": f"Which animal did {name} find?"},
            {"role": "assistant", "content": f"{name} found a {colour} {animal}."},
        ]
    return turns


def write_synthetic_chat(
    path: str | os.PathLike, *, num_conversations: int = 2000, seed: int = 0
) -> Path:
    """Write ``num_conversations`` chats (:func:`conversation`) as JSON lines
    ``{"messages": [...]}`` to ``path`` (atomically), for ``data.format="chat"``.

    Returns the path. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    rows = (json.dumps({"messages": conversation(rng)}) for _ in range(num_conversations))
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)
    return path
