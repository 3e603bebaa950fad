"""Checkpoints that survive crashes: written to `<name>.partial/`, published by one rename, then `latest` is
swapped atomically. A crash or a full disk mid-save leaves the previous checkpoint as `latest`. The run's end
exports the last one's inference-ready part to `<output_dir>/final/`, also atomically, with every weight.

Layout of `step_0000100/`:
  model.safetensors     the weights the run may have changed, in the training dtype, gathered from ZeRO-3
                        partitions (only those); no pickle. With `checkpoint.lean: false`, every weight.
  weight_sources.json   the weights left out: per pretrained directory, its path, the SHA-256 of its weight and
                        config files and the keys read from it (part/model/weight_sources.py)
  part_model.json, tokenizer/, encoder_config/, llm_config/   so the directory loads with
                        `SpeechLLM.from_pretrained`, which reads the left-out weights from their directories
  trainer_state.json    step, the stage the optimizer belongs to, data positions per rank, counters
  ds/                   DeepSpeed's optimizer partitions of the stage's trainable parameters (torch.save format,
                        the only pickled part)
  SHA256SUMS            every other file's SHA-256 (`sha256sum -c` format), written last, checked at resume

A weight is left out when it was read from a pretrained directory (`model.encoder.pretrained`,
`model.llm.pretrained`) and no stage up to the checkpoint's own trained it: stage 1 training the adapter writes
the adapter, the LoRA adapters and whatever else no directory holds; once a stage trains the encoder, every later
checkpoint holds it too. A checkpoint refers to no other, so pruning may delete any. Building a stage from a
checkpoint (a resume, a stage switch) checks the sources' digests first and refuses a changed or missing one.

Non-finite weights are never written: the ranks agree before anything is, and the trainer stops. A checkpoint
whose files do not match SHA256SUMS is skipped at resume, loudly, for the newest one that matches. One without
SHA256SUMS cannot be checked: the resume is refused unless `--trust-unverified-checkpoint` asks to use it as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import deepspeed
import torch
from safetensors.torch import save_file

from part.model.speech_llm import OBJECTIVES_DIR, WEIGHTS_NAME, SpeechLLM
from part.model.weight_sources import SOURCES_NAME, PretrainedPart, read_sources, reference

if TYPE_CHECKING:
    from part.train.distributed import DistributedContext

LATEST = "latest"
DS_TAG = "ds"
SUMS = "SHA256SUMS"
# the train.py flag that resumes from a checkpoint without SHA256SUMS, whose files nothing can check
TRUST_UNVERIFIED_FLAG = "--trust-unverified-checkpoint"


class NonFiniteWeightsError(RuntimeError):
    """Raised on every rank when a checkpoint would hold NaN or inf weights (nothing was written)."""


class UnverifiedCheckpoint(RuntimeError):
    """The checkpoint a resume would take has no SHA256SUMS; the message names it and the flag that trusts it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(ckpt: Path) -> None:
    """SHA256SUMS over every file of `ckpt` (relative paths), in `sha256sum -c` format."""
    files = sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != SUMS)
    (ckpt / SUMS).write_text("".join(f"{_sha256(f)}  {f.relative_to(ckpt).as_posix()}\n" for f in files))


