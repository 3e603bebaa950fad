"""Test-only entry point: train.py (under the collective guard) where a DataLoader worker of one rank raises at
its Nth sample, as a bug in the data code would.

    deepspeed --num_gpus 2 tests/integration/worker_fault_train.py --fail-rank 1 --fail-sample 20 --config c.yaml ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.utils.data import get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: train.py and part/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # guarded_train

from guarded_train import guarded_main  # noqa: E402  (after the path set-up above)

from part.data import stream  # noqa: E402
from part.exit_codes import exit_process  # noqa: E402


def failing_in_worker(rank: int, at: int):
    original, made = stream.make_sample, [0]

    def make_sample(*args, **kwargs):
        if get_worker_info() is not None and int(os.environ.get("RANK", 0)) == rank:
            made[0] += 1
            if made[0] == at:
                raise RuntimeError(f"injected: the data code failed at sample {at}")
        return original(*args, **kwargs)

    return make_sample


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fail-rank", type=int, required=True, help="the rank whose loader worker fails")
    parser.add_argument("--fail-sample", type=int, required=True, help="1-based sample of that worker that fails")
    ours, rest = parser.parse_known_args()
    stream.make_sample = failing_in_worker(ours.fail_rank, ours.fail_sample)
    exit_process(guarded_main(rest))
