"""Generic manifest builder: a TSV or JSONL list of clips -> per-language WebDataset shards.

TSV: a header row naming at least `audio`, `text` and `language`; optional `id`, `start`, `end` (seconds, to cut a
segment out of a longer file), `source` and `translation_<lang>` columns. Files are read with Python's csv module
(tab-delimited; fields holding tabs, quotes or newlines are double-quoted, as csv.writer and pandas write them).
JSONL: one object per line with the same keys; `translations` may also be given as a {lang: text} object.

`audio` is a path relative to the manifest's directory, or absolute. `language` is an ISO 639-1 code; regional tags
are reduced to it (en-US -> en). Without `id`, the id is made from the audio path (and the segment times).

This module also holds the small record helpers the corpus builders share (ids, language codes, TSV reading).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from data_prep.common import OUTPUT_HELP, Item, add_common_args, build_shards
from part.prompts import LANGUAGE_NAMES

MAX_ID_BYTES = 80  # tar (USTAR) member names are at most 100 bytes: `<id>.flac` must fit
_UNSAFE_ID_CHARS = re.compile(r"[^\w\-]+")

# Tags whose ISO 639-1 code is not simply their first subtag. Codes without an ISO 639-1 form (yue, ast, ceb, ...)
# stay as they are.
LANGUAGE_ALIASES = {
    "cmn": "zh",  # Mandarin (FLEURS cmn_hans_cn)
    "zh-hk": "yue",  # Common Voice zh-HK is Cantonese speech
    "yue": "yue",
    "fil": "tl",  # Filipino (FLEURS fil_ph), Whisper's `tl`
}

Log = Callable[[str], None]

EXAMPLES = """\
examples:
  python -m data_prep.manifest --manifest train.tsv --out shards/mine --workers 8
  python -m data_prep.manifest --manifest de.jsonl en.jsonl --out shards/mine --max-duration 30 --limit 1000
"""


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_selected(items: list[Item], args: argparse.Namespace, index_extra: dict,
                   missing_note: str | None = None, skipped: dict[str, int] | None = None,
                   load: Callable[[Item], Item] | None = None) -> None:
    """The end every builder shares: --seed/--no-shuffle/--limit selection, a warning (and `missing_note`) for
    missing audio, then the shards. `skipped`: rows already left out, by reason (see BadRows); `load`: fills in an
    item's audio just before it is converted, so a selection of millions of rows does not hold their audio."""
    items = select(items, seed=None if args.no_shuffle else args.seed, limit=args.limit)
    if warn_missing_audio(items) and missing_note:
        log_stderr(missing_note)
    work = items if load is None else map(load, items)
    summary = build_shards(work, args.out, total=len(items), index_extra=index_extra, skipped=skipped,
                           **build_options(args))
    if not summary.written:  # the summary table above says why; no traceback, no empty index
        rows = len(items) + sum((skipped or {}).values())
        log_stderr(f"error: no sample of {rows} survived; nothing was written to {args.out}")
        raise SystemExit(2)


class BadRows:
    """Rows (or parts of rows) a builder leaves out for bad metadata, so one bad line does not stop a corpus.

    Each is logged as `skipped <file:line>: <what is wrong, naming the field>` (the first `shown`, then only counted)
    and counted by reason; the counts go to write_selected, which adds them to the build summary and index.json.
    """

    def __init__(self, log: Log | None = None, shown: int = 20):
        self.log = log or log_stderr
        self.shown = shown
        self.counts: Counter = Counter()

    def skip(self, message: str, reason: str = "bad_row") -> None:
        total = sum(self.counts.values())
        if total < self.shown:
            self.log(f"skipped {message}")
        elif total == self.shown:
            self.log("(more skipped rows are only counted; the summary at the end has the totals)")
        self.counts[reason] += 1


def folders_with(root: Path, filename: str) -> list[str]:
    """Names of the folders of `root` that hold `filename` (the locales of a Common Voice or FLEURS release)."""
    return sorted(p.name for p in root.iterdir() if (p / filename).is_file())


def sanitize_id(raw: str) -> str:
    """A webdataset-safe sample key: runs of anything but letters, digits, '_' and '-' become '_' (no '.' or '/').

    Keys longer than MAX_ID_BYTES are shortened and made unique again with a hash of the original.
    """
    key = _UNSAFE_ID_CHARS.sub("_", str(raw)).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample id from {raw!r}")
    if len(key.encode("utf-8")) > MAX_ID_BYTES:
        digest = hashlib.sha1(str(raw).encode("utf-8")).hexdigest()[:12]
        head = key.encode("utf-8")[: MAX_ID_BYTES - 13].decode("utf-8", errors="ignore")
        key = f"{head}_{digest}"
    return key