def verify_sums(ckpt: Path) -> str | None:
    """None when every file listed in SHA256SUMS is there with its digest; else what is wrong, naming the file."""
    sums = ckpt / SUMS
    if not sums.exists():
        return f"{sums} is missing"
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        file = ckpt / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} does not match its SHA-256 in {SUMS} (corrupted or changed after the save)"
    return None


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def gather_state_dict(model: SpeechLLM, rank: int, *, every_rank: bool = False, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = torch.float32,
                      keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Full copies of every weight, or of `keys` only (under ZeRO-3, one parameter gathered at a time, and only
    those), on rank 0, or on every rank with `every_rank`; empty elsewhere. Collective. On `device`, cast to
    `dtype` (None: the weights' own)."""
    state: dict[str, torch.Tensor] = {}
    wanted = set(model.state_dict().keys()) if keys is None else set(keys)
    keep = every_rank or rank == 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in wanted:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if keep:
                state[name] = param.detach().to(device, dtype or param.dtype).clone().contiguous()
    if keep:
        for name, buf in model.named_buffers():
            if name in wanted:
                state[name] = buf.detach().to(device).clone().contiguous()
    return state


def written_keys(model: SpeechLLM, left: Sequence[PretrainedPart]) -> list[str]:
    """The state-dict keys a checkpoint holds: all but those `left` (part.model.weight_sources.left_out) names."""
    omitted = {key for part in left for key in part.keys}
    return [key for key in model.state_dict() if key not in omitted]


class Checkpointer:
    def __init__(self, root: str | Path, dist: DistributedContext | None, keep: int = 2,
                 kept_steps: Sequence[int] = ()):
        """`dist`: the ranks' collectives (None: one process, no process group). `kept_steps`: the steps whose
        checkpoints pruning never removes (the stages' ends, with checkpoint.keep_stage_ends)."""
        self.root = Path(root)
        self.dist, self.keep = dist, keep
        self.kept_steps = frozenset(kept_steps)
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def _all_ranks_ok(self, ok: bool) -> bool:
        return self.dist.all_true(ok) if self.dist is not None else ok

    def complete(self) -> list[Path]:
        """Published checkpoints (a trainer_state.json, not a .partial), oldest first by step number."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
                 and p.name.split("_")[1].isdigit() and (p / "trainer_state.json").exists()]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        """What `latest` names; without the pointer, the newest complete checkpoint."""
        pointer = self.root / LATEST
        if not pointer.exists():
            done = self.complete()
            return done[-1] if done else None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{pointer} names {path}, which has no trainer_state.json")
        return path

    def newest_good(self, report: Callable[[str], None] = print, trust_unverified: bool = False) -> Path | None:
        """The checkpoint to resume from: `latest` (or the newest complete one) when its files match their
        SHA-256 sums, else the newest older one that does; every one skipped is reported. Reads every file:
        call it on one rank. Reaching a checkpoint without SHA256SUMS raises UnverifiedCheckpoint, unless
        `trust_unverified` takes it as it is."""
        pointer = self.root / LATEST
        first = None
        if pointer.exists():
            try:
                first = self.latest()
            except FileNotFoundError as exc:  # it names a checkpoint that is gone or incomplete
                report(f"{exc}; using the newest complete checkpoint instead")
        elif done := self.complete():
            report(f"{pointer} is missing; using the newest complete checkpoint, {done[-1].name}")
        candidates = [p for p in reversed(self.complete()) if first is None or step_of(p) <= step_of(first)]
        for path in candidates:
            if not (path / SUMS).exists():  # an older version's, or the file was lost: nothing to check against
                if not trust_unverified:
                    raise UnverifiedCheckpoint(
                        f"checkpoint {path} has no {SUMS}, so its files cannot be verified; resume with "
                        f"{TRUST_UNVERIFIED_FLAG} to use it as it is, or remove it to resume from an older one")
                report(f"note: checkpoint {path.name} has no {SUMS}: used unverified ({TRUST_UNVERIFIED_FLAG})")
                return path
            problem = verify_sums(path)
            if problem is None:
                return path
            report(f"error: checkpoint {path.name} is damaged: {problem}; falling back to the one before it")
        return None

    def save(self, engine, model: SpeechLLM, tokenizer, step: int, trainer_state: dict,
             data_state: dict, save_optimizer: bool = True, left: Sequence[PretrainedPart] = ()) -> Path:
        """Collective: every rank calls it. Returns the published checkpoint directory. `left`: the weights it
        leaves out (part.model.weight_sources.left_out), referenced in their pretrained directories; the others
        are written in their own dtype."""
        final = self.root / step_dir_name(step)
        partial = self.root / (step_dir_name(step) + ".partial")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        self._barrier()
        state = gather_state_dict(model, self.rank, dtype=None, keys=written_keys(model, left))
        # Never written, published or exported: every rank agrees before anything is, then all raise.
        if not self._all_ranks_ok(_finite(state)):
            self._abandon(partial)
            raise NonFiniteWeightsError(f"the weights at step {step} are not finite; nothing was saved")
        ok = True
        try:
            if save_optimizer:
                # frozen weights are in model.safetensors or their sources; DeepSpeed need not store them again
                engine.save_checkpoint(str(partial), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
            (partial / f"data_rank{self.rank}.json").write_text(json.dumps(data_state))
            if self.rank == 0:
                model.save_pretrained(partial, tokenizer, state, sources=[reference(part) for part in left])
                full = dict(trainer_state, step=step, world_size=self.world_size)
                (partial / "trainer_state.json").write_text(json.dumps(full, indent=1))
        except Exception as exc:  # noqa: BLE001  disk full (not always an OSError), ...: keep the previous one
            print(f"[rank {self.rank}] checkpoint at step {step} failed: {type(exc).__name__}: {exc}; keeping the "
                  "previous one", flush=True)
            ok = False
        # Through the ranks' context, on the engine's device: NCCL has no CPU tensors (a CPU flag here killed
        # every GPU run at its first checkpoint, while gloo accepted it).
        if not self._all_ranks_ok(ok):
            return self._abandon(partial)
        if self.rank == 0:  # every rank's files are written: their sums, last
            try:
                write_sums(partial)
                ok = True
            except Exception as exc:  # noqa: BLE001
                print(f"[rank 0] checkpoint at step {step}: writing {SUMS} failed: {exc}", flush=True)
                ok = False
        if not self._all_ranks_ok(ok):
            return self._abandon(partial)
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp_pointer = self.root / (LATEST + ".partial")
            tmp_pointer.write_text(final.name)
            os.replace(tmp_pointer, self.root / LATEST)
            self._prune(keep_also=final)
        self._barrier()
        return final

    def _abandon(self, partial: Path) -> Path | None:
        """Collective: drops a save that did not complete on every rank; the previous checkpoint stays."""
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self._barrier()
        return self.latest()

    def _prune(self, keep_also: Path) -> None:
        """Keeps the newest `keep` checkpoints by step number, those of `kept_steps`, and always `keep_also` (the
        one just written)."""
        prunable = [p for p in self.complete() if step_of(p) not in self.kept_steps]
        for old in prunable[: -self.keep]:
            if old != keep_also:
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


def export_final(ckpt_dir: Path, final: Path, extra_files: dict[str, str] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """The inference-ready part of the last checkpoint (weights, model config, tokenizer), without optimizer;
    `extra_files` (name -> text, e.g. the model card) are written with it. A checkpoint that leaves weights out
    needs `weights`, every one of them (gather_state_dict): `final/` holds them all and reads no other directory."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if weights is not None:
        save_file(weights, str(tmp / WEIGHTS_NAME))
    elif read_sources(ckpt_dir):
        raise ValueError(f"{ckpt_dir} leaves weights out ({SOURCES_NAME}): exporting it needs every weight")
    else:
        shutil.copy2(ckpt_dir / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
    shutil.copy2(ckpt_dir / "part_model.json", tmp / "part_model.json")
    for name in ("tokenizer", "encoder_config", "llm_config", OBJECTIVES_DIR):
        if name == OBJECTIVES_DIR and not (ckpt_dir / name).exists():
            continue  # a model whose objectives keep no files
        shutil.copytree(ckpt_dir / name, tmp / name)
    (tmp / FINAL_MARKER).write_text(json.dumps({"checkpoint": str(ckpt_dir)}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
