"""A counter of the host synchronisations a training step would make on a GPU, measured on CPU.

On a GPU, a call that needs a device value on the host stalls the host until the device has caught up (the queue
of launched kernels drains and the GPU idles): reading values (`.item()`, `bool/int/float(t)`, `t.__index__()`,
`.tolist()`, `.numpy()`), copying to host memory (`.cpu()`, `.to("cpu")`, `host.copy_(t)`), an op whose output
shape depends on values (`nonzero`, one-argument `where`, `unique`, `masked_select`, boolean-mask indexing,
`repeat_interleave` without `output_size`, `bincount`), a comparison answered on the host (`equal`, `allclose`,
`if t.any():`), or waiting for the device (the accelerator's `synchronize`). On CPU nothing stalls, so counting
them is the only way to see them. The guard counts such calls on device data, attributed to the code that asked:
the innermost frame outside torch that belongs to this repository (`part`), DeepSpeed, transformers or peft
(`other` otherwise).

Device data is told from host data by provenance, since on CPU both live in the same memory:

- the step runs on a pretend device, `SyncGuard.device` (`cpu:0`, which torch keeps apart from the host's `cpu`):
  a tensor moved there (`t.to(device)`, as `Batch.to` does) is a new tensor, and device data;
- a tensor made by a factory given a device (`torch.zeros(n, device=x.device)`, `torch.tensor(v, device=d)`), or
  made inside torch's own code (a backward pass, a functional's helper), is device data; one made by the step's
  code without a device, or in pinned memory, is host data;
- a tensor handed to a collective is device data (NCCL takes no other);
- what is computed from device data is device data; what is computed from host data alone is host data;
- a tensor made before the step and not noted as host data (parameters, optimizer state, engine buffers) is
  device data; `note_host` names host data made before the step (the collator's batch);
- `.cpu()` and `.to("cpu")` of device data copy it to host memory (counted; the result, a view standing for the
  copy a GPU would make, is host data); `.to()` given a `torch.device` is taken as a move within the device (on
  CPU `x.device` is `cpu`), as is DeepSpeed's `.to("cpu")` (it names the device by its accelerator's name, `cpu`
  on CPU, so its copies to host memory inside a step, e.g. with ZeRO-Offload, go uncounted).

    guard = SyncGuard()
    with guard, guard.step():    # counts only inside; guard.per_step holds one Counter per step
        with guard.paused():     # e.g. while fetching the batch
            batch = fetch()
        guard.note_host(batch)   # made before the step on the host: reading it is free
        device_batch = batch.to(guard.device)
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
OWNERS = (("part", (REPO / "part", REPO / "train.py", REPO / "bench")),)
LIBRARIES = ("deepspeed", "transformers", "peft")
PRETEND_DEVICE = torch.device("cpu", 0)
# aten ops that read device values on the host, or whose output shape depends on them
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal", "aten::allclose",
            "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::bincount"}
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}  # with a bool index
# Tensor methods that read device values without dispatching an op on CPU
READS = {"tolist", "numpy", "__array__"}


def _owner(frame) -> str:
    """Who asked: the innermost frame outside torch and this file that belongs to part or a known library."""
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if "torch" not in file.parts and file.resolve() != HERE:
            for name, roots in OWNERS:
                if any(file.resolve().is_relative_to(root) for root in roots):
                    return name
            for library in LIBRARIES:
                if library in file.parts:
                    return library
        frame = frame.f_back
    return "other"


def _where(frame) -> str:
    """The innermost frame outside torch and this file, as file:line."""
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if "torch" not in file.parts and file.resolve() != HERE:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


class _Functions(TorchFunctionMode):
    """Python-level calls: reads that dispatch no op on CPU, moves between host and device, factories."""

    def __init__(self, guard: SyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        guard = self.guard
        if func in (torch.Tensor.backward, torch.autograd.backward):
            with self:  # the mode is off while it handles a call: back on for the hooks backward runs
                return _backward(*args, **kwargs)
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and name in READS and guard.on_device(tensor):
            guard.count(f"Tensor.{name}")
            return func(*args, **kwargs)
        if tensor is not None and name in ("cpu", "to"):
            target = _move_target(name, args[1:], kwargs, guard)
            out = func(*args, **kwargs)
            if target is None:
                return out
            if target == "host" and guard.on_device(tensor):
                guard.count(f"Tensor.{name}")
            if out is tensor and guard.on_device(tensor) != (target == "device"):
                out = out.view_as(out)  # on CPU the same tensor: a view stands for the copy a GPU would make
            if target == "device":
                guard.note_device(out)
            else:
                guard.note_host(out)
            return out
        out = func(*args, **kwargs)
        if not any(True for _ in _tensors((args, kwargs))) and isinstance(out, torch.Tensor):  # a factory
            if kwargs.get("device") is not None and not kwargs.get("pin_memory"):
                guard.note_device(out)
            else:
                guard.note_host(out)
        return out


def _backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, gradient=None):
    """`Tensor.backward` and `torch.autograd.backward` (which take the gradient by different names), run without
    handing the call to torch-function modes again."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(gradient if gradient is not None else grad_tensors,
                                                             len(tensors)), is_grads_batched=False)
    return _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                                inputs, allow_unreachable=True, accumulate_grad=True)


