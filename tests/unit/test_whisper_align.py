"""Token timings from Whisper's alignment heads (part/objectives/whisper_align.py, `python -m part align`): the DTW
against an exhaustive one, the frame targets by hand, and the real Whisper-base (converted from its
wheels) placing the words of an espeak-ng clip on either side of a silence inserted between them."""

from __future__ import annotations

import itertools
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from part.cli import align
from part.data.audio import load_audio
from part.objectives.whisper_align import (
    FrameTargetTeacher,
    TokenTiming,
    WhisperAligner,
    alignment_heads_problem,
    dtw_path,
    frame_owners,
    frame_targets,
    map_timings,
    token_char_spans,
)


def _path_cost(cost: np.ndarray, path: list[tuple[int, int]]) -> float:
    return float(sum(cost[i, j] for i, j in path))


def _best_cost(cost: np.ndarray) -> float:
    """Exhaustive: the least cost over every monotonic path (moves right, down, diagonal)."""
    n, m = cost.shape
    best = {(0, 0): cost[0, 0]}
    for i, j in itertools.product(range(n), range(m)):
        if (i, j) == (0, 0):
            continue
        prev = [best[p] for p in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if p in best]
        best[(i, j)] = cost[i, j] + min(prev)
    return best[(n - 1, m - 1)]


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (3, 9), (7, 7), (9, 4)])
def test_dtw_path_is_monotonic_complete_and_least_cost(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.normal(size=shape)
        path = dtw_path(cost)
        assert path[0] == (0, 0) and path[-1] == (shape[0] - 1, shape[1] - 1)
        for (i0, j0), (i1, j1) in zip(path, path[1:]):
            assert (i1 - i0, j1 - j0) in {(0, 1), (1, 0), (1, 1)}
        assert _path_cost(cost, path) == pytest.approx(_best_cost(cost))


def test_dtw_path_follows_a_clear_diagonal():
    cost = np.ones((4, 8))
    for i in range(4):
        cost[i, 2 * i : 2 * i + 2] = -5.0  # token i sits on frames 2i, 2i+1
    spans = {}
    for i, j in dtw_path(cost):
        spans.setdefault(i, []).append(j)
    assert spans == {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7]}


def test_frame_targets_put_each_token_at_its_centre_and_blank_elsewhere():
    timings = [TokenTiming(10, "a", 0.00, 0.16), TokenTiming(11, "b", 0.14, 0.22),
               TokenTiming(12, "c", 0.20, 0.60), TokenTiming(13, "d", 0.90, 1.00)]
    # 80 ms frames: centres 0.08 -> 1, 0.18 -> 2, 0.40 -> 5, 0.95 -> 11
    assert frame_targets(timings, 13, 0.08, blank=0) == [0, 10, 11, 0, 0, 12, 0, 0, 0, 0, 0, 13, 0]
    crowded = [TokenTiming(20 + k, "x", 0.0, 0.05) for k in range(4)]  # four centres in frame 0
    assert frame_targets(crowded, 3, 0.08, blank=0) == [20, 21, 22]  # moved right; the fourth has no frame left


def test_frame_owners_give_each_token_its_centre_then_the_free_frames_of_its_span():
    timings = [TokenTiming(10, "a", 0.00, 0.16), TokenTiming(11, "b", 0.14, 0.22),
               TokenTiming(12, "c", 0.20, 0.60), TokenTiming(13, "d", 0.90, 1.00)]
    # centres as frame_targets places them (1, 2, 5, 11); then frames whose centre (0.04, 0.12, ...) is in a span
    assert frame_owners(timings, 13, 0.08) == [0, 0, 1, 2, 2, 2, 2, -1, -1, -1, -1, 3, -1]
    crowded = [TokenTiming(20 + k, "x", 0.0, 0.05) for k in range(4)]
    assert frame_owners(crowded, 3, 0.08) == [0, 1, 2]  # the fourth owns no frame, as frame_targets drops it
    # the owners agree with frame_targets on which tokens have a frame, and in order
    blank = 0
    targets = frame_targets(timings, 13, 0.08, blank)
    owners = frame_owners(timings, 13, 0.08)
    owned = dict.fromkeys(o for o in owners if o >= 0)
    assert [t for t in targets if t != blank] == [timings[i].token_id for i in owned]


