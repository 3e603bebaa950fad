"""Raw shard members -> a task sample: the prompt and target texts (then token ids) and the audio bytes."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field

from part.config import SPEECH_TASKS
from part.data.shards import AUDIO_EXTENSIONS
from part.prompts import PromptFormat, split_for_text_task


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


def read_record(members: dict[str, bytes], language: str, counters: Counter) -> tuple[dict, str] | None:
    """A sample's JSON record and its stripped transcript, when the record is a JSON object with a non-empty
    transcript of `language` (the language of the shards it came from); otherwise counts why not and returns None."""
    try:
        record = json.loads(members["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        counters["bad_record"] += 1
        return None
    if not isinstance(record, dict):
        counters["bad_record"] += 1
        return None
    text = str(record.get("transcript", "")).strip()
    if not text:
        counters["empty_transcript"] += 1
        return None
    if record.get("language", language) != language:  # another (maybe unlisted) language in these shards
        counters["other_language"] += 1
        return None
    return record, text


def make_sample(task: str, language: str, key: str, members: dict[str, bytes], shard: str, rng: random.Random,
                targets: list[str], max_duration: float, counters: Counter, prompts: PromptFormat) -> Sample | None:
    """Turns raw members into a sample of `task` (read from a `language` source), its prompt written in the LLM's
    format `prompts`, or counts why it cannot be one and returns None."""
    read = read_record(members, language, counters)
    if read is None:
        return None
    record, text = read
    try:  # only for bucketing: the collator measures the decoded clip and drops it if it is really too long
        duration = float(record.get("duration", 0.0))
    except (TypeError, ValueError):
        duration = math.nan
    if not math.isfinite(duration) or duration < 0:
        counters["bad_duration"] += 1
        return None
    audio = next((members[e] for e in AUDIO_EXTENSIONS if e in members), None)
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
        translations = record.get("translations")
        translations = translations if isinstance(translations, dict) else {}
        options = [t for t in targets if t != language and str(translations.get(t, "")).strip()]
        if not options:
            counters["no_translation"] += 1
            return None
        target_lang = rng.choice(options)
        target = str(translations[target_lang]).strip()
    elif task == "text":
        text, target = split_for_text_task(text)
    else:
        target = text
    prompt = prompts.prompt(task, language, target_lang, text if task in ("mt", "text") else None)
    return Sample(task, language, target_lang, key, shard, prompt, target, duration, audio,
                  transcript=text if task in SPEECH_TASKS else "")


def encode_text(tokenizer, sample: Sample, end_token_id: int) -> None:
    """Token ids of the prompt, of the target followed by the end-of-turn token the model learns to stop on (the
    prompt format's `end_token`), and of the transcript (speech samples)."""
    sample.prompt_ids = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    sample.target_ids = tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [end_token_id]
    if sample.transcript:
        sample.transcript_ids = tokenizer(sample.transcript, add_special_tokens=False)["input_ids"]
