"""Test-only entry point: train.py (under the collective guard) with a callback that makes the loss of chosen
steps non-finite.

    deepspeed --num_gpus 2 tests/integration/nan_loss_train.py --nan-steps 1,3,4 --config c.yaml [train.py args]

Fault injection goes through the trainer's callback hook, installed here; the production loop reads no switch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: train.py and part/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # guarded_train

from guarded_train import guarded_main  # noqa: E402  (after the path set-up above)

from part.exit_codes import exit_process  # noqa: E402
from part.train.callbacks import TrainerCallback  # noqa: E402


class NonFiniteLossAt(TrainerCallback):
    def __init__(self, steps: set[int]):
        self.steps = steps

    def transform_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.steps else loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nan-steps", required=True, help="0-based global steps whose loss becomes NaN, e.g. 1,3,4")
    ours, rest = parser.parse_known_args()
    steps = {int(s) for s in ours.nan_steps.split(",") if s}
    exit_process(guarded_main(rest, callbacks=[NonFiniteLossAt(steps)]))
