"""Checkpoints that survive crashes: written to `<name>.partial/`, published by one rename, then `latest` is
swapped atomically. A crash or a full disk mid-save leaves the previous checkpoint as `latest`. The run's end
exports the last one's inference-ready part to `<output_dir>/final/`, also atomically.

Layout of `step_0000100/`:
  model.safetensors     every weight (frozen ones too), gathered from ZeRO-3 partitions; no pickle
  part_model.json, tokenizer/   so the directory loads with `SpeechLLM.from_pretrained`
  trainer_state.json    step, the stage the optimizer belongs to, data positions per rank, counters
  ds/                   DeepSpeed's optimizer partitions (torch.save format, the only pickled part)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import deepspeed
import torch

from part.model.speech_llm import SpeechLLM

if TYPE_CHECKING:
    from part.train.distributed import DistributedContext

LATEST = "latest"
DS_TAG = "ds"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def gather_state_dict(model: SpeechLLM, rank: int) -> dict[str, torch.Tensor]:
    """Full fp32 copies of every weight on rank 0 (empty elsewhere), one parameter gathered at a time."""
    state: dict[str, torch.Tensor] = {}
    keys = set(model.state_dict().keys())
    for name, param in model.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0 and name in keys:
                state[name] = param.detach().to("cpu", torch.float32).clone().contiguous()
    if rank == 0:
        for name, buf in model.named_buffers():
            if name in keys:
                state[name] = buf.detach().cpu().clone().contiguous()
    return state


class Checkpointer:
    def __init__(self, root: str | Path, dist: DistributedContext | None, keep: int = 2):
        """`dist`: the ranks' collectives (None: one process, no process group)."""
        self.root = Path(root)
        self.dist, self.keep = dist, keep
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def _all_ranks_ok(self, ok: bool) -> bool:
        return self.dist.all_true(ok) if self.dist is not None else ok

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{pointer} names {path}, which has no trainer_state.json")
        return path

    def save(self, engine, model: SpeechLLM, tokenizer, step: int, trainer_state: dict,
             data_state: dict, save_optimizer: bool = True) -> Path:
        """Collective: every rank calls it. Returns the published checkpoint directory."""
        final = self.root / step_dir_name(step)
        partial = self.root / (step_dir_name(step) + ".partial")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        self._barrier()
        state = gather_state_dict(model, self.rank)
        ok = True
        try:
            if save_optimizer:
                # frozen weights are in model.safetensors already; DeepSpeed need not store them again
                engine.save_checkpoint(str(partial), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
            (partial / f"data_rank{self.rank}.json").write_text(json.dumps(data_state))
            if self.rank == 0:
                model.save_pretrained(partial, tokenizer, state)
                full = dict(trainer_state, step=step, world_size=self.world_size)
                (partial / "trainer_state.json").write_text(json.dumps(full, indent=1))
        except OSError as exc:  # e.g. disk full: keep the previous checkpoint, report, go on training
            print(f"[rank {self.rank}] checkpoint at step {step} failed: {exc}; keeping the previous one", flush=True)
            ok = False
        # Through the ranks' context, on the engine's device: NCCL has no CPU tensors (a CPU flag here killed
        # every GPU run at its first checkpoint, while gloo accepted it).
        if not self._all_ranks_ok(ok):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            self._barrier()
            return self.latest()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp_pointer = self.root / (LATEST + ".partial")
            tmp_pointer.write_text(final.name)
            os.replace(tmp_pointer, self.root / LATEST)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def read_data_state(path: Path, rank: int) -> dict | None:
    """This rank's data position; None when the checkpoint has none for it (e.g. a different world size)."""
    file = path / f"data_rank{rank}.json"
    return json.loads(file.read_text()) if file.exists() else None


# ---------------------------------------------------------------- the final export

FINAL_MARKER = "part_final.json"


def final_is_from(final: Path, ckpt_dir: Path | None) -> bool:
    """Whether `final/` was exported from checkpoint `ckpt_dir` (so the run's end has already happened)."""
    marker = final / FINAL_MARKER
    return ckpt_dir is not None and marker.exists() and json.loads(marker.read_text())["checkpoint"] == str(ckpt_dir)


def export_final(ckpt_dir: Path, final: Path) -> None:
    """The inference-ready part of the last checkpoint (weights, model config, tokenizer), without optimizer."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.safetensors", "part_model.json"):
        shutil.copy2(ckpt_dir / name, tmp / name)
    for name in ("tokenizer", "encoder_config", "llm_config"):
        shutil.copytree(ckpt_dir / name, tmp / name)
    (tmp / FINAL_MARKER).write_text(json.dumps({"checkpoint": str(ckpt_dir)}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
