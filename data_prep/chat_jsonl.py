"""Chat-style JSONL (ms-swift, LLaMA-Factory, Fun-ASR-Nano, WeNet WEST fine-tuning data) -> per-language shards.

One JSON object per line, e.g.
  {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "<audio>Transcribe the German audio."},
                {"role": "assistant", "content": "Die Höhle befindet sich auf der Spitze eines der Berge."}],
   "audios": ["clips/de_004.wav"]}
A user turn refers to its audio in one of three ways:
  `<audio>` in its text                   the next entry of the object's `audios` list (ms-swift, LLaMA-Factory)
  <|startofspeech|>!PATH<|endofspeech|>   inline in its text (Fun-ASR-Nano)
  {"type": "audio", "audio": PATH}        a content part, alone or in a list of parts (WEST; `audio_url` too)
LLaMA-Factory's ShareGPT form, "conversations": [{"from": "human"|"gpt"|"system", "value": ...}], is read as well.
The assistant turn right after a user turn with audio is that audio's target. One audio per such user turn; user
turns without audio (and their replies) are not read.

The task of each audio turn: asr (the target is the transcript) or s2tt (the target is a translation):
  1. the object's `task` field (asr, transcribe, transcription / s2tt, ast, st, translate, translation), else --task;
  2. else the user's instruction, only where it says one of them plainly, in English or Chinese:
       asr:  transcribe, transcription, speech recognition, speech to text; 转写, 转录, 语音识别, 语音转文字/文本, 听写
       s2tt: translate, translation; 翻译, 译成, 译为
     An instruction with words of both, or of neither, is not guessed: the turn is skipped as `unknown_task`.
The speech language: the object's `language`, else --language, else the instruction's "<Language> audio|speech|
recording" / "from <Language>" / "<语言>语音" / "转写成<语言>" (Fun-ASR's prompt).
The target language of s2tt: the object's `target_language`, else --target-language, else the instruction's
"into|to <Language>" / "翻译成|翻译为|译成|译为<语言>".
Languages: ISO 639 codes or tags (de, zh-CN) or English names (German); the instruction's names are English names
(German, Chinese, ...) or Chinese ones (德语, 中文, ...).

A shard record holds one clip's transcript and its translations {lang: text}, so the turns of one audio file, in one
object or across lines, become one sample. A translation needs the clip's transcript as well: an asr turn of the same
file, or the object's `transcript` field; a clip with translations only is skipped as `no_transcript`.
Audio paths: absolute, or relative to --audio-root (default: the JSONL file's directory). Sample ids: the object's
`id` (or `key`) when it holds one audio, else made from the audio path.

Bad lines and turns are skipped, each named by file:line and field, and counted in the summary at the end (and in
index.json); the command exits 2 when no sample survives.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.manifest import (
    BadRows,
    add_selection_args,
    id_from_audio,
    jsonl_objects,
    language_code,
    make_record,
    sanitize_id,
    write_selected,
)
from part.prompts import LANGUAGE_NAMES

SOURCE = "chat_jsonl"
TASKS = {"asr": "asr", "transcribe": "asr", "transcription": "asr",
         "s2tt": "s2tt", "ast": "s2tt", "st": "s2tt", "translate": "s2tt", "translation": "s2tt"}
ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's names
AUDIO_TAG = "<audio>"
INLINE_AUDIO = re.compile(r"<\|startofspeech\|>!?(.*?)<\|endofspeech\|>", re.S)

# Chinese language names an instruction may use (the English ones are part.prompts.LANGUAGE_NAMES).
CHINESE_NAMES = {
    "中文": "zh", "汉语": "zh", "普通话": "zh", "英文": "en", "英语": "en", "日文": "ja", "日语": "ja", "韩文": "ko",
    "韩语": "ko", "粤语": "yue", "德文": "de", "德语": "de", "法文": "fr", "法语": "fr", "西班牙语": "es",
    "俄语": "ru", "俄文": "ru", "意大利语": "it", "葡萄牙语": "pt", "阿拉伯语": "ar",
}
_EN_NAMES = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
_EN_NAME = "(" + "|".join(sorted(_EN_NAMES, key=len, reverse=True)) + ")"
_ZH_NAME = "(" + "|".join(sorted(CHINESE_NAMES, key=len, reverse=True)) + ")"
ASR_WORDS = re.compile(r"\b(transcri(be|bes|bed|ption|pt)|speech recognition|speech[- ]to[- ]text)\b"
                       r"|转写|转录|语音识别|语音转文字|语音转文本|听写", re.I)
S2TT_WORDS = re.compile(r"\btranslat(e|es|ed|ion|ing)\b|翻译|译成|译为", re.I)
SPEECH_LANGUAGE = [re.compile(rf"\b{_EN_NAME}\s+(audio|speech|recording)\b", re.I),
                   re.compile(rf"\bfrom\s+{_EN_NAME}\b", re.I),
                   re.compile(rf"{_ZH_NAME}(语音|音频)"), re.compile(rf"(转写|转录)成{_ZH_NAME}")]
TARGET_LANGUAGE = [re.compile(rf"\binto\s+{_EN_NAME}\b", re.I), re.compile(rf"\bto\s+{_EN_NAME}\b", re.I),
                   re.compile(rf"(翻译成|翻译为|译成|译为){_ZH_NAME}")]

EXAMPLES = """\
examples:
  python -m data_prep.chat_jsonl --jsonl train.jsonl --out shards/chat --language de --workers 8
