"""The training stream of one stage on one rank, and what the trainer keeps of it to resume.

Determinism and resume. Each data worker (rank r, loader worker w; global id g) owns the shards `shards[g::G]`
of every source and walks them in a per-epoch seeded order. A worker reads a *window* of samples, drawing
the source of draw k from a counter-seeded RNG (so the mixture depends only on k), sorts the window by
length, cuts it into batches bounded by audio seconds and tokens, and shuffles those batches. Every batch
carries the worker state at the start of its window and its index within the window. Restoring that state
re-reads one window (headers and JSON only: audio of skipped batches is never decoded) and continues with
the next batch, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from part.batch import Batch, StreamPosition
from part.config import DataConfig, StageConfig
from part.data.batching import bucket, collate
from part.data.samples import Sample, encode_text, make_sample
from part.data.sources import Cursor, SourceReader, remote_reads, stage_mixture, stage_shards
from part.features import AudioFeatures, audio_features
from part.packing import LayoutSpec
from part.prompts import PromptFormat


@dataclass(frozen=True)
class BucketedWindow:
    """One window as the stream bucketed it: its samples in arrival order and the batches cut from them (in
    the order they are yielded). For the padding figures of the benchmark."""

    arrival: list[Sample]
    batches: list[list[Sample]]


class MixtureStream(IterableDataset):
    """Endless stream of batches for one stage on one rank; see the module docstring for the resume contract.

    `features` computes the audio features: the model's `audio_features` (an int: Whisper log-mel with that many
    bins). `on_window`, when given, sees every window right after it is bucketed (in the process that iterates).
    `prompts` is the LLM's prompt format (by default the tokenizer's: `PromptFormat.from_tokenizer`). `layout`: the
    model's `layout_spec`, with which every batch is laid out for the LLM in the worker (part/packing.py).
    """

    def __init__(self, cfg: DataConfig, stage: StageConfig, tokenizer, features: AudioFeatures | int, rank: int,
                 world_size: int, resume: dict | None = None,
                 on_window: Callable[[BucketedWindow], None] | None = None, prompts: PromptFormat | None = None,
                 layout: LayoutSpec | None = None):
        self.cfg, self.stage, self.tokenizer = cfg, stage, tokenizer
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, cfg.num_workers)
        self.mixture = stage_mixture(cfg, stage)
        self.feature_extractor = audio_features(features)
        self.layout = layout
        self.prompts = prompts or PromptFormat.from_tokenizer(tokenizer)
        self.end_token_id = tokenizer.convert_tokens_to_ids(self.prompts.end_token)
        self.resume = resume or {}
        self.on_window = on_window
        self.shards = stage_shards(cfg, stage, world_size)

    def worker_id(self, local: int) -> int:
        # After a resume the loader restarts at local worker 0; rotating keeps the batch order unchanged.
        rotated = (local + self.resume.get("consumed", 0)) % self.num_workers
        return self.rank * self.num_workers + rotated

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        local = info.id if info is not None else 0
        g = self.worker_id(local)
        groups = self.world_size * self.num_workers
        counters: Counter = Counter()
        mixed: Counter = Counter()
        saved = self.resume.get("workers", {}).get(str(g))
        state = saved["state"] if saved else {"window": 0, "draws": 0, "cursors": {}, "mixed": {}, "skipped": {}}
        skip_batches = saved["next_batch"] if saved else 0
        counters.update(state.get("skipped", {}))
        mixed.update(state.get("mixed", {}))
        seed = f"{self.cfg.seed}/{self.stage.name}/{g}"
        readers = {
            src.key: SourceReader(src, self.shards[src.key][g::groups], seed,
                                  Cursor(*state["cursors"].get(src.key, [0, 0, 0])), counters,
                                  remote_reads(self.cfg))
            for src, _ in self.mixture
        }
        sources = [s for s, _ in self.mixture]
        weights = [w for _, w in self.mixture]
        targets = self.stage.translation_targets
        window, draws = state["window"], state["draws"]
        while True:
            start_state = {
                "window": window, "draws": draws,
                "cursors": {k: r.cursor.as_list() for k, r in readers.items()},
                "mixed": dict(mixed), "skipped": dict(counters),
            }
            samples: list[Sample] = []
            while len(samples) < self.cfg.window:
                rng = random.Random(f"{seed}/draw/{draws}")
                draws += 1
                source = rng.choices(sources, weights)[0]
                key, members, shard = readers[source.key].next()
                sample = make_sample(source.task, source.language, key, members, shard, rng, targets,
                                     self.cfg.max_duration, counters, self.prompts)
                if sample is None:
                    continue
                encode_text(self.tokenizer, sample, self.end_token_id)
                if len(sample.prompt_ids) + len(sample.target_ids) > self.cfg.max_batch_tokens:
                    counters["too_many_tokens"] += 1  # alone it would overflow any batch's token budget
                    continue
                samples.append(sample)
            batches = bucket(samples, self.cfg, self.layout, self.feature_extractor.steps_per_second)
            random.Random(f"{seed}/window/{window}").shuffle(batches)
            if self.on_window is not None:
                self.on_window(BucketedWindow(list(samples), batches))
            for b, batch_samples in enumerate(batches):
                # counted also when skipped: a resume re-reads the window, whose earlier batches were drawn
                mixed.update(s.task + "/" + s.language + ("-" + s.target_language if s.target_language else "")
                             for s in batch_samples)
                if b < skip_batches:
                    continue
                batch = collate(batch_samples, self.feature_extractor, counters, self.cfg.max_duration, self.layout,
                                self.cfg.audio_multiple, self.cfg.audio_row_seconds)
                if batch is None:
                    continue
                position = StreamPosition(worker=g, window_state=start_state, next_batch=b + 1,
                                          mixed=dict(mixed), skipped=dict(counters))
                yield dataclasses.replace(batch, position=position)
            skip_batches = 0
            window += 1


def _leave_signals_to_the_rank(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT: a stop signal reaches the whole process group, and a worker dying
    on it would kill its rank before the rank writes its checkpoint. The rank shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: MixtureStream) -> DataLoader:
    workers = dataset.cfg.num_workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_leave_signals_to_the_rank if workers else None)


class StreamTracker:
    """Trainer-side bookkeeping of what has been consumed: the resume state and mixture/skip counters.

    Its state is what checkpoints store per rank (`data_rank<r>.json`) and MixtureStream takes as `resume`.
    """

    def __init__(self, resume: dict | None = None):
        resume = resume or {}
        self.consumed = resume.get("consumed", 0)
        self.workers: dict[str, dict] = dict(resume.get("workers", {}))

    def update(self, position: StreamPosition) -> None:
        self.consumed += 1
        self.workers[str(position.worker)] = {
            "state": position.window_state, "next_batch": position.next_batch,
            "mixed": position.mixed, "skipped": position.skipped,
        }

    def state(self) -> dict:
        return {"consumed": self.consumed, "workers": self.workers}

    def totals(self) -> tuple[Counter, Counter]:
        mixed, skipped = Counter(), Counter()
        for w in self.workers.values():
            mixed.update(w["mixed"])
            skipped.update(w["skipped"])
        return mixed, skipped


def data_workers(layout: dict) -> int:
    """How many data workers a stream layout (StageRun.stream_layout) has in all: ranks x loader workers."""
    return int(layout["world_size"]) * max(1, int(layout["num_workers"]))


def regroup_positions(saved: list[dict], rank: int, world_size: int, num_workers: int) -> dict | None:
    """Rank `rank`'s resume state under a layout of `world_size` ranks x `num_workers` loader workers, from every
    rank's saved state (`saved[r]`: rank r's tracker state with its layout). A data worker's stream (its shards,
    their order, its windows) depends only on its global id g and the number of workers G, and its position is
    its own; so when G is unchanged, each worker continues exactly where it stopped, whichever rank runs it now:
    no sample is repeated or skipped. None when G changed (a position means nothing under another G)."""
    if not saved or any(data_workers(s) != world_size * max(1, num_workers) for s in saved):
        return None
    per_rank = max(1, num_workers)
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    workers = {g: w for s in saved for g, w in s.get("workers", {}).items() if int(g) in mine}
    return {"consumed": 0, "workers": workers}  # consumed 0: local loader worker w runs global worker rank*W + w
