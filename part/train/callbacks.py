"""Hooks the trainer calls at fixed points of a step. Each default does nothing; tests install their own (fault
injection: `train.main(argv, callbacks=[...])`) instead of the production loop reading test switches."""

from __future__ import annotations

import torch


class TrainerCallback:
    def transform_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of 0-based global step `step`, before the ranks agree that it is finite."""
        return loss
