"""Training-side benchmark worker, run by bench/benchmark.py under the real launcher:

    deepspeed --num_gpus N --master_port P bench/train_bench_worker.py --config configs/tiny_part.yaml \
        --workdir /tmp/x [--phases train,replay,plain,ckpt,switch] [--steps 20] [key.sub=value ...]

Builds the model, the torch AdamW client optimizer and the ZeRO-3 engine the way train.py does, streams the
stage's mixture through MixtureStream + make_loader and times the same per-step work as train.py's loop.
Rank 0 prints one `BENCH_JSON {...}` line per measurement; the parent parses those lines and nothing else.

Phases (in this order; each is optional):
  train   live loop: --warmup untimed steps, then --steps timed ones; step time, time in next(loader),
          samples, audio seconds, LLM tokens per rank; per-rank ZeRO-3 parameter partition bytes
  replay  ZeRO-3 compute only on --replay-steps batches kept from the live loop (no loader)
  plain   (1 rank only) the same model and batches in a plain PyTorch loop, interleaved with `replay` (ABBA)
  ckpt    Checkpointer.save, then train.py's resume path: SpeechLLM + load_weights, new engine, load_checkpoint
  switch  train.py's stage switch: destroy the engine, next stage's model from the checkpoint weights with its
          trainable groups, new engine, new stream; then --switch-steps steps of the new stage
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

PREFIX = "BENCH_JSON "
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    parser.add_argument("--workdir", required=True, help="scratch directory shared by the ranks (checkpoints)")
    parser.add_argument("--phases", default="train,replay,plain,ckpt,switch")
    parser.add_argument("--stage", type=int, default=0, help="index of the stage to train")
    parser.add_argument("--next-stage", type=int, default=-1, help="stage to switch to (default: --stage + 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replay-steps", type=int, default=8)
    parser.add_argument("--switch-steps", type=int, default=3)
    parser.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the config's ds_config)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_intermixed_args(argv)


def seed_everything(seed: int) -> None:  # as train.py
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Bench:
    def __init__(self, args: argparse.Namespace):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        from part.config import load_config
        from part.curriculum import Curriculum
        from part.model import load_tokenizer

        self.args = args
        self.cfg = load_config(args.config, args.overrides)
        self.accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=self.accelerator.communication_backend_name())
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(self.accelerator.device_name(local_rank))
        if self.accelerator.device_name() != "cpu":
            self.accelerator.set_device(local_rank)
        self.ds_path = args.ds_config or self.cfg.ds_config
        self.ds_config = json.loads(Path(self.ds_path).read_text())
        self.bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))
        if self.bf16 and not self.accelerator.is_bf16_supported():
            raise SystemExit(f"error: {self.ds_path} enables bf16, which this accelerator does not support")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.clip = float(self.ds_config.get("gradient_clipping", 0.0))
        self.tokenizer = load_tokenizer(self.cfg.model.llm.tokenizer or self.cfg.model.llm.pretrained)
        self.curriculum = Curriculum(self.cfg.stages)
        self.workdir = Path(args.workdir)
        self.engine = self.model = self.optimizer = self.batches = None

    # ---------------------------------------------------------------- helpers

    def emit(self, kind: str, **data) -> None:
        if self.rank == 0:
            print(PREFIX + json.dumps({"kind": kind, "world": self.world, **data}), flush=True)

    def gather(self, value) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def sync(self) -> None:
        self.accelerator.synchronize()

    def barrier(self) -> None:
        self.sync()
        self.dist.barrier()

    def build_engine(self, stage_index: int, weights: Path | None) -> dict[str, float]:
        """train.py's per-stage build: model (from `weights` when given), trainable groups, AdamW, engine."""
        import deepspeed

        from part.model import SpeechLLM, set_trainable

        cfg, stage = self.cfg, self.cfg.stages[stage_index]
        times = {}
        seed_everything(cfg.seed + stage_index)
        t0 = time.perf_counter()
        model = SpeechLLM(cfg.model, self.tokenizer)
        t1 = time.perf_counter()
        if weights is not None:
            model.load_weights(weights)
        t2 = time.perf_counter()
        set_trainable(model, stage.trainable)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.curriculum.lr(self.curriculum.spans[stage_index].start), betas=cfg.optim.betas,
            eps=cfg.optim.eps,
        )
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        engine.train()
        self.barrier()
        t3 = time.perf_counter()
        self.engine, self.model, self.optimizer = engine, model, optimizer
        times.update(build_model=t1 - t0, load_weights=t2 - t1, init_engine=t3 - t2)
        return times

    def open_stream(self, stage_index: int, resume: dict | None = None):
        from part.data import MixtureStream, StreamTracker, make_loader

        stage = self.cfg.stages[stage_index]
        stream = MixtureStream(self.cfg.data, stage, self.tokenizer, self.model.encoder.config.num_mel_bins,
                               self.rank, self.world, resume=resume)
        self.tracker = StreamTracker(resume)
        self.batches = iter(make_loader(stream))

    def close_stream(self) -> None:
        self.batches = None  # drops the loader iterator: its worker processes shut down
        gc.collect()

    def destroy_engine(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.model = self.optimizer = None
        gc.collect()

    def llm_tokens(self, batch: dict) -> int:
        """Positions the LLM processes (prompt + target + the adapter's audio frames), for tokens/s and MFU."""
        down = self.cfg.model.adapter.downsample
        frames = batch["feature_frames"].tolist()
        total = 0
        for p, t, j in zip(batch["prompt_ids"], batch["target_ids"], batch["audio_index"].tolist()):
            total += len(p) + len(t)
            if j >= 0:
                enc = (frames[j] + 1) // 2
                total += max(1, -(-enc // down)) - 1  # the placeholder token is replaced by the audio frames
        return total

    def step(self, batch: dict, step: int) -> dict:
        """One optimizer step, the same work as one micro-step of train.py's loop (no logging, no checkpoint)."""
        from part.data import to_device

        lr = self.curriculum.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        on_device = to_device(batch, self.device, self.dtype)
        out = self.engine(on_device)
        loss = out["loss"]
        finite = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=self.device)
        self.dist.all_reduce(finite, op=self.dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise RuntimeError(f"non-finite loss at step {step}")
        self.engine.backward(loss)
        self.engine.step()
        loss_sum = float(out["loss_sum"].detach())
        self.sync()
        return {"loss": loss_sum / max(int(out["tokens"]), 1)}

    def param_partition(self) -> dict:
        """This rank's ZeRO-3 parameter partition: each param's local shard `ds_tensor` (ds_numel elements)."""
        local = full = 0
        unpartitioned = 0
        for p in self.model.parameters():
            full += p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
            shard = getattr(p, "ds_tensor", None)
            if shard is None:
                unpartitioned += 1
                local += p.numel() * p.element_size()
            else:
                local += shard.ds_numel * shard.element_size()
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        return {"local_bytes": local, "full_bytes": full, "params": n_params, "unpartitioned": unpartitioned}

    # ---------------------------------------------------------------- phases

    def phase_train(self) -> None:
        a, span = self.args, self.curriculum.spans[self.args.stage]
        self.build_engine(a.stage, None)
        part = self.gather(self.param_partition())
        self.emit("params", stage=span.name, per_rank=part)
        self.open_stream(a.stage)
        self.kept: list[dict] = []
        rows, warmup_times = [], []
        step = span.start
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            batch = next(self.batches)
            wait = time.perf_counter() - t0
            self.tracker.update(batch.pop("position"))
            self.step(batch, step)
            step_time = time.perf_counter() - t0
            step += 1
            if i < a.warmup:
                warmup_times.append(step_time)
                continue
            if len(self.kept) < max(1, a.replay_steps):
                self.kept.append(batch)
            rows.append({"time": step_time, "wait": wait, "samples": len(batch["meta"]),
                         "audio_seconds": sum(m["duration"] for m in batch["meta"]),
                         "tokens": self.llm_tokens(batch)})
        self.step_index = step
        self.mean_step_time = sum(r["time"] for r in rows) / len(rows)
        summary = {k: sum(r[k] for r in rows) for k in ("time", "wait", "samples", "audio_seconds", "tokens")}
        summary["steps"] = len(rows)
        summary["max_step"] = max(r["time"] for r in rows)
        summary["warmup_times"] = warmup_times
        self.emit("train", stage=span.name, trainable=self.cfg.stages[a.stage].trainable,
                  tasks=self.cfg.stages[a.stage].tasks, per_rank=self.gather(summary),
                  ds_config=self.ds_path, threads=torch.get_num_threads(),
                  num_workers=self.cfg.data.num_workers,
                  device_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)

    def zero_replay(self) -> list[float]:
        times = []
        for batch in self.kept:
            t0 = time.perf_counter()
            self.step(batch, self.step_index)
            times.append(time.perf_counter() - t0)
        return times

    def phase_replay(self, plain: bool) -> None:
        """ZeRO-3 on the kept batches; with `plain`, ABBA-interleaved with a plain PyTorch loop on the same ones."""
        if not plain or self.world != 1:
            zero = self.zero_replay()
            self.emit("replay", per_rank=self.gather({"zero3": zero}))
            return
        from part.data import to_device
        from part.model import SpeechLLM, set_trainable

        cfg, stage = self.cfg, self.cfg.stages[self.args.stage]
        seed_everything(cfg.seed + self.args.stage)
        model = SpeechLLM(cfg.model, self.tokenizer).to(self.device, self.dtype)  # what the engine trains in
        set_trainable(model, stage.trainable)
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.curriculum.lr(self.step_index), betas=cfg.optim.betas, eps=cfg.optim.eps,
        )
        model.train()

        def plain_replay(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
            times = []
            for batch in self.kept:
                t0 = time.perf_counter()
                out = model(to_device(batch, self.device, self.dtype))
                out["loss"].backward()
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, self.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                float(out["loss_sum"].detach())
                self.sync()
                times.append(time.perf_counter() - t0)
            return times

        plain_replay(model, optimizer)  # warmup: first-touch allocations and AdamW state creation, as the engine had
        zero, plain_t = [], []
        zero += self.zero_replay()  # A B B A: cancels a linear drift in machine load
        plain_t += plain_replay(model, optimizer)
        plain_t += plain_replay(model, optimizer)
        zero += self.zero_replay()
        self.emit("replay", per_rank=[{"zero3": zero, "plain": plain_t}], dtype=str(self.dtype))
        del model, optimizer
        gc.collect()

    def phase_ckpt(self) -> None:
        from part.checkpoint import DS_TAG, Checkpointer
        from part.config import to_dict

        a = self.args
        stage = self.cfg.stages[a.stage]
        root = self.workdir / "ckpt"
        checkpointer = Checkpointer(root, self.rank, self.world, keep=2)
        trainer_state = {"engine_stage": a.stage, "stage": stage.name, "config": to_dict(self.cfg)}
        data_state = dict(self.tracker.state(), stage=stage.name)
        self.barrier()
        t0 = time.perf_counter()
        path = checkpointer.save(self.engine, self.model, self.tokenizer, self.step_index, trainer_state, data_state)
        self.barrier()
        save_time = time.perf_counter() - t0
        self.ckpt_dir = path
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.rank == 0 else 0
        weights = (path / "model.safetensors").stat().st_size if self.rank == 0 else 0

        # train.py's resume inside a stage: new model + load_weights, new engine, engine.load_checkpoint
        self.close_stream()
        self.destroy_engine()
        self.barrier()
        t0 = time.perf_counter()
        times = self.build_engine(a.stage, path / "model.safetensors")
        t1 = time.perf_counter()
        self.engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        self.barrier()
        t2 = time.perf_counter()
        t3 = time.perf_counter()
        self.step(self.kept[0], self.step_index)  # the resumed engine trains
        first_step = time.perf_counter() - t3
        self.emit("ckpt", save=save_time, load_weights=times["load_weights"], load_checkpoint=t2 - t1,
                  build_model=times["build_model"], init_engine=times["init_engine"], resume_total=t2 - t0,
                  first_step=first_step, bytes=size, weights_bytes=weights, step_time=self.mean_step_time)

    def phase_switch(self) -> None:
        a = self.args
        nxt = a.next_stage if a.next_stage >= 0 else a.stage + 1
        if nxt >= len(self.cfg.stages):
            nxt = a.stage - 1
        if nxt < 0 or nxt == a.stage:
            self.emit("switch", skipped="the config has a single stage")
            return
        weights = self.ckpt_dir / "model.safetensors"
        self.barrier()
        t0 = time.perf_counter()
        self.close_stream()
        self.destroy_engine()
        t1 = time.perf_counter()
        times = self.build_engine(nxt, weights)
        t2 = time.perf_counter()
        self.open_stream(nxt)
        batch = next(self.batches)
        self.tracker.update(batch.pop("position"))
        t3 = time.perf_counter()
        steps = []
        step = self.curriculum.spans[nxt].start
        t = t3
        for i in range(a.switch_steps):
            if i:  # the first step's batch is already here; later ones are fetched inside the timed step
                t = time.perf_counter()
                batch = next(self.batches)
                self.tracker.update(batch.pop("position"))
            self.step(batch, step)
            steps.append(time.perf_counter() - t)
            step += 1
        self.emit("switch", from_stage=self.cfg.stages[a.stage].name, to_stage=self.cfg.stages[nxt].name,
                  trainable=self.cfg.stages[nxt].trainable, destroy=t1 - t0, build_model=times["build_model"],
                  load_weights=times["load_weights"], init_engine=times["init_engine"], engine_total=t2 - t0,
                  first_batch=t3 - t2, total=t3 - t0, new_stage_steps=steps, step_time=self.mean_step_time)

    def close(self) -> None:
        self.close_stream()
        self.destroy_engine()
        self.dist.barrier()
        self.dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"train", "replay", "plain", "ckpt", "switch"}
    if unknown:
        raise SystemExit(f"error: unknown phases {sorted(unknown)}")
    bench = Bench(args)
    bench.phase_train()
    if "replay" in phases or "plain" in phases:
        bench.phase_replay(plain="plain" in phases)
    if "ckpt" in phases or "switch" in phases:
        bench.phase_ckpt()
    if "switch" in phases:
        bench.phase_switch()
    bench.emit("done")
    bench.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
