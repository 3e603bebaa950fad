"""Process setup under the `deepspeed` launcher, and the collectives the trainer needs, in one place.

Every collective of this repository's code goes through `DistributedContext`, and every tensor it hands to one
is made on `self.device`: NCCL refuses CPU tensors (gloo does not, so CPU tests alone would not show it).
tests/collective_guard.py enforces both in the launcher tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from part.train.supervision import StallWatch

SHM_SEGMENT_DIR = "/dev/shm"


def cpu_allreduce_segment_name(rank: int) -> str:
    """The POSIX shared-memory name DeepSpeed's CPU backend gives rank `rank`'s all-reduce workspace
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: prefix, uid, MASTER_ADDR, MASTER_PORT, rank)."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_cpu_allreduce_segment(rank: int) -> bool:
    """Removes this rank's all-reduce segment name once every peer has mapped it. DeepSpeed never unlinks it,
    so each CPU run with several ranks left 66 MB per rank in /dev/shm for good (19 GB after a day of tests,
    which then starved later runs of memory); mapped pages stay valid until the processes exit."""
    try:
        os.unlink(os.path.join(SHM_SEGMENT_DIR, cpu_allreduce_segment_name(rank)))
    except FileNotFoundError:  # one rank alone, or ranks on several hosts: DeepSpeed made no segment
        return False
    return True


# A process killed while torch built DeepSpeed's CPU op leaves the build's lock file; every later process then
# waits on it forever without a word. The op builds in about a minute; a lock this old has no build behind it.
STALE_BUILD_LOCK_SECONDS = 900.0


def stale_build_locks(now: float | None = None, roots: Sequence[str] | None = None) -> list[str]:
    """Lock files of torch extension builds (under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) older than
    STALE_BUILD_LOCK_SECONDS."""
    import glob
    import time

    if roots is None:
        roots = [os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")]
    now = time.time() if now is None else now
    found = []
    for root in roots:
        # <root>/<name>/lock with TORCH_EXTENSIONS_DIR set, <root>/<python and device tag>/<name>/lock otherwise
        locks = glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
        for lock in sorted(locks):
            try:
                if now - os.path.getmtime(lock) > STALE_BUILD_LOCK_SECONDS:
                    found.append(lock)
            except FileNotFoundError:  # the build finished meanwhile
                continue
    return found


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    watch: StallWatch | None = None  # what this rank waits on, ended after distributed.timeout_s

    @classmethod
    def init(cls, device: torch.device | None = None, timeout_s: float = 600.0) -> DistributedContext:
        """Joins the process group the launcher set up (gloo on CPU, NCCL on GPUs), its collectives timing out
        after `timeout_s`, and picks this rank's device (`device` overrides it, for tests)."""
        from datetime import timedelta

        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        if accelerator.device_name() == "cpu":  # the CPU backend builds its shm op on first use
            stale = stale_build_locks()
            if stale:
                raise RuntimeError(f"{', '.join(stale)}: left by an interrupted build of a torch extension (older "
                                   f"than {STALE_BUILD_LOCK_SECONDS / 60:.0f} minutes); the build would wait on it "
                                   "forever. Remove the file if no build is running, then start again.")
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                                   timeout=timedelta(seconds=timeout_s))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if accelerator.device_name() != "cpu":
            accelerator.set_device(local_rank)
        else:  # denormal floats late in training make CPU steps up to ~10x slower; flushing them costs nothing
            torch.set_flush_denormal(True)
        rank = dist.get_rank()
        context = cls(rank, dist.get_world_size(), local_rank,
                      device or torch.device(accelerator.device_name(local_rank)),
                      StallWatch(timeout_s, label=f"[rank {rank}] ").start())
        if accelerator.device_name() == "cpu":
            context.barrier()  # every rank has mapped its peers' segments once init returned everywhere
            unlink_cpu_allreduce_segment(context.rank)
        return context

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def waiting(self, what: str) -> AbstractContextManager:
        """Marks a wait on the other ranks (a training step, a collective): one that lasts past
        distributed.timeout_s ends the run with ExitCode.STALLED, naming `what` (StallWatch)."""
        return self.watch.waiting(what) if self.watch is not None else nullcontext()

    def supports_bf16(self) -> bool:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_bf16_supported())

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank. Used where ranks must take the same branch (skipping a step),
        or ZeRO's collectives would hang on the ranks that go on."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self.waiting("all_reduce (all_true)"):
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.item() >= 1

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether `value` (a device tensor) is finite on every rank: one collective and one read, where
        `all_true(bool(...))` would need two reads."""
        flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
        with self.waiting("all_reduce (all_finite)"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() >= 1

    def rank0_decides(self, question: Callable[[], bool]) -> bool:
        """Rank 0's answer to `question` on every rank (nodes may not share a filesystem view at one instant)."""
        value = torch.tensor([1 if self.rank == 0 and question() else 0], device=self.device)
        with self.waiting("broadcast (rank0_decides)"):
            dist.broadcast(value, 0)
        return bool(value.item())

    def rank0_int(self, question: Callable[[], int]) -> int:
        """Rank 0's integer answer to `question` on every rank."""
        value = torch.tensor([question() if self.rank == 0 else 0], dtype=torch.int64, device=self.device)
        with self.waiting("broadcast (rank0_int)"):
            dist.broadcast(value, 0)
        return int(value.item())

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, in float64."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        with self.waiting("all_reduce (sum)"):
            dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: object) -> list:
        """Every rank's `obj` (small, our own Python objects, e.g. hypotheses), in rank order."""
        gathered: list = [None] * self.world_size
        with self.waiting("all_gather_object (gather_objects)"):
            dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        with self.waiting("barrier"):
            if self.device.type == "cuda":  # NCCL's barrier otherwise guesses the device from the rank
                dist.barrier(device_ids=[self.device.index if self.device.index is not None else self.local_rank])
            else:
                dist.barrier()

    def synchronize(self) -> None:
        """Waits for this rank's queued device work (so wall-clock step times are real times)."""
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()

    def peak_memory(self, reset: bool = False) -> int | None:
        """Bytes allocated at most on this rank's GPU since the last reset (None on CPU)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device)
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def close(self) -> None:
        self.barrier()
        dist.destroy_process_group()
        if self.watch is not None:
            self.watch.stop()
