"""The tokens the adapter's frames are classified over (`model.alignment.vocabulary`).

The frame losses and the vocabulary readout read every adapter frame through the LLM's output head. Over the whole
vocabulary (51,868 tokens for the Whisper-decoder stand-in, 151,936 for Qwen2.5) that head is the largest cost of an
adapter-only step, yet a frame can only learn the tokens its transcripts hold: the corpus' token set (17,871 of
51,868 in the embedded default's four languages), plus the blank. `python -m part frame_vocabulary` writes that set
from the training shards; the model classifies its frames over it, and a saved model keeps a copy
(`FILE_NAME` beside its weights), so it loads without the corpus.

Most of those tokens are rare (in the embedded default, 10,019 of 17,871 occur fewer than 5 times in 20 hours of
speech), and a class seen a handful of times is not learned. With `model.alignment.vocabulary_min_count` N the
file keeps the tokens seen at least N times; every other token is spelled with them (`TokenPieces`: its text cut
into the longest pieces that are tokens of the set, single characters where nothing longer is), so a rare word
becomes a few frequent pieces that decode to the same text (on the embedded default the frames then read worse
within its budget: docs/results/frame_supervision.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
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


def whole_characters(tokenizer, token: int) -> bool:
    """Whether `token` decodes to whole characters (not a byte of a longer UTF-8 character): only such tokens
    are pieces, since a byte is no sound of its own."""
    return "\ufffd" not in tokenizer.decode([token])


class TokenPieces:
    """Each token of the LLM written with the tokens of `vocabulary`: itself when it is one, else its text (the
    tokenizer's own form: byte-level or SentencePiece pieces) cut from the left into the longest pieces that are
    tokens of `vocabulary` and whole characters; None when no such spelling exists (a rare Chinese character stays
    a token of its own). The pieces decode to the token's text."""

    def __init__(self, tokenizer, vocabulary: Iterable[int]):
        self.vocabulary = set(vocabulary)
        texts = tokenizer.get_vocab()  # text -> id
        self.text = {i: t for t, i in texts.items()}
        self.piece = {t: i for t, i in texts.items() if i in self.vocabulary and whole_characters(tokenizer, i)}
        self.longest = max((len(t) for t in self.piece), default=0)
        self._spelled: dict[int, list[int] | None] = {}

    def __call__(self, token: int) -> list[int] | None:
        if token in self.vocabulary:
            return [token]
        if token not in self._spelled:
            self._spelled[token] = self._spell(self.text.get(token, ""))
        return self._spelled[token]

    def _spell(self, text: str) -> list[int] | None:
        pieces, i = [], 0
        while i < len(text):
            for j in range(min(len(text), i + self.longest), i, -1):
                if (piece := self.piece.get(text[i:j])) is not None:
                    pieces.append(piece)
                    i = j
                    break
            else:
                return None
        return pieces or None


def choose_frame_vocabulary(counts: Counter, tokenizer, min_count: int = 1) -> tuple[list[int], dict]:
    """The frame vocabulary of transcripts whose tokens occur `counts` times: the tokens seen at least `min_count`
    times, the single-character tokens that spell the others (`TokenPieces`), and the rare tokens that cannot be
    spelled so (characters of their own, parts of one). Also what it holds: classes, tokens spelled, pieces per
    transcript token."""
    kept = {t for t, n in counts.items() if n >= min_count}
    if len(kept) == len(counts):
        return sorted(kept), {"min_count": min_count, "spelled_tokens": 0, "pieces_per_token": 1.0}
    characters = {i for i in tokenizer.get_vocab().values() if len(tokenizer.decode([i])) == 1
                  and whole_characters(tokenizer, i)}
    spell = TokenPieces(tokenizer, kept | characters)
    used, whole, pieces = set(), set(), 0
    for token, n in counts.items():
        spelled = spell(token) if token not in kept else [token]
        if spelled is None:
            whole.add(token)
            pieces += n
        else:
            used.update(spelled)
            pieces += n * len(spelled)
    ids = sorted(kept | used | whole)
    return ids, {"min_count": min_count, "spelled_tokens": len(set(counts) - set(ids)),
                 "pieces_per_token": round(pieces / sum(counts.values()), 3)}
