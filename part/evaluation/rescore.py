"""Where a finished evaluation's hypotheses are, and which normaliser scored them (`python -m part rescore`)."""

from __future__ import annotations

import json
from pathlib import Path

HYPOTHESES = "final_hypotheses.jsonl"
_SUFFIX = "_hypotheses.jsonl"


def hypotheses_path(source: Path) -> Path:
    """The hypotheses file of a run directory (its final evaluation's) or the file itself."""
    if source.is_dir():
        path = source / HYPOTHESES
        if not path.is_file():
            others = sorted(p.name for p in source.glob(f"*{_SUFFIX}"))
            found = f" (it has {', '.join(others)}: pass one of them)" if others else ""
            raise FileNotFoundError(f"{source}: no {HYPOTHESES}{found}")
        return path
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such run directory or hypotheses file")
    return source


def recorded_normalizer(hypotheses: Path) -> str | None:
    """The normaliser of the results file written beside `hypotheses` (X_hypotheses.jsonl -> X.json), if any."""
    if not hypotheses.name.endswith(_SUFFIX):
        return None
    results = hypotheses.with_name(hypotheses.name[: -len(_SUFFIX)] + ".json")
    try:
        return json.loads(results.read_text(encoding="utf-8")).get("normalizer")
    except (OSError, ValueError, AttributeError):
        return None
