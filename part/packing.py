"""Where each position of the LLM's input comes from, decided on the host before a batch reaches the device.

A batch's samples are token sequences with one audio slot (speech) or none (text): [prompt with the slot] +
[target]. `layout_sequences` lays them out in rows -- packed (several samples per row, each attending only to
itself) or one per row -- and lists, as index tensors, what the model needs to build the input embeddings and
score the targets with a few gathers and scatters: no per-sample Python, no reads of device tensors, no shapes
that depend on device values. Row lengths are rounded up to few lengths (`bucket_length`), so the shapes a run
sees stay few.

This module imports only part.batch: the data pipeline (the collator) and the model both use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from part.batch import Batch, SequenceLayout


@dataclass(frozen=True)
class ClipPositions:
    """The LLM positions a clip's frames take, from its valid feature steps: the encoder's convolutions, then the
    adapter's ceil-division by its stride (at least one frame)."""

    convs: tuple[tuple[int, int, int], ...]  # (kernel, stride, padding) from feature steps to encoder frames
    downsample: int  # the adapter's stride

    def __call__(self, steps: int) -> int:
        for kernel, stride, padding in self.convs:
            steps = (steps + 2 * padding - kernel) // stride + 1
        return max(1, -(-steps // self.downsample))

    @property
    def stride(self) -> int:
        """Feature steps per LLM position."""
        total = self.downsample
        for _, stride, _ in self.convs:
            total *= stride
        return total


@dataclass(frozen=True)
class LayoutSpec:
    """How a model lays out its input: the model's `layout_spec` makes one, the collator applies it."""

    audio_token_id: int  # the placeholder the clip's frames replace
    pad_token_id: int  # the token at padding and audio positions (its embedding is overwritten or masked)
    frames_per_clip: ClipPositions
    packed: bool = True  # several samples per row (else one sample per row)
    length_multiple: int = 16  # rows are padded to a bucket_length with this multiple
    row_tokens: int = 0  # packed rows hold at least this many positions (0: the longest sample, rounded)


LENGTHS_PER_DOUBLING = 32  # bucket_length's resolution: rounding adds at most 1/32 of a length


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def bucket_length(n: int, multiple: int) -> int:
    """`n` rounded up to one of few lengths: a multiple of `multiple`, and of 1/32 of the power of two below `n`.
    Padding from the rounding stays under ~3% (beyond the first multiple), and a run sees at most 32 lengths per
    doubling. A multiple of 1 rounds nothing."""
    if multiple <= 1:
        return n
    if n <= multiple:
        return round_up(n, multiple)
    step = max(multiple, (1 << (n.bit_length() - 1)) // LENGTHS_PER_DOUBLING)
    return round_up(n, round_up(step, multiple))


def first_fit(fill: list[int], size: int, capacity: int) -> int:
    """The first of the rows (`fill`: what each holds) with room for `size` more within `capacity`; len(fill): none,
    a new row."""
    return next((r for r, used in enumerate(fill) if used + size <= capacity), len(fill))


def _rows(lengths: list[int], capacity: int, packed: bool) -> list[list[int]]:
    """Sample indices per row: one sample per row, or (packed) the fewest rows of at most `capacity` positions
    over which the samples, longest first each into the emptiest row, spread evenly (every row is padded to the
    fullest, so a nearly empty last row would be mostly padding); first-fit's rows where no even spread fits in
    fewer."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fitted: list[list[int]] = []
    fill: list[int] = []
    for i in order:  # longest first, each into the first row it fits
        r = first_fit(fill, lengths[i], capacity)
        if r == len(fill):
            fitted.append([])
            fill.append(0)
        fitted[r].append(i)
        fill[r] += lengths[i]
    rows = fitted
    for n_rows in range(max(1, -(-sum(lengths) // capacity)), len(fitted) + 1):
        even: list[list[int]] = [[] for _ in range(n_rows)]
        fill = [0] * n_rows
        for i in order:  # longest first, each into the emptiest row
            r = min(range(n_rows), key=lambda r: (fill[r], r))
            even[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= capacity:
            rows = even
            break
    return sorted(sorted(r) for r in rows)  # batch order inside a row, rows by their first sample


def clip_span(steps: int, multiple: int) -> int:
    """The steps a clip of `steps` takes in its row: itself and an empty step, up to the next multiple."""
    return round_up(steps + 1, multiple)


def clip_rows(steps: list[int], row_steps: int, multiple: int = 2) -> list[tuple[int, int]]:
    """(row, offset) of each clip of `steps` feature steps packed into rows of `row_steps`: first-fit decreasing,
    each clip at an offset that is a multiple of `multiple` (`ClipPositions.stride`: the encoder's convolutions and
    the adapter's windows then read each clip as alone), with at least one empty step after it."""
    fill: list[int] = []
    placed: list[tuple[int, int]] = [(0, 0)] * len(steps)
    for i in sorted(range(len(steps)), key=lambda i: (-steps[i], i)):
        if steps[i] > row_steps:
            raise ValueError(f"a clip of {steps[i]} steps does not fit a row of {row_steps}")
        row = first_fit(fill, steps[i], row_steps)
        if row == len(fill):
            fill.append(0)
        placed[i] = (row, fill[row])
        fill[row] += clip_span(steps[i], multiple)
    return placed


def layout_sequences(prompts: list[list[int]], targets: list[list[int]], audio_index: list[int],
                     feature_frames: list[int], spec: LayoutSpec, left_aligned: bool = False,
                     clip_places: list[tuple[int, int]] | None = None) -> SequenceLayout:
    """The layout of samples [prompt] + [target] (lists of token ids), sample i's audio slot filled with the frames
    of clip `audio_index[i]` (-1: a text sample; its prompt keeps any placeholder as a token). `feature_frames`:
    valid feature steps per clip. `left_aligned` (generation, one sample per row): padding before each sample.
    `clip_places`: each clip's (row, first feature step) where the clips are packed into rows (None: a row per
    clip); the slot then reads the clip's frames from its row."""
    clip_positions = [spec.frames_per_clip(int(f)) for f in feature_frames]
    sequences, sources = [], []  # per sample: token ids (slot kept as one entry) and (clip, frames) of the slot
    for i, (prompt, target, j) in enumerate(zip(prompts, targets, audio_index)):
        slot = None
        if j >= 0:
            found = [p for p, t in enumerate(prompt) if t == spec.audio_token_id]
            if len(found) != 1:
                raise ValueError(f"sample {i}: a speech prompt must hold exactly one audio placeholder "
                                 f"(token {spec.audio_token_id}); it holds {len(found)}")
            slot = (found[0], j, clip_positions[j])
        sequences.append((list(prompt), list(target)))
        sources.append(slot)
    lengths = [len(p) + len(t) + (s[2] - 1 if s else 0) for (p, t), s in zip(sequences, sources)]
    packed = spec.packed and not left_aligned
    capacity = bucket_length(max(max(lengths), spec.row_tokens if packed else 0), spec.length_multiple)
    rows = _rows(lengths, capacity, packed)
    width = bucket_length(max(sum(lengths[i] for i in row) for row in rows), spec.length_multiple)

    n_rows = len(rows)
    token_ids = torch.full((n_rows, width), spec.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.full((n_rows, width), -1, dtype=torch.long)
    slots, clips, frames, scored, scored_targets, seq_lens = [], [], [], [], [], []
    for r, row in enumerate(rows):
        start = width - lengths[row[0]] if left_aligned else 0
        for k, i in enumerate(row):
            (prompt, target), slot, n = sequences[i], sources[i], lengths[i]
            if slot is None:
                ids = prompt + target
            else:
                p, j, m = slot
                ids = prompt[:p] + [spec.pad_token_id] * m + prompt[p + 1:] + target
                base = r * width + start + p
                slots.extend(range(base, base + m))
                if clip_places is None:
                    clips.extend([j] * m)
                    frames.extend(range(m))
                else:  # the clip's frames in its row: its first step is a multiple of the stride
                    row, first = clip_places[j]
                    offset = first // spec.frames_per_clip.stride
                    clips.extend([row] * m)
                    frames.extend(range(offset, offset + m))
            token_ids[r, start:start + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = k
            # position q predicts the token at q + 1: the positions before each target token
            first_target = r * width + start + n - len(target)
            scored.extend(range(first_target - 1, first_target - 1 + len(target)))
            scored_targets.extend(target)
            seq_lens.append(n)
            start += n
        if not left_aligned and start < width:
            position_ids[r, start:] = torch.arange(width - start)
            seq_lens.append(width - start)  # the row's padding, as a sequence of its own (varlen attention)
    if left_aligned:  # the padding before each row's sample: a sequence of its own, listed first in its row
        seq_lens = [x for r, row in enumerate(rows) for x in ((width - lengths[row[0]],) if lengths[row[0]] < width
                                                              else ()) + (lengths[row[0]],)]
    cumulative = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cumulative[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    return SequenceLayout(
        token_ids=token_ids, position_ids=position_ids, segments=segments,
        audio_slots=torch.tensor(slots, dtype=torch.long), audio_clips=torch.tensor(clips, dtype=torch.long),
        audio_frames=torch.tensor(frames, dtype=torch.long), scored=torch.tensor(scored, dtype=torch.long),
        targets=torch.tensor(scored_targets, dtype=torch.long), cu_seqlens=cumulative,
        max_seqlen=max(seq_lens), real_tokens=sum(lengths), shared_rows=any(len(row) > 1 for row in rows),
    )


def layout_batch(prompt_ids, target_ids, audio_index: torch.Tensor, feature_frames: torch.Tensor, spec: LayoutSpec,
                 left_aligned: bool = False, clip_places: torch.Tensor | None = None) -> SequenceLayout:
    """`layout_sequences` of a batch's host tensors."""
    return layout_sequences([p.tolist() for p in prompt_ids], [t.tolist() for t in target_ids],
                            audio_index.tolist(), feature_frames.tolist(), spec, left_aligned,
                            None if clip_places is None else [tuple(p) for p in clip_places.tolist()])


def with_layouts(batch: Batch, spec: LayoutSpec) -> Batch:
    """`batch` (on the host) with its training layout and its prompts' generation layout."""
    layout = layout_batch(batch.prompt_ids, batch.target_ids, batch.audio_index, batch.feature_frames, spec,
                          clip_places=batch.clip_places)
    prompts = layout_batch(batch.prompt_ids, [t[:0] for t in batch.target_ids], batch.audio_index,
                           batch.feature_frames, spec, left_aligned=True, clip_places=batch.clip_places)
    return dataclasses.replace(batch, layout=layout, prompt_layout=prompts)
