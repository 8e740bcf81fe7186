"""The documentation's links hold: every `docs/<page>.md#<anchor>` a comment or docstring cites, and every
relative link in the README and docs/, names a page that exists and a heading on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITED = re.compile(r"docs/([A-Za-z0-9_-]+\.md)(?:#([A-Za-z0-9_-]+))?")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """The anchor GitHub (and GitLab, Gitea) give a heading: lower case, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))}


def sources() -> list[Path]:
    files = [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "docker").iterdir()]
    for folder in ("src", "tests", "bench", "migrations"):
        files += (ROOT / folder).rglob("*.py")
    return [f for f in files if f.is_file()]


def test_there_are_pages_to_check() -> None:
    assert {p.name for p in DOCS.glob("*.md")} >= {
        "architecture.md",
        "openai.md",
        "glm.md",
        "wenxin.md",
        "roleplay.md",
        "tasks.md",
        "deployment.md",
        "operations.md",
    }


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_docs_section_exists(path: Path) -> None:
    for page, anchor in CITED.findall(path.read_text(encoding="utf-8", errors="replace")):
        target = DOCS / page
        assert target.is_file(), f"{path.relative_to(ROOT)} cites docs/{page}, which does not exist"
        if anchor:
            assert anchor in anchors(target), (
                f"{path.relative_to(ROOT)} cites docs/{page}#{anchor}: no such heading"
            )


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        assert dest.exists(), f"{page.name} links to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name} links to {target}: no such heading"
