"""The tokens the adapter's frames are classified over (`model.alignment.vocabulary`).

The frame losses and the vocabulary readout read every adapter frame through the LLM's output head. Over the whole
vocabulary (51,868 tokens for the Whisper-decoder stand-in, 151,936 for Qwen2.5) that head is the largest cost of an
adapter-only step, yet a frame can only learn the tokens its transcripts hold: the corpus' token set (17,871 of
51,868 in the embedded default's four languages), plus the blank. `python -m part frame_vocabulary` writes that set
from the training shards; the model classifies its frames over it, and a saved model keeps a copy
(`FILE_NAME` beside its weights), so it loads without the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE_NAME = "frame_vocabulary.json"


class FrameVocabularyError(ValueError):
    """A frame vocabulary file that cannot be used; the message names the file and the problem."""


def read_frame_vocabulary(path: str | Path, vocab_size: int, blank: int) -> list[int]:
    """The sorted token ids of the frame vocabulary file `path`, with `blank` (the frame losses' blank, the pad
    token) added; every id must be a token of the LLM (< `vocab_size`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FrameVocabularyError(f"{path}: no such file (write it with `python -m part frame_vocabulary "
                                   "--config CONFIG`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameVocabularyError(f"{path}: cannot read the frame vocabulary ({exc})") from None
    ids = data.get("token_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids:
        raise FrameVocabularyError(f"{path}: field 'token_ids' must be a non-empty list of token ids")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise FrameVocabularyError(f"{path}: field 'token_ids' holds {len(bad)} entries that are not token ids of "
                                   f"this LLM (0 <= id < {vocab_size}), e.g. {bad[:3]}")
    return sorted(set(ids) | {blank})


def write_frame_vocabulary(path: str | Path, token_ids: list[int], about: dict | None = None) -> None:
    """Writes `token_ids` (sorted, once each) and `about` (where they came from) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(dict(about or {}, token_ids=sorted(set(token_ids)))))
    tmp.replace(path)
