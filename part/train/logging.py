"""Rank-0 logging: a console progress line for everyone, and wandb (offline unless configured) when enabled."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from part.config import TrainConfig, to_dict
from part.curriculum import StageSpan
from part.evaluation.metrics import results_table
from part.train.records import StepRecord

# (samples drawn per "task/language[-target]", samples skipped per reason) of a stage's stream, over all ranks
DataCounters = tuple[Counter, Counter]


class RunLogger:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, peak_flops: float | None = None):
        """`peak_flops`: one device's peak for the run's precision (None: unknown, MFU not reported)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.peak_flops = peak_flops
        self.start = time.time()
        self.steps_timed = 0
        self.time_in_steps = 0.0
        # The same on every rank (the config's): ranks gather the data counters for the wandb records by it.
        self.wandb_enabled = bool(cfg.logging.wandb_project) and cfg.logging.wandb_mode != "disabled"
        # The wandb run (rank 0) starts with the first record, so a re-run with nothing left to do (an already
        # complete run) leaves no empty wandb run behind.
        self._wandb = None
        self._curriculum_logged = False
        if rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    @property
    def wandb(self):
        """The wandb run on rank 0 when wandb is enabled (started on first use), else None."""
        if self._wandb is None and self.rank == 0 and self.wandb_enabled:
            import wandb

            mode = self.cfg.logging.wandb_mode
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                mode = "offline"
                self.info("wandb: WANDB_API_KEY is not set; logging offline (sync later with `wandb sync`)")
            # Process-wide settings first: wandb's own usage telemetry reads them, not the run's, and would
            # otherwise try to reach its server even from an offline run.
            wandb.setup(settings=wandb.Settings(mode=mode))
            # Each process start (a resume, a --reevaluate) is a run of its own, grouped under the run's name.
            name = self.cfg.logging.run_name or Path(self.cfg.output_dir).name
            self._wandb = wandb.init(project=self.cfg.logging.wandb_project, name=self.cfg.logging.run_name,
                                     group=name, mode=mode, config=to_dict(self.cfg), dir=self.cfg.output_dir)
            if mode == "offline":
                self.info(f"wandb: offline run in {Path(self._wandb.dir).parent} "
                          "(upload later with `wandb sync` on that directory)")
        return self._wandb

    def wandb_due(self, step: int, span: StageSpan) -> bool:
        """Whether step `step` is logged to wandb (the same answer on every rank)."""
        return self.wandb_enabled and self._log_due(step, span)

    def _log_due(self, step: int, span: StageSpan) -> bool:
        return step % self.cfg.logging.every == 0 or step == span.end

    def resumed_at(self, step: int) -> None:
        """Drops train_log.jsonl's records after `step` (the run resumes there and logs them again), so each
        step is in the log once."""
        path = Path(self.cfg.output_dir) / "train_log.jsonl"
        if self.rank != 0 or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) == len(lines):  # nothing to drop: the file stays as it is (a finished run re-run)
            return
        tmp = path.with_suffix(".jsonl.partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def info(self, message: str) -> None:
        if self.rank == 0:
            print(f"[part] {message}", flush=True)

    def stage(self, span: StageSpan, counts: dict[str, int], step: int) -> None:
        total = sum(counts.values())
        groups = ", ".join(f"{k}={v:,}" for k, v in counts.items())
        # the console and wandb log the schedule's lr; a group of `group_lr` trains at its own peak, scaled alike
        rates = f"; peak lr {span.stage.lr:g}" + "".join(f", {g} {r:g}" for g, r in span.stage.group_lr.items())
        self.info(f"stage {span.index + 1} '{span.name}' steps {span.start}-{span.end} (at {step}): "
                  f"trainable {total:,} params ({groups}); tasks {span.stage.tasks}{rates}")
        if run := self.wandb:
            import wandb

            record = {"stage/started": span.index, "stage/name": span.name, "stage/first_step": span.start,
                      "stage/end_step": span.end, "stage/trainable_params": total,
                      **{f"stage/trainable/{k}": v for k, v in counts.items()}}
            if not self._curriculum_logged:  # the whole plan once per process, next to the first stage
                self._curriculum_logged = True
                columns = ["index", "stage", "first_step", "end_step", "tasks", "languages", "trainable", "lr",
                           "group_lr"]
                rows, start = [], 0
                for i, s in enumerate(self.cfg.stages):
                    rows.append([i, s.name, start, start + s.steps, json.dumps(s.tasks),
                                 ",".join(s.languages or self.cfg.data.languages), ",".join(s.trainable), s.lr,
                                 json.dumps(s.group_lr)])
                    start += s.steps
                record["curriculum"] = wandb.Table(columns=columns, data=rows)
            run.log(record, step=step)

    def step(self, record: StepRecord, span: StageSpan, counters: DataCounters | None = None) -> None:
        """`record` holds sums over all ranks (the global batch); every rank may call this, rank 0 writes.
        `counters`: the stage's samples drawn per task/language and skipped per reason, summed over ranks, for
        wandb (the trainer gathers them at the steps `wandb_due` names)."""
        if self.rank != 0:
            return
        step, step_time = record.step, record.step_time
        data_wait = record.data_wait / self.world_size  # mean over ranks
        # model FLOP utilisation: the step's operations over what all devices could do in its time
        # model FLOP utilisation over real positions (the useful work), and over everything that ran
        capacity = step_time * self.world_size * self.peak_flops if self.peak_flops else None
        mfu = record.flops / capacity if capacity else None
        mfu_padded = record.padded_flops / capacity if capacity else None
        # Every step, full precision: what the plots and the resume tests read. `process_steps` counts the steps
        # this process logged (1, 2, ... again after a resume), so reports can leave out each process's warm-up.
        self.steps_timed += 1
        with open(Path(self.cfg.output_dir) / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "stage": span.name, "stage_index": span.index,
                                 # null in a stage without the LM loss (no target token was scored)
                                 "loss": record.loss if record.tokens else None,
                                 "lr": record.lr, "samples": float(record.samples),
                                 "audio_seconds": float(record.audio_seconds), "step_time": step_time,
                                 "data_wait": data_wait, "tokens": record.sequence_tokens, "flops": record.flops,
                                 "padded_flops": record.padded_flops, "llm_padding": record.llm_padding,
                                 "audio_padding": record.audio_padding,
                                 "skipped_samples": record.skipped_samples, "process_steps": self.steps_timed,
                                 **({"mfu": mfu, "mfu_padded": mfu_padded} if mfu is not None else {}),
                                 **({"peak_memory_gib": record.peak_memory / 1024**3}
                                    if record.peak_memory is not None else {}),
                                 **record.objective_losses})
                     + "\n")
        self.time_in_steps += step_time
        if not self._log_due(step, span):
            return
        remaining = (self.cfg.total_steps - step) * (self.time_in_steps / self.steps_timed)
        wait_frac = data_wait / max(step_time, 1e-9)
        gn = float(record.grad_norm) if record.grad_norm is not None else float("nan")
        objectives = "".join(f" {name.removesuffix('_loss')} {value:.4f}"
                             for name, value in record.objective_losses.items())
        lm = f"loss {record.loss:.4f}" if record.tokens else "loss -"  # a stage without the LM loss
        print(f"[part] step {step}/{self.cfg.total_steps} stage {span.index + 1}:{span.name} "
              f"{lm}{objectives} lr {record.lr:.2e} gnorm {gn:.3f} "
              f"{record.samples / step_time:.1f} samples/s "
              f"{record.audio_seconds / step_time:.1f} audio-s/s {record.sequence_tokens / step_time:.0f} tok/s "
              f"{'' if mfu is None else f'mfu {100 * mfu:.1f}% (padded {100 * mfu_padded:.1f}%) '}"
              f"padding llm {100 * record.llm_padding:.1f}% audio {100 * record.audio_padding:.1f}% "
              f"data-wait {100 * wait_frac:.1f}% "
              f"{f'skipped {record.skipped_samples} samples ' if record.skipped_samples else ''}"
              f"eta {remaining / 60:.1f} min", flush=True)
        if run := self.wandb:
            run.log({**({"train/loss": record.loss} if record.tokens else {}), "train/lr": record.lr,
                     "train/grad_norm": gn,
                     **{f"train/{name}": value for name, value in record.objective_losses.items()},
                     "train/samples_per_s": record.samples / step_time,
                     "train/audio_s_per_s": record.audio_seconds / step_time, "train/data_wait": wait_frac,
                     "train/tokens_per_s": record.sequence_tokens / step_time,
                     **({"train/mfu": mfu, "train/mfu_padded": mfu_padded} if mfu is not None else {}),
                     "train/llm_padding": record.llm_padding, "train/audio_padding": record.audio_padding,
                     "train/skipped_samples": record.skipped_samples, "stage/index": span.index,
                     **(self._data_record(counters, span, step) if counters is not None else {})}, step=step)

    def _data_record(self, counters: DataCounters, span: StageSpan, step: int) -> dict:
        """What the stage's stream drew so far (counts and shares per task/language and per task) and skipped
        (per reason); at the stage's end also as a table."""
        import wandb

        mixed, skipped = counters
        drawn = sum(mixed.values()) or 1
        tasks: Counter = Counter()
        for key, n in mixed.items():
            tasks[key.split("/", 1)[0]] += n
        out = {**{f"data/mixed/{k}": v for k, v in sorted(mixed.items())},
               **{f"data/share/{k}": v / drawn for k, v in sorted(mixed.items())},
               **{f"data/task_share/{k}": v / drawn for k, v in sorted(tasks.items())},
               **{f"data/skipped/{k}": v for k, v in sorted(skipped.items())},
               "data/skipped_total": sum(skipped.values())}
        if step == span.end:
            rows = []
            for key, n in sorted(mixed.items()):
                task, lang = key.split("/", 1)
                rows.append([span.name, task, lang, n, n / drawn, span.stage.tasks.get(task, 0.0)])
            out["data/mixture"] = wandb.Table(
                columns=["stage", "task", "language", "samples", "share", "task_weight"], data=rows)
            out["data/skips"] = wandb.Table(columns=["stage", "reason", "samples"],
                                            data=[[span.name, k, v] for k, v in sorted(skipped.items())])
        return out

    def evaluation(self, step: int, rows: list[dict], records: list[dict]) -> None:
        """An evaluation's scores (`rows`, as `score` makes them) and utterances (`records`: reference and
        hypothesis each) to wandb: every score as a scalar, the table of final.md (per language, with the
        averages), and per source language a table of the first `logging.wandb_samples` utterances of each
        task/direction (the same utterances at every evaluation)."""
        if not (run := self.wandb):
            return
        import wandb

        flat = {}
        for r in rows:
            key = r.get("language") or f"{r.get('source')}-{r.get('target')}"
            flat[f"eval/{r['task']}/{r['metric']}/{key}"] = r["value"]
        _, summary = results_table(rows)
        table = [[task, metric, key, v["value"], v["n"]]
                 for task, metrics in summary.items() for metric, keys in metrics.items() for key, v in keys.items()]
        flat["eval/metrics"] = wandb.Table(columns=["task", "metric", "lang", "value", "n"], data=table)
        per_group: dict[tuple, list[dict]] = defaultdict(list)
        for r in sorted(records, key=lambda r: (r["task"], r["language"], r.get("target_language") or "", r["key"])):
            per_group[(r["language"], r["task"], r.get("target_language"))].append(r)
        samples: dict[str, list[list]] = defaultdict(list)
        for (lang, task, target), items in per_group.items():
            for r in items[:self.cfg.logging.wandb_samples]:
                samples[lang].append([task, target or "", r["key"], r["reference"], r["hypothesis"]])
        for lang, data in sorted(samples.items()):
            flat[f"eval/hypotheses/{lang}"] = wandb.Table(
                columns=["task", "target", "key", "reference", "hypothesis"], data=data)
        run.log(flat, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        sys.stdout.flush()