def iso639_1(tag: str) -> str:
    """Language code for records: 'zh-CN' -> 'zh', 'sv-SE' -> 'sv', 'en_us' -> 'en', 'cmn_hans_cn' -> 'zh'."""
    norm = tag.strip().replace("_", "-").lower()
    if not norm:
        raise ValueError("empty language code")
    if norm in LANGUAGE_ALIASES:
        return LANGUAGE_ALIASES[norm]
    primary = norm.split("-")[0]
    if not re.fullmatch(r"[a-z]{2,3}", primary):  # 'English' would name shards english-000000.tar
        raise ValueError(f"language {tag!r} is not an ISO 639 code (e.g. 'en', 'zh-CN', 'cmn_hans_cn')")
    return LANGUAGE_ALIASES.get(primary, primary)


def language_code(value: object) -> str:
    """iso639_1 of a tag, or the code of an English language name ('English' -> 'en', 'german' -> 'de'), as
    corpora that name languages (Lhotse recipes, FLEURS on the Hugging Face hub) write them."""
    text = str(value).strip()
    by_name = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
    if text.lower() in by_name:
        return by_name[text.lower()]
    return iso639_1(text)


def id_from_audio(audio: Path, start: float | None = None, end: float | None = None) -> str:
    """A sample id made from an audio path: the relative path without its suffix, or an absolute path's file name,
    with the segment times in ms when the sample is a span of the file (sanitize_id makes it a tar key)."""
    raw = str(audio.with_suffix("")) if not audio.is_absolute() else audio.stem
    if start is not None or end is not None:
        raw += f"_{round((start or 0.0) * 1000)}-{'end' if end is None else round(end * 1000)}"
    return raw


def read_tsv(path: Path, required: Iterable[str | tuple[str, ...]] = (), **csv_options) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for each row of a TSV with a header row; `required` columns may be tuples of alternatives.

    Raises ValueError naming the file (and line) for a missing required column or a row with the wrong column count.
    """
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", **csv_options)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise ValueError(f"{path}:1: empty file, expected a header row")
        for names in required:
            names = (names,) if isinstance(names, str) else names
            if not any(name in header for name in names):
                raise ValueError(f"{path}:1: header has no column {' or '.join(map(repr, names))} (header: {header})")
        for values in reader:
            where = f"{path}:{reader.line_num}"
            if not values or values == [""]:
                continue
            if len(values) != len(header):
                raise ValueError(f"{where}: expected {len(header)} tab-separated columns, found {len(values)}")
            yield where, dict(zip(header, values))


def select(items: list[Item], *, seed: int | None, limit: int = 0) -> list[Item]:
    """Shuffles with `seed` (None: keep the order), then keeps at most `limit` items per language (0: all)."""
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    if limit > 0:
        count: Counter = Counter()
        kept = []
        for item in items:
            lang = item.record["language"]
            if count[lang] < limit:
                count[lang] += 1
                kept.append(item)
        items = kept
    return items


def warn_missing_audio(items: list[Item], log: Log = log_stderr) -> int:
    """Logs how many items' audio files do not exist (they are counted as `unreadable_audio`); returns that count."""
    missing = [it.audio_path for it in items if isinstance(it.audio_path, str) and not os.path.exists(it.audio_path)]
    if missing:
        log(f"warning: {len(missing)} of {len(items)} audio files do not exist, e.g. {missing[0]}; "
            "they are skipped as unreadable_audio")
    return len(missing)


def drop_duplicate_ids(items: list[Item], log: Log = log_stderr) -> list[Item]:
    """Keeps the first item of each id (a tar shard cannot hold two samples with one key); logs what was dropped."""
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.record["id"] not in seen:
            seen.add(item.record["id"])
            kept.append(item)
    if len(kept) < len(items):
        log(f"warning: dropped {len(items) - len(kept)} rows whose id was already used")
    return kept


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the order of samples in the shards")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the corpus order")
    parser.add_argument("--limit", type=int, default=0, help="at most this many samples per language (0: all)")


