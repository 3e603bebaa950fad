"""The typed batch: what the collator (part/data/batching.py) makes and the model, the evaluator and the logger
read. This module imports no other module of the package, so the data pipeline and the model both depend on it
and not on each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StreamPosition:
    """Where a data worker was when it made a batch: enough to continue right after that batch."""

    worker: int  # global data-worker id: rank x workers + local worker
    window_state: dict  # the worker's state at the start of the batch's window (JSON: window, draws, cursors, ...)
    next_batch: int  # index, within that window, of the batch after this one
    mixed: dict[str, int]  # samples drawn so far per task/language(-target)
    skipped: dict[str, int]  # samples skipped so far per reason


@dataclass(frozen=True)
class SampleMeta:
    """What a sample in a batch is, next to its tensors: for scoring, logging and the benchmark."""

    key: str
    task: str
    language: str
    target_language: str | None
    reference: str  # the target text
    duration: float  # seconds of audio; 0 for text-only samples


@dataclass(frozen=True)
class SequenceLayout:
    """Where every position of the LLM's input comes from (part/packing.py builds it on the host). Flat positions
    count row by row: row x length + column."""

    token_ids: torch.Tensor  # [rows, length] the token at each position (a pad id at audio slots and padding)
    position_ids: torch.Tensor  # [rows, length] the position within its sample, from 0
    segments: torch.Tensor  # [rows, length] the sample's index within its row; -1 for padding
    audio_slots: torch.Tensor  # [A] flat positions the clips' frames go to
    audio_clips: torch.Tensor  # [A] the clip (row of the encoder's input) of each
    audio_frames: torch.Tensor  # [A] the frame within that clip
    scored: torch.Tensor  # [T] flat positions whose next token is a target token
    targets: torch.Tensor  # [T] those target tokens
    cu_seqlens: torch.Tensor  # [S + 1] int32 cumulative lengths of the samples and padding runs, over all rows
    max_seqlen: int  # the longest of those
    real_tokens: int  # positions that hold a sample (not padding)
    shared_rows: bool = True  # some row holds several samples (else each row is one sample from column 0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.token_ids.shape)

    @property
    def target_tokens(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str) -> SequenceLayout:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> SequenceLayout:
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> SequenceLayout:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True)
class Batch:
    """The model's input. Speech samples have a row of `input_features`; text-only ones have audio_index -1."""

    # The encoder family's features, padded to the longest clip: [clips, mel bins, frames] log-mel (Whisper),
    # [clips, samples] waveform (wav2vec2, HuBERT, WavLM), [clips, frames, 160] stacked fbank (w2v-BERT)
    input_features: torch.Tensor
    feature_frames: torch.Tensor  # [clips] valid time steps (frames or samples) per clip
    audio_index: torch.Tensor  # [samples] the sample's row of input_features, or -1
    prompt_ids: list[torch.Tensor]  # per sample; a speech prompt holds one audio placeholder token
    target_ids: list[torch.Tensor]  # per sample; ends with the end-of-turn token
    transcript_ids: list[torch.Tensor] = field(default_factory=list)  # per sample (empty: none), for the CTC loss
    meta: list[SampleMeta] = field(default_factory=list)
    position: StreamPosition | None = None  # training stream: where its worker was, for resume
    is_padding: bool = False  # evaluation filler that keeps ranks in lockstep; its outputs are dropped
    layout: SequenceLayout | None = None  # prompts + targets as the LLM reads them in training (part/packing.py)
    prompt_layout: SequenceLayout | None = None  # the prompts alone, one per row, left-aligned (generation)
    # Clips packed into fixed rows of input_features ([rows, mel bins, steps]; None: a row per clip): the clip of
    # each feature step ([rows, steps], -1: none) and each clip's (row, first step) ([clips, 2])
    audio_segments: torch.Tensor | None = None
    clip_places: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to(self, device: torch.device | str, features_dtype: torch.dtype | None = None) -> Batch:
        """The tensors on `device`; audio features in `features_dtype` (the model's compute dtype) when given."""
        return dataclasses.replace(
            self,
            input_features=self.input_features.to(device, features_dtype, non_blocking=True),
            feature_frames=self.feature_frames.to(device, non_blocking=True),
            audio_index=self.audio_index.to(device, non_blocking=True),
            prompt_ids=[t.to(device, non_blocking=True) for t in self.prompt_ids],
            target_ids=[t.to(device, non_blocking=True) for t in self.target_ids],
            transcript_ids=[t.to(device, non_blocking=True) for t in self.transcript_ids],
            layout=None if self.layout is None else self.layout.to(device),
            prompt_layout=None if self.prompt_layout is None else self.prompt_layout.to(device),
            audio_segments=None if self.audio_segments is None else self.audio_segments.to(device, non_blocking=True),
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True on CUDA machines) so host-to-device copies can overlap."""
        return dataclasses.replace(
            self,
            input_features=self.input_features.pin_memory(),
            feature_frames=self.feature_frames.pin_memory(),
            audio_index=self.audio_index.pin_memory(),
            prompt_ids=[t.pin_memory() for t in self.prompt_ids],
            target_ids=[t.pin_memory() for t in self.target_ids],
            transcript_ids=[t.pin_memory() for t in self.transcript_ids],
            layout=None if self.layout is None else self.layout.pin_memory(),
            prompt_layout=None if self.prompt_layout is None else self.prompt_layout.pin_memory(),
            audio_segments=None if self.audio_segments is None else self.audio_segments.pin_memory(),
        )

    @property
    def audio_seconds(self) -> float:
        return sum(m.duration for m in self.meta)