"""


def _named(match: re.Match) -> str:
    name = next(g for g in reversed(match.groups()) if g and (g.lower() in _EN_NAMES or g in CHINESE_NAMES))
    return _EN_NAMES.get(name.lower()) or CHINESE_NAMES[name]


def _first_language(patterns: list[re.Pattern], text: str) -> str | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return _named(match)
    return None


def infer_task(instruction: str) -> tuple[str | None, str | None, str | None]:
    """(task, speech language, target language) that the user's instruction states plainly; None where it does not.
    The task is None unless exactly one of the asr and s2tt word lists occurs in it."""
    asr, s2tt = bool(ASR_WORDS.search(instruction)), bool(S2TT_WORDS.search(instruction))
    task = "asr" if asr and not s2tt else "s2tt" if s2tt and not asr else None
    target = _first_language(TARGET_LANGUAGE, instruction) if task == "s2tt" else None
    return task, _first_language(SPEECH_LANGUAGE, instruction), target


@dataclass
class AudioTurn:
    audio: str  # as written in the file
    field: str  # where it was written, e.g. audios[0]
    instruction: str
    reply: str


def _content(content: object, name: str) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(audio path, field)]) of a turn's content: a string, a part {"type": ..., ...} or a list of parts."""
    if isinstance(content, str):
        audios = [(m.group(1).strip(), name) for m in INLINE_AUDIO.finditer(content)]
        return INLINE_AUDIO.sub("", content), audios
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ValueError(f"field '{name}' must be a string, a content part or a list of parts")
    texts, audios = [], []
    for n, part in enumerate(parts):
        where = name if isinstance(content, dict) else f"{name}[{n}]"
        if part.get("type") == "audio":
            path = part.get("audio", part.get("audio_url"))
            if not isinstance(path, str) or not path.strip():
                raise ValueError(f"field '{where}': an audio part needs 'audio' (a path)")
            audios.append((path.strip(), where))
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return " ".join(texts), audios


def _messages(obj: dict) -> tuple[str, list[tuple[str, object]]]:
    """The list's field name and its (role, content) pairs, from `messages` (role/content) or `conversations`
    (ShareGPT from/value)."""
    name = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if name is None:
        raise ValueError("missing field 'messages'")
    turns = obj[name]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"field '{name}' must be a list of objects")
    out = []
    for n, turn in enumerate(turns):
        role = turn.get("role", turn.get("from"))
        if not isinstance(role, str):
            raise ValueError(f"field '{name}[{n}]' has no 'role'")
        out.append((ROLES.get(role, role), turn.get("content", turn.get("value"))))
    return name, out


