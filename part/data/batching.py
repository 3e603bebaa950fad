"""Duration bucketing and the collator, which makes the typed Batch (part/batch.py) the model, the evaluator and
the logger read."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from part.batch import Batch, SampleMeta
from part.config import SPEECH_TASKS, DataConfig
from part.data.audio import AudioDecodeError, load_audio
from part.data.samples import Sample
from part.features import SAMPLE_RATE, audio_features
from part.packing import LayoutSpec, bucket_length, clip_rows, clip_span, first_fit, with_layouts


def bucket(samples: list[Sample], cfg: DataConfig, layout: LayoutSpec | None = None,
           steps_per_second: float = 100.0) -> list[list[Sample]]:
    """A window's samples cut into batches by `cfg.batching`: `sorted` (by audio, then text length, cut where a
    bound would be passed) or `fill` (`fill_batches`; `layout` gives each clip's LLM positions, from its feature
    steps at `steps_per_second`)."""
    if cfg.batching == "fill":
        return fill_batches(samples, cfg, layout, steps_per_second)
    order = sorted(samples, key=lambda s: (s.duration, len(s.prompt_ids) + len(s.target_ids)))
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    for s in order:
        trial = current + [s]
        longest_audio = max(x.duration for x in trial)
        longest_text = max(len(x.prompt_ids) + len(x.target_ids) for x in trial)
        fits = (
            len(trial) <= cfg.max_batch_size
            and longest_audio * len(trial) <= cfg.max_batch_seconds
            and longest_text * len(trial) <= cfg.max_batch_tokens
        )
        if current and not fits:
            batches.append(current)
            current = [s]
        else:
            current = trial
    if current:
        batches.append(current)
    return batches


@dataclass
class _Filling:
    """A batch being filled: its samples, LLM positions, speech clips, longest clip and its rows' used steps."""

    cfg: DataConfig
    row_steps: int  # 0: a row per clip
    samples: list[Sample] = field(default_factory=list)
    positions: int = 0
    clips: int = 0
    longest: float = 0.0
    rows: list[int] = field(default_factory=list)

    def row_for(self, steps: int) -> int | None:
        """The row a clip of `steps` would take (as `clip_rows` places it; None: no room and no row left)."""
        row = first_fit(self.rows, steps, self.row_steps)
        return row if row * self.cfg.audio_row_seconds < self.cfg.max_batch_seconds else None

    def takes(self, sample: Sample, steps: int, positions: int) -> bool:
        if len(self.samples) >= self.cfg.max_batch_size or self.positions + positions > self.cfg.max_batch_tokens:
            return False
        if sample.audio is None:
            return True
        if self.row_steps:
            return self.row_for(steps) is not None
        return max(self.longest, sample.duration) * (self.clips + 1) <= self.cfg.max_batch_seconds

    def add(self, sample: Sample, steps: int, positions: int, multiple: int) -> None:
        if sample.audio is not None:
            if self.row_steps:
                row = self.row_for(steps)
                if row == len(self.rows):
                    self.rows.append(0)
                self.rows[row] += clip_span(steps, multiple)
            self.clips += 1
            self.longest = max(self.longest, sample.duration)
        self.samples.append(sample)
        self.positions += positions


def fill_batches(samples: list[Sample], cfg: DataConfig, layout: LayoutSpec | None,
                 steps_per_second: float) -> list[list[Sample]]:
    """First-fit decreasing (longest clip first, each into the first batch it fits) into batches bounded by
    max_batch_size samples, max_batch_tokens LLM positions (prompt, target and the clip's positions) and
    max_batch_seconds of audio: the rows' seconds when clips are packed into rows of data.audio_row_seconds,
    else the longest clip times the clips. Most batches come out full, with the same shapes."""
    row_steps = round(cfg.audio_row_seconds * steps_per_second)
    multiple = layout.frames_per_clip.stride if layout is not None else 2
    batches: list[_Filling] = []
    for s in sorted(samples, key=lambda s: (-s.duration, -(len(s.prompt_ids) + len(s.target_ids)))):
        steps = int(s.duration * steps_per_second) + 1  # from the record (the decoded clip may differ by a step)
        positions = len(s.prompt_ids) + len(s.target_ids)
        if s.audio is not None and layout is not None:
            positions += layout.frames_per_clip(steps) - 1
        batch = next((b for b in batches if b.takes(s, steps, positions)), None)
        if batch is None:
            batch = _Filling(cfg, row_steps)
            batches.append(batch)
        batch.add(s, steps, positions, multiple)
    return [b.samples for b in batches]


MIN_SECONDS = 0.1  # shorter clips do not fill the encoders' front ends (a few 25 ms windows)


