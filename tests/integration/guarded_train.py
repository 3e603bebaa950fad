"""Test-only entry point: train.py under the collective guard (tests/collective_guard.py) and the host-sync
guard (tests/sync_guard.py).

    deepspeed --num_gpus 2 tests/integration/guarded_train.py --config c.yaml [train.py args]

Every torch.distributed collective of the run (ours and DeepSpeed's) is checked against the rank's device, and
collectives from this repository's code must come through DistributedContext, so a CPU tensor that NCCL would
refuse fails the CPU tests too. Prints how many collectives were checked, for the tests to assert on, and the
most host synchronisations a training step made (by part's code, by each library, in all), with where part's
were asked for.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: train.py and part/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the collective guard

from collective_guard import CollectiveGuard  # noqa: E402
from sync_guard import SyncGuard  # noqa: E402

import train  # noqa: E402  (after the path set-up above)
from part.exit_codes import exit_process  # noqa: E402
from part.train.callbacks import TrainerCallback  # noqa: E402

GUARD_LINE = "collective guard: {calls} collectives checked on {device}"
SYNC_LINE = ("sync guard: {steps} steps ({per_step}), most per step: part {part}, all {all} ({owners}); "
             "part's: {where}; most asked (last step): {top}")


def rank_device() -> torch.device:
    """The device the trainer will use (DistributedContext.init picks the same one)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


def counting_steps(syncs: SyncGuard):
    """Installs a StageRun.train_step that counts each step's host synchronisations, the batch fetch excluded."""
    from part.train.stage import StageRun

    original = StageRun.train_step

    def train_step(self, step, lr, fetch=None, callbacks=()):
        source = fetch or self.next_batch

        def fetch_host_batch():
            with syncs.paused():
                batch = source()
            syncs.note_host(batch)
            return batch

        with syncs.step():
            record = original(self, step, lr, fetch_host_batch, callbacks)
        if syncs.per_step[-1]["part"] > worst_part[0]:
            worst_part[:] = [syncs.per_step[-1]["part"], sorted({w for o, _, w in syncs.events if o == "part"})]
        return record

    worst_part = [0, []]
    StageRun.train_step = train_step
    return worst_part


def guarded_main(argv: list[str], callbacks: Sequence[TrainerCallback] = ()) -> int:
    with CollectiveGuard(rank_device()) as guard, SyncGuard() as syncs:
        worst_part = counting_steps(syncs)
        code = train.main(argv, callbacks=callbacks)
    print(GUARD_LINE.format(calls=guard.calls, device=guard.device), flush=True)
    owners = ", ".join(f"{o} {max(c[o] for c in syncs.per_step)}"
                       for o in sorted({o for c in syncs.per_step for o in c}))
    print(SYNC_LINE.format(steps=len(syncs.per_step), per_step=" ".join(f"part {c['part']} all {sum(c.values())}"
                                                                       for c in syncs.per_step),
                           part=syncs.worst("part"), all=syncs.worst(),
                           owners=owners or "none", where=" ".join(worst_part[1]) or "none",
                           top=", ".join(f"{n} x {o} {op} at {w}" for (o, op, w), n in
                                         Counter(syncs.events).most_common(4)) or "none"), flush=True)
    return code


if __name__ == "__main__":
    exit_process(guarded_main(sys.argv[1:]))