def audio_turns(obj: dict, bad: BadRows, where: str) -> list[AudioTurn]:
    """The object's user turns with audio and their replies. A problem with the whole object raises ValueError;
    a problem with one turn skips that turn (logged and counted in `bad`)."""
    name, turns = _messages(obj)
    listed = obj.get("audios", obj.get("audio", []))
    listed = [listed] if isinstance(listed, str) else listed
    if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
        raise ValueError("field 'audios' must be a list of paths")
    users = {n: _content(content, f"{name}[{n}].content") for n, (role, content) in enumerate(turns) if role == "user"}
    tags = sum(text.count(AUDIO_TAG) for text, _ in users.values())
    if tags != len(listed):
        raise ValueError(f"field 'audios' has {len(listed)} entries for {tags} '{AUDIO_TAG}' tags in user turns")
    next_listed, found = 0, []
    for n, (text, audios) in users.items():
        for _ in range(text.count(AUDIO_TAG)):
            audios.append((listed[next_listed], f"audios[{next_listed}]"))
            next_listed += 1
        if not audios:
            continue
        if len(audios) > 1:
            bad.skip(f"{where}: field '{name}[{n}].content': {len(audios)} audios in one user turn (one per turn)")
            continue
        reply_role, reply = turns[n + 1] if n + 1 < len(turns) else (None, None)
        if reply_role != "assistant":
            bad.skip(f"{where}: field '{name}[{n}]': a user turn with audio and no assistant reply after it")
            continue
        try:
            reply_text, reply_audios = _content(reply, f"{name}[{n + 1}].content")
        except ValueError as exc:
            bad.skip(f"{where}: {exc}")
            continue
        if not reply_text.strip() or reply_audios:
            bad.skip(f"{where}: field '{name}[{n + 1}].content': the reply must be non-empty text")
            continue
        audio, audio_field = audios[0]
        found.append(AudioTurn(audio, audio_field, text.replace(AUDIO_TAG, " ").strip(), reply_text.strip()))
    return found


@dataclass
class Clip:
    """What the lines say about one audio file, merged."""

    id: str
    language: str
    where: str  # file:line that first named it
    transcript: str | None = None
    translations: dict[str, str] = field(default_factory=dict)


@dataclass
class Defaults:
    task: str | None = None
    language: str | None = None
    target_language: str | None = None


def _field_language(obj: dict, name: str, default: str | None) -> str | None:
    value = obj.get(name)
    if value is None or not str(value).strip():
        return default
    try:
        return language_code(value)
    except ValueError as exc:
        raise ValueError(f"field '{name}': {exc}") from None


def _object_task(obj: dict, default: str | None) -> str | None:
    value = obj.get("task")
    if value is None or not str(value).strip():
        return default
    task = TASKS.get(str(value).strip().lower())
    if task is None:
        raise ValueError(f"field 'task': {value!r} is neither asr nor s2tt (one of {', '.join(TASKS)})")
    return task


