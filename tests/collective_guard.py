"""A guard over torch.distributed's collectives that fails where NCCL would, also on CPU under gloo.

NCCL takes only tensors on the rank's GPU; gloo takes CPU tensors too, so a CPU flag handed to `all_reduce`
passes every CPU test and kills the first GPU run. Under the guard, every collective checks that

  1. each tensor it is given lives on `device` (the device the trainer says it uses), and
  2. a collective called from this repository's code is called from `DistributedContext`
     (part/train/distributed.py), which makes every tensor it hands over on its own `device`.

Rule 2 is what catches, on a CPU machine, the tensor that would be on the wrong device on a GPU: the only code
allowed to call collectives builds its tensors from the context's device, and a unit test runs that code with a
device that is not the CPU. DeepSpeed's own calls are checked by rule 1 only.

    with CollectiveGuard(torch.device("cuda", local_rank)):
        ...   # a violation raises CollectiveDeviceError naming the collective, the caller and the device
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
# The repository's code that rule 2 covers (the tests call collectives as they like)
GUARDED_CODE = ("part", "bench", "data_prep", "train.py")
CONTEXT_FILE = REPO / "part" / "train" / "distributed.py"
# The collectives of torch.distributed that take tensors (or none, for barrier), as DeepSpeed and we call them.
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "gather", "scatter", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "barrier", "all_gather_object", "broadcast_object_list",
    "gather_object", "scatter_object_list",
)


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor NCCL would refuse, or was called around the ranks' context."""


def _tensors(value: object):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _same_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def _caller_in_repo(depth: int = 2) -> Path | None:
    """The file of the first frame outside this module and torch, when it is the repository's code."""
    frame = sys._getframe(depth)
    while frame is not None:
        file = Path(frame.f_code.co_filename).resolve()
        if file != Path(__file__).resolve() and "torch" not in file.parts:
            try:
                top = file.relative_to(REPO).parts[0]
            except ValueError:
                return None
            return file if top in GUARDED_CODE else None
        frame = frame.f_back
    return None


class CollectiveGuard:
    """Wraps torch.distributed's collectives while active (a context manager; `install`/`uninstall` too)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.calls = 0  # collectives checked (a test asserts the guard saw traffic)
        self._originals: dict[str, object] = {}

    def _check(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        caller = _caller_in_repo(3)
        if caller is not None and caller != CONTEXT_FILE:
            raise CollectiveDeviceError(
                f"torch.distributed.{name} called from {caller.relative_to(REPO)}: collectives go through "
                "part.train.distributed.DistributedContext, which puts their tensors on the rank's device")
        for tensor in _tensors(list(args) + list(kwargs.values())):
            if not _same_device(tensor, self.device):
                where = caller.relative_to(REPO) if caller else "a library"
                raise CollectiveDeviceError(
                    f"torch.distributed.{name} (called from {where}) got a tensor on {tensor.device}, but this "
                    f"rank's device is {self.device}; NCCL would fail here")

    def install(self) -> CollectiveGuard:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original

            def checked(*args, _name=name, _original=original, **kwargs):
                self._check(_name, args, kwargs)
                return _original(*args, **kwargs)

            setattr(dist, name, functools.wraps(original)(checked))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def __enter__(self) -> CollectiveGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
