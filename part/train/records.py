"""The typed record one training step returns: what the logger, the trainer's cadence and the benchmark read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SUMMED = {"over_ranks": "sum"}  # a field the global batch's record sums over ranks; the others are rank 0's


@dataclass(frozen=True)
class StepRecord:
    step: int  # optimizer steps done once this one is (1-based: the step number logs and checkpoints use)
    lr: float
    loss_sum: float = field(metadata=SUMMED)  # summed token losses of the micro-batches that trained
    tokens: int = field(metadata=SUMMED)  # target tokens scored
    samples: int = field(metadata=SUMMED)
    audio_seconds: float = field(metadata=SUMMED)
    grad_norm: float | None  # None when the step was skipped
    step_time: float  # seconds, data wait included
    data_wait: float = field(metadata=SUMMED)  # seconds spent waiting for batches
    skipped: bool = False  # a non-finite loss on some rank: no update was made
    # positions through the LLM (prompt, audio frames, target; padding not counted), and with padding
    sequence_tokens: int = field(default=0, metadata=SUMMED)
    sequence_positions: int = field(default=0, metadata=SUMMED)
    # the clips' valid feature steps, and the steps the encoder ran (padding included)
    audio_steps: int = field(default=0, metadata=SUMMED)
    padded_audio_steps: int = field(default=0, metadata=SUMMED)
    # model operations of the step, forward and backward: on real positions (padding excluded), and all that ran
    flops: float = field(default=0.0, metadata=SUMMED)
    padded_flops: float = field(default=0.0, metadata=SUMMED)
    # bad or unusable samples the stage's stream has skipped so far (counted by reason)
    skipped_samples: int = field(default=0, metadata=SUMMED)
    peak_memory: int | None = None  # bytes allocated at most on the device during the stage so far (GPU only)
    stop_requests: int = field(default=0, metadata=SUMMED)  # ranks a stop signal has reached (the trainer sets it)
    # The objectives' losses by name (part/objectives), summed over the micro-batches that computed them, and
    # how many did: every rank holds the same names (the model's `loss_names`), so they sum over ranks by name.
    objective_sums: dict[str, float] = field(default_factory=dict, metadata=SUMMED)
    objective_batches: dict[str, int] = field(default_factory=dict, metadata=SUMMED)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def llm_padding(self) -> float:
        """The share of the LLM's positions that held no sample."""
        return 1 - self.sequence_tokens / self.sequence_positions if self.sequence_positions else 0.0

    @property
    def audio_padding(self) -> float:
        """The share of the encoder's input steps that held no audio."""
        return 1 - self.audio_steps / self.padded_audio_steps if self.padded_audio_steps else 0.0

    @property
    def objective_losses(self) -> dict[str, float]:
        """Each objective loss's mean over the micro-batches that computed it (the ones none did left out)."""
        return {name: total / self.objective_batches[name] for name, total in self.objective_sums.items()
                if self.objective_batches.get(name)}

    def summed_over_ranks(self, sum_values: Callable[[Sequence[float]], Sequence[float]]) -> StepRecord:
        """The global batch's record: every SUMMED figure through one `sum_values` (a collective summing a list of
        numbers over ranks, in order), the rest as this rank has them."""
        names = [f.name for f in dataclasses.fields(self) if f.metadata.get("over_ranks") == "sum"]
        flat: list[float] = []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, dict):
                flat.extend(value[k] for k in sorted(value))
            else:
                flat.append(value)
        totals = iter(sum_values(flat))
        summed = {}
        for name in names:
            value = getattr(self, name)
            if isinstance(value, dict):
                summed[name] = {k: type(value[k])(next(totals)) for k in sorted(value)}
            else:
                summed[name] = type(value)(next(totals))
        return dataclasses.replace(self, **summed)