def collate(samples: list[Sample], feature_extractor, counters: Counter, max_duration: float = 30.0,
            layout: LayoutSpec | None = None, audio_multiple: float = 0.0,
            audio_row_seconds: float = 0.0) -> Batch | None:
    """Decodes audio and builds the tensors the model reads. Unreadable clips, and clips whose decoded length is
    over `max_duration` or under MIN_SECONDS (whatever their record says), are dropped, counted and named.
    `feature_extractor`: the model's `audio_features` (part.model.encoders.AudioFeatures; a bare transformers
    extractor works too), which alone computes the features and their valid lengths. `layout`: the model's
    `layout_spec`, with which the batch's sequence layouts are computed here, on the host (part/packing.py).
    `audio_multiple` (seconds, 0: none): the features are padded to a `bucket_length` of that multiple.
    `audio_row_seconds` (0: a row per clip): the clips are packed into rows of that length (`clip_rows`; needs
    `layout` and features with time last)."""
    features_of = audio_features(feature_extractor)
    waves, kept, seconds = [], [], []
    for s in samples:
        if s.audio is not None:
            try:
                wave = load_audio(s.audio, name=f"{s.shard}:{s.key}")
            except AudioDecodeError as exc:
                counters["unreadable_audio"] += 1
                print(f"warning: {exc}", file=sys.stderr, flush=True)
                continue
            length = len(wave) / SAMPLE_RATE
            if not MIN_SECONDS <= length <= max_duration:
                reason = "too_long" if length > max_duration else "too_short"
                counters[reason] += 1
                print(f"warning: {s.shard}:{s.key}: the clip is {length:.2f} s long (its record says "
                      f"{s.duration:g} s); skipped as {reason}", file=sys.stderr, flush=True)
                continue
            waves.append(wave)
            seconds.append(length)
        kept.append(s)
    if not kept:
        return None
    if waves:
        features, frames = features_of(waves)
    else:  # text-only batch: a short silent input keeps the audio path (and ZeRO-3 gathers) identical on all ranks
        features, frames = features_of([np.zeros(SAMPLE_RATE // 4, dtype=np.float32)])
    segments = places = None
    if audio_row_seconds > 0:
        row_steps = round(audio_row_seconds * features_of.steps_per_second)
        features, segments, places = packed_rows(features, frames, row_steps, layout.frames_per_clip.stride)
    elif audio_multiple > 0:
        multiple = max(1, round(audio_multiple * features_of.steps_per_second))
        steps = features.shape[features_of.time_axis]
        longest = max(steps, round(max_duration * features_of.steps_per_second))  # what the encoder takes
        features = features_of.pad_to(features, min(bucket_length(steps, multiple), longest))
    audio_index, durations, j = [], [], 0
    for s in kept:
        audio_index.append(j if s.audio is not None else -1)
        durations.append(seconds[j] if s.audio is not None else 0.0)  # measured, not the record's
        j += s.audio is not None
    batch = Batch(
        input_features=features,
        feature_frames=frames,
        audio_index=torch.tensor(audio_index),
        prompt_ids=[torch.tensor(s.prompt_ids) for s in kept],
        target_ids=[torch.tensor(s.target_ids) for s in kept],
        transcript_ids=[torch.tensor(s.transcript_ids, dtype=torch.long) for s in kept],
        meta=[SampleMeta(s.key, s.task, s.language, s.target_language, s.target, d) for s, d in zip(kept, durations)],
        audio_segments=segments,
        clip_places=places,
    )
    return batch if layout is None else with_layouts(batch, layout)


def packed_rows(features: torch.Tensor, frames: torch.Tensor, row_steps: int,
                multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[clips, bins, steps] features packed into [rows, bins, row_steps] by `clip_rows`; each step's clip
    ([rows, row_steps], -1: none) and each clip's (row, first step) ([clips, 2])."""
    steps = frames.tolist()
    places = clip_rows(steps, row_steps, multiple)
    rows = 1 + max(row for row, _ in places)
    packed = features.new_zeros(rows, features.shape[1], row_steps)
    segments = torch.full((rows, row_steps), -1, dtype=torch.long)
    for clip, ((row, first), n) in enumerate(zip(places, steps)):
        packed[row, :, first:first + n] = features[clip, :, :n]
        segments[row, first:first + n] = clip
    return packed, segments, torch.tensor(places, dtype=torch.long)


class HasTaskAndDuration(Protocol):
    task: str
    duration: float


def audio_stats(items: Iterable[HasTaskAndDuration]) -> tuple[float, float]:
    """(real audio seconds, padded audio seconds) of a batch's speech samples (Samples or SampleMetas): the
    padded length is the longest clip times their count."""
    durations = [x.duration for x in items if x.task in SPEECH_TASKS]
    if not durations:
        return 0.0, 0.0
    return sum(durations), max(durations) * len(durations)


def batch_audio_stats(batch: Batch) -> tuple[float, float]:
    """(real audio seconds, padded audio seconds) of a collated batch, for the padding-fraction figures."""
    return audio_stats(batch.meta)
