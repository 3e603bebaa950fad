"""One stage of a run: its model and DeepSpeed engine, its data stream, and the training step.

A stage switch and a resume take the same path: the model is built (from the pretrained directories, or from a
checkpoint's saved architecture and weights, the frozen ones it references read from their pretrained
directories), everything but the stage's trainable groups is frozen, and a new
engine gets an optimizer that holds state only for those. A resume inside a stage also restores that state.
The benchmark builds and steps stages through this module too, so what it times is what training runs.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from part.batch import Batch
from part.config import OptimConfig, TrainConfig, deepspeed_config, to_dict
from part.curriculum import StageSpan
from part.data.stream import MixtureStream, StreamTracker, make_loader
from part.model.flops import FlopTally, Shapes, Trainable
from part.model.groups import set_trainable
from part.model.speech_llm import WEIGHTS_NAME, SpeechLLM
from part.model.weight_sources import SourceError, sources_problem
from part.train.callbacks import TrainerCallback
from part.train.checkpoint import DS_TAG, Checkpointer, gather_state_dict, read_trainer_state
from part.train.checkpoint_contents import leaves_out
from part.train.distributed import DistributedContext
from part.train.elastic import load_resharded_optimizer
from part.train.records import StepRecord


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def features_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype audio features take on the device: the engine's compute precision."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float,
                    lr_scales: dict[str, float] | None = None, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and norms do not. `lr_scales`: factors on `lr`
    for some parameter groups (a parameter in two takes the first); each param group carries its `lr_scale`,
    which `train_step` applies to the scheduled lr at every step. `fused`: one kernel for the whole update (on
    GPUs)."""
    from part.model.groups import group_parameters

    scales: dict[str, float] = {}
    for group, scale in (lr_scales or {}).items():
        for name in group_parameters(model, group):
            scales.setdefault(name, scale)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_groups = []
    for scale in [1.0] + sorted(set(scales.values()) - {1.0}):
        mine = [p for n, p in trainable if scales.get(n, 1.0) == scale]
        decay = [p for p in mine if p.ndim >= 2]
        no_decay = [p for p in mine if p.ndim < 2]
        for params, weight_decay in ((decay, optim.weight_decay), (no_decay, 0.0)):
            if params or scale == 1.0:  # the stage-lr pair always, the others when not empty
                param_groups.append({"params": params, "weight_decay": weight_decay, "lr": lr * scale,
                                     "lr_scale": scale})
    return torch.optim.AdamW(param_groups, lr=lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


@dataclass(frozen=True)
class BuildTimes:
    """Seconds spent building a stage (the benchmark reports them)."""

    model: float  # the model from the pretrained directories, or from a checkpoint's saved architecture
    weights: float  # the checkpoint's weights (0 without one)
    engine: float  # trainable groups, optimizer, deepspeed.initialize
    optimizer_state: float  # the checkpoint's optimizer state (0 unless resuming inside the stage)


class StageRun:
    """A stage's model, engine and data stream, built at the stage's start (or a resume) and destroyed at its end."""

    def __init__(self, cfg: TrainConfig, dist: DistributedContext, tokenizer, span: StageSpan, model: SpeechLLM,
                 engine, optimizer, trainable_counts: dict[str, int], build_times: BuildTimes):
        self.cfg, self.dist, self.tokenizer, self.span = cfg, dist, tokenizer, span
        self.model, self.engine, self.optimizer = model, engine, optimizer
        self.trainable_counts = trainable_counts
        self.build_times = build_times
        self.flop_shapes, self.trainable_parts = Shapes.from_model(model), Trainable.from_model(model)
        self.features_dtype = features_dtype(cfg)
        self.tracker = StreamTracker()
        self._batches = None

    @classmethod
    def build(cls, cfg: TrainConfig, dist: DistributedContext, tokenizer, span: StageSpan, lr: float,
              checkpoint: Path | None = None, restore_optimizer: bool = False) -> StageRun:
        """The stage's model (pretrained, or the architecture and weights of `checkpoint`) with its trainable
        groups, and a DeepSpeed engine around it; with `restore_optimizer`, the checkpoint's optimizer state."""
        import deepspeed

        seed_everything(cfg.seed + span.index)
        t0 = time.perf_counter()
        model_cfg = dataclasses.replace(cfg.model, activation_checkpointing=cfg.recompute(span.stage))
        if checkpoint is None:
            model = SpeechLLM(model_cfg, tokenizer)  # the pretrained encoder and LLM
        else:
            # The sources of the weights the checkpoint leaves out: every rank checks its own view of them, and
            # all refuse together when one finds a change (a rank alone would leave the others waiting).
            problem = sources_problem(checkpoint)
            if not dist.all_true(problem is None):
                raise SourceError(problem or f"{checkpoint}: another rank found a pretrained directory it references "
                                  "changed or missing (its log names it)")
            # The architecture saved with the checkpoint, the weights it references read from their pretrained
            # directories, then its own weights.
            model = SpeechLLM(model_cfg, tokenizer, saved_configs=checkpoint)
        t1 = time.perf_counter()
        if checkpoint is not None:
            model.load_weights(checkpoint / WEIGHTS_NAME)
        t2 = time.perf_counter()
        counts = set_trainable(model, span.stage.trainable)
        scales = {group: rate / span.stage.lr for group, rate in span.stage.group_lr.items()}  # of the schedule
        optimizer = build_optimizer(model, cfg.optim, lr, scales, fused=dist.device.type == "cuda")
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
        t3 = time.perf_counter()
        if restore_optimizer:
            if checkpoint is None:
                raise ValueError("restore_optimizer needs a checkpoint")
            if read_trainer_state(checkpoint).get("world_size", dist.world_size) == dist.world_size:
                engine.load_checkpoint(str(checkpoint), tag=DS_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            else:  # written by another number of ranks: its ZeRO partitions, resharded onto this engine's
                load_resharded_optimizer(engine, model, checkpoint, dist)
        t4 = time.perf_counter()
        times = BuildTimes(model=t1 - t0, weights=t2 - t1, engine=t3 - t2, optimizer_state=t4 - t3)
        dist.peak_memory(reset=True)  # the stage's peak, from here
        return cls(cfg, dist, tokenizer, span, model, engine, optimizer, counts, times)

    def decoding_model(self) -> tuple[SpeechLLM, bool]:
        """The model an evaluation generates with, and whether the ranks must generate in lockstep. Collective.

        Under ZeRO-3 the engine's module holds only this rank's partition of each weight and gathers every layer
        again at every generated token (on 2 CPU ranks most of an evaluation's time). With `eval.replicate` each
        rank instead gathers the weights once into a plain copy on its device, and decodes on its own.
        """
        if self.cfg.zero_stage != 3:
            return self.model, False
        if not self.cfg.eval.replicate:
            return self.model, self.dist.world_size > 1
        # Staged on the host, so that the device holds one whole copy at a time, as the --check estimate counts.
        state = gather_state_dict(self.model, self.dist.rank, every_rank=True, dtype=None)
        replica = SpeechLLM(self.cfg.model, self.tokenizer, weights=False)
        replica.load_state_dict(state, strict=True)
        replica.run_lora(self.model.lora_runs)
        del state
        return replica.to(self.dist.device, self.features_dtype), False

    # ---------------------------------------------------------------- data

    def stream_layout(self) -> dict:
        """What a saved data position depends on: it resumes only into the same stage, ranks and workers."""
        return {"stage": self.span.name, "world_size": self.dist.world_size, "num_workers": self.cfg.data.num_workers}

    def open_stream(self, resume: dict | None = None) -> None:
        """This stage's data stream on this rank, continuing from `resume` (a tracker state) when given."""
        stream = MixtureStream(self.cfg.data, self.span.stage, self.tokenizer, self.model.audio_features,
                               self.dist.rank, self.dist.world_size, resume=resume,
                               layout=self.model.layout_spec(self.cfg.data.packing, self.cfg.data.length_multiple,
                                                             self.cfg.data.row_tokens))
        self.tracker = StreamTracker(resume)
        self._batches = iter(make_loader(stream))

    def next_batch(self) -> Batch:
        """The stream's next batch, recorded as consumed (for the next checkpoint's data position)."""
        batch = next(self._batches)
        self.tracker.update(batch.position)
        return batch

    def close_stream(self) -> None:
        self._batches = None  # drops the loader iterator: its worker processes shut down

    # ---------------------------------------------------------------- the step

    def train_step(self, step: int, lr: float, fetch: Callable[[], Batch] | None = None,
                   callbacks: Sequence[TrainerCallback] = ()) -> StepRecord:
        """Global step `step` (0-based): optim.grad_accum_steps micro-batches from `fetch` (default: the stream),
        forward, backward, optimizer step. A non-finite loss on any rank skips the micro-batch on every rank."""
        fetch = fetch or self.next_batch
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        names = self.model.loss_names
        # The micro-batches' losses stay on the device until one read at the end of the step.
        losses: list[torch.Tensor] = []  # [LM loss sum, the objectives' losses by name] per micro-batch trained
        objective_batches = dict.fromkeys(names, 0)
        tokens, samples, audio_seconds, wait = 0, 0, 0.0, 0.0
        work = FlopTally()
        lm_loss = self.span.stage.lm_loss
        skipped = False
        for _ in range(self.cfg.optim.grad_accum_steps):
            w0 = time.perf_counter()
            batch = fetch()
            wait += time.perf_counter() - w0
            out = self.engine(batch.to(self.dist.device, self.features_dtype), lm_loss=lm_loss)
            loss = out["loss"]
            for callback in callbacks:
                loss = callback.transform_loss(step, loss)
            # Every rank must agree to skip, or ZeRO's collectives would hang on the ranks that go on.
            if not self.dist.all_finite(loss):
                skipped = True
                if self.cfg.optim.grad_accum_steps > 1:  # keep DeepSpeed's accumulation boundary; adds nothing
                    self.engine.step()
                continue
            self.engine.backward(loss)
            self.engine.step()
            zero = out["loss_sum"].new_zeros(())
            losses.append(torch.stack([out["loss_sum"].detach().float()]
                                      + [out[name].float() if name in out else zero for name in names]))
            for name in names:
                objective_batches[name] += name in out
            tokens += out["tokens"]
            samples += len(batch)
            audio_seconds += batch.audio_seconds
            work.add(batch, self.flop_shapes, self.trainable_parts, self.model.audio_token_id, lm_loss)
        grad_norm = None if skipped else self.engine.get_global_grad_norm()
        # The step's one read of device values: the losses' sums, and the gradient norm where it is a tensor.
        reads = [torch.stack(losses).sum(0) if losses else torch.zeros(1 + len(names), device=self.dist.device)]
        norm_on_device = isinstance(grad_norm, torch.Tensor)
        if norm_on_device:
            reads.append(grad_norm.detach().float().reshape(1).to(self.dist.device))
        values = torch.cat(reads).tolist()
        loss_sum, objective_values = values[0], values[1:1 + len(names)]
        if norm_on_device:
            grad_norm = values[-1]
        self.dist.synchronize()  # queued device work belongs to this step's time
        return StepRecord(step=step + 1, lr=lr, loss_sum=loss_sum, tokens=tokens, samples=samples,
                          audio_seconds=audio_seconds, grad_norm=None if grad_norm is None else float(grad_norm),
                          step_time=time.perf_counter() - t0, data_wait=wait, skipped=skipped,
                          objective_sums=dict(zip(names, objective_values)), objective_batches=objective_batches,
                          skipped_samples=sum(self.tracker.totals()[1].values()),
                          peak_memory=self.dist.peak_memory(), **work.record_fields())

    # ---------------------------------------------------------------- checkpoint and teardown

    def save_checkpoint(self, checkpointer: Checkpointer, step: int) -> Path | None:
        """Collective. Weights, this engine's optimizer partitions and every rank's data position at `step`."""
        trainer_state = {"engine_stage": self.span.index, "stage": self.span.name, "config": to_dict(self.cfg)}
        data_state = dict(self.tracker.state(), **self.stream_layout())
        return checkpointer.save(self.engine, self.model, self.tokenizer, step, trainer_state, data_state,
                                 left=leaves_out(self.cfg, self.model, self.span.index))

    def destroy(self) -> None:
        self.close_stream()
        self.engine.destroy()
