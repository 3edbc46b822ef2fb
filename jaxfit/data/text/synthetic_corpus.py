"""A synthetic text corpus for the language-model demo: learnable without any download.

Documents are short stories from a small probabilistic grammar with long-range structure
(a character named in the first sentence is referred to later, counts go up by one), so
a small GPT can visibly lower its perplexity in minutes on a CPU and its samples show
whether it learned the grammar.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "duck", "goat"]
COLOURS = ["red", "blue", "green", "yellow", "brown", "white"]
PLACES = ["the forest", "the river", "the hill", "the garden", "the market", "the lake"]
VERBS = ["found", "saw", "fed", "followed", "painted", "counted"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def story(rng: np.random.Generator) -> str:
    """One story of 4-7 sentences."""
    name = NAMES[rng.integers(len(NAMES))]
    animal = ANIMALS[rng.integers(len(ANIMALS))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    place = PLACES[rng.integers(len(PLACES))]
    lines = [f"{name} went to {place} and {VERBS[rng.integers(len(VERBS))]} a {colour} {animal}."]
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
