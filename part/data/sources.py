"""A stage's sources (one per task x language), their mixture weights, and endless resumable readers over them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from part.config import SPEECH_TASKS, DataConfig, StageConfig
from part.data.shards import DataError, RemoteReads, expand_shards, iter_tar_samples, language_sizes


@dataclass(frozen=True)
class Source:
    task: str
    language: str
    pattern: str

    @property
    def key(self) -> str:
        return f"{self.task}/{self.language}"


def stage_mixture(data: DataConfig, stage: StageConfig) -> list[tuple[Source, float]]:
    """Sources and their sampling probabilities: task weight x temperature-scaled language share."""
    languages = stage.languages or data.languages
    mixture: list[tuple[Source, float]] = []
    total_task = sum(w for w in stage.tasks.values() if w > 0)
    for task, weight in stage.tasks.items():
        if weight <= 0:
            continue
        pattern = data.train_shards if task in SPEECH_TASKS else data.text_shards
        langs = [lang for lang in languages if task not in ("s2tt", "mt") or set(stage.translation_targets) - {lang}]
        sizes = language_sizes(pattern, langs)
        empty = [lang for lang in langs if sizes[lang] <= 0]
        if empty:
            raise DataError(f"stage '{stage.name}', task {task}: no shards match '{pattern}' for {', '.join(empty)}")
        scaled = {lang: sizes[lang] ** (1.0 / data.temperature) for lang in langs}
        norm = sum(scaled.values())
        for lang in langs:
            mixture.append((Source(task, lang, pattern), weight / total_task * scaled[lang] / norm))
    return mixture


def stage_shards(cfg: DataConfig, stage: StageConfig, world_size: int) -> dict[str, list[str]]:
    """Shards of every source of a stage; fails up front when a source has fewer shards than data workers."""
    groups = world_size * max(1, cfg.num_workers)
    shards: dict[str, list[str]] = {}
    for source, _ in stage_mixture(cfg, stage):
        found = expand_shards(source.pattern, source.language)
        if len(found) < groups:
            raise DataError(
                f"stage '{stage.name}', source {source.key}: {len(found)} shard(s) match '{source.pattern}' for "
                f"language '{source.language}', fewer than ranks x workers = {world_size} x {max(1, cfg.num_workers)};"
                " write smaller shards (--shard-samples) or use fewer data workers"
            )
        shards[source.key] = found
    return shards


def remote_reads(cfg: DataConfig) -> RemoteReads:
    """How the data config retries shards read over the network."""
    return RemoteReads(cfg.shard_retries, cfg.shard_retry_wait, cfg.shard_timeout)


@dataclass
class Cursor:
    epoch: int = 0
    shard: int = 0  # position in this epoch's shard order
    member: int = 0  # samples already taken from that shard

    def as_list(self) -> list[int]:
        return [self.epoch, self.shard, self.member]


class SourceReader:
    """An endless, resumable stream of raw samples of one source over this worker's shards. A shard read over
    the network that fails is retried as `reads` says and gives the samples an undisturbed read gives, so the
    cursor (samples taken from the shard) means the same after a fault as for a local file."""

    def __init__(self, source: Source, shards: list[str], seed: str, cursor: Cursor, counters: Counter,
                 reads: RemoteReads | None = None):
        self.source, self.shards, self.seed = source, shards, seed
        self.cursor = Cursor(*cursor.as_list())
        self.counters = counters
        self.reads = reads or RemoteReads()
        self._iter: Iterator | None = None

    def _order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.source.key}/{epoch}").shuffle(order)
        return order

    def _open(self) -> Iterator:
        url = self._order(self.cursor.epoch)[self.cursor.shard]
        it = iter_tar_samples(url, self.counters, self.reads)
        for _ in range(self.cursor.member):  # fast-forward within the shard: headers and bytes, no decoding
            next(it, None)
        return it

    def next(self) -> tuple[str, dict[str, bytes], str]:
        empty_passes = 0
        while True:
            if self._iter is None:
                self._iter = self._open()
            item = next(self._iter, None)
            if item is not None:
                self.cursor.member += 1
                return item[0], item[1], self._order(self.cursor.epoch)[self.cursor.shard]
            self._iter = None
            self.cursor = Cursor(self.cursor.epoch, self.cursor.shard + 1, 0)
            if self.cursor.shard >= len(self.shards):
                self.cursor = Cursor(self.cursor.epoch + 1, 0, 0)
                empty_passes += 1
                if empty_passes > 1:
                    raise DataError(f"source {self.source.key}: no readable samples in {len(self.shards)} shards")