def _move_target(name: str, args, kwargs, guard: SyncGuard) -> str | None:
    """Where `.cpu()` or `.to(...)` moves a tensor: "host", "device", or None (no move, or `.to(other)`).
    `.to()` given the string "cpu" moves to host memory, except from DeepSpeed, which names the device by its
    accelerator's name (`cpu` on CPU); a `torch.device` is the pretend device or, as `x.device` is on CPU, the
    device."""
    if name == "cpu":
        return "host"
    if isinstance(kwargs.get("other", args[0] if args else None), torch.Tensor):
        return None
    for value in (kwargs.get("device"), *args):
        if isinstance(value, torch.device):
            return "device"
        if isinstance(value, str):
            try:
                device = torch.device(value)
            except RuntimeError:  # not a device's name
                continue
            if device == guard.device or _owner(sys._getframe(2)) == "deepspeed":
                return "device"
            return "host" if device.type == "cpu" else "device"
    return None


class _Ops(TorchDispatchMode):
    """aten ops: counts those that synchronise on device data, and carries provenance from inputs to outputs."""

    def __init__(self, guard: SyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        guard = self.guard
        name = func._schema.name
        if name.startswith("c10d::"):  # a collective: its tensors are the device's
            guard.note_device(args, kwargs)
            return func(*args, **kwargs)
        inputs = list(_tensors((args, kwargs)))
        on_device = any(guard.on_device(t) for t in inputs)
        if name == "aten::copy_" and not guard.on_device(args[0]) and guard.on_device(args[1]):
            guard.count(name)  # a copy into host memory
            return func(*args, **kwargs)
        if name in SYNC_OPS and on_device:
            guard.count(name)
        elif name in INDEX_OPS and _has_bool_index(args, guard):
            guard.count(name)
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and on_device:
            guard.count(name)
        out = func(*args, **kwargs)
        if on_device or not inputs:  # a factory called from torch's own code (the torch-function mode notes
            guard.note_device(out)   # the host's, called from the step's code)
        else:
            guard.note_host(out)
        return out


def _has_bool_index(args, guard: SyncGuard) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool and guard.on_device(i) for i in indices)


class SyncGuard:
    """Counts host synchronisations per step (see the module docstring)."""

    def __init__(self, device: torch.device = PRETEND_DEVICE):
        self.device = device
        self.per_step: list[Counter] = []
        self.counting = False
        self.step_events: list[list[tuple[str, str, str]]] = []  # (owner, op, where) per step, for messages
        self._host: dict[int, weakref.ref] = {}  # by id, checked by identity (a freed tensor's id is reused)
        self._functions, self._ops = _Functions(self), _Ops(self)
        self._patched: list[tuple[object, str]] = []
        self._window: contextlib.ExitStack | None = None

    # ---- what is host data

    def note_host(self, *values) -> None:
        """Tensors (also inside lists, dicts and dataclasses such as Batch) that hold host data."""
        self._host.update((id(t), weakref.ref(t)) for t in _tensors(values))

    def note_device(self, *values) -> None:
        """Tensors that hold device data."""
        for t in _tensors(values):
            self._host.pop(id(t), None)

    def on_device(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is None or ref() is not tensor

    # ---- counting

    def count(self, op: str) -> None:
        if not self.counting:
            return
        frame = sys._getframe(1)
        self.per_step[-1][_owner(frame)] += 1
        self.step_events[-1].append((_owner(frame), op, _where(frame)))

    @property
    def events(self) -> list[tuple[str, str, str]]:
        """(owner, op, where) of each synchronisation of the last step."""
        return self.step_events[-1] if self.step_events else []

    def open(self) -> None:
        """Starts a step: from here to `close` every host synchronisation on device data is counted."""
        self.close()
        self.per_step.append(Counter())
        self.step_events.append([])
        self._window = contextlib.ExitStack()
        self._window.enter_context(self._functions)
        self._window.enter_context(self._ops)
        self.counting = True

    def close(self) -> None:
        """Ends the step `open` started, if any."""
        if self._window is not None:
            self.counting = False
            window, self._window = self._window, None
            window.close()
            self._host.clear()

    @contextlib.contextmanager
    def step(self):
        self.open()
        try:
            yield self
        finally:
            self.close()

    @contextlib.contextmanager
    def paused(self):
        counting, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = counting

    # ---- waits for the device that are no tensor call

    def install(self) -> SyncGuard:
        """Counts the accelerator's `synchronize` (a no-op on CPU, a wait for the device's queue on a GPU)."""
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        original = accelerator.synchronize

        def synchronize(*args, **kwargs):
            self.count("synchronize")
            return original(*args, **kwargs)

        accelerator.synchronize = synchronize
        self._patched.append((accelerator, "synchronize"))
        return self

    def uninstall(self) -> None:
        self.close()
        for owner, name in self._patched:
            delattr(owner, name)  # the instance attribute goes; the class's method shows again
        self._patched.clear()

    def __enter__(self) -> SyncGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---- summaries

    def worst(self, owner: str | None = None) -> int:
        """The most synchronisations one step made (by `owner`, or by all)."""
        return max((c[owner] if owner else sum(c.values()) for c in self.per_step), default=0)
