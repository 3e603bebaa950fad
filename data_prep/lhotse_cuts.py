"""Lhotse CutSet manifests (cuts.jsonl.gz or .jsonl) -> per-language WebDataset shards. Read as JSON: the lhotse
package is not needed.

One cut per line, with its recording inline, as CutSet.to_file writes it, e.g.
  {"id": "rec1-2500", "start": 2.5, "duration": 4.0, "channel": 0, "type": "MonoCut",
   "recording": {"id": "rec1", "sources": [{"type": "file", "channels": [0], "source": "audio/rec1.flac"}],
                 "sampling_rate": 16000, "num_samples": 240000, "duration": 15.0},
   "supervisions": [{"id": "rec1-sup3", "recording_id": "rec1", "start": 0.0, "duration": 4.0, "channel": 0,
                     "text": "Die Höhle befindet sich auf der Spitze eines der Berge.", "language": "German"}]}
Required fields:
  cut: `id`, `start` and `duration` (seconds within the recording), `recording`, `supervisions` (a list)
  recording: `sources` (a `file` source: `source` is its path, `channels` the channels it holds), `sampling_rate`,
    and `duration` or `num_samples`; `transforms` other than Resample (speed, volume, reverb) are not supported
  supervision: `text`, `start` (seconds from the cut's start), `duration`; `language` unless --language gives it
Optional: the cut's `channel` (an int: that channel of the file; a list, or none: the mix of the source's channels),
  a supervision's `custom` {"translations": {lang: text}} or `custom` {"translation_<lang>": text}.
A sample's audio is the cut: [start, start + duration) of the recording, read by seeking into the file, mixed to mono
(or the cut's one channel) and resampled to 16 kHz. Audio paths are absolute, or relative to --audio-root (default:
the manifest's folder). Languages: ISO 639 codes or tags (en, zh-CN) or English names (English, as recipes write).

A cut with several supervisions is one sample (the default), as Lhotse's ASR datasets read it: the cut's audio, the
supervisions' texts in start order joined by a space (translations likewise, where every supervision has one), their
one language (supervisions of different languages make the cut bad). With --per-supervision each supervision becomes
a sample instead: its own span (clipped to the cut), text and id.
MixedCut and PaddingCut lines, cuts whose audio is not a local file, and cuts past the end of their recording are
skipped, each named by file:line and field, and counted in the summary at the end (and in index.json); the command
exits 2 when no sample survives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.manifest import (
    BadRows,
    add_selection_args,
    jsonl_objects,
    language_code,
    make_record,
    sanitize_id,
    write_selected,
)

SOURCE = "lhotse"
CUT_TYPES = ("MonoCut", "MultiCut")
END_TOLERANCE = 0.01  # s a cut may reach past its recording's end (rounding in the manifest)

EXAMPLES = """\
examples:
  python -m data_prep.lhotse_cuts --cuts data/manifests/cuts_train.jsonl.gz --out shards/lhotse --workers 8
"""


def _number(obj: dict, name: str, prefix: str = "") -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field '{prefix}{name}' must be a number, got {value!r}")
    return float(value)


def _source(recording: dict, channel: object, root: Path) -> tuple[str, int | None]:
    """(audio file, channel index within it or None for the mix) of the recording's source holding `channel`."""
    sources = recording.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
        raise ValueError("field 'recording.sources' must be a non-empty list of sources")
    wanted = [channel] if isinstance(channel, int) else channel if isinstance(channel, list) else None
    for n, source in enumerate(sources):
        held = source.get("channels", [0])
        if wanted is not None and not set(wanted) <= set(held):
            continue
        if source.get("type") != "file":
            raise ValueError(f"field 'recording.sources[{n}].type': {source.get('type')!r} sources are not supported "
                             "(only 'file')")
        path = source.get("source")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"field 'recording.sources[{n}].source' must be a path")
        file = Path(path) if Path(path).is_absolute() else root / path
        if not file.is_file():
            raise ValueError(f"field 'recording.sources[{n}].source': no such file {file}")
        index = held.index(channel) if isinstance(channel, int) and len(held) > 1 else None
        return str(file), index
    raise ValueError(f"field 'channel': no source of the recording holds channel {channel}")


def _translations(supervision: dict) -> dict[str, str]:
    custom = supervision.get("custom") or {}
    if not isinstance(custom, dict):
        return {}
    found = dict(custom.get("translations") or {}) if isinstance(custom.get("translations"), dict) else {}
    found |= {k[len("translation_"):]: v for k, v in custom.items() if k.startswith("translation_")}
    return {language_code(k): v for k, v in found.items() if isinstance(v, str) and v.strip()}


def _supervision(sup: object, n: int, default_language: str | None) -> tuple[float, float, str, str, dict]:
    """(start, duration, text, language, translations) of the cut's supervision `n`."""
    name = f"supervisions[{n}]."
    if not isinstance(sup, dict):
        raise ValueError(f"field 'supervisions[{n}]' must be an object")
    text = sup.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field '{name}text': missing or empty")
    language = sup.get("language")
    if language is None or not str(language).strip():
        if default_language is None:
            raise ValueError(f"field '{name}language': missing (--language gives a default)")
        language = default_language
    else:
        try:
            language = language_code(language)
        except ValueError as exc:
            raise ValueError(f"field '{name}language': {exc}") from None
    try:
        translations = _translations(sup)
    except ValueError as exc:
        raise ValueError(f"field '{name}custom': {exc}") from None
    return _number(sup, "start", name), _number(sup, "duration", name), text.strip(), language, translations


