"""Streaming data: WebDataset tar shards -> task/language mixture -> duration-bucketed, tokenized batches.

Knows nothing of the model: it needs a tokenizer and the number of mel bins, nothing else.

Determinism and resume. Each data worker (rank r, loader worker w; global id g) owns the shards `shards[g::G]`
of every source and walks them in a per-epoch seeded order. A worker reads a *window* of samples, drawing
the source of draw k from a counter-seeded RNG (so the mixture depends only on k), sorts the window by
length, cuts it into batches bounded by audio seconds and tokens, and shuffles those batches. Every batch
carries the worker state at the start of its window and its index within the window. Restoring that state
re-reads one window (headers and JSON only: audio of skipped batches is never decoded) and continues with
the next batch, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import json
import random
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from part.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from part.config import SPEECH_TASKS, DataConfig, StageConfig
from part.prompts import instruction, split_for_text_task

# Extensions whose only decoder is pickle. A member with one of these is refused, never decoded.
PICKLE_EXTENSIONS = {"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt"}
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3")
HOP = 160  # Whisper's mel hop: 100 frames per second
WINDOW_SECONDS = 30.0  # the Whisper encoder's window: longer clips cannot be encoded


class DataError(RuntimeError):
    """Fatal data problem (no shards, unsafe member); the message names the shard or pattern."""


# ---------------------------------------------------------------- shard lists


def expand_shards(pattern: str, language: str | None = None) -> list[str]:
    """`{lang}` substituted, then brace ranges expanded; local patterns with * or ? are globbed."""
    if language is not None:
        pattern = pattern.replace("{lang}", language)
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if "://" in item or item.startswith("pipe:"):
            urls.append(item)  # remote: checked when opened
        else:
            urls.extend(sorted(glob.glob(item)))  # local: only files that exist (a plain path globs to itself)
    return urls


def language_sizes(pattern: str, languages: list[str]) -> dict[str, float]:
    """Hours (speech) or samples (text) per language from the builders' index.json; shard counts otherwise."""
    sizes = {}
    for lang in languages:
        shards = expand_shards(pattern, lang)
        size = 0.0
        for index_path in {Path(s).parent / "index.json" for s in shards if "://" not in s}:
            if index_path.exists():
                index = json.loads(index_path.read_text())
                names = {Path(s).name for s in shards}
                for entry in index["shards"]:
                    if entry["name"] in names:
                        hours = entry["hours_per_language"].get(lang, 0.0)
                        size += hours if hours > 0 else entry["samples"]
        sizes[lang] = size if size > 0 else float(len(shards))
    return sizes


# ---------------------------------------------------------------- sources and mixture


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


# ---------------------------------------------------------------- reading shards


@dataclass
class Cursor:
    epoch: int = 0
    shard: int = 0  # position in this epoch's shard order
    member: int = 0  # samples already taken from that shard

    def as_list(self) -> list[int]:
        return [self.epoch, self.shard, self.member]


def iter_tar_samples(url: str, counters: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive tar members by key. A truncated or unreadable tar ends the shard and is counted."""
    current, members = None, {}
    try:
        stream = wds.gopen(url, "rb")
    except Exception as exc:
        counters["unreadable_shard"] += 1
        print(f"warning: cannot open shard {url}: {exc}", file=sys.stderr, flush=True)
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.split("/")[-1]
                key, _, ext = name.partition(".")
                if ext.lower() in PICKLE_EXTENSIONS:
                    raise DataError(f"shard {url}: member '{info.name}' has a pickle extension; refusing to decode it")
                data = tar.extractfile(info).read()
                if key != current and current is not None:
                    yield current, members
                    members = {}
                current = key
                members[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        counters["truncated_shard"] += 1
        print(f"warning: shard {url} is truncated or corrupt ({exc}); skipping the rest of it", file=sys.stderr,
              flush=True)
        members = {}  # the last group may be incomplete
    finally:
        stream.close()
    if current is not None and members:
        yield current, members


class SourceReader:
    """An endless, resumable stream of raw samples of one source over this worker's shards."""

    def __init__(self, source: Source, shards: list[str], seed: int, cursor: Cursor, counters: Counter):
        self.source, self.shards, self.seed = source, shards, seed
        self.cursor = Cursor(*cursor.as_list())
        self.counters = counters
        self._iter: Iterator | None = None

    def _order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.source.key}/{epoch}").shuffle(order)
        return order

    def _open(self) -> Iterator:
        url = self._order(self.cursor.epoch)[self.cursor.shard]
        it = iter_tar_samples(url, self.counters)
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


# ---------------------------------------------------------------- samples and batches


@dataclass
class Sample:
    task: str
    language: str
    target_language: str | None
    key: str
    shard: str
    prompt: str
    target: str
    duration: float
    audio: bytes | None
    transcript: str = ""  # what is said (speech samples), for the auxiliary CTC loss
    prompt_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    transcript_ids: list[int] = field(default_factory=list)


