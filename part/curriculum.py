"""The PART curriculum controller: a pure object, global step in, stage (and its learning rate) out. Training
follows it; the comparison reads a run's stage boundaries from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from part.config import StageConfig


@dataclass(frozen=True)
class StageSpan:
    index: int
    stage: StageConfig
    start: int  # first global step of the stage
    end: int  # one past its last step

    @property
    def name(self) -> str:
        return self.stage.name


class Curriculum:
    def __init__(self, stages: list[StageConfig]):
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        self.spans: list[StageSpan] = []
        start = 0
        for i, stage in enumerate(stages):
            self.spans.append(StageSpan(i, stage, start, start + stage.steps))
            start += stage.steps
        self.total_steps = start

    def trained_through(self, index: int) -> list[str]:
        """Every trainable group of stage `index` and the stages before it, each once, in order."""
        return list(dict.fromkeys(group for span in self.spans[: index + 1] for group in span.stage.trainable))

    def at(self, step: int) -> StageSpan:
        """The stage that trains global step `step` (0-based). Steps past the end map to the last stage."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for span in self.spans:
            if step < span.end:
                return span
        return self.spans[-1]

    def is_boundary(self, step: int) -> bool:
        """True when `step` is the first step of a stage other than the first."""
        return any(span.start == step for span in self.spans[1:])

    def lr(self, step: int) -> float:
        """Linear warmup to the stage's lr, then cosine decay to lr x min_lr_ratio at the stage's end."""
        span = self.at(step)
        s = span.stage
        local = step - span.start
        if local < s.warmup_steps:
            return s.lr * (local + 1) / (s.warmup_steps + 1)
        decay_steps = max(1, span.end - span.start - s.warmup_steps)
        progress = min(1.0, (local - s.warmup_steps) / decay_steps)
        floor = s.lr * s.min_lr_ratio
        return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