class ChatReader:
    """Reads chat JSONL files into clips: one per audio file, with its transcript and translations."""

    def __init__(self, defaults: Defaults, audio_root: Path | None = None, log=None):
        self.defaults = defaults
        self.audio_root = audio_root
        self.bad = BadRows(log)
        self.clips: dict[str, Clip] = {}  # by resolved audio path
        self.ids: dict[str, str] = {}  # sample id -> audio path

    def read(self, path: Path) -> None:
        root = self.audio_root or path.resolve().parent
        for where, obj in jsonl_objects(path, self.bad):
            try:
                self._read_object(obj, where, root)
            except ValueError as exc:
                self.bad.skip(f"{where}: {exc}")

    def _read_object(self, obj: dict, where: str, root: Path) -> None:
        task = _object_task(obj, self.defaults.task)
        language = _field_language(obj, "language", self.defaults.language)
        target = _field_language(obj, "target_language", self.defaults.target_language)
        turns = audio_turns(obj, self.bad, where)
        if not turns:
            raise ValueError("no user turn with audio")
        given_id = obj.get("id", obj.get("key")) if len(turns) == 1 else None
        transcript = obj.get("transcript") if len(turns) == 1 else None
        if transcript is not None and not isinstance(transcript, str):
            raise ValueError("field 'transcript' must be a string")
        for turn in turns:
            self._add_turn(turn, where, root, task, language, target, given_id, transcript)

    def _add_turn(self, turn: AudioTurn, where: str, root: Path, task: str | None, language: str | None,
                  target: str | None, given_id: object, transcript: str | None) -> None:
        said_task, said_language, said_target = infer_task(turn.instruction)
        task, language = task or said_task, language or said_language
        if task is None:
            self.bad.skip(f"{where}: field 'task': not given, and the instruction {turn.instruction[:60]!r} does not "
                          "plainly ask for a transcript or a translation (give `task`, or --task)", "unknown_task")
            return
        if language is None:
            self.bad.skip(f"{where}: field 'language': the speech language is not given (give `language`, or "
                          "--language)")
            return
        if task == "s2tt":
            target = target or said_target
            if target is None:
                self.bad.skip(f"{where}: field 'target_language': a translation with no target language (give "
                              "`target_language`, or --target-language)")
                return
            if target == language:
                self.bad.skip(f"{where}: field 'target_language': a translation into the speech language {language}")
                return
        audio = Path(turn.audio)
        if "://" in turn.audio:
            self.bad.skip(f"{where}: field '{turn.field}': {turn.audio} is not a local file")
            return
        resolved = audio if audio.is_absolute() else root / audio
        if not resolved.is_file():
            self.bad.skip(f"{where}: field '{turn.field}': no such file {resolved}")
            return
        key = str(resolved)
        clip = self.clips.get(key)
        if clip is None:
            raw_id = str(given_id).strip() if given_id is not None and str(given_id).strip() else id_from_audio(audio)
            clip_id = sanitize_id(raw_id)
            if clip_id in self.ids:
                self.bad.skip(f"{where}: field 'id': id '{clip_id}' is already used by {self.ids[clip_id]}")
                return
            clip = Clip(clip_id, language, where)
        elif clip.language != language:
            self.bad.skip(f"{where}: field 'language': {turn.audio} is {language} here, {clip.language} at "
                          f"{clip.where}")
            return
        spoken = turn.reply if task == "asr" else transcript
        if spoken is not None and spoken.strip():
            if clip.transcript is not None and clip.transcript != spoken.strip():
                self.bad.skip(f"{where}: field 'transcript': {turn.audio} has a different transcript at {clip.where}")
                return
            clip.transcript = spoken.strip()
        if task == "s2tt":
            if clip.translations.get(target, turn.reply) != turn.reply:
                self.bad.skip(f"{where}: field '{turn.field}': a different {target} translation of {turn.audio} "
                              f"at {clip.where}")
                return
            clip.translations[target] = turn.reply
        self.clips[key] = clip
        self.ids[clip.id] = key

    def items(self, source: str) -> list[Item]:
        """One item per clip with a transcript; clips with translations only are counted as `no_transcript`."""
        items = []
        for path, clip in self.clips.items():
            if clip.transcript is None:
                self.bad.skip(f"{clip.where}: field 'transcript': {path} has only translations; a sample needs "
                              "its transcript too (an asr turn of the same audio, or `transcript`)", "no_transcript")
                continue
            record = make_record(clip.id, clip.language, clip.transcript, source, clip.translations)
            items.append(Item(record=record, audio_path=path))
        return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--jsonl", nargs="+", required=True, type=Path, help="one or more chat JSONL files")
    parser.add_argument("--task", choices=sorted(TASKS), help="task of audio turns whose object has no `task`")
    parser.add_argument("--language", help="speech language of objects without `language` (e.g. de, zh-CN)")
    parser.add_argument("--target-language", help="target language of translations without `target_language`")
    parser.add_argument("--audio-root", type=Path, help="relative audio paths start here (default: the JSONL's dir)")
    parser.add_argument("--source", default=SOURCE, help="the records' `source`")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    try:
        defaults = Defaults(TASKS[args.task] if args.task else None,
                            language_code(args.language) if args.language else None,
                            language_code(args.target_language) if args.target_language else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reader = ChatReader(defaults, args.audio_root)
    for path in args.jsonl:
        try:
            reader.read(path)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    items = reader.items(args.source)
    write_selected(items, args, {"source": args.source}, skipped=dict(reader.bad.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
