"""Rank-0 logging: a console progress line for everyone, and wandb (offline unless configured) when enabled."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from part.config import TrainConfig, to_dict
from part.data.stream import StreamTracker
from part.train.curriculum import StageSpan
from part.train.records import StepRecord


class RunLogger:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, peak_flops: float | None = None):
        """`peak_flops`: one device's peak for the run's precision (None: unknown, MFU not reported)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.peak_flops = peak_flops
        self.start = time.time()
        self.steps_timed = 0
        self.time_in_steps = 0.0
        self.wandb = None
        if rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        if rank == 0 and cfg.logging.wandb_project and cfg.logging.wandb_mode != "disabled":
            import wandb

            mode = cfg.logging.wandb_mode
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                mode = "offline"
                self.info("wandb: WANDB_API_KEY is not set; logging offline (sync later with `wandb sync`)")
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name, mode=mode,
                                    config=to_dict(cfg), dir=cfg.output_dir)

    def resumed_at(self, step: int) -> None:
        """Drops train_log.jsonl's records after `step` (the run resumes there and logs them again), so each
        step is in the log once."""
        path = Path(self.cfg.output_dir) / "train_log.jsonl"
        if self.rank != 0 or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".jsonl.partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def info(self, message: str) -> None:
        if self.rank == 0:
            print(f"[part] {message}", flush=True)

    def stage(self, span: StageSpan, counts: dict[str, int], step: int) -> None:
        total = sum(counts.values())
        groups = ", ".join(f"{k}={v:,}" for k, v in counts.items())
        self.info(f"stage {span.index + 1} '{span.name}' steps {span.start}-{span.end} (at {step}): "
                  f"trainable {total:,} params ({groups}); tasks {span.stage.tasks}")
        if self.wandb:
            self.wandb.log({"stage/index": span.index, "stage/trainable_params": total,
                            **{f"stage/trainable/{k}": v for k, v in counts.items()}}, step=step)

    def step(self, record: StepRecord, span: StageSpan, tracker: StreamTracker) -> None:
        """`record` holds sums over all ranks (the global batch); every rank may call this, rank 0 writes."""
        if self.rank != 0:
            return
        step, step_time = record.step, record.step_time
        data_wait = record.data_wait / self.world_size  # mean over ranks
        # model FLOP utilisation: the step's operations over what all devices could do in its time
        mfu = record.flops / (step_time * self.world_size * self.peak_flops) if self.peak_flops else None
        # Every step, full precision: what the plots and the resume tests read. `process_steps` counts the steps
        # this process logged (1, 2, ... again after a resume), so reports can leave out each process's warm-up.
        self.steps_timed += 1
        with open(Path(self.cfg.output_dir) / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "stage": span.name, "stage_index": span.index, "loss": record.loss,
                                 "lr": record.lr, "samples": float(record.samples),
                                 "audio_seconds": float(record.audio_seconds), "step_time": step_time,
                                 "data_wait": data_wait, "tokens": record.sequence_tokens, "flops": record.flops,
                                 "skipped_samples": record.skipped_samples, "process_steps": self.steps_timed,
                                 **({"mfu": mfu} if mfu is not None else {}),
                                 **({"peak_memory_gib": record.peak_memory / 1024**3}
                                    if record.peak_memory is not None else {}),
                                 **({"ctc_loss": record.ctc_loss} if record.ctc_loss is not None else {})}) + "\n")
        self.time_in_steps += step_time
        every = self.cfg.logging.every
        if step % every and step != span.end:
            return
        remaining = (self.cfg.total_steps - step) * (self.time_in_steps / self.steps_timed)
        wait_frac = data_wait / max(step_time, 1e-9)
        gn = float(record.grad_norm) if record.grad_norm is not None else float("nan")
        ctc = f" ctc {record.ctc_loss:.4f}" if record.ctc_loss is not None else ""
        print(f"[part] step {step}/{self.cfg.total_steps} stage {span.index + 1}:{span.name} "
              f"loss {record.loss:.4f}{ctc} lr {record.lr:.2e} gnorm {gn:.3f} "
              f"{record.samples / step_time:.1f} samples/s "
              f"{record.audio_seconds / step_time:.1f} audio-s/s {record.sequence_tokens / step_time:.0f} tok/s "
              f"{'' if mfu is None else f'mfu {100 * mfu:.1f}% '}data-wait {100 * wait_frac:.1f}% "
              f"{f'skipped {record.skipped_samples} samples ' if record.skipped_samples else ''}"
              f"eta {remaining / 60:.1f} min", flush=True)
        if self.wandb:
            mixed, skipped = tracker.totals()
            self.wandb.log({"train/loss": record.loss, "train/lr": record.lr, "train/grad_norm": gn,
                            **({"train/ctc_loss": record.ctc_loss} if record.ctc_loss is not None else {}),
                            "train/samples_per_s": record.samples / step_time,
                            "train/audio_s_per_s": record.audio_seconds / step_time, "train/data_wait": wait_frac,
                            "train/tokens_per_s": record.sequence_tokens / step_time,
                            **({"train/mfu": mfu} if mfu is not None else {}),
                            "stage/index": span.index, **{f"data/mixed/{k}": v for k, v in mixed.items()},
                            **{f"data/skipped/{k}": v for k, v in skipped.items()}}, step=step)

    def metrics(self, step: int, rows: list[dict]) -> None:
        if self.wandb:
            flat = {}
            for r in rows:
                key = r.get("language") or f"{r.get('source')}-{r.get('target')}"
                flat[f"eval/{r['task']}/{r['metric']}/{key}"] = r["value"]
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()
        sys.stdout.flush()
