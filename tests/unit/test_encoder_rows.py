"""Clips packed into fixed encoder rows (data.audio_row_seconds) and batches filled to their bounds (data.batching
fill): the placement, the Whisper encoder and the adapter over rows (every clip's frames equal its encoding alone,
whatever shares its row), the whole model's loss and gradients, the filled batches' bounds, the training stream."""

from __future__ import annotations

import pytest
import torch
from tiny_encoders import build_tiny_encoder

from part.model.encoders import encoder_family
from part.packing import clip_rows


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


def test_the_adapter_over_packed_rows_reads_each_clip_as_alone(tmp_path):
    from part.config import AdapterConfig
    from part.model.adapter import Adapter

    torch.manual_seed(0)
    adapter = Adapter(AdapterConfig(hidden=32, layers=2, heads=4, downsample=4), 16, 24).eval()
    frames = [37, 120, 8, 64, 3, 149, 1]  # encoder frames per clip
    row_frames = 150
    placed = clip_rows([2 * f for f in frames], 2 * row_frames, multiple=2 * adapter.downsample)
    rows = 1 + max(r for r, _ in placed)
    x = torch.randn(rows, row_frames, 16)
    clip_of = torch.full((rows, row_frames), -1)
    clips = [torch.randn(f, 16) for f in frames]
    for i, ((row, offset), clip) in enumerate(zip(placed, clips)):
        start = offset // 2
        assert start % adapter.downsample == 0
        x[row, start:start + len(clip)] = clip
        clip_of[row, start:start + len(clip)] = i
    x = x * (clip_of >= 0)[..., None]  # the encoder's outputs are zero between clips
    with torch.no_grad():
        out, out_clip = adapter.forward_rows(x, clip_of)
        assert out.shape[:2] == out_clip.shape == (rows, -(-row_frames // 4))
        for i, clip in enumerate(clips):
            alone, lengths = adapter(clip[None], torch.tensor([len(clip)]))
            packed = out[out_clip == i]
            assert packed.shape[0] == int(lengths[0])
            torch.testing.assert_close(packed, alone[0], rtol=1e-5, atol=1e-5)


def test_the_model_reads_packed_rows_as_a_row_per_clip(tiny_models):
    """The whole training forward and backward: clips packed into rows of 6 s give the loss and the gradients of a
    row per clip (fp32)."""
    import dataclasses

    from test_model import make_batch, tiny_speech_llm

    from part.data.batching import packed_rows
    from part.packing import with_layouts

    model, tok = tiny_speech_llm(tiny_models)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = make_batch(tok, frames=(300, 181, 120, 57, 299), text_only=True)
    spec = model.layout_spec()
    features, segments, places = packed_rows(batch.input_features, batch.feature_frames, 600,
                                             spec.frames_per_clip.stride)
    assert features.shape == (2, 80, 600) and places[:, 1].remainder(8).eq(0).all()
    packed = dataclasses.replace(batch, input_features=features, audio_segments=segments, clip_places=places)
    results = []
    for laid in (with_layouts(batch, spec), with_layouts(packed, spec)):
        model.zero_grad()
        out = model(laid)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), out["tokens"], grads))
    (loss, tokens, grads), (packed_loss, packed_tokens, packed_grads) = results
    assert packed_tokens == tokens and len(grads) > 50 and packed_grads.keys() == grads.keys()
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fill_batches_keep_every_bound_and_come_out_full():
    import random

    from part.config import DataConfig
    from part.data.batching import bucket
    from part.data.samples import Sample
    from part.packing import ClipPositions, LayoutSpec

    rng = random.Random(0)
    spec = LayoutSpec(audio_token_id=5, pad_token_id=0, frames_per_clip=ClipPositions(((3, 1, 1), (3, 2, 1)), 4))
    samples = [Sample("asr" if i % 10 else "text", "en", None, str(i), "s", "p", "t", rng.uniform(1, 20) if i % 10
                      else 0.0, b"flac" if i % 10 else None, prompt_ids=[1] * rng.randint(5, 20),
                      target_ids=[1] * rng.randint(3, 60)) for i in range(600)]
    cfg = DataConfig(train_shards="x", max_batch_seconds=120, max_batch_tokens=2048, max_batch_size=400, window=600,
                     audio_row_seconds=30, batching="fill")
    batches = bucket(samples, cfg, spec, 100)
    assert sorted(s.key for b in batches for s in b) == sorted(s.key for s in samples)  # each sample once

    def steps(s):
        return int(s.duration * 100) + 1

    def positions(s):
        return len(s.prompt_ids) + len(s.target_ids) + (spec.frames_per_clip(steps(s)) - 1 if s.audio else 0)

    rows_used, audio = 0, 0
    for b in batches:
        assert len(b) <= 400 and sum(positions(s) for s in b) <= 2048
        clips = [steps(s) for s in b if s.audio]
        rows = 1 + max(r for r, _ in clip_rows(clips, 3000, spec.frames_per_clip.stride)) if clips else 0
        assert rows <= 4  # 120 s of 30-s rows, as the collator will place the clips
        rows_used += rows
        audio += sum(clips)
    # full batches: few rows left empty; fewer batches than cut from the sorted window
    assert audio / (rows_used * 3000) > 0.93
    sorted_batches = bucket(samples, DataConfig(train_shards="x", max_batch_seconds=120, max_batch_tokens=2048,
                                                max_batch_size=400, window=600))
    assert len(batches) < len(sorted_batches)


def test_the_stream_fills_batches_of_30_s_rows(corpus, tiny_models):
    """Through the training stream on the fixture corpus: every batch's encoder input is [rows, mel bins, 3000]
    with at most max_batch_seconds / 30 rows, and the model trains on it."""
    from test_model import tiny_speech_llm

    from part.config import DataConfig, StageConfig
    from part.data.stream import MixtureStream

    model, tok = tiny_speech_llm(tiny_models)
    data = DataConfig(train_shards=f"{corpus}/train/{{lang}}-*.tar", languages=["en", "de"], num_workers=0,
                      window=64, max_batch_seconds=60, max_batch_tokens=4096, max_batch_size=64, max_duration=30,
                      audio_row_seconds=30, batching="fill")
    stream = iter(MixtureStream(data, StageConfig(name="asr", steps=1, tasks={"asr": 1.0}), tok,
                                model.audio_features, rank=0, world_size=1, layout=model.layout_spec()))
    for _ in range(3):
        batch = next(stream)
        rows, _, steps = batch.input_features.shape
        assert steps == 3000 and 1 <= rows <= 2 and batch.audio_segments.shape == (rows, 3000)
        assert sorted(set(batch.audio_segments.unique().tolist()) - {-1}) == list(range(len(batch.feature_frames)))
        out = model(batch)
        assert torch.isfinite(out["loss"]) and out["tokens"] > 0
