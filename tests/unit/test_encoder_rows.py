"""Whisper encoding of clips packed into fixed rows (part.model.encoders.WhisperFamily.encode_rows): every clip's
frames equal its encoding alone, whatever shares its row."""

from __future__ import annotations

import pytest
import torch
from tiny_encoders import build_tiny_encoder

from part.model.encoders import clip_rows, encoder_family


def test_clip_rows_places_clips_at_even_offsets_with_a_gap():
    placed = clip_rows([37, 120, 8, 64, 201, 300], 300)
    assert placed[5] == (0, 0)  # the longest first; it fills its row (its empty step falls past the row's end)
    rows: dict[int, list[tuple[int, int]]] = {}
    for (row, offset), n in zip(placed, [37, 120, 8, 64, 201, 300]):
        assert offset % 2 == 0
        rows.setdefault(row, []).append((offset, n))
    for clips in rows.values():
        clips.sort()
        for (a, n), (b, _) in zip(clips, clips[1:]):
            assert b >= a + n + 1  # at least one empty step between clips
        assert clips[-1][0] + clips[-1][1] <= 300
    assert len(rows) == 3  # 300 | 201 + 64 (+ 8) | 120 + 37 ... first-fit decreasing
    with pytest.raises(ValueError, match="does not fit a row of 300"):
        clip_rows([301], 300)


def test_packed_rows_encode_each_clip_as_alone(tmp_path):
    family = encoder_family(build_tiny_encoder("whisper", tmp_path / "whisper"))
    enc = family.build().eval()
    steps = [37, 120, 8, 64, 201, 299, 2]
    row_steps = 300
    torch.manual_seed(0)
    clips = [torch.randn(80, n) for n in steps]
    placed = clip_rows(steps, row_steps)
    rows = 1 + max(r for r, _ in placed)
    features = torch.randn(rows, 80, row_steps)  # what lies outside the clips is masked, whatever it holds
    segments = torch.full((rows, row_steps), -1)
    for i, ((row, offset), clip) in enumerate(zip(placed, clips)):
        features[row, :, offset:offset + clip.shape[1]] = clip
        segments[row, offset:offset + clip.shape[1]] = i
    with torch.no_grad():
        frames, clip_of = family.encode_rows(enc, features, segments)
        assert frames.shape[:2] == clip_of.shape == (rows, row_steps // 2)
        for i, clip in enumerate(clips):
            alone, lengths = family.encode(enc, clip[None], torch.tensor([clip.shape[1]]))
            packed = frames[clip_of == i]  # row-major: the clip's frames in order
            assert packed.shape[0] == int(lengths[0]) == family.output_lengths(steps[i])
            torch.testing.assert_close(packed, alone[0, : int(lengths[0])], rtol=1e-5, atol=1e-5)
        assert (frames[clip_of < 0] == 0).all()
