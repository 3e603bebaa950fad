"""A counter of the host synchronisations a training step would make on a GPU, measured on CPU.

On a GPU, reading a device value on the host (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `.cpu()`), an op whose
output shape depends on device values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`) or a
data-dependent check stalls the host until the device has caught up: the queue of launched kernels drains and
the GPU idles. On CPU nothing stalls, so the count is the only way to see them. The guard counts such operations
on tensors that are not the host's (the batch the collator made, before `Batch.to`, and what is computed from it
alone), attributed to the code that
asked: the innermost frame outside torch that belongs to this repository (`part`), DeepSpeed, transformers or
peft (`other` otherwise).

    guard = SyncGuard()
    with guard.step():           # counts only inside; guard.per_step holds one Counter per step
        with guard.paused():     # e.g. while fetching the batch
            batch = fetch()
        guard.note_host(batch)   # the batch's tensors are host tensors: reading them is free
        ...

Under the guard, `Batch.to` copies every tensor even to the device it is on, so the device batch is a set of
tensors distinct from the host's (on CPU `.to("cpu")` would return the same objects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
OWNERS = (("part", (REPO / "part", REPO / "train.py", REPO / "bench")),)
LIBRARIES = ("deepspeed", "transformers", "peft")
# ops that read device values on the host, or whose output shape depends on them
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal",
            "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::allclose"}
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}  # with a bool index


def _owner(frame) -> str:
    """Who asked: the innermost frame outside torch and this file that belongs to part or a known library."""
    here = Path(__file__).resolve()
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if file.resolve() != here:
            parts = file.parts
            if "torch" not in parts:
                for name, roots in OWNERS:
                    if any(file.resolve().is_relative_to(root) for root in roots):
                        return name
                for library in LIBRARIES:
                    if library in parts:
                        return library
        frame = frame.f_back
    return "other"


class _Mode(TorchDispatchMode):
    def __init__(self, guard: SyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        host = self.guard.is_host(args)
        if self.guard.counting and not host:
            if name in SYNC_OPS or (name in INDEX_OPS and _has_bool_index(args)):
                self.guard.count(name)
        out = func(*args, **kwargs)
        if host and self.guard.propagating:  # computed from host tensors alone: host data too
            self.guard.note_host(out)
        return out


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


class SyncGuard:
    """Counts host synchronisations per step (see the module docstring)."""

    def __init__(self):
        self.per_step: list[Counter] = []
        self.counting = False
        self.propagating = True
        self.events: list[tuple[str, str, str]] = []  # (owner, op, where) of the last step, for messages
        self._host: dict[int, weakref.ref] = {}  # by id, checked by identity (a freed tensor's id is reused)
        self._mode = _Mode(self)
        self._patched: dict[str, object] = {}

    # ---- what is host data

    def note_host(self, *values) -> None:
        """Tensors (also inside lists and dataclasses such as Batch) that live on the host."""
        for value in values:
            self._host.update((id(t), weakref.ref(t)) for t in _tensors(value))

    def host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def is_host(self, args) -> bool:
        tensors = list(_tensors(list(args)))
        return bool(tensors) and all(self.host(t) for t in tensors)

    # ---- counting

    def count(self, op: str) -> None:
        frame = sys._getframe(2)
        owner = _owner(frame)
        where = ""
        while frame is not None:
            if "torch" not in Path(frame.f_code.co_filename).parts and Path(frame.f_code.co_filename).resolve() \
                    != Path(__file__).resolve():
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                break
            frame = frame.f_back
        self.per_step[-1][owner] += 1
        self.events.append((owner, op, where))

    @contextlib.contextmanager
    def step(self):
        self.per_step.append(Counter())
        self.events = []
        self.counting = True
        try:
            with self._mode:
                yield self
        finally:
            self.counting = False
            self._host.clear()

    @contextlib.contextmanager
    def paused(self):
        counting, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = counting

    # ---- reads that do not dispatch an op on CPU

    def install(self) -> SyncGuard:
        guard = self

        def reader(name):
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, **kwargs):
                if guard.counting and not guard.host(tensor):
                    guard.count(f"Tensor.{name}")
                return original(tensor, *args, **kwargs)

            self._patched[name] = original
            setattr(torch.Tensor, name, read)

        for name in ("tolist", "numpy", "cpu"):
            reader(name)
        from part.batch import Batch

        original_to = Batch.to

        def copying_to(batch, device, features_dtype=None):
            moved = original_to(batch, device, features_dtype)
            guard.propagating = False  # the copies stand for the device's tensors
            try:
                return _copied(moved)
            finally:
                guard.propagating = True

        self._patched["Batch.to"] = original_to
        Batch.to = copying_to
        return self

    def uninstall(self) -> None:
        from part.batch import Batch

        for name, original in self._patched.items():
            if name == "Batch.to":
                Batch.to = original
            else:
                setattr(torch.Tensor, name, original)
        self._patched.clear()

    def __enter__(self) -> SyncGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---- summaries

    def worst(self, owner: str | None = None) -> int:
        """The most synchronisations one step made (by `owner`, or by all)."""
        return max((c[owner] if owner else sum(c.values()) for c in self.per_step), default=0)


def _copied(value):
    """`value` with every tensor in it (also inside lists and dataclasses) copied."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _copied(getattr(value, f.name)) for f in dataclasses.fields(value)
                                             if f.init})
    return value
