"""The documentation speaks of the software, by topic: no page named after a ticket or a commit, no heading that
is a ticket number, a work session or a commit, and no commit name, ticket or work session in the prose either (the
history lives in git). A measurement report may say in its heading when and where it ran. The README is short and
starts with its Quickstart, every link between the pages resolves, and the configuration reference of
docs/training.md names every field of the config."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from part.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").rglob("*.md")])
BAD_NAME = re.compile(r"issue|ticket|[0-9a-f]{7,40}", re.IGNORECASE)
BAD_HEADING = re.compile(r"\bissues?\s*#?\d+|#\d+\b|\bsessions?\b|\b[0-9a-f]{7,40}\b", re.IGNORECASE)
# a commit's name in prose: 7-40 hex digits with at least one digit and one letter (not a word such as "defaced",
# not a number)
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
WORK_LOG = re.compile(r"\b(issues?|tickets?|sessions?|honestly)\b|#\d+\b", re.IGNORECASE)


def headings(page: Path) -> list[str]:
    """The page's Markdown headings (lines inside fenced code blocks are not headings)."""
    found, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line)
    return found


def prose(page: Path) -> str:
    """The page without its fenced code blocks (commands and program output may hold anything)."""
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


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
    for text in ("at commit 3be9974", "the issue's targets", "the sixth session", "fixed in #27", "honestly"):
        assert COMMIT.search(text) or WORK_LOG.search(text), text
    for text in ("a defaced 1234567 figure", "sha256 of 64 digits", "step_0000300", "ds_configs/zero3.json"):
        assert not COMMIT.search(text) and not WORK_LOG.search(text), text


def test_prose_names_no_commit_ticket_or_work_session():
    bad = []
    for page in PAGES:
        for line in prose(page).splitlines():
            for pattern in (COMMIT, WORK_LOG):
                bad += [f"{page.relative_to(REPO)}: {m.group(0)!r} in {line.strip()[:80]!r}"
                        for m in pattern.finditer(line)]
    assert not bad, "\n".join(bad)


def test_the_readme_is_short_and_starts_with_its_quickstart():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    assert "## Quickstart" in lines[:30]
    start = lines.index("## Quickstart")
    block = lines[start:start + 15]
    assert any(line.startswith("bash launch/demo.sh") for line in block)
    assert any(line.startswith("bash launch/test.sh") for line in block)
    assert "bash launch/test.sh" in (REPO / ".ci" / "run").read_text()


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(REPO)}: {target}")
    assert not bad, "\n".join(bad)


def config_fields(cls: type, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass, as its dotted path (a list of stages as `stages`)."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(kind):
            inner = [kind]
        if inner:
            found += config_fields(inner[0], f"{prefix}{field.name}.")
        else:
            found.append(prefix + field.name)
    return found


def test_the_config_reference_names_every_field():
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    reference = text[text.index("### Reference"):text.index("## Launching")]
    named = set(re.findall(r"`([\w.\[\]]+)`", reference))
    missing = [path for path in config_fields(TrainConfig)
               if path.rsplit(".", 1)[-1] not in {n.rsplit(".", 1)[-1] for n in named}
               and path.replace("stages.", "stages[i].") not in named]
    assert config_fields(TrainConfig) and not missing, missing
