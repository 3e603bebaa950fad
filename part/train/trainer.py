"""The Trainer: owns one run of the PART curriculum from its first (or resumed) step to the exported model.

For each stage: build the stage (model, engine, optimizer for its trainable groups; see stage.py), stream its
task mixture, step, checkpoint and evaluate at their cadence, then switch. A stage switch goes through the same
path as a resume (weights from the boundary checkpoint, a fresh optimizer for the new trainable set), so a run
resumed at or inside any stage continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from part.config import TrainConfig, to_dict
from part.curriculum import Curriculum, StageSpan
from part.data.stream import data_workers, regroup_positions
from part.evaluation.evaluator import Evaluator
from part.exit_codes import ExitCode, exit_process
from part.model.flops import peak_flops
from part.model.tokenizer import load_tokenizer
from part.model.weight_sources import SourceError, read_sources
from part.train.callbacks import TrainerCallback
from part.train.checkpoint import (
    TRUST_UNVERIFIED_FLAG,
    Checkpointer,
    NonFiniteWeightsError,
    UnverifiedCheckpoint,
    export_final,
    final_is_from,
    gather_state_dict,
    read_data_state,
    read_trainer_state,
    step_dir_name,
)
from part.train.distributed import DistributedContext
from part.train.logging import DataCounters, RunLogger
from part.train.model_card import model_card
from part.train.profiling import StepProfiler
from part.train.records import StepRecord
from part.train.resume_check import resume_conflicts
from part.train.run_lock import CheckpointDirInUse, CheckpointDirLock
from part.train.stage import StageRun, features_dtype
from part.train.supervision import LauncherWatch, StopGrace

TRAIN_CONFIG = "train_config.yaml"  # the resolved config, exported with the final model
UNVERIFIED = -2  # _newest_good_step's answer when the checkpoint to resume has no SHA256SUMS and is not trusted


class RunRefused(Exception):
    """The run cannot start as asked (e.g. a fresh start over another run's checkpoints); the message says why."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = (),
                 dist: DistributedContext | None = None, reevaluate: bool = False, trust_unverified: bool = False):
        """`reevaluate`: a resumed run that is already complete evaluates its final model again (and exports it
        with the new table); without it such a run only reports its saved results. `trust_unverified`: resume
        from a checkpoint without SHA256SUMS (refused otherwise)."""
        self.cfg = cfg
        self.reevaluate = reevaluate
        self.trust_unverified = trust_unverified
        self.unverified = ""  # rank 0's refusal of a checkpoint without SHA256SUMS
        self.callbacks = list(callbacks)
        self.dist = dist or DistributedContext.init(timeout_s=cfg.distributed.timeout_s)
        self.run_lock = self._lock_checkpoint_dir()
        try:
            self._set_up(resume)
        except BaseException:
            self.run_lock.release()
            raise

    def _lock_checkpoint_dir(self) -> CheckpointDirLock:
        """Rank 0 takes checkpoint.dir's lock before any work; every rank stops when it cannot (RunRefused)."""
        lock = CheckpointDirLock(self.cfg.checkpoint.dir)
        refusal = ""

        def take() -> bool:
            nonlocal refusal
            try:
                lock.acquire(report=lambda message: print(f"[part] {message}", flush=True))
            except CheckpointDirInUse as exc:
                refusal = str(exc)
                return False
            return True

        if not self.dist.rank0_decides(take):
            raise RunRefused(refusal or f"checkpoint.dir {self.cfg.checkpoint.dir} is in use by another run "
                             "(rank 0 names it)")
        return lock

    def _set_up(self, resume: bool) -> None:
        cfg = self.cfg
        if cfg.precision == "bf16" and not self.dist.supports_bf16():
            raise SystemExit(f"error: precision bf16 ({cfg.ds_config}) is not supported on {self.dist.device.type}; "
                             "use precision: fp32 with an fp32 DeepSpeed config such as ds_configs/zero3_cpu.json")
        self.tokenizer = load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.pretrained)
        self.curriculum = Curriculum(cfg.stages)
        stage_ends = [span.end for span in self.curriculum.spans] if cfg.checkpoint.keep_stage_ends else []
        self.checkpointer = Checkpointer(cfg.checkpoint.dir, self.dist, keep=cfg.checkpoint.keep, kept_steps=stage_ends)
        self.logger = RunLogger(cfg, self.dist.rank, self.dist.world_size,
                                peak_flops=peak_flops(self.dist.device, cfg.precision))
        self.evaluator = Evaluator(cfg, self.tokenizer, self.dist, features_dtype(cfg), self.logger)
        self.final_dir = Path(cfg.output_dir) / "final"
        self.profiler = StepProfiler(Path(cfg.output_dir) / "profile", self.dist.rank, cfg.logging.profile_start,
                                     cfg.logging.profile_steps, self.dist.device)
        self.step = 0  # optimizer steps done
        self.bad_steps_in_a_row = 0
        self.checkpoint: Path | None = None  # the latest checkpoint of this run: the next stage is built from it
        self.checkpoint_state: dict | None = None
        self.stop_signal: int | None = None  # SIGTERM/SIGINT seen: checkpoint at the next step boundary, stop
        self.stop_cause = "a signal"
        # Set when no step boundary is ahead to stop at (the run is failing, or only its end is left): a stop
        # signal then exits at once with this code instead of waiting for a step that will not come.
        self.exit_now_code: ExitCode | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        self.stop_grace = StopGrace(cfg.distributed.stop_grace_s)
        self.logger.info(self.stop_grace.describe())
        self.launcher_watch = LauncherWatch(self._on_launcher_gone, grace=self.stop_grace.seconds,
                                            label=f"[rank {self.dist.rank}] ").start()
        if resume:
            # rank 0 reads and checks the files (SHA-256) and falls back past damaged checkpoints, loudly
            step = self.dist.rank0_int(self._newest_good_step)
            if step == UNVERIFIED:
                raise RunRefused(f"--resume: {self.unverified}" if self.unverified else "--resume: the checkpoint "
                                 f"has no SHA256SUMS (rank 0 names it); {TRUST_UNVERIFIED_FLAG} uses it as it is")
            if step >= 0:
                path = self.checkpointer.root / step_dir_name(step)
                self._adopt_checkpoint(path)
                self.step = self.checkpoint_state["step"]
                if conflicts := resume_conflicts(self.checkpoint_state["config"], cfg, self.step):
                    raise RunRefused(f"--resume from {path}: the config changed where a resume cannot follow "
                                     "(part/train/resume_check.py says what may change):\n  " + "\n  ".join(conflicts))
                self.logger.resumed_at(self.step)
                self.logger.info(f"resuming from {path} at step {self.step}")
                ranks = self.checkpoint_state.get("world_size", self.dist.world_size)
                if ranks != self.dist.world_size:
                    self.logger.info(f"the checkpoint was written by {ranks} rank(s), this run has "
                                     f"{self.dist.world_size}: the weights are whole; inside a stage its optimizer "
                                     "state is resharded onto this run's ranks")
            else:
                self.logger.info(f"--resume: no checkpoint in {cfg.checkpoint.dir}; starting fresh")
        elif self.dist.rank0_decides(lambda: bool(self.checkpointer.complete())):
            raise RunRefused(f"checkpoint.dir {cfg.checkpoint.dir} holds checkpoints of an earlier run; continue it "
                             "with --resume, or start fresh in an empty checkpoint.dir (its pruning would otherwise "
                             "mix the two runs)")

    def _on_stop_signal(self, signum: int, frame) -> None:
        if self.exit_now_code is None and self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._request_stop(signum, signal.Signals(signum).name)

    def _on_launcher_gone(self, name: str) -> None:
        """From the launcher watch's thread: the run's launcher is gone, so no one would stop this rank."""
        if self.stop_signal is None:
            self.stop_cause = "the launcher's end"
        self._request_stop(signal.SIGTERM, f"{name} is gone")

    def _request_stop(self, signum: int, reason: str) -> None:
        if self.exit_now_code is not None:
            print(f"[rank {self.dist.rank}] {reason}: no step boundary is ahead; exiting now (exit code "
                  f"{int(self.exit_now_code)})", flush=True)
            exit_process(self.exit_now_code)
        if self.stop_signal is None:
            print(f"[rank {self.dist.rank}] {reason}: stopping after a checkpoint at the next step", flush=True)
        self.stop_signal = signum

    def _newest_good_step(self) -> int:
        """The step of the checkpoint to resume from; -1: none; UNVERIFIED: refused (the reason in `unverified`)."""
        try:
            path = self.checkpointer.newest_good(report=self.logger.info, trust_unverified=self.trust_unverified)
        except UnverifiedCheckpoint as exc:
            self.unverified = str(exc)
            return UNVERIFIED
        return -1 if path is None else int(read_trainer_state(path)["step"])

    # ---------------------------------------------------------------- the run

    def fit(self) -> ExitCode:
        """Trains every remaining step, evaluates, exports `<output_dir>/final`; collective. Returns the exit code.
        A run that is already complete (every stage trained, final/ exported from the last checkpoint and its
        final evaluation saved) says so and prints the saved table, unless `reevaluate` asks for the run's end
        again."""
        try:
            code = self._fit()
        except BaseException:
            self.exit_now_code = ExitCode.FAILED
            self.launcher_watch.stop()
            self.run_lock.release()
            raise
        self.exit_now_code = code if code is not ExitCode.OK else ExitCode.STOPPED
        self.logger.close()
        self.dist.close()
        self.launcher_watch.stop()
        self.run_lock.release()
        return code

    def _fit(self) -> ExitCode:
        code = ExitCode.OK
        if self.step >= self.curriculum.total_steps:
            self.exit_now_code = ExitCode.STOPPED  # only the run's end (or nothing) is left
        if self._finished():
            if self.reevaluate:
                self.logger.info(f"run already complete at step {self.step}; --reevaluate: evaluating the final "
                                 "model again")
                code = self._run_stage(self.curriculum.at(self.step))
            else:
                self._report_complete()
        # Also entered at the last step when the final evaluation/export did not happen (a crash right after the
        # last checkpoint): the stage is rebuilt from that checkpoint and only the run's end is done.
        while code is ExitCode.OK and not self._finished():
            code = self._run_stage(self.curriculum.at(self.step))
        return code

    def _finished(self) -> bool:
        """Every step trained, final/ exported from the last checkpoint, and (when evaluation is configured) the
        final evaluation of that step saved: nothing left to do."""
        if self.step < self.curriculum.total_steps:
            return False
        return self.dist.rank0_decides(lambda: final_is_from(self.final_dir, self.checkpoint)
                                       and (not self.cfg.eval.per_language or self._final_metrics() is not None))

    def _final_metrics(self) -> dict | None:
        """final.json when it holds this run's final evaluation (of the current step), else None."""
        path = Path(self.cfg.output_dir) / "final.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return saved if saved.get("step") == self.step and path.with_suffix(".md").exists() else None

    def _report_complete(self) -> None:
        """Rank 0: the run was complete before this process started; nothing was trained or evaluated."""
        if not self.dist.is_main:
            return
        out = Path(self.cfg.output_dir)
        stages = len(self.curriculum.spans)
        self.logger.info(f"run already complete: all {stages} stages ({self.step} steps) are trained and the final "
                         f"model is exported ({self.final_dir}, from checkpoint {self.checkpoint.name}); nothing "
                         "was trained or evaluated. Pass --reevaluate to evaluate the final model again.")
        if self.cfg.eval.per_language:
            self.logger.info(f"saved results of step {self.step} ({out / 'final.md'}; hypotheses in "
                             f"{out / 'final_hypotheses.jsonl'}):\n{(out / 'final.md').read_text().rstrip()}")
        else:
            self.logger.info("no final evaluation is configured (eval.per_language: 0)")

    def _run_stage(self, span: StageSpan) -> ExitCode:
        # Inside a stage the checkpoint's optimizer state carries on; at a boundary the new stage starts fresh.
        same_stage = self.checkpoint_state is not None and self.checkpoint_state["engine_stage"] == span.index
        try:
            stage = StageRun.build(self.cfg, self.dist, self.tokenizer, span, self.curriculum.lr(self.step),
                                   checkpoint=self.checkpoint, restore_optimizer=same_stage)
        except SourceError as exc:  # every rank refuses together (StageRun.build)
            raise RunRefused(f"stage '{span.name}' cannot be built from {self.checkpoint}: {exc}. Restore the "
                             "directory as it was, or resume from a checkpoint that holds these weights "
                             "(checkpoint.lean: false writes them all)") from None
        self.logger.stage(span, stage.trainable_counts, self.step)
        if self.step < span.end:  # else only the run's end is left: no data needed
            stage.open_stream(self._data_resume(stage) if same_stage else None)
        stage.engine.train()
        code = self._train_until(stage, span.end)
        self.profiler.close(self.step)  # a window the stage left early (a stop signal)
        stage.close_stream()
        if code is not ExitCode.OK:
            return code
        if self.step == self.curriculum.total_steps:
            self._finish(stage)
        stage.destroy()
        return ExitCode.OK

    def _data_resume(self, stage: StageRun) -> dict | None:
        """This rank's data position in the checkpoint. The same stream layout: its own, exact. Another number of
        ranks or loader workers with as many data workers in all (ranks x data.num_workers): every worker's
        position, regrouped onto the ranks that now run it, exact too. Else None: the stream restarts."""
        layout = stage.stream_layout()
        saved = read_data_state(self.checkpoint, self.dist.rank)
        if saved and all(saved.get(k) == v for k, v in layout.items()):
            return saved
        ranks = int(self.checkpoint_state.get("world_size", self.dist.world_size))
        every = [read_data_state(self.checkpoint, r) for r in range(ranks)]
        if all(s is not None and s.get("stage") == layout["stage"] for s in every):
            regrouped = regroup_positions(every, self.dist.rank, self.dist.world_size, self.cfg.data.num_workers)
            if regrouped is not None:
                self.logger.info(f"data: the checkpoint's {ranks} rank(s) x {every[0]['num_workers']} loader "
                                 f"worker(s) now run as {self.dist.world_size} x {layout['num_workers']}: the same "
                                 f"{data_workers(layout)} data workers, each continuing from its position")
                return regrouped
            self.logger.info(f"data: the checkpoint's stream had {data_workers(every[0])} data workers (ranks x "
                             f"data.num_workers: {ranks} x {every[0]['num_workers']}), this run has "
                             f"{data_workers(layout)} ({self.dist.world_size} x {layout['num_workers']}); positions "
                             "do not carry over: this stage's data stream restarts from its beginning (keep ranks x "
                             "data.num_workers to continue it exactly)")
            return None
        self.logger.info("data: the checkpoint's stream layout differs (stage, ranks or workers); "
                         "this stage's data stream restarts from its beginning")
        return None

    def _train_until(self, stage: StageRun, end: int) -> ExitCode:
        while self.step < end:
            self.profiler.before_step(self.step)
            with self.dist.waiting(f"step {self.step + 1}"):
                record = stage.train_step(self.step, self.curriculum.lr(self.step), callbacks=self.callbacks)
            self._grace_changed(self.stop_grace.step_took(record.step_time))
            self.profiler.after_step(record.step, end)
            if record.skipped:
                self.bad_steps_in_a_row += 1
                bad = self.bad_steps_in_a_row
                self.logger.info(f"step {self.step}: non-finite loss, step skipped ({bad} in a row)")
                if bad >= self.cfg.optim.max_bad_steps:
                    self.logger.info(f"error: {bad} consecutive non-finite losses at step "
                                     f"{self.step}; stopping. Lower the learning rate or check the data; resume from "
                                     "the last checkpoint.")
                    return ExitCode.NON_FINITE_LOSS
            else:
                self.bad_steps_in_a_row = 0
            self.step = record.step
            # One collective a step: the global batch's figures for the log, and the ranks a stop signal reached
            # (it may reach only some, or reach them a step apart): every rank stops when one was.
            stop_requests = int(self.stop_signal is not None)
            summed = self._summed_over_ranks(dataclasses.replace(record, stop_requests=stop_requests))
            if not record.skipped:
                counters = self._data_counters(stage) if self.logger.wandb_due(self.step, stage.span) else None
                self.logger.step(summed, stage.span, counters)
            stopping = summed.stop_requests > 0
            if self.step % self.cfg.checkpoint.every == 0 or self.step == stage.span.end or stopping:
                if (code := self._save_checkpoint(stage)) is not ExitCode.OK:
                    return code
            if stopping:
                self.logger.info(f"stopped by {self.stop_cause} at step {self.step}, after checkpoint "
                                 f"{self.checkpoint.name}; continue with --resume")
                return ExitCode.STOPPED
            if self._evaluation_due():
                self.evaluator.run(*stage.decoding_model(), self.step)
                stage.engine.train()
        return ExitCode.OK

    def _summed_over_ranks(self, record: StepRecord) -> StepRecord:
        """The global batch's figures (collective), for the log line of this step."""
        return record.summed_over_ranks(self.dist.sum)

    def _data_counters(self, stage: StageRun) -> DataCounters:
        """The stage's samples drawn per task/language and skipped per reason, summed over ranks (collective)."""
        mixed, skipped = Counter(), Counter()
        for rank_mixed, rank_skipped in self.dist.gather_objects(tuple(map(dict, stage.tracker.totals()))):
            mixed.update(rank_mixed)
            skipped.update(rank_skipped)
        return mixed, skipped

    def _save_checkpoint(self, stage: StageRun) -> ExitCode:
        """Collective. Not OK when the weights are non-finite (nothing saved) or the checkpoint the next stage is
        built from could not be written."""
        started = time.monotonic()
        try:
            with self.dist.waiting(f"the checkpoint of step {self.step}"):
                path = stage.save_checkpoint(self.checkpointer, self.step)
        except NonFiniteWeightsError as exc:
            last = self.checkpoint.name if self.checkpoint else "none"
            self.logger.info(f"error: {exc}. The last good checkpoint ({last}) is kept; lower the learning rate "
                             "or check the data, then resume.")
            return ExitCode.NON_FINITE_WEIGHTS
        if path is not None and path.name == step_dir_name(self.step):
            self.logger.info(f"checkpoint {path}")
            self._grace_changed(self.stop_grace.checkpoint_took(time.monotonic() - started))
            self._adopt_checkpoint(path)
        elif self.step == stage.span.end:  # the next stage is built from this checkpoint: it must exist
            self.logger.info(f"error: the stage-boundary checkpoint at step {self.step} could not be written; "
                             f"free space in {self.cfg.checkpoint.dir} and rerun with --resume")
            return ExitCode.CHECKPOINT_FAILED
        return ExitCode.OK

    def _grace_changed(self, line: str | None) -> None:
        if line is not None:
            self.logger.info(line)

    def _adopt_checkpoint(self, path: Path) -> None:
        self.checkpoint, self.checkpoint_state = path, read_trainer_state(path)

    def _evaluation_due(self) -> bool:
        every = self.cfg.eval.every
        due = bool(every and self.cfg.eval.per_language and self.step % every == 0)
        return due and self.step < self.curriculum.total_steps  # the run's end evaluates anyway

    def _finish(self, stage: StageRun) -> None:
        """The run's end: the final evaluation, then `final/` exported from the last checkpoint."""
        self.exit_now_code = ExitCode.STOPPED  # the last step's checkpoint is written: --resume does only this
        if self.cfg.eval.per_language:
            self.evaluator.run(*stage.decoding_model(), self.step, final=True)
        # final/ holds every weight: those the checkpoint leaves out are gathered from the model (collective)
        lean = self.dist.rank0_decides(lambda: bool(read_sources(self.checkpoint)))
        weights = gather_state_dict(stage.model, self.dist.rank) if lean else None
        if self.dist.is_main:
            self.logger.info(f"final model: {self.final_dir} (a copy of checkpoint {self.checkpoint.name}, with a "
                             "model card and the resolved config)")
            metrics = Path(self.cfg.output_dir) / "final.md"
            again = f"{self.cfg.output_dir.rstrip('/')}_again"
            command = (f"deepspeed --num_gpus {self.dist.world_size} train.py --config "
                       f"{self.final_dir / TRAIN_CONFIG} output_dir={again} checkpoint.dir={again}/checkpoints")
            card = model_card(self.cfg, self.checkpoint, metrics.read_text() if metrics.exists() else None, command)
            config_yaml = yaml.safe_dump(to_dict(self.cfg), sort_keys=False, allow_unicode=True)
            export_final(self.checkpoint, self.final_dir, {"README.md": card, TRAIN_CONFIG: config_yaml}, weights)
        self.dist.barrier()
