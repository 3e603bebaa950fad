"""The collective guard: what NCCL would refuse fails on CPU too. DistributedContext, the one caller of
collectives in this repository, puts every tensor on its device whatever that device is."""

from __future__ import annotations

import collective_guard
import pytest
import torch
import torch.distributed as dist
from collective_guard import REPO, CollectiveDeviceError, CollectiveGuard

from part.train.distributed import DistributedContext


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "f"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def call_from_repo_file(relative: str, code: str) -> None:
    """Runs `code` as if it were a line of the repository's file `relative`."""
    exec(compile(code, str(REPO / relative), "exec"), {"torch": torch, "dist": dist})


def test_context_passes_and_guard_counts(one_rank_group):
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    original = dist.all_reduce
    with CollectiveGuard(torch.device("cpu")) as guard:
        assert ctx.all_true(True) and not ctx.all_true(False)
        assert ctx.sum([1.5, 2.0]) == [1.5, 2.0]
        assert ctx.rank0_decides(lambda: True)
        assert ctx.gather_objects({"a": 1}) == [{"a": 1}]
        ctx.barrier()
    assert guard.calls >= 6
    assert dist.all_reduce is original  # uninstalled


def test_direct_call_from_repo_code_is_refused(one_rank_group):
    # What the checkpointer did: a CPU flag all-reduced directly. Under gloo it works; NCCL refuses it.
    with CollectiveGuard(torch.device("cpu")):
        with pytest.raises(CollectiveDeviceError, match=r"part/train/checkpoint\.py.*DistributedContext"):
            call_from_repo_file("part/train/checkpoint.py", "dist.all_reduce(torch.tensor([1]))")
        with pytest.raises(CollectiveDeviceError, match="evaluator"):
            call_from_repo_file("part/evaluation/evaluator.py", "dist.barrier()")
    call_from_repo_file("part/train/checkpoint.py", "dist.all_reduce(torch.tensor([1]))")  # unguarded: gloo takes it


def test_tensor_off_the_rank_device_is_refused(one_rank_group):
    with CollectiveGuard(torch.device("cuda", 0)):  # a rank whose device is a GPU, handed a CPU tensor
        with pytest.raises(CollectiveDeviceError, match="cpu.*cuda:0.*NCCL"):
            dist.all_reduce(torch.ones(1))
        with pytest.raises(CollectiveDeviceError):
            dist.all_gather([torch.ones(1)], torch.ones(1))


def test_context_makes_every_tensor_on_its_device(monkeypatch):
    """Every collective of DistributedContext with the trainer's device injected as one that is not the CPU
    (meta: tensors without storage): each tensor it hands over is on that device. Collectives are recorded,
    not sent; reading a meta tensor's value is stubbed."""
    seen = []

    def record(name):
        def fake(*args, **kwargs):
            seen.extend((name, t.device) for t in collective_guard._tensors(list(args) + list(kwargs.values())))
        return fake

    for name in ("all_reduce", "broadcast", "barrier", "all_gather_object"):
        monkeypatch.setattr(dist, name, record(name))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 1)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: [0.0])
    ctx = DistributedContext(0, 2, 1, torch.device("meta"))
    ctx.all_true(True)
    ctx.rank0_decides(lambda: True)
    ctx.sum([1.0, 2.0])
    ctx.barrier()
    ctx.gather_objects("x")
    assert [name for name, _ in seen] == ["all_reduce", "broadcast", "all_reduce"]
    assert all(device.type == "meta" for _, device in seen), seen


def test_stale_torch_extension_build_locks_are_found_and_fresh_ones_are_not(tmp_path):
    """A killed build of DeepSpeed's CPU op leaves <root>/<tag>/<op>/lock, and later processes wait on it forever
    (seen: a run hung in FileBaton.wait); DistributedContext.init refuses with the file's name instead."""
    import os

    from part.train.distributed import STALE_BUILD_LOCK_SECONDS, stale_build_locks

    default_layout = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    env_layout = tmp_path / "deepspeed_shm_comm_other"
    for folder in (default_layout, env_layout):
        folder.mkdir(parents=True)
        (folder / "lock").touch()
    now = os.path.getmtime(default_layout / "lock")
    assert stale_build_locks(now + 60, [str(tmp_path)]) == []  # a build in progress
    later = now + STALE_BUILD_LOCK_SECONDS + 1
    assert stale_build_locks(later, [str(tmp_path)]) == sorted([str(env_layout / "lock"), str(default_layout / "lock")])
    (default_layout / "lock").unlink()
    assert stale_build_locks(later, [str(tmp_path)]) == [str(env_layout / "lock")]
    assert stale_build_locks(later, [str(tmp_path / "absent")]) == []
