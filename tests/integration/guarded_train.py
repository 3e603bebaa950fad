"""Test-only entry point: train.py under the collective guard (tests/collective_guard.py).

    deepspeed --num_gpus 2 tests/integration/guarded_train.py --config c.yaml [train.py args]

Every torch.distributed collective of the run (ours and DeepSpeed's) is checked against the rank's device, and
collectives from this repository's code must come through DistributedContext, so a CPU tensor that NCCL would
refuse fails the CPU tests too. Prints how many collectives were checked, for the tests to assert on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: train.py and part/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the collective guard

from collective_guard import CollectiveGuard  # noqa: E402

import train  # noqa: E402  (after the path set-up above)
from part.exit_codes import exit_process  # noqa: E402
from part.train.callbacks import TrainerCallback  # noqa: E402

GUARD_LINE = "collective guard: {calls} collectives checked on {device}"


def rank_device() -> torch.device:
    """The device the trainer will use (DistributedContext.init picks the same one)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


def guarded_main(argv: list[str], callbacks: Sequence[TrainerCallback] = ()) -> int:
    with CollectiveGuard(rank_device()) as guard:
        code = train.main(argv, callbacks=callbacks)
    print(GUARD_LINE.format(calls=guard.calls, device=guard.device), flush=True)
    return code


if __name__ == "__main__":
    exit_process(guarded_main(sys.argv[1:]))
