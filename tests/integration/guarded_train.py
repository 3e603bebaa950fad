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


def counting_steps(syncs: SyncGuard) -> None:
    """Counts each training step's host synchronisations as the trainer runs the step: from the top of its loop
    (`StepProfiler.before_step`) to the top of the next or the end of the stage, the step, the reductions over
    ranks and the log included; the batch fetch, checkpoints and evaluations left out. Every rank's device is the
    guard's pretend device, so that moves to it make device data (tests/sync_guard.py)."""
    from part.evaluation.evaluator import Evaluator
    from part.train.distributed import DistributedContext
    from part.train.profiling import StepProfiler
    from part.train.stage import StageRun
    from part.train.trainer import Trainer

    init = DistributedContext.init.__func__

    def init_on_pretend_device(cls, device=None, **kwargs):
        return init(cls, device or syncs.device, **kwargs)

    before_step, train_until, train_step = StepProfiler.before_step, Trainer._train_until, StageRun.train_step

    def opening_before_step(self, done):
        syncs.open()
        return before_step(self, done)

    def closing_train_until(self, stage, end):
        try:
            return train_until(self, stage, end)
        finally:
            syncs.close()

    def fetching_host_batches(self, step, lr, fetch=None, callbacks=()):
        source = fetch or self.next_batch

        def fetch_host_batch():
            with syncs.paused():
                batch = source()
            syncs.note_host(batch)
            return batch

        return train_step(self, step, lr, fetch_host_batch, callbacks)

    def paused(method):
        def call(*args, **kwargs):
            with syncs.paused():
                return method(*args, **kwargs)
        return call

    DistributedContext.init = classmethod(init_on_pretend_device)
    StepProfiler.before_step, Trainer._train_until = opening_before_step, closing_train_until
    StageRun.train_step = fetching_host_batches
    Trainer._save_checkpoint = paused(Trainer._save_checkpoint)
    StageRun.decoding_model, Evaluator.run = paused(StageRun.decoding_model), paused(Evaluator.run)


def guarded_main(argv: list[str], callbacks: Sequence[TrainerCallback] = ()) -> int:
    with CollectiveGuard(rank_device()) as guard, SyncGuard() as syncs:
        counting_steps(syncs)
        code = train.main(argv, callbacks=callbacks)
    print(GUARD_LINE.format(calls=guard.calls, device=guard.device), flush=True)
    worst = max(range(len(syncs.per_step)), key=lambda i: syncs.per_step[i]["part"], default=None)
    where = sorted({w for o, _, w in syncs.step_events[worst] if o == "part"}) if worst is not None else []
    owners = ", ".join(f"{o} {max(c[o] for c in syncs.per_step)}"
                       for o in sorted({o for c in syncs.per_step for o in c}))
    print(SYNC_LINE.format(steps=len(syncs.per_step), per_step=" ".join(f"part {c['part']} all {sum(c.values())}"
                                                                       for c in syncs.per_step),
                           part=syncs.worst("part"), all=syncs.worst(),
                           owners=owners or "none", where=" ".join(where) or "none",
                           top=", ".join(f"{n} x {o} {op} at {w}" for (o, op, w), n in
                                         Counter(syncs.events).most_common(4)) or "none"), flush=True)
    return code


if __name__ == "__main__":
    exit_process(guarded_main(sys.argv[1:]))
