"""The host-synchronisation guard (tests/sync_guard.py) and what it says of the model's training step."""

from __future__ import annotations

import dataclasses

import torch
from sync_guard import SyncGuard
from test_model import make_batch, tiny_speech_llm

from part.data.batching import packed_rows
from part.packing import with_layouts


def test_the_guard_counts_reads_of_device_values_and_not_of_host_ones():
    guard = SyncGuard()
    host = torch.arange(6)
    with guard, guard.step():
        guard.note_host(host)
        host.tolist()
        int(host[2])  # a host tensor's element: still host data (an index op on a host tensor)
        host = host * 2  # computed from host tensors alone: host data
        host.tolist()
        device = torch.arange(6) * 2  # made in the step: would live on the device
        device.sum().item()
        device[device > 3]  # boolean-mask indexing: the output's shape needs the device's values
        torch.nonzero(device)
        device.tolist()
        with guard.paused():
            device.tolist()
    assert [op for _, op, _ in guard.events] == ["aten::_local_scalar_dense", "aten::index", "aten::nonzero",
                                                 "Tensor.tolist"], guard.events
    assert guard.per_step[0] == {"other": 4}  # called from this test: neither part nor a library


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
        out = model(batch.to("cpu"))
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
