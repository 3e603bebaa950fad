"""Resuming inside a stage on another number of ranks: the optimizer state, resharded.

A checkpoint's weights (model.safetensors, and those it references in their pretrained directories) are whole; its
optimizer state (ds/) is ZeRO partitions, one file per rank of the run that wrote it, which only an engine of the
same world size loads. On another world size, rank 0 converts ds/ into DeepSpeed's universal layout
(deepspeed.checkpoint.ds_to_universal: every trainable parameter's fp32 master weight and Adam moments as whole
tensors), and every rank copies its own partition of each into the new engine; the step count of Adam and the
engine's counters follow. DeepSpeed's own universal loader is not used: it gives every param group the first group's
hyperparameters (weight decay, lr_scale).
The data positions are the stream's business (part/data/stream.py, regroup_positions).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from part.train.checkpoint import DS_TAG
from part.train.distributed import DistributedContext

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """The checkpoint's optimizer state could not be resharded; the message names the checkpoint."""


def universal_dir(checkpoint: Path) -> Path:
    """Where rank 0 writes the conversion: beside the checkpoint, named so that the checkpointer's pruning
    removes it if a crash leaves it behind."""
    return checkpoint.parent / f"{checkpoint.name}.universal.partial"


def convert_to_universal(checkpoint: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint / DS_TAG), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2 checkpoints lack its metadata
    ds_to_universal.main(args)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # its pointer for DeepSpeed's own loader: not ours


def _local_partition(full: torch.Tensor, param, rank: int) -> torch.Tensor:
    """ZeRO-3: this rank's slice of `full`, zero-padded to the partition's size as ZeRO-3 lays it out."""
    size = param.ds_tensor.numel()
    flat = full.flatten()
    out = torch.zeros(size, dtype=flat.dtype)
    piece = flat[rank * size: (rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def load_resharded_optimizer(engine, model: torch.nn.Module, checkpoint: Path, dist: DistributedContext) -> int:
    """Collective. Fills `engine`'s optimizer (fp32 master weights, Adam moments and step) from `checkpoint`,
    written on any number of ranks. Returns the number of parameters restored."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    out = universal_dir(checkpoint)
    problem = ""

    def convert() -> bool:
        nonlocal problem
        try:
            convert_to_universal(checkpoint, out)
            return True
        except Exception as exc:  # noqa: BLE001  reported on every rank below
            problem = f"{type(exc).__name__}: {exc}"
            return False

    if not dist.rank0_decides(convert):
        raise ReshardError(f"{checkpoint / DS_TAG}: converting the optimizer state to another number of ranks "
                           f"failed{': ' + problem if problem else ' on rank 0'}")
    zero = out / "zero"
    zero_optimizer = engine.optimizer
    base = zero_optimizer.optimizer  # the torch optimizer over this rank's flat fp32 partitions
    # Its state is made at its first step (ZeRO-3): made here, then filled below. ZeRO-3 and ZeRO-1/2 name
    # the flat partitions differently.
    flats = (getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
             or getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or [])
    for flat in flats:
        state = base.state[flat]
        for key in OPTIMIZER_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(flat)
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: each parameter's view of it
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    restored = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        folder = zero / name
        if not folder.is_dir():
            raise ReshardError(f"{checkpoint}: the optimizer state has no entry for trainable parameter {name}")
        values = {key: _load_tensor(folder / f"{key}.pt").float() for key in ("fp32", *OPTIMIZER_KEYS)}
        if hasattr(param, "ds_tensor"):  # ZeRO-3: every rank holds a padded slice of each parameter
            safe_set_local_fp32_param(param, _local_partition(values["fp32"], param, dist.rank))
            for key in OPTIMIZER_KEYS:
                safe_set_local_optimizer_state(param, _local_partition(values[key], param, dist.rank), key)
        else:  # ZeRO-1/2: DeepSpeed maps the whole tensor onto this rank's fragment
            safe_set_full_fp32_param(param, values["fp32"].view_as(param))
            for key in OPTIMIZER_KEYS:
                safe_set_full_optimizer_state(param, values[key].view_as(param), key)
        restored += 1
    step = _adam_step(zero)
    for state in base.state.values():
        state["step"] = step.clone() if torch.is_tensor(step) else step
    _restore_engine_counters(engine, checkpoint)
    dist.barrier()  # every rank has read the conversion
    if dist.is_main:
        shutil.rmtree(out, ignore_errors=True)
    return restored


def _load_tensor(path: Path) -> torch.Tensor:
    """One state of one parameter in the universal layout: a tensor (from ZeRO-3) or {"param": tensor, ...}."""
    value = torch.load(path, map_location="cpu", weights_only=True)
    return value["param"] if isinstance(value, dict) else value


def _adam_step(zero: Path):
    """Adam's step count: in the common optimizer state (from ZeRO-3), else beside each parameter (ZeRO-1/2)."""
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if common.get("optimizer_state_dict"):
        return next(iter(common["optimizer_state_dict"]["state"].values()))["step"]
    return _load_tensor(next(zero.glob("*/step.pt")))


def _restore_engine_counters(engine, checkpoint: Path) -> None:
    """The engine's step and sample counters, as DeepSpeed's own load restores them (any rank's file has them)."""
    files = sorted((checkpoint / DS_TAG).glob("*model_states.pt"))
    if not files:
        return
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in saved:
            setattr(engine, key, saved[key])
