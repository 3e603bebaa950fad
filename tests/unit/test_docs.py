"""The documentation speaks of the software, by topic: no page named after a ticket or a commit, no heading that
is a ticket number, a work session or a commit (the history lives in git). A measurement report may say in its
heading when and where it ran."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").rglob("*.md")])
BAD_NAME = re.compile(r"issue|ticket|[0-9a-f]{7,40}", re.IGNORECASE)
BAD_HEADING = re.compile(r"\bissues?\s*#?\d+|#\d+\b|\bsessions?\b|\b[0-9a-f]{7,40}\b", re.IGNORECASE)


def headings(page: Path) -> list[str]:
    """The page's Markdown headings (lines inside fenced code blocks are not headings)."""
    found, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line)
    return found


def test_doc_files_are_named_by_topic():
    files = [p for p in (REPO / "docs").rglob("*") if p.is_file()]
    assert files
    named = [str(p.relative_to(REPO)) for p in files if BAD_NAME.search(p.stem)]
    assert not named, named


def test_headings_name_topics_not_tickets_sessions_or_commits():
    bad = [f"{page.relative_to(REPO)}: {line}" for page in PAGES for line in headings(page) if BAD_HEADING.search(line)]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for():
    assert BAD_NAME.search("issue13_stage1_4lang") and BAD_NAME.search("compare_tiny_3be9974")
    assert not BAD_NAME.search("frame_supervision") and not BAD_NAME.search("compare_tiny_earlier")
    for line in ("# Issue 13: stage 1", "## Fourth session (2026-11-30): spans", "## Fixed in #27", "## At 3be9974"):
        assert BAD_HEADING.search(line), line
    for line in ("# Reliability", "## Tokens anywhere in their span", "### PART vs baseline on the tiny default"):
        assert not BAD_HEADING.search(line), line
