"""Training-side benchmark worker, run by bench/benchmark.py under the real launcher.

Drives the trainer's own objects (part.train.stage.StageRun: the stage's model, engine, stream and training step;
part.train.checkpoint.Checkpointer), so what it times is what train.py runs. Rank 0 prints one
`BENCH_JSON {...}` line per measurement; the parent parses those lines and nothing else.

Phases (in this order; each is optional):
  train   live loop: --warmup untimed steps, then --steps timed ones; step time, time in next(loader),
          samples, audio seconds, LLM tokens per rank; per-rank ZeRO-3 parameter partition bytes
  replay  ZeRO-3 compute only on --replay-steps batches kept from the live loop (no loader)
  plain   (1 rank only) the same model and batches in a plain PyTorch loop, interleaved with `replay` (ABBA)
  ckpt    Checkpointer.save, then the trainer's resume path: the stage rebuilt from the checkpoint (model,
          weights, engine, optimizer state)
  switch  the trainer's stage switch: destroy the stage, build the next one from the checkpoint weights with its
          trainable groups, new stream; then --switch-steps steps of the new stage
  anatomy where a step's time goes, on --anatomy-batches batches the live loop has not trained on: each trained
          twice in a row (the first step meets the batch's shape, new or already seen; the second replays it), on
          CUDA with cuDNN attention as set (the default), then switched; then replayed steps under torch.profiler,
          whose operators' own time (device kernels on CUDA, host operators on CPU) is the step's share in kernels
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

PREFIX = "BENCH_JSON "
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from part.batch import Batch  # noqa: E402  (after the path set-up above)

EXAMPLES = """\
example (bench/benchmark.py starts it so; run by hand to debug one phase):
  deepspeed --num_gpus 1 --master_port 29511 bench/train_bench_worker.py --config configs/tiny_part.yaml \\
      --workdir /tmp/bench_worker --phases train --steps 5
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--anatomy-batches", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_intermixed_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace):
        from part.config import load_config
        from part.curriculum import Curriculum
        from part.model.tokenizer import load_tokenizer
        from part.train.distributed import DistributedContext

        self.args = args
        self.cfg = load_config(args.config, args.overrides)
        self.dist = DistributedContext.init()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        if self.cfg.precision == "bf16" and not self.dist.supports_bf16():
            raise SystemExit(f"error: precision bf16 ({self.cfg.ds_config}) is not supported on this accelerator")
        self.tokenizer = load_tokenizer(self.cfg.model.llm.tokenizer or self.cfg.model.llm.pretrained)
        self.curriculum = Curriculum(self.cfg.stages)
        self.workdir = Path(args.workdir)
        self.stage = None  # the StageRun being timed

    # ---------------------------------------------------------------- helpers

    def emit(self, kind: str, **data) -> None:
        if self.rank == 0:
            print(PREFIX + json.dumps({"kind": kind, "world": self.world, **data}), flush=True)

    def gather(self, value) -> list:
        return self.dist.gather_objects(value)

    def barrier(self) -> None:
        self.dist.synchronize()
        self.dist.barrier()

    def build_stage(self, stage_index: int, checkpoint: Path | None, restore_optimizer: bool = False):
        """The trainer's stage build (StageRun.build), put in training mode with every rank done building."""
        from part.train.stage import StageRun

        span = self.curriculum.spans[stage_index]
        self.stage = StageRun.build(self.cfg, self.dist, self.tokenizer, span, self.curriculum.lr(span.start),
                                    checkpoint=checkpoint, restore_optimizer=restore_optimizer)
        self.stage.engine.train()
        self.barrier()
        return self.stage

    def destroy_stage(self) -> None:
        if self.stage is not None:
            self.stage.destroy()  # drops the loader iterator (its workers shut down), then the engine
        self.stage = None
        gc.collect()

    def step_on(self, batch: Batch, step: int) -> float:
        """One training step of the stage on a batch already in hand; its time (s)."""
        record = self.stage.train_step(step, self.curriculum.lr(step), fetch=lambda: batch)
        if record.skipped:
            raise RuntimeError(f"non-finite loss at step {step}")
        return record.step_time

    def param_partition(self) -> dict:
        """This rank's ZeRO-3 parameter partition: each param's local shard `ds_tensor` (ds_numel elements)."""
        local = full = 0
        unpartitioned = 0
        for p in self.stage.model.parameters():
            full += p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
            shard = getattr(p, "ds_tensor", None)
            if shard is None:
                unpartitioned += 1
                local += p.numel() * p.element_size()
            else:
                local += shard.ds_numel * shard.element_size()
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.stage.model.parameters())
        return {"local_bytes": local, "full_bytes": full, "params": n_params, "unpartitioned": unpartitioned}

    # ---------------------------------------------------------------- phases

    def phase_train(self) -> None:
        a, span = self.args, self.curriculum.spans[self.args.stage]
        stage = self.build_stage(a.stage, None)
        part = self.gather(self.param_partition())
        self.emit("params", stage=span.name, per_rank=part)
        stage.open_stream()
        self.kept: list[Batch] = []
        rows, warmup_times = [], []
        step = span.start
        fetched: list[Batch] = []  # this step's batches: kept for the replay
        self.seen_shapes: set[tuple] = set()

        def fetch() -> Batch:
            fetched.append(stage.next_batch())
            self.seen_shapes.add(batch_shape(fetched[-1]))
            return fetched[-1]

        for i in range(a.warmup + a.steps):
            fetched.clear()
            record = stage.train_step(step, self.curriculum.lr(step), fetch=fetch)
            if record.skipped:
                raise RuntimeError(f"non-finite loss at step {step}")
            step += 1
            if i < a.warmup:
                warmup_times.append(record.step_time)
                continue
            if len(self.kept) < max(1, a.replay_steps):
                self.kept += list(fetched)
            rows.append({"time": record.step_time, "wait": record.data_wait, "samples": record.samples,
                         "audio_seconds": record.audio_seconds, "tokens": record.sequence_tokens,
                         "flops": record.flops})
        self.step_index = step
        self.mean_step_time = sum(r["time"] for r in rows) / len(rows)
        summary = {k: sum(r[k] for r in rows) for k in ("time", "wait", "samples", "audio_seconds", "tokens", "flops")}
        summary["steps"] = len(rows)
        summary["max_step"] = max(r["time"] for r in rows)
        summary["warmup_times"] = warmup_times
        self.emit("train", stage=span.name, trainable=self.cfg.stages[a.stage].trainable,
                  tasks=self.cfg.stages[a.stage].tasks, per_rank=self.gather(summary),
                  ds_config=self.cfg.ds_config, threads=torch.get_num_threads(),
                  num_workers=self.cfg.data.num_workers,
                  device_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)

    def zero_replay(self) -> list[float]:
        return [self.step_on(batch, self.step_index) for batch in self.kept]

    def phase_replay(self, plain: bool) -> None:
        """ZeRO-3 on the kept batches; with `plain`, ABBA-interleaved with a plain PyTorch loop on the same ones."""
        if not plain or self.world != 1:
            zero = self.zero_replay()
            self.emit("replay", per_rank=self.gather({"zero3": zero}))
            return
        from part.model.groups import set_trainable
        from part.model.speech_llm import SpeechLLM
        from part.train.stage import build_optimizer, seed_everything

        cfg, stage = self.cfg, self.cfg.stages[self.args.stage]
        dtype = self.stage.features_dtype
        seed_everything(cfg.seed + self.args.stage)
        model = SpeechLLM(cfg.model, self.tokenizer).to(self.dist.device, dtype)  # what the engine trains in
        set_trainable(model, stage.trainable)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg.optim, self.curriculum.lr(self.step_index))
        model.train()

        def plain_replay(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
            times = []
            for batch in self.kept:
                t0 = time.perf_counter()
                out = model(batch.to(self.dist.device, dtype), lm_loss=stage.lm_loss)
                out["loss"].backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                float(out["loss_sum"].detach())
                self.dist.synchronize()
                times.append(time.perf_counter() - t0)
            return times

        plain_replay(model, optimizer)  # warmup: first-touch allocations and AdamW state creation, as the engine had
        zero, plain_t = [], []
        zero += self.zero_replay()  # A B B A: cancels a linear drift in machine load
        plain_t += plain_replay(model, optimizer)
        plain_t += plain_replay(model, optimizer)
        zero += self.zero_replay()
        self.emit("replay", per_rank=[{"zero3": zero, "plain": plain_t}], dtype=str(dtype))
        del model, optimizer
        gc.collect()

    def phase_ckpt(self) -> None:
        from part.train.checkpoint import Checkpointer

        a = self.args
        checkpointer = Checkpointer(self.workdir / "ckpt", self.dist, keep=2)
        self.barrier()
        t0 = time.perf_counter()
        path = self.stage.save_checkpoint(checkpointer, self.step_index)
        self.barrier()
        save_time = time.perf_counter() - t0
        self.ckpt_dir = path
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.rank == 0 else 0
        weights = (path / "model.safetensors").stat().st_size if self.rank == 0 else 0

        # the trainer's resume inside a stage: the stage rebuilt from the checkpoint, optimizer state included
        self.destroy_stage()
        self.barrier()
        t0 = time.perf_counter()
        times = self.build_stage(a.stage, path, restore_optimizer=True).build_times
        resume_total = time.perf_counter() - t0
        first_step = self.step_on(self.kept[0], self.step_index)  # the resumed engine trains
        self.emit("ckpt", save=save_time, load_weights=times.weights, load_checkpoint=times.optimizer_state,
                  build_model=times.model, init_engine=times.engine, resume_total=resume_total,
                  first_step=first_step, bytes=size, weights_bytes=weights, step_time=self.mean_step_time)

    def phase_switch(self) -> None:
        a = self.args
        nxt = a.next_stage if a.next_stage >= 0 else a.stage + 1
        if nxt >= len(self.cfg.stages):
            nxt = a.stage - 1
        if nxt < 0 or nxt == a.stage:
            self.emit("switch", skipped="the config has a single stage")
            return
        self.barrier()
        t0 = time.perf_counter()
        self.destroy_stage()
        t1 = time.perf_counter()
        stage = self.build_stage(nxt, self.ckpt_dir)  # a boundary: the weights, a fresh optimizer
        times = stage.build_times
        t2 = time.perf_counter()
        stage.open_stream()
        batch = stage.next_batch()
        t3 = time.perf_counter()
        steps = []
        step = self.curriculum.spans[nxt].start
        for i in range(a.switch_steps):
            # the first step's batch is already here; later ones are fetched inside the timed step
            record = stage.train_step(step, self.curriculum.lr(step), fetch=(lambda: batch) if i == 0 else None)
            steps.append(record.step_time)
            step += 1
        self.emit("switch", from_stage=self.cfg.stages[a.stage].name, to_stage=self.cfg.stages[nxt].name,
                  trainable=self.cfg.stages[nxt].trainable, destroy=t1 - t0, build_model=times.model,
                  load_weights=times.weights, init_engine=times.engine, engine_total=t2 - t0,
                  first_batch=t3 - t2, total=t3 - t0, new_stage_steps=steps, step_time=self.mean_step_time)

    def phase_anatomy(self) -> None:
        """New batches stepped twice (first vs replay), per attention setting; the replayed step's kernel time."""
        stage, n = self.stage, self.args.anatomy_batches
        cuda = torch.cuda.is_available()

        def twice(label: str) -> dict:
            """Each of n new batches trained twice in a row: the first step's time, the replay's."""
            first, replay, new = [], [], []
            for _ in range(n):
                batch = stage.next_batch()
                shape = batch_shape(batch)
                new.append(shape not in self.seen_shapes)
                self.seen_shapes.add(shape)
                first.append(self.step_on(batch, self.step_index))
                replay.append(self.step_on(batch, self.step_index))
            return {"mode": label, "first": first, "replay": replay, "new_shape": new}

        if not cuda:
            modes = [twice("cpu")]
        else:
            enabled = torch.backends.cuda.cudnn_sdp_enabled()
            modes = [twice(f"cuDNN attention {'on' if enabled else 'off'} (default)")]
            torch.backends.cuda.enable_cudnn_sdp(not enabled)
            modes.append(twice(f"cuDNN attention {'off' if enabled else 'on'}"))
            torch.backends.cuda.enable_cudnn_sdp(enabled)  # the profiled steps run under the default
        kernels, wall, kind = self.kernel_time(self.kept[0])
        self.emit("anatomy", stage=self.cfg.stages[self.args.stage].name, modes=modes, kernel_seconds=kernels,
                  profiled_seconds=wall, kernel_kind=kind, shapes_seen=len(self.seen_shapes))

    def kernel_time(self, batch: Batch, steps: int = 2) -> tuple[float, float, str]:
        """Per replayed step under torch.profiler (`steps` of them): the operators' own time (device kernels on
        CUDA, operators on the host on CPU: part.train.profiling.operator_time) and the wall time, both in s, and
        what the first counts."""
        from torch.profiler import ProfilerActivity, profile

        from part.train.profiling import operator_time

        cuda = torch.cuda.is_available()
        self.step_on(batch, self.step_index)  # the shape met outside the window
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step_on(batch, self.step_index)
            wall = time.perf_counter() - t0
        busy, kind, _ = operator_time(prof.key_averages(), "cuda" if cuda else "cpu")
        return busy / steps, wall / steps, kind

    def close(self) -> None:
        self.destroy_stage()
        self.dist.close()


def batch_shape(batch: Batch) -> tuple:
    """The shapes a batch gives the model: (clips, audio steps), (LLM rows, LLM length)."""
    token_ids = batch.layout.token_ids if batch.layout is not None else None
    return (tuple(batch.input_features.shape), None if token_ids is None else tuple(token_ids.shape))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"train", "replay", "plain", "ckpt", "switch", "anatomy"}
    if unknown:
        raise SystemExit(f"error: unknown phases {sorted(unknown)}")
    bench = Bench(args)
    bench.phase_train()
    if "anatomy" in phases:
        bench.phase_anatomy()
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
    os._exit(code)  # no interpreter teardown: loader workers and gloo must not hold the launcher up
