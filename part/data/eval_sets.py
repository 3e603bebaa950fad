"""Held-out evaluation batches: deterministic, and the same number on every rank."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

from part.config import DataConfig
from part.data.batching import Batch, collate
from part.data.samples import Sample, encode_text, make_sample
from part.data.shards import RemoteReads, expand_shards, iter_tar_samples
from part.data.sources import remote_reads
from part.features import MAX_CLIP_SECONDS, AudioFeatures, audio_features
from part.packing import LayoutSpec
from part.prompts import PromptFormat

WINDOW_SECONDS = MAX_CLIP_SECONDS  # the longest clip an encoder is given (Whisper's window)

Taken = TypeVar("Taken")


def first_per_language(shards: str, languages: list[str], per_language: int,
                       accept: Callable[[str, str, str, dict[str, bytes]], Taken | None],
                       counters: Counter, reads: RemoteReads | None = None) -> Iterator[Taken]:
    """The held-out set's rule: for each language in turn, its shards in order, the first `per_language` samples
    that `accept(language, shard_url, key, members)` makes something of (None: passed over, e.g. unreadable or
    another language's clip). Unreadable tar members are counted in `counters`; `reads`: how shards read over
    the network are retried."""
    for lang in languages:
        taken = 0
        for url in expand_shards(shards, lang):
            if taken >= per_language:
                break
            for key, members in iter_tar_samples(url, counters, reads):
                item = accept(lang, url, key, members)
                if item is None:
                    continue
                yield item
                taken += 1
                if taken >= per_language:
                    break


def eval_batches(cfg: DataConfig, languages: list[str], tasks: list[str], targets: list[str], per_language: int,
                 batch_size: int, tokenizer, features: AudioFeatures | int, rank: int, world_size: int,
                 prompts: PromptFormat | None = None, layout: LayoutSpec | None = None) -> list[Batch]:
    """Deterministic held-out batches for this rank: `first_per_language` of the eval shards, each clip as every
    task's prompt (`mt`: its transcript as text to translate). Every rank gets the same number of batches (the
    last ones may be repeats marked `is_padding`) so that generation can run in lockstep (the ZeRO-3 engine's own
    module). Prompts are written in `prompts` (by default the tokenizer's format, `PromptFormat.from_tokenizer`).
    `features`: the model's `audio_features` (an int: Whisper log-mel with that many bins); `layout`: the model's
    `layout_spec`."""
    if not cfg.eval_shards:
        return []
    fe = audio_features(features)
    prompts = prompts or PromptFormat.from_tokenizer(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(prompts.end_token)
    counters: Counter = Counter()

    def speech_samples(lang: str, url: str, key: str, members: dict[str, bytes]) -> list[Sample] | None:
        made = []
        for task in tasks:
            for tgt in targets if task in ("s2tt", "mt") else [None]:
                if tgt == lang:
                    continue
                s = make_sample(task, lang, key, members, url, random.Random(0), [tgt] if tgt else [],
                                WINDOW_SECONDS, counters, prompts)
                if s is not None:
                    made.append(s)
        if not made or made[0].language != lang:  # unusable, or another language's clip
            return None
        for s in made:
            encode_text(tokenizer, s, end_id)
        return made

    samples = [s for made in first_per_language(cfg.eval_shards, languages, per_language, speech_samples, counters,
                                                remote_reads(cfg))
               for s in made]
    samples.sort(key=lambda s: s.duration)
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    mine = chunks[rank::world_size]
    n_batches = -(-len(chunks) // world_size) if chunks else 0
    out = [batch for batch in (collate(b, fe, counters, layout=layout) for b in mine)
           if batch is not None]  # None: all its clips were bad
    while len(out) < n_batches:
        out.append(dataclasses.replace(out[0] if out else collate(chunks[0], fe, counters, layout=layout),
                                       is_padding=True))
    return out