def _espeak(text: str, path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return load_audio(path)


@pytest.fixture(scope="module")
def gap_clip(tmp_path_factory):
    """'Good morning everybody.', 1.5 s of silence, 'Thank you very much.': (path, where the silence starts and
    ends, the clip's length), in seconds."""
    tmp = tmp_path_factory.mktemp("align")
    first = _espeak("Good morning everybody.", tmp / "a.wav")
    second = _espeak("Thank you very much.", tmp / "b.wav")
    gap = np.zeros(int(1.5 * 16000), dtype=np.float32)
    path = tmp / "gap.wav"
    sf.write(path, np.concatenate([first, gap, second]), 16000)
    return path, len(first) / 16000, (len(first) + len(gap)) / 16000, (len(first) + len(gap) + len(second)) / 16000


def test_whisper_base_places_the_words_around_the_silence(converted, gap_clip):
    whisper_dir, _ = converted
    path, silence_start, silence_end, length = gap_clip
    timings = WhisperAligner(whisper_dir).align(load_audio(path), "Good morning everybody. Thank you very much.",
                                               "en")
    text = "".join(t.text for t in timings)
    assert text == "Good morning everybody. Thank you very much."
    starts = [t.start for t in timings]
    assert starts == sorted(starts) and all(t.end > t.start for t in timings)
    thank = next(i for i, t in enumerate(timings) if t.text.strip() == "Thank")
    seen = ([(t.text, round(t.start, 2), round(t.end, 2)) for t in timings], silence_start, silence_end)
    # Measured: ' Thank' starts at 2.92 s, the silence ends at 2.94 s; the first sentence's '.' spans the silence.
    assert all(t.start < silence_start + 0.3 for t in timings[:thank]), seen
    assert silence_end - 0.5 < timings[thank].start < silence_end + 0.3, seen
    assert timings[-1].end <= length + 0.02, seen


def test_cli_prints_timings_and_names_bad_inputs(converted, gap_clip, tmp_path, capsys):
    whisper_dir, _ = converted
    path = gap_clip[0]
    assert align.main([str(whisper_dir), str(path), "--language", "en", "--json",
                       "--text", "Good morning everybody. Thank you very much."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(r["text"] for r in rows) == "Good morning everybody. Thank you very much."
    assert all(set(r) == {"token_id", "text", "start", "end"} for r in rows)

    assert align.main([str(whisper_dir), str(path), "--language", "xx", "--text", "hi"]) == 2
    assert "<|xx|>" in capsys.readouterr().err
    missing = tmp_path / "missing.wav"
    assert align.main([str(whisper_dir), str(missing), "--language", "en", "--text", "hi"]) == 2
    assert str(missing) in capsys.readouterr().err
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "generation_config.json").write_text("{}")
    assert align.main([str(headless), str(path), "--language", "en", "--text", "hi"]) == 2
    assert "no alignment_heads" in capsys.readouterr().err


def whisper_encoded(whisper_dir, path):
    """The clip at `path` through the Whisper family's encoder, as the training step encodes it (its own length)."""
    import torch

    from part.config import EncoderConfig
    from part.model.encoders import family_for

    family = family_for(EncoderConfig(pretrained=str(whisper_dir)))
    encoder = family.build(weights=True).eval()
    features, frames = family.features([load_audio(path)])
    with torch.no_grad():
        return family.encode(encoder, features, frames)


def test_frame_teacher_places_the_tokens_from_the_encoders_own_outputs(converted, gap_clip):
    """The in-step teacher of the frame loss: Whisper-base's decoder over the encoder outputs our Whisper family
    computes (variable length, no 30 s padding) puts ' Thank' at the silence's end, as `align` does, and makes
    one target per 80 ms adapter frame, the blank where no token is centred."""
    from transformers import WhisperTokenizer

    whisper_dir, _ = converted
    path, silence_start, silence_end, length = gap_clip
    states, state_lengths = whisper_encoded(whisper_dir, path)
    tokenizer = WhisperTokenizer.from_pretrained(whisper_dir)  # the stand-in LLM's text vocabulary is this one
    text = "Good morning everybody. Thank you very much."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blank = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    teacher = FrameTargetTeacher(whisper_dir, tokenizer)
    timings = teacher.aligner.align_encoded(states[0, : int(state_lengths[0])], ids, "en")
    assert [t.token_id for t in timings] == ids
    thank = next(t for t in timings if t.text.strip() == "Thank")
    assert silence_end - 0.5 < thank.start < silence_end + 0.3, (thank, silence_end)
    adapter_frames = (int(state_lengths[0]) + 3) // 4
    # special tokens (an end of text) have no timing: they are dropped, not placed
    (timed,) = teacher.timings(states, state_lengths.tolist(), [ids + [blank]], ["en"])
    assert [t.token_id for t in timed] == ids and timed == timings
    targets = frame_targets(timed, adapter_frames, 0.08, blank)
    assert len(targets) == adapter_frames
    placed = [t for t in targets if t != blank]
    assert placed == ids  # every token once, in order (the clip has frames to spare)
    thank_frame = targets.index(thank.token_id)
    assert abs(thank_frame * 0.08 - (thank.start + thank.end) / 2) <= 0.08
    # inside the silence: at most the first sentence's '.', whose span covers it (measured above)
    inside = [tokenizer.decode([t]) for t in targets[int(silence_start / 0.08) + 2 : int(silence_end / 0.08) - 2]
              if t != blank]
    assert inside in ([], ["."]), inside


def test_frame_teacher_needs_whisper_with_its_decoder_and_knows_a_shared_vocabulary(converted, tmp_path):
    import shutil

    from transformers import PreTrainedTokenizerFast

    whisper_dir, _ = converted
    assert alignment_heads_problem(whisper_dir) is None
    no_heads = tmp_path / "no_heads"
    shutil.copytree(whisper_dir, no_heads)
    generation = json.loads((no_heads / "generation_config.json").read_text())
    generation.pop("alignment_heads")
    (no_heads / "generation_config.json").write_text(json.dumps(generation))
    assert "alignment_heads" in alignment_heads_problem(no_heads)
    assert "config.json" in alignment_heads_problem(tmp_path)  # not a model directory
    # an LLM tokenizer that splits text otherwise: the timings are mapped onto its tokens
    other = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    assert not FrameTargetTeacher(whisper_dir, other).shared_vocabulary


def test_other_tokenizers_take_the_time_of_the_characters_they_cover(converted, gap_clip, tiny_models):
    """Tokenizer independence: an LLM tokenizer that splits text otherwise (the tiny LLM's) gets, for each
    of its tokens, the span of the Whisper tokens whose characters it covers; Whisper's own tokenizer, forced
    through the same mapping, gets exactly the timings of the shared-vocabulary path (the targets of an LLM that
    shares Whisper's vocabulary do not change)."""
    from transformers import WhisperTokenizer

    from part.model.tokenizer import load_tokenizer

    whisper_dir, _ = converted
    path, _, _, _ = gap_clip
    states, state_lengths = whisper_encoded(whisper_dir, path)
    text = "Good morning everybody. Thank you very much."
    whisper = WhisperTokenizer.from_pretrained(whisper_dir)
    teacher = FrameTargetTeacher(whisper_dir, whisper)
    ids = whisper(text, add_special_tokens=False)["input_ids"]
    (shared,) = teacher.timings(states, state_lengths.tolist(), [ids], ["en"])
    teacher.shared_vocabulary = False
    (mapped,) = teacher.timings(states, state_lengths.tolist(), [ids], ["en"])
    assert mapped == shared
    thank = next(t for t in shared if t.text.strip() == "Thank")

    # the tiny LLM's own sentencepiece tokenizer (not Whisper's): its tokens of "Thank" span Whisper's " Thank"
    llm = load_tokenizer(str(tiny_models / "llm"))
    llm_ids = llm(text, add_special_tokens=False)["input_ids"]
    llm_teacher = FrameTargetTeacher(whisper_dir, llm)
    assert not llm_teacher.shared_vocabulary
    (timed,) = llm_teacher.timings(states, state_lengths.tolist(), [llm_ids], ["en"])
    decoded, spans = token_char_spans(llm, llm_ids)
    assert decoded.strip() == text
    assert [t.token_id for t in timed] == [i for i, (a, b) in zip(llm_ids, spans) if decoded[a:b].strip()]
    at = decoded.index("Thank")
    inside = [t for t, (i, (a, b)) in zip(timed, [(i, sp) for i, sp in zip(llm_ids, spans) if decoded[sp[0]:sp[1]]
              .strip()]) if a >= at and b <= at + len("Thank") + 1 and decoded[a:b].strip()]
    assert inside and min(t.start for t in inside) == thank.start and max(t.end for t in inside) == thank.end
    assert all(t.start <= t.end for t in timed)
    assert [t.start for t in timed] == sorted(t.start for t in timed)  # in order, as the teacher's tokens


def test_char_span_mapping_by_hand():
    """map_timings on made-up spans: a token covering two teacher tokens spans both; whitespace-only tokens and
    tokens past the teacher's cut get none; partial characters (byte fallback) share their character's span."""
    timings = [TokenTiming(1, " ab", 0.0, 0.2), TokenTiming(2, "c", 0.2, 0.3), TokenTiming(3, " d", 0.5, 0.9)]
    text = " abc d e"
    teacher_spans = [(0, 3), (3, 4), (4, 6)]
    spans = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8)]  # " a", "bc", " ", "d", " e" (past the teacher's cut)
    out = map_timings(timings, teacher_spans, [10, 11, 12, 13, 14], spans, text, ["a", "bc", " ", "d", "e"])
    assert [(t.token_id, t.start, t.end) for t in out] == [(10, 0.0, 0.2), (11, 0.0, 0.3), (13, 0.5, 0.9)]

    class Bytes:  # a tokenizer whose tokens are UTF-8 bytes
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    decoded, char_spans = token_char_spans(Bytes(), list("a你".encode()))
    assert decoded == "a你" and char_spans == [(0, 1), (1, 2), (1, 2), (1, 2)]


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={chr(c): c for c in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer
