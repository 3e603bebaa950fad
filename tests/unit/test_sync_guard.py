"""The host-synchronisation guard (tests/sync_guard.py): every call that would block the host on a GPU is counted
on device data and not on host data, and what the guard says of the model's training step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sync_guard import SyncGuard
from test_model import make_batch, tiny_speech_llm

from part.data.batching import packed_rows
from part.packing import with_layouts


def _accelerator_synchronize(_):
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


# Each call blocks the host on a GPU once, given device data `d` (float, 0..5).
CALLS = {
    "item": lambda d: d.sum().item(),
    "bool": lambda d: bool(d[0]),
    "int": lambda d: int(d[1]),
    "float": lambda d: float(d[1]),
    "index": lambda d: [0, 1, 2][d[1].long()],
    "tolist": lambda d: d.tolist(),
    "numpy": lambda d: d.numpy(),
    "np.asarray": lambda d: np.asarray(d),
    "cpu": lambda d: d.cpu(),
    "to cpu": lambda d: d.to("cpu"),
    "to cpu and dtype": lambda d: d.to("cpu", torch.float64),
    "copy_ into host memory": lambda d: torch.empty(6).copy_(d),
    "nonzero": lambda d: d.nonzero(),
    "unique": lambda d: torch.unique(d),
    "unique_consecutive": lambda d: torch.unique_consecutive(d),
    "masked_select": lambda d: d.masked_select(d > 2),
    "boolean-mask indexing": lambda d: d[d > 2],
    "boolean-mask assignment": lambda d: d.clone().__setitem__(d > 2, 0.0),
    "one-argument where": lambda d: torch.where(d > 2),
    "repeat_interleave": lambda d: torch.repeat_interleave(d.long()),
    "repeat_interleave by a tensor": lambda d: d.repeat_interleave(d.long()),
    "bincount": lambda d: torch.bincount(d.long()),
    "equal": lambda d: torch.equal(d, d + 0),
    "allclose": lambda d: torch.allclose(d, d + 0),
    "any read": lambda d: bool((d > 4).any()),
    "all read": lambda d: bool((d >= 0).all()),
    "accelerator synchronize": _accelerator_synchronize,
}


def _events(call, make) -> list[tuple[str, str, str]]:
    guard = SyncGuard()
    with guard, guard.step():
        data = make(guard)
        call(data)
    assert guard.per_step[0].total() == len(guard.events)
    return guard.events


@pytest.mark.parametrize("name", CALLS)
def test_each_call_that_blocks_the_host_is_counted_once_on_device_data(name):
    events = _events(CALLS[name], lambda guard: torch.arange(6.0).to(guard.device))
    assert len(events) == 1, events
    assert events[0][0] == "other" and __file__ in events[0][2]  # attributed to the line that asked


@pytest.mark.parametrize("name", [n for n in CALLS if n != "accelerator synchronize"])
def test_the_same_calls_on_host_data_count_nothing(name):
    assert _events(CALLS[name], lambda guard: torch.arange(6.0)) == []


def test_device_data_is_what_moved_to_the_device_or_was_computed_from_it():
    guard = SyncGuard()
    held = torch.arange(6)  # made before the step, not noted as host data: the device's (e.g. a parameter)
    with guard, guard.step():
        host = torch.arange(6)
        guard.note_host(held)
        int(host[2]), held.tolist(), (host * 2 + held).tolist()  # host data, and computed from it alone: free
        moved = host.to(guard.device)  # the input path: a new tensor on the device, the host's left as it was
        assert moved is not host and host.tolist() == moved.tolist()
        host.to(moved.device).tolist()  # moved to the device (on CPU `x.device` is `cpu`): counted ...
        host.tolist()  # ... and the host's tensor is still the host's
        made = torch.zeros(2, device=moved.device)  # a factory given a device
        computed = moved * 2 + host
        computed.sum().item()
        made.tolist()
        back = moved.cpu()  # a copy to host memory: counted once, then reading it is free
        back.tolist(), back.numpy()
        torch.repeat_interleave(moved, output_size=15)  # the output's size given: nothing to read
        with guard.paused():
            moved.tolist()
    assert [op for _, op, _ in guard.events] == ["Tensor.tolist", "Tensor.tolist", "aten::_local_scalar_dense",
                                                 "Tensor.tolist", "Tensor.cpu"], guard.events
    assert guard.per_step[0] == {"other": 5}  # called from this test: neither part nor a library


def test_a_tensor_handed_to_a_collective_is_device_data(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        guard = SyncGuard()
        with guard, guard.step():
            flag = torch.tensor([1.0])  # made on the host ...
            flag.item()
            dist.all_reduce(flag)  # ... and handed to a collective: on a GPU it is the device's
            flag.item()
    finally:
        dist.destroy_process_group()
    assert [op for _, op, _ in guard.events] == ["aten::_local_scalar_dense"], guard.events


def test_reads_in_backward_hooks_are_counted():
    guard = SyncGuard()
    weight = torch.ones(3, requires_grad=True)  # held from before the step: the device's, as a parameter is
    weight.register_hook(lambda grad: grad.tolist() and None)  # a Python-level read inside backward
    with guard, guard.step():
        (weight * 2).sum().backward()
        torch.autograd.backward((weight * 3).sum())
    assert [op for _, op, _ in guard.events] == ["Tensor.tolist"] * 2, guard.events
    assert weight.grad.tolist() == [5.0] * 3


def _model_step_syncs(model, tok, frames, rows: bool = False) -> SyncGuard:
    batch = make_batch(tok, frames=frames, text_only=True)
    if rows:  # the clips packed into encoder rows of 6 s, as the collator packs them
        features, segments, places = packed_rows(batch.input_features, batch.feature_frames, 600,
                                                 model.layout_spec().frames_per_clip.stride)
        batch = dataclasses.replace(batch, input_features=features, audio_segments=segments, clip_places=places)
    batch = with_layouts(batch, model.layout_spec())
    guard = SyncGuard()
    with guard, guard.step():
        guard.note_host(batch)
        out = model(batch.to(guard.device))
        out["loss"].backward()
    return guard


def test_the_model_step_reads_nothing_from_the_device_at_any_batch_size(tiny_models):
    """Encode, adapt, splice, LLM, loss and backward (adapter and LoRA training) make no host synchronisation in
    part's code, and what the libraries make does not grow with the batch."""
    model, tok = tiny_speech_llm(tiny_models)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("adapter.") or "lora_" in name)
    small = _model_step_syncs(model, tok, (300, 180))
    large = _model_step_syncs(model, tok, (300, 280, 240, 200, 180, 160, 120, 100, 80, 60))
    assert small.worst("part") == 0 and large.worst("part") == 0, large.events
    assert small.worst() == large.worst() <= 8, (small.events, large.events)
    # the same with the clips packed into encoder rows
    small_rows = _model_step_syncs(model, tok, (300, 180), rows=True)
    large_rows = _model_step_syncs(model, tok, (300, 280, 240, 200, 180, 160, 120, 100, 80, 60), rows=True)
    assert small_rows.worst("part") == 0 and large_rows.worst("part") == 0, large_rows.events
    assert small_rows.worst() == large_rows.worst() <= 8, (small_rows.events, large_rows.events)
