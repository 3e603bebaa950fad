"""What a checkpoint of each stage holds, and its size on disk (`train.py --check` prints it per stage).

The weights: every one but those `leaves_out` names (read from a pretrained directory and trained by no stage up
to the checkpoint's own; with `checkpoint.lean: false`, none is left out), in the training dtype, as
model.safetensors lays them out (its JSON header, then the tensors). The optimizer state (ds/, DeepSpeed's ZeRO
partitions of the stage's trainable parameters): the fp32 master weights and Adam's two moments, 12 bytes per
trainable parameter over all ranks (each parameter padded to a multiple of the ranks under ZeRO-3); under ZeRO-1/2
the rank-0 model file also holds the trainable weights in the training dtype, and every tied parameter's second
name (a head tied to the embeddings) whole, trained or not: DeepSpeed leaves out the frozen parameters by their
first name only; and what DeepSpeed keeps beside them
(names, shapes, its config, two conversion scripts). This module reads names and shapes only: it runs on the
meta-device skeleton (part/train/preflight.py) as well as on the training model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from part.config import TrainConfig
from part.curriculum import Curriculum
from part.model.groups import group_parameters
from part.model.weight_sources import PretrainedPart, left_out

GIB = 1024**3
# safetensors' names of the dtypes a model holds
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
# What DeepSpeed writes besides the tensors, measured on its ZeRO-3 files of the tiny test models (negligible for a
# large model, a few percent of a tiny one's): per optimizer-state file; per model-state file, and in it per
# trainable parameter (its name, shape and placeholder); the conversion scripts it puts beside ds/.
DS_OPTIMIZER_FILE_BYTES = 5_200
DS_MODEL_FILE_BYTES = 22_500
DS_BYTES_PER_PARAMETER = 450
DS_SCRIPTS_BYTES = 41_000


def leaves_out(cfg: TrainConfig, model, stage_index: int) -> list[PretrainedPart]:
    """The weights a checkpoint of stage `stage_index` references instead of holding (none unless
    `checkpoint.lean`): those of the pretrained directories that no stage up to that one trains."""
    if not cfg.checkpoint.lean:
        return []
    return left_out(model, Curriculum(cfg.stages).trained_through(stage_index))


def training_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of the engine's weights, which checkpoints write them in."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The size of the safetensors file holding tensors of these (shape, dtype): an 8-byte length, the JSON
    header (padded to 8 bytes), the data."""
    header, offset = {}, 0
    for name in sorted(tensors):
        shape, dtype = tensors[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text) % 8 + offset


def written_tensors(model, left: list[PretrainedPart], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...],
                                                                                            torch.dtype]]:
    """(shape, dtype) of every tensor a checkpoint's weight file holds: floating-point ones in `dtype`."""
    omitted = {key for part in left for key in part.keys}
    return {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
            for name, t in model.state_dict().items() if name not in omitted}


def trainable_shapes(model, groups: list[str]) -> list[int]:
    """The element counts of the parameters `groups` select (a tied parameter once)."""
    names = {name for group in groups for name in group_parameters(model, group)}
    return [p.numel() for name, p in model.named_parameters() if name in names]


def tied_aliases(model) -> list[int]:
    """The element counts of the parameters' second names (a head tied to the embeddings)."""
    first = {name for name, _ in model.named_parameters()}
    return [p.numel() for name, p in model.named_parameters(remove_duplicate=False) if name not in first]


def optimizer_bytes(sizes: list[int], cfg: TrainConfig, world_size: int, aliases: list[int] = ()) -> int:
    """What DeepSpeed writes for a stage training parameters of these element counts on `world_size` ranks: every
    rank's optimizer-state file (fp32 master weights, Adam's two moments), the model-state files (every rank's
    under ZeRO-3; rank 0's under ZeRO-1/2, with the trainable weights and the tied parameters' second names,
    `aliases`, in the training dtype) and its scripts."""
    if cfg.zero_stage == 3:
        elements = sum(math.ceil(n / world_size) * world_size for n in sizes)  # ZeRO-3 pads each parameter
        model_files, weights, aliases = world_size, 0, []
    else:
        elements = sum(sizes)
        model_files, weights = 1, (sum(sizes) + sum(aliases)) * training_dtype(cfg).itemsize
    return (12 * elements + world_size * DS_OPTIMIZER_FILE_BYTES + weights + model_files
            * (DS_MODEL_FILE_BYTES + DS_BYTES_PER_PARAMETER * (len(sizes) + len(aliases))) + DS_SCRIPTS_BYTES)


@dataclass(frozen=True)
class CheckpointSize:
    stage: str
    weights: int  # model.safetensors
    optimizer: int  # DeepSpeed's files (ds/ of all ranks, its scripts)
    left_out: int  # tensors referenced in their pretrained directories
    every_weight: int  # model.safetensors holding every weight (checkpoint.lean: false)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer


def checkpoint_sizes(cfg: TrainConfig, model, world_size: int) -> list[CheckpointSize]:
    """Every stage's checkpoint size on disk; `model`: the skeleton (part.train.preflight.skeleton) or the model."""
    dtype = training_dtype(cfg)
    aliases = tied_aliases(model)
    out = []
    for index, stage in enumerate(cfg.stages):
        left = leaves_out(cfg, model, index)
        weights = safetensors_bytes(written_tensors(model, left, dtype))
        optimizer = optimizer_bytes(trainable_shapes(model, stage.trainable), cfg, world_size, aliases)
        every = safetensors_bytes(written_tensors(model, [], dtype))
        out.append(CheckpointSize(stage.name, weights, optimizer, sum(len(part.keys) for part in left), every))
    return out


def checkpoint_table(sizes: list[CheckpointSize], cfg: TrainConfig, world_size: int) -> str:
    """What `--check` prints: a heading and a markdown table in GiB (MiB below 1 GiB)."""

    def show(n: int) -> str:
        return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.2f} MiB"

    kind = "lean: pretrained weights no stage has trained yet are referenced" if cfg.checkpoint.lean else (
        "every weight (checkpoint.lean: false)")
    lines = [f"bytes per checkpoint ({world_size} ranks, ZeRO-{cfg.zero_stage}, {cfg.precision}; {kind}):",
             "| stage | weights (model.safetensors) | optimizer state (DeepSpeed) | total | tensors referenced | "
             "every weight would be |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in sizes:
        lines.append(f"| {s.stage} | {show(s.weights)} | {show(s.optimizer)} | {show(s.total)} | {s.left_out} | "
                     f"{show(s.every_weight)} |")
    return "\n".join(lines)
