"""Train a Speech LLM with the PART curriculum under DeepSpeed.

    deepspeed --num_gpus 8 train.py --config configs/part_large.yaml [key.sub=value ...] [--resume]

One loop, top to bottom: for each stage of the curriculum, build the engine with that stage's trainable
groups, stream that stage's task mixture, train, checkpoint, evaluate. A stage switch goes through the same
path as a resume (weights from the boundary checkpoint, a fresh optimizer for the new trainable set), so a
run resumed at or inside any stage continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.0.lr=5e-4")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.dir/latest if present")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the data of every stage, then exit (no processes started)")
    parser.add_argument("--world-size", type=int, default=1, help="with --check: the number of ranks to check for")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_intermixed_args(argv)  # flags may come after the overrides


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from part.data import DataError, stage_shards

    try:  # every stage's data, before any process starts or any step is spent
        for stage in cfg.stages:
            stage_shards(cfg.data, stage, int(os.environ.get("WORLD_SIZE", args.world_size)))
    except DataError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK ({len(cfg.stages)} stages, {cfg.total_steps} steps)")
        return 0

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from part.checkpoint import DS_TAG, Checkpointer, read_data_state, read_trainer_state, step_dir_name
    from part.curriculum import Curriculum
    from part.data import MixtureStream, StreamTracker, make_loader, to_device
    from part.evaluate import evaluate
    from part.logging import RunLogger
    from part.model import SpeechLLM, load_tokenizer, set_trainable

    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(accelerator.device_name(local_rank))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    else:  # denormal floats late in training make CPU steps up to ~10x slower; flushing them costs nothing
        torch.set_flush_denormal(True)
    ds_config = json.loads(Path(cfg.ds_config).read_text())
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if bf16 and not accelerator.is_bf16_supported():
        raise SystemExit(f"error: {cfg.ds_config} enables bf16, which {accelerator.device_name()} does not support; "
                         "use an fp32 config such as ds_configs/zero3_cpu.json")
    grad_accum = int(ds_config.get("gradient_accumulation_steps", 1))

    tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.pretrained)
    curriculum = Curriculum(cfg.stages)
    checkpointer = Checkpointer(cfg.checkpoint.dir, rank, world, keep=cfg.checkpoint.keep)
    logger = RunLogger(cfg, rank, world)

    step, ckpt_dir, ckpt_state = 0, None, None
    if args.resume and (ckpt_dir := checkpointer.latest()) is not None:
        ckpt_state = read_trainer_state(ckpt_dir)
        step = ckpt_state["step"]
        logger.info(f"resuming from {ckpt_dir} at step {step}")
    elif args.resume:
        logger.info(f"--resume: no checkpoint in {cfg.checkpoint.dir}; starting fresh")

    bad_in_a_row = 0
    fault_nan_steps = {int(s) for s in os.environ.get("PART_FAULT_NAN_STEPS", "").split(",") if s}  # tests only
    exit_code = 0
    final_dir = Path(cfg.output_dir) / "final"

    def run_finished() -> bool:  # decided by rank 0 (nodes may not share a filesystem view at this instant)
        flag = torch.tensor([1 if rank == 0 and final_is_from(final_dir, ckpt_dir) else 0], device=device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    # Also entered at the last step when the final evaluation/export did not happen (a crash right after the
    # last checkpoint): the engine is rebuilt from that checkpoint and only the evaluation runs.
    while step < curriculum.total_steps or not run_finished():
        span = curriculum.at(step)
        stage = span.stage
        seed_everything(cfg.seed + span.index)

        # ---- build this stage's model and engine (fresh, or from the checkpoint's weights)
        if ckpt_dir is None:
            model = SpeechLLM(cfg.model, tokenizer)  # the pretrained encoder and LLM
        else:  # the architecture saved with the checkpoint, then its weights: pretrained ones are not read again
            model = SpeechLLM(cfg.model, tokenizer, saved_configs=ckpt_dir)
            model.load_weights(ckpt_dir / "model.safetensors")
        counts = set_trainable(model, stage.trainable)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=curriculum.lr(step), betas=cfg.optim.betas, eps=cfg.optim.eps,
        )
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        same_stage = ckpt_state is not None and ckpt_state["engine_stage"] == span.index
        if same_stage:  # inside a stage: restore the optimizer too; at a boundary the new stage starts fresh
            engine.load_checkpoint(str(ckpt_dir), tag=DS_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        logger.stage(span, counts, step)

        # ---- this stage's data stream, positioned where the checkpoint left it
        data_resume = None
        if same_stage:
            saved = read_data_state(ckpt_dir, rank)
            layout = {"stage": stage.name, "world_size": world, "num_workers": cfg.data.num_workers}
            if saved and all(saved.get(k) == v for k, v in layout.items()):
                data_resume = saved
            else:
                logger.info("data: the checkpoint's stream layout differs (stage, ranks or workers); "
                            "this stage's data stream restarts from its beginning")
        stream = MixtureStream(cfg.data, stage, tokenizer, model.encoder.config.num_mel_bins, rank, world,
                               resume=data_resume)
        tracker = StreamTracker(data_resume)
        batches = iter(make_loader(stream))
        tokens_dtype = torch.bfloat16 if bf16 else torch.float32

        engine.train()
        while step < span.end:
            t0 = time.time()
            lr = curriculum.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, token_sum, samples, audio_seconds, wait = 0.0, 0, 0, 0.0, 0.0
            skipped = False
            for _ in range(grad_accum):
                w0 = time.time()
                batch = next(batches)
                wait += time.time() - w0
                tracker.update(batch.pop("position"))
                batch = to_device(batch, device, tokens_dtype)
                out = engine(batch)
                loss = out["loss"]
                if step in fault_nan_steps:
                    loss = loss * float("nan")
                # Every rank must agree to skip, or ZeRO's collectives would hang on the ranks that go on.
                finite = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=device)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    skipped = True
                    if grad_accum > 1:  # keep DeepSpeed's accumulation boundary; this micro-batch adds nothing
                        engine.step()
                    continue
                engine.backward(loss)
                engine.step()
                loss_sum += float(out["loss_sum"].detach())
                token_sum += int(out["tokens"])
                samples += len(batch["meta"])
                audio_seconds += sum(m["duration"] for m in batch["meta"])
            if skipped:
                bad_in_a_row += 1
                logger.info(f"step {step}: non-finite loss, step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.optim.max_bad_steps:
                    logger.info(f"error: {bad_in_a_row} consecutive non-finite losses at step {step}; stopping. "
                                "Lower the learning rate or check the data; resume from the last checkpoint.")
                    exit_code = 3
                    break
            else:
                bad_in_a_row = 0
            step += 1
            if not skipped:
                logger.step(step, span, loss_sum, token_sum, samples, audio_seconds, lr,
                            engine.get_global_grad_norm(), time.time() - t0, wait, tracker, device)
            if step % cfg.checkpoint.every == 0 or step == span.end:
                trainer_state = {"engine_stage": span.index, "stage": stage.name, "config": to_dict(cfg)}
                data_state = dict(tracker.state(), stage=stage.name, world_size=world,
                                  num_workers=cfg.data.num_workers)
                path = checkpointer.save(engine, model, tokenizer, step, trainer_state, data_state)
                if path is not None and path.name == step_dir_name(step):
                    logger.info(f"checkpoint {path}")
                    ckpt_dir, ckpt_state = path, read_trainer_state(path)
                elif step == span.end:  # the next stage is built from this checkpoint: it must exist
                    logger.info(f"error: the stage-boundary checkpoint at step {step} could not be written; "
                                f"free space in {cfg.checkpoint.dir} and rerun with --resume")
                    exit_code = 4
                    break
            eval_due = cfg.eval.every and cfg.eval.per_language and step % cfg.eval.every == 0
            if eval_due and step < curriculum.total_steps:
                evaluate(engine, cfg, tokenizer, rank, world, device, tokens_dtype, step, logger)
                engine.train()
        del batches
        if exit_code:
            break
        if step == curriculum.total_steps:
            if cfg.eval.per_language:
                evaluate(engine, cfg, tokenizer, rank, world, device, tokens_dtype, step, logger, final=True)
            if rank == 0:
                logger.info(f"final model: {final_dir} (a copy of checkpoint {ckpt_dir.name})")
                export_final(ckpt_dir, final_dir)
            dist.barrier()
        engine.destroy()
        del engine, model, optimizer
    logger.close()
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


FINAL_MARKER = "part_final.json"


def final_is_from(final: Path, ckpt_dir: Path | None) -> bool:
    """Whether `final/` was exported from checkpoint `ckpt_dir` (so the run's end has already happened)."""
    marker = final / FINAL_MARKER
    return ckpt_dir is not None and marker.exists() and json.loads(marker.read_text())["checkpoint"] == str(ckpt_dir)


def export_final(ckpt_dir: Path, final: Path) -> None:
    """The inference-ready part of the last checkpoint (weights, model config, tokenizer), without optimizer."""
    import shutil

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


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code) if code else sys.exit(0)