def build_options(args: argparse.Namespace) -> dict:
    """build_shards keyword arguments from add_common_args' options."""
    options = {"workers": args.workers, "max_bytes": int(args.shard_mb * 1024**2), "max_duration": args.max_duration}
    if getattr(args, "shard_samples", 0):
        options["max_samples"] = args.shard_samples
    return options


def make_record(
    id_: str, language: str, transcript: str, source: str, translations: dict[str, str] | None = None
) -> dict:
    """A shard record; `duration` is filled in by build_shards."""
    return {
        "id": id_,
        "language": language,
        "duration": 0.0,
        "transcript": transcript.strip(),
        "translations": {k: v.strip() for k, v in (translations or {}).items() if v and v.strip()},
        "source": source,
    }


# ---------------------------------------------------------------------------------------------------------- manifest

def _seconds(value: object, name: str, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field '{name}' must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{where}: field '{name}' must not be negative, got {value!r}")
    return seconds


def manifest_item(row: dict, where: str, base_dir: Path, default_source: str) -> Item:
    """One manifest row (TSV columns or a JSON object) -> Item. Raises ValueError naming `where` and the field."""
    for name in ("audio", "text", "language"):
        value = row.get(name)
        if value is None or (name != "text" and not str(value).strip()):
            raise ValueError(f"{where}: missing field '{name}'")
    if not isinstance(row["text"], str):
        raise TypeError(f"{where}: field 'text' must be a string")
    translations = row.get("translations") or {}
    if not isinstance(translations, dict) or not all(isinstance(v, str) for v in translations.values()):
        raise TypeError(f"{where}: field 'translations' must be an object of language -> text")
    try:
        language = iso639_1(str(row["language"]))
        translations = {iso639_1(k): v for k, v in translations.items()}
        for key, value in row.items():
            if key.startswith("translation_") and isinstance(value, str) and value.strip():
                translations[iso639_1(key[len("translation_"):])] = value
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

    audio = Path(str(row["audio"]).strip())
    audio_path = audio if audio.is_absolute() else base_dir / audio
    start, end = _seconds(row.get("start"), "start", where), _seconds(row.get("end"), "end", where)
    if end is not None and start is None:
        start = 0.0
    if end is not None and end <= start:
        raise ValueError(f"{where}: 'end' ({end}) must be after 'start' ({start})")

    raw_id = row.get("id")
    if raw_id is None or not str(raw_id).strip():
        raw_id = id_from_audio(audio, start, end)
    source = str(row.get("source") or default_source)
    rec = make_record(sanitize_id(str(raw_id)), language, row["text"], source, translations)
    return Item(record=rec, audio_path=str(audio_path), start=start, end=end)


def jsonl_objects(path: Path, bad: BadRows, expected: str = "a JSON object") -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each JSON object line of `path` (gzip when it ends in .gz); blank lines are passed
    over, and a line that is not JSON or not an object is skipped through `bad`, naming its line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.skip(f"{where}: invalid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                bad.skip(f"{where}: expected {expected}")
                continue
            yield where, obj


class RefusedRows(BadRows):
    """Where a bad row stops the build (a manifest the user wrote: fixed at once rather than half-built): a
    ValueError with the message."""

    def skip(self, message: str, reason: str = "bad_row") -> None:
        raise ValueError(message)


def manifest_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for each row of a .tsv or .jsonl manifest; a line that is not a JSON object is a
    ValueError naming it."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        yield from jsonl_objects(path, RefusedRows())
    else:
        yield from read_tsv(path, required=("audio", "text", "language"))


def read_manifests(paths: Iterable[str | Path], default_source: str = "manifest") -> list[Item]:
    """Items of .tsv / .jsonl manifests; ValueError names the file, line and field of the first problem."""
    items: list[Item] = []
    first_seen: dict[str, str] = {}
    for path in map(Path, paths):
        base_dir = path.resolve().parent
        for where, row in manifest_rows(path):
            item = manifest_item(row, where, base_dir, default_source)
            key = item.record["id"]
            if key in first_seen:
                raise ValueError(f"{where}: duplicate id '{key}' (first at {first_seen[key]})")
            first_seen[key] = where
            items.append(item)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--manifest", nargs="+", required=True, help="one or more .tsv / .jsonl manifests")
    parser.add_argument("--source", default="manifest", help="record `source` where a row has none")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    try:
        items = read_manifests(args.manifest, args.source)
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_selected(items, args, {"source": args.source})
    return 0


if __name__ == "__main__":
    sys.exit(main())
