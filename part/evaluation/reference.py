"""A Whisper checkpoint's own reading of a recipe's held-out speech: its decoder transcribing (ASR) and translating
into English (S2TT) the evaluation utterances the trained model is scored on, with the same metrics. For the
embedded default this is the model the encoder and the frame targets come from, so it says how much of the speech
its features carry for a decoder that was trained on them: a reference for the table, not a bound."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from part.config import DataConfig
from part.data.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from part.data.eval_sets import first_per_language
from part.data.shards import AUDIO_EXTENSIONS
from part.model.encoders import MAX_CLIP_SECONDS


@dataclass
class Utterance:
    key: str
    language: str
    transcript: str
    translations: dict[str, str]
    audio: np.ndarray  # mono float32 waveform at SAMPLE_RATE


def held_out_utterances(data: DataConfig, languages: list[str], per_language: int,
                        skipped: Counter | None = None) -> list[Utterance]:
    """The first `per_language` readable clips of each language in the eval shards, in shard order (the clips
    `part.data.eval_sets.eval_batches` takes), each no longer than Whisper's window. Unreadable samples are
    left out and counted in `skipped` by reason."""
    counters: Counter = skipped if skipped is not None else Counter()

    def utterance(lang: str, url: str, key: str, members: dict[str, bytes]) -> Utterance | None:
        audio = next((members[e] for e in AUDIO_EXTENSIONS if e in members), None)
        if "json" not in members or audio is None:
            counters["missing_json_or_audio"] += 1
            return None
        try:
            record = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            counters["unreadable_json"] += 1
            return None
        if record.get("language") != lang or not record.get("transcript"):
            return None  # another language's clip in the shard, or one without a transcript
        try:
            wave = load_audio(audio, name=f"{url}:{key}")
        except AudioDecodeError:
            counters["undecodable_audio"] += 1
            return None
        if len(wave) > MAX_CLIP_SECONDS * SAMPLE_RATE:
            counters["over_30_s"] += 1
            return None
        return Utterance(key, lang, record["transcript"], record.get("translations") or {}, wave)

    return list(first_per_language(data.eval_shards, languages, per_language, utterance, counters))


@torch.no_grad()
def whisper_records(whisper_dir: str | Path, utterances: list[Utterance], tasks: list[str], batch_size: int = 8,
                    max_new_tokens: int = 120, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """{task, language, target_language, reference, hypothesis} per utterance and task: Whisper's greedy decoding
    with the language given (`transcribe` for asr; `translate`, into English, for s2tt of non-English clips)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    jobs = []
    for u in utterances:
        if "asr" in tasks:
            jobs.append(("asr", u, None, u.transcript))
        if "s2tt" in tasks and u.language != "en" and "en" in u.translations:
            jobs.append(("s2tt", u, "en", u.translations["en"]))
    groups: dict[tuple[str, str], list] = {}
    for job in jobs:
        groups.setdefault((job[0], job[1].language), []).append(job)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    records = []
    for done, batch in enumerate(batches, 1):
        task, language = batch[0][0], batch[0][1].language  # a batch holds one task and one language
        features = processor.feature_extractor([job[1].audio for job in batch], sampling_rate=SAMPLE_RATE,
                                               return_tensors="pt").input_features
        ids = model.generate(features, language=language, task="transcribe" if task == "asr" else "translate",
                             max_new_tokens=max_new_tokens)
        for (_, u, target, reference), text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True)):
            records.append({"key": u.key, "task": task, "language": u.language, "target_language": target,
                            "reference": reference, "hypothesis": text.strip()})
        if progress is not None:
            progress(done, len(batches))
    return records