def make_sample(source: Source, key: str, members: dict[str, bytes], shard: str, rng: random.Random,
                targets: list[str], max_duration: float, counters: Counter) -> Sample | None:
    """Turns raw members into a task sample, or counts why it cannot be one and returns None."""
    try:
        record = json.loads(members["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        counters["bad_record"] += 1
        return None
    text = str(record.get("transcript", "")).strip()
    if not text:
        counters["empty_transcript"] += 1
        return None
    lang = record.get("language", source.language)
    duration = float(record.get("duration", 0.0))
    audio = next((members[e] for e in AUDIO_EXTENSIONS if e in members), None)
    task = source.task
    target_lang = None
    if task in SPEECH_TASKS:
        if audio is None:
            counters["missing_audio"] += 1
            return None
        if duration > max_duration:
            counters["too_long"] += 1
            return None
    else:
        audio, duration = None, 0.0
    if task in ("s2tt", "mt"):
        options = [t for t in targets if t != lang and str(record.get("translations", {}).get(t, "")).strip()]
        if not options:
            counters["no_translation"] += 1
            return None
        target_lang = rng.choice(options)
        target = record["translations"][target_lang].strip()
    elif task == "text":
        text, target = split_for_text_task(text)
    else:
        target = text
    prompt = instruction(task, lang, target_lang, text if task in ("mt", "text") else None)
    return Sample(task, lang, target_lang, key, shard, prompt, target, duration, audio,
                  transcript=text if task in SPEECH_TASKS else "")


def bucket(samples: list[Sample], cfg: DataConfig) -> list[list[Sample]]:
    """Sorts by (audio length, text length) and packs batches under the seconds/tokens/size bounds."""
    order = sorted(samples, key=lambda s: (s.duration, len(s.prompt_ids) + len(s.target_ids)))
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    for s in order:
        trial = current + [s]
        longest_audio = max(x.duration for x in trial)
        longest_text = max(len(x.prompt_ids) + len(x.target_ids) for x in trial)
        fits = (
            len(trial) <= cfg.max_batch_size
            and longest_audio * len(trial) <= cfg.max_batch_seconds
            and longest_text * len(trial) <= cfg.max_batch_tokens
        )
        if current and not fits:
            batches.append(current)
            current = [s]
        else:
            current = trial
    if current:
        batches.append(current)
    return batches


def collate(samples: list[Sample], feature_extractor, counters: Counter) -> dict | None:
    """Decodes audio and builds the tensors the model reads. Unreadable clips are dropped and counted."""
    waves, kept = [], []
    for s in samples:
        if s.audio is not None:
            try:
                wave = load_audio(s.audio, name=f"{s.shard}:{s.key}")
            except AudioDecodeError as exc:
                counters["unreadable_audio"] += 1
                print(f"warning: {exc}", file=sys.stderr, flush=True)
                continue
            waves.append(wave)
        kept.append(s)
    if not kept:
        return None
    if waves:
        feats = feature_extractor(waves, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
                                  return_tensors="np")
        features = torch.from_numpy(feats["input_features"])
        frames = torch.tensor([max(1, len(w) // HOP) for w in waves])
    else:  # text-only batch: a short silent input keeps the audio path (and ZeRO-3 gathers) identical on all ranks
        features = torch.from_numpy(
            feature_extractor([np.zeros(SAMPLE_RATE // 4, dtype=np.float32)], sampling_rate=SAMPLE_RATE,
                              padding="longest", return_tensors="np")["input_features"]
        )
        frames = torch.tensor([features.shape[-1]])
    audio_index, j = [], 0
    for s in kept:
        audio_index.append(j if s.audio is not None else -1)
        j += s.audio is not None
    return {
        "input_features": features,
        "feature_frames": frames,
        "audio_index": torch.tensor(audio_index),
        "prompt_ids": [torch.tensor(s.prompt_ids) for s in kept],
        "target_ids": [torch.tensor(s.target_ids) for s in kept],
        "transcript_ids": [torch.tensor(s.transcript_ids, dtype=torch.long) for s in kept],
        "meta": [{"key": s.key, "task": s.task, "language": s.language, "target_language": s.target_language,
                  "reference": s.target, "duration": s.duration} for s in kept],
    }


def encode_text(tokenizer, sample: Sample, end_token_id: int) -> None:
    sample.prompt_ids = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    sample.target_ids = tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [end_token_id]
    if sample.transcript:
        sample.transcript_ids = tokenizer(sample.transcript, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the training stream


class MixtureStream(IterableDataset):
    """Endless stream of batches for one stage on one rank; see the module docstring for the resume contract."""

    def __init__(self, cfg: DataConfig, stage: StageConfig, tokenizer, num_mel_bins: int, rank: int,
                 world_size: int, resume: dict | None = None):
        from transformers import WhisperFeatureExtractor

        self.cfg, self.stage, self.tokenizer = cfg, stage, tokenizer
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, cfg.num_workers)
        self.mixture = stage_mixture(cfg, stage)
        self.feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
        self.end_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.resume = resume or {}
        self.shards = stage_shards(cfg, stage, world_size)

    def worker_id(self, local: int) -> int:
        # After a resume the loader restarts at local worker 0; rotating keeps the batch order unchanged.
        rotated = (local + self.resume.get("consumed", 0)) % self.num_workers
        return self.rank * self.num_workers + rotated

    def __iter__(self) -> Iterator[dict]:
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
                                  Cursor(*state["cursors"].get(src.key, [0, 0, 0])), counters)
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
                sample = make_sample(source, key, members, shard, rng, targets, self.cfg.max_duration, counters)
                if sample is None:
                    continue
                encode_text(self.tokenizer, sample, self.end_token_id)
                samples.append(sample)
            batches = bucket(samples, self.cfg)
            random.Random(f"{seed}/window/{window}").shuffle(batches)
            for b, batch_samples in enumerate(batches):
                if b < skip_batches:
                    continue
                mixed.update(s.task + "/" + s.language + ("-" + s.target_language if s.target_language else "")
                             for s in batch_samples)
                batch = collate(batch_samples, self.feature_extractor, counters)
                if batch is None:
                    continue
                batch["position"] = {"worker": g, "state": start_state, "next_batch": b + 1,
                                     "mixed": dict(mixed), "skipped": dict(counters)}
                yield batch
            skip_batches = 0
            window += 1


def make_loader(dataset: MixtureStream) -> DataLoader:
    workers = dataset.cfg.num_workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


class StreamTracker:
    """Trainer-side bookkeeping of what has been consumed: the resume state and mixture/skip counters."""

    def __init__(self, resume: dict | None = None):
        resume = resume or {}
        self.consumed = resume.get("consumed", 0)
        self.workers: dict[str, dict] = dict(resume.get("workers", {}))

    def update(self, position: dict) -> None:
        self.consumed += 1
        self.workers[str(position["worker"])] = {
            "state": position["state"], "next_batch": position["next_batch"],
            "mixed": position["mixed"], "skipped": position["skipped"],
        }

    def state(self) -> dict:
        return {"consumed": self.consumed, "workers": self.workers}

    def totals(self) -> tuple[Counter, Counter]:
        mixed, skipped = Counter(), Counter()
        for w in self.workers.values():
            mixed.update(w["mixed"])
            skipped.update(w["skipped"])
        return mixed, skipped


# ---------------------------------------------------------------- evaluation sets


def eval_batches(cfg: DataConfig, languages: list[str], tasks: list[str], targets: list[str], per_language: int,
                 batch_size: int, tokenizer, num_mel_bins: int, rank: int, world_size: int) -> list[dict]:
    """Deterministic held-out batches for this rank. Every rank gets the same number of batches (the last
    ones may be padded with repeats marked `pad`) so generation under ZeRO-3 stays in lockstep."""
    from transformers import WhisperFeatureExtractor

    if not cfg.eval_shards:
        return []
    fe = WhisperFeatureExtractor(feature_size=num_mel_bins)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    counters: Counter = Counter()
    samples: list[Sample] = []
    for lang in languages:
        taken = 0
        for url in expand_shards(cfg.eval_shards, lang):
            for key, members in iter_tar_samples(url, counters):
                if taken >= per_language:
                    break
                made = []
                for task in tasks:
                    for tgt in targets if task == "s2tt" else [None]:
                        if tgt == lang:
                            continue
                        s = make_sample(Source(task, lang, cfg.eval_shards), key, members, url, random.Random(0),
                                        [tgt] if tgt else [], WINDOW_SECONDS, counters)
                        if s is not None:
                            made.append(s)
                if not made or made[0].language != lang:  # unusable, or another language's clip
                    continue
                for s in made:
                    encode_text(tokenizer, s, end_id)
                samples.extend(made)
                taken += 1
    samples.sort(key=lambda s: s.duration)
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    mine = chunks[rank::world_size]
    n_batches = -(-len(chunks) // world_size) if chunks else 0
    out = []
    for b in mine:
        batch = collate(b, fe, counters)
        batch["pad"] = False
        out.append(batch)
    while len(out) < n_batches:
        filler = dict(out[0] if out else collate(chunks[0], fe, counters))
        filler["pad"] = True
        out.append(filler)
    return out


def batch_audio_stats(batch: dict) -> tuple[float, float]:
    """(real audio seconds, padded audio seconds) of a batch, for the padding-fraction benchmark."""
    durations = [m["duration"] for m in batch["meta"] if m["task"] in SPEECH_TASKS]
    if not durations:
        return 0.0, 0.0
    return sum(durations), max(durations) * len(durations)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Moves a batch's tensors to `device`; audio features take the model's compute dtype."""
    out = dict(batch)
    out["input_features"] = batch["input_features"].to(device, dtype, non_blocking=True)
    for key in ("feature_frames", "audio_index"):
        out[key] = batch[key].to(device, non_blocking=True)
    out["prompt_ids"] = [t.to(device, non_blocking=True) for t in batch["prompt_ids"]]
    out["target_ids"] = [t.to(device, non_blocking=True) for t in batch["target_ids"]]
    if "transcript_ids" in batch:
        out["transcript_ids"] = [t.to(device, non_blocking=True) for t in batch["transcript_ids"]]
    return out
