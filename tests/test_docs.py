"""The README is a guide to the pages of ``docs/``: short, linking every guide, with links
that resolve, and no measurement quoted outside docs/BENCHMARKS.md (issue 21, part 6).

The commands the pages show are checked by ``tests/cli/test_readme_commands.py``; the
planned peaks BENCHMARKS.md publishes by ``tests/plan/test_memory_records.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# docs/ pages that are not guides: the measurement log and the map of the code.
NOT_GUIDES = {"BENCHMARKS.md", "DESIGN.md"}
GUIDES = sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in NOT_GUIDES)
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for ``page``'s headings: lower case, punctuation dropped, spaces
    to hyphens (the rule of github.com's Markdown renderer)."""
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#+\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move the manual into docs/"


def test_the_readme_links_every_guide():
    links = set(LINK.findall(README.read_text(encoding="utf-8")))
    targets = {link.split("#")[0] for link in links}
    missing = [g.name for g in GUIDES if f"docs/{g.name}" not in targets]
    assert not missing, f"README.md does not link {missing}"
    assert {"docs/BENCHMARKS.md", "docs/DESIGN.md"} <= targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Every relative link of a page names an existing file and, after ``#``, a heading
    of it."""
    bad = []
    for link in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_guides_link_to_the_measurements_rather_than_quote_them():
    """Planned and measured peaks (``N.NN GiB``) appear in docs/BENCHMARKS.md only."""
    figure = re.compile(r"\b\d+\.\d\d GiB\b")
    quoted = {
        p.name: figure.findall(_prose(p.read_text(encoding="utf-8"))) for p in [README, *GUIDES]
    }
    assert not any(quoted.values()), {k: v for k, v in quoted.items() if v}