def cut_items(cut: dict, root: Path, default_language: str | None, per_supervision: bool, source: str) -> list[Item]:
    """The samples of one cut. Raises ValueError naming the field of the first problem."""
    kind = cut.get("type", "MonoCut")
    if kind not in CUT_TYPES:
        raise ValueError(f"field 'type': {kind} is not supported (only {' and '.join(CUT_TYPES)})")
    for name in ("id", "recording", "supervisions"):
        if name not in cut:
            raise ValueError(f"missing field '{name}'")
    start, duration = _number(cut, "start"), _number(cut, "duration")
    if start < 0 or duration <= 0:
        raise ValueError(f"field 'duration': a cut of {duration} s from {start} s")
    recording = cut["recording"]
    if not isinstance(recording, dict):
        raise ValueError("field 'recording' must be an object (the recording inline, as CutSet.to_file writes it)")
    transforms = [t.get("name") if isinstance(t, dict) else t for t in recording.get("transforms") or []]
    if any(t != "Resample" for t in transforms):
        raise ValueError(f"field 'recording.transforms': {transforms} change the audio; not supported")
    if "duration" in recording:
        length = _number(recording, "duration", "recording.")
    else:
        length = _number(recording, "num_samples", "recording.") / _number(recording, "sampling_rate", "recording.")
    if start + duration > length + END_TOLERANCE:
        raise ValueError(f"field 'duration': the cut ends at {start + duration:.3f} s, after the recording's "
                         f"{length:.3f} s")
    path, channel = _source(recording, cut.get("channel"), root)
    sups = cut["supervisions"]
    if not isinstance(sups, list) or not sups:
        raise ValueError("field 'supervisions': no supervision (nothing to transcribe)")
    parsed = sorted((_supervision(s, n, default_language) + (s.get("id"),) for n, s in enumerate(sups)),
                    key=lambda s: s[0])
    if per_supervision:
        items = []
        for n, (sup_start, sup_duration, text, language, translations, sup_id) in enumerate(parsed):
            first, last = max(0.0, sup_start), min(duration, sup_start + sup_duration)
            if last <= first:
                raise ValueError(f"field 'supervisions[{n}]': it lies outside the cut")
            raw_id = sup_id if isinstance(sup_id, str) and sup_id.strip() else f"{cut['id']}_{n}"
            record = make_record(sanitize_id(raw_id), language, text, source, translations)
            items.append(Item(record=record, audio_path=path, start=start + first, end=start + last, channel=channel))
        return items
    languages = sorted({s[3] for s in parsed})
    if len(languages) > 1:
        raise ValueError(f"field 'supervisions': languages {', '.join(languages)} in one cut (--per-supervision "
                         "makes a sample of each)")
    shared = set.intersection(*(set(s[4]) for s in parsed))
    translations = {lang: " ".join(s[4][lang] for s in parsed) for lang in sorted(shared)}
    record = make_record(sanitize_id(str(cut["id"])), languages[0], " ".join(s[2] for s in parsed), source,
                         translations)
    return [Item(record=record, audio_path=path, start=start, end=start + duration, channel=channel)]


def _read_manifest(path: Path, root: Path, bad: BadRows, items: list[Item], first_seen: dict[str, str],
                   default_language: str | None, per_supervision: bool, source: str) -> None:
    for where, cut in jsonl_objects(path, bad, expected="a JSON object (one cut)"):
        try:
            found = cut_items(cut, root, default_language, per_supervision, source)
        except ValueError as exc:
            bad.skip(f"{where}: {exc}")
            continue
        for item in found:
            key = item.record["id"]
            if key in first_seen:
                bad.skip(f"{where}: field 'id': duplicate id '{key}' (first at {first_seen[key]})")
                continue
            first_seen[key] = where
            items.append(item)


def read_cuts(paths: list[Path], bad: BadRows, *, audio_root: Path | None = None, default_language: str | None = None,
              per_supervision: bool = False, source: str = SOURCE) -> list[Item]:
    """Items of the cuts of each manifest; bad lines are skipped (logged and counted in `bad`)."""
    items: list[Item] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        try:
            _read_manifest(path, audio_root or path.resolve().parent, bad, items, first_seen, default_language,
                           per_supervision, source)
        except (OSError, EOFError, UnicodeDecodeError) as exc:  # gzip's errors are OSError / EOFError
            raise ValueError(f"cannot read {path}: {exc}") from exc
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cuts", nargs="+", required=True, type=Path, help="cuts.jsonl.gz / cuts.jsonl manifests")
    parser.add_argument("--language", help="language of supervisions without one (e.g. en, zh-CN, English)")
    parser.add_argument("--per-supervision", action="store_true",
                        help="one sample per supervision (default: one per cut, its supervisions' texts joined)")
    parser.add_argument("--audio-root", type=Path,
                        help="relative audio paths start here (default: the manifest's folder)")
    parser.add_argument("--source", default=SOURCE, help="the records' `source`")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    bad = BadRows()
    try:
        language = language_code(args.language) if args.language else None
        items = read_cuts(args.cuts, bad, audio_root=args.audio_root, default_language=language,
                          per_supervision=args.per_supervision, source=args.source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_selected(items, args, {"source": args.source}, skipped=dict(bad.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
