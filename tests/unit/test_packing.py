"""The host-side sequence layout (part/packing.py): row lengths, packing, and the index tensors the model reads."""

from __future__ import annotations

import random

import torch

from part.packing import ClipPositions, LayoutSpec, bucket_length, layout_sequences

AUDIO, PAD = 7, 0
SPEC = LayoutSpec(AUDIO, PAD, ClipPositions(((3, 1, 1), (3, 2, 1)), 4), packed=True, length_multiple=1)


def test_bucket_length_pads_little_and_takes_few_values():
    lengths = range(1, 20000)
    buckets = [bucket_length(n, 16) for n in lengths]
    assert all(b >= n and b % 16 == 0 for n, b in zip(lengths, buckets))
    assert max((b - n) / n for n, b in zip(lengths, buckets) if n > 512) <= 1 / 32 + 1e-9
    for low in (1024, 2048, 4096, 8192):  # at most 32 lengths per doubling
        assert len({bucket_length(n, 16) for n in range(low + 1, 2 * low + 1)}) <= 32
    assert [bucket_length(n, 1) for n in (1, 73, 5000)] == [1, 73, 5000]  # a multiple of 1 rounds nothing


def test_clip_positions_follow_the_encoder_and_the_adapter():
    # 300 mel frames -> 150 encoder frames (stride 2) -> ceil(150 / 4) = 38 adapter frames
    assert [SPEC.frames_per_clip(n) for n in (300, 180, 1)] == [38, 23, 1]


def test_a_packed_layout_places_every_token_frame_and_target():
    prompts = [[1, AUDIO, 2], [3, 4], [5, AUDIO]]
    targets = [[10, 11], [12], [13]]
    layout = layout_sequences(prompts, targets, [0, -1, 1], [16, 8], SPEC)  # clips of 2 and 1 adapter frames
    lengths = [2 + 2 + 2, 2 + 1, 1 + 1 + 1]  # prompt - slot + frames + target
    assert layout.real_tokens == sum(lengths) and layout.shared_rows
    rows, width = layout.shape
    assert rows == 2 and width == 6  # capacity 6: [sample 0] and [samples 1 + 2]
    flat_tokens, flat_segments = layout.token_ids.flatten().tolist(), layout.segments.flatten().tolist()
    assert flat_tokens[:6] == [1, PAD, PAD, 2, 10, 11] and flat_segments[:6] == [0] * 6
    # the audio slots hold clip 0's frames 0-1, then clip 1's frame 0, each where its sample's placeholder was
    assert [flat_tokens[s] for s in layout.audio_slots.tolist()] == [PAD] * 3
    assert list(zip(layout.audio_clips.tolist(), layout.audio_frames.tolist())) == [(0, 0), (0, 1), (1, 0)]
    assert torch.equal(layout.token_ids.flatten()[layout.scored + 1], layout.targets)
    assert sorted(layout.targets.tolist()) == sorted(t for ts in targets for t in ts)
    # positions restart at every sample; the varlen lengths list every sample (and padding run) in row order
    assert layout.position_ids[1].tolist() == [0, 1, 2, 0, 1, 2]
    assert layout.cu_seqlens.tolist() == [0, 6, 9, 12] and layout.max_seqlen == 6


def test_left_aligned_prompts_end_at_the_last_column():
    layout = layout_sequences([[1, AUDIO], [3, 4, 5, 6]], [[], []], [0, -1], [16], SPEC, left_aligned=True)
    assert layout.shape == (2, 4) and not layout.shared_rows
    assert layout.segments.tolist() == [[-1, 0, 0, 0], [0, 0, 0, 0]]
    assert layout.token_ids[0].tolist() == [PAD, 1, PAD, PAD] and layout.audio_slots.tolist() == [2, 3]


def test_packed_rows_spread_evenly_instead_of_leaving_a_nearly_empty_row():
    rng = random.Random(0)
    prompts = [[1] * rng.randint(200, 260) for _ in range(32)]
    spec = LayoutSpec(AUDIO, PAD, SPEC.frames_per_clip, packed=True, length_multiple=16, row_tokens=1024)
    layout = layout_sequences(prompts, [[2]] * 32, [-1] * 32, [], spec)
    rows, width = layout.shape
    assert rows == -(-layout.real_tokens // 1024) and 1 - layout.real_tokens / (rows * width) < 0.03


def test_a_speech_prompt_without_exactly_one_placeholder_is_refused():
    import pytest

    with pytest.raises(ValueError, match="sample 0: a speech prompt must hold exactly one audio placeholder"):
        layout_sequences([[1, 2]], [[3]], [0], [16], SPEC)
