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

from part.config import SPEECH_TASKS, DataConfig, TrainConfig
from part.data.audio import AudioDecodeError, load_audio
from part.data.eval_sets import first_per_language
from part.data.shards import AUDIO_EXTENSIONS
from part.evaluation.evaluator import BatchProgress, score_each
from part.evaluation.metrics import evaluation_report, normalizers_from
from part.features import MAX_CLIP_SECONDS, SAMPLE_RATE

PROGRESS_SECONDS = 30.0  # the least time between two progress lines


class ReferenceInputError(ValueError):
    """The Whisper directory, the tasks or the eval shards cannot give a reference; the message names it."""


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


def write_whisper_reference(cfg: TrainConfig, source: str, whisper_dir: str | Path | None = None,
                            tasks: list[str] | None = None, per_language: int | None = None, batch_size: int = 8,
                            out: str | Path = "runs/whisper_reference",
                            log: Callable[[str], None] = print) -> str:
    """Whisper's own reading of `cfg`'s held-out speech (the config read from `source`): writes
    `reference_hypotheses.jsonl` and `reference.md` into `out` and returns the table. `whisper_dir` defaults to
    the config's encoder, `tasks` to eval.tasks, `per_language` to eval.per_language; `log` gets the clip count,
    what was skipped and the progress (batches, elapsed, ETA). ReferenceInputError for a directory without
    Whisper's decoder, a task other than asr and s2tt, or no readable clip."""
    whisper = Path(whisper_dir or cfg.model.encoder.pretrained or "")
    if not (whisper / "config.json").is_file() or not (whisper / "generation_config.json").is_file():
        raise ReferenceInputError(f"{whisper}: not a transformers Whisper directory with its decoder (config.json, "
                                  "generation_config.json)")
    tasks = list(tasks or [t for t in cfg.eval.tasks if t in SPEECH_TASKS])  # speech in, not text (mt)
    unknown = sorted(set(tasks) - set(SPEECH_TASKS))
    if unknown:
        raise ReferenceInputError(f"tasks: {', '.join(unknown)} (Whisper reads asr and s2tt into English)")
    skipped: Counter = Counter()
    utterances = held_out_utterances(cfg.data, cfg.data.languages, per_language or cfg.eval.per_language, skipped)
    if skipped:
        log("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
    if not utterances:
        raise ReferenceInputError(f"no readable clips of {cfg.data.languages} in {cfg.data.eval_shards}")
    log(f"{len(utterances)} clips ({', '.join(cfg.data.languages)}), {whisper}, tasks {','.join(tasks)}")
    records = whisper_records(whisper, utterances, tasks, batch_size=batch_size,
                              progress=BatchProgress(log, every_seconds=PROGRESS_SECONDS))
    table = evaluation_report(score_each(records, normalizers_from(cfg.eval.normalizer)), cfg.eval.normalizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reference_hypotheses.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    header = f"Whisper's own decoder ({whisper}) on {source}'s held-out speech, greedy\n\n"
    (out / "reference.md").write_text(header + table + "\n", encoding="utf-8")
    return table
