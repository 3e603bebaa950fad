"""The typed record one training step returns: what the logger, the trainer's cadence and the benchmark read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    step: int  # optimizer steps done once this one is (1-based: the step number logs and checkpoints use)
    lr: float
    loss_sum: float  # summed token losses of the micro-batches that trained
    tokens: int  # target tokens scored
    samples: int
    audio_seconds: float
    grad_norm: float | None  # None when the step was skipped
    step_time: float  # seconds, data wait included
    data_wait: float  # seconds spent waiting for batches
    skipped: bool = False  # a non-finite loss on some rank: no update was made
    ctc_sum: float = 0.0  # the auxiliary CTC loss (model.ctc_weight > 0), summed over micro-batches ...
    ctc_batches: int = 0  # ... and their number (0: no CTC term)
    frame_sum: float = 0.0  # the frame loss (model.frame_weight > 0), summed over micro-batches ...
    frame_batches: int = 0  # ... and their number (0: no frame term)
    sequence_tokens: int = 0  # positions through the LLM (prompt, audio frames, target; padding not counted)
    flops: float = 0.0  # model operations of the step, forward and backward (part/model/flops.py)
    skipped_samples: int = 0  # bad or unusable samples the stage's stream has skipped so far (counted by reason)
    peak_memory: int | None = None  # bytes allocated at most on the device during the stage so far (GPU only)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def ctc_loss(self) -> float | None:
        return self.ctc_sum / self.ctc_batches if self.ctc_batches else None

    @property
    def frame_loss(self) -> float | None:
        return self.frame_sum / self.frame_batches if self.frame_batches else None
