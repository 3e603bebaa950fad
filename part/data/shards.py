"""The shard format, written and read here only: size-bounded WebDataset tars, written atomically, with an index.

A sample is `<key>.json` (the record) plus, for speech, `<key>.flac` (16 kHz mono).
Record fields: id, language, duration (s), transcript, translations {lang: text}, source.
Text-only samples (for the `mt` and `text` tasks) have no audio and duration 0.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

REQUIRED_FIELDS = ("id", "language", "duration", "transcript")
INDEX_NAME = "index.json"
# Extensions whose only decoder is pickle. A member with one of these is refused, never decoded.
PICKLE_EXTENSIONS = {"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt"}
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3")


class DataError(RuntimeError):
    """Fatal data problem (no shards, unsafe member); the message names the shard or pattern."""


# ---------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    name: str
    samples: int = 0
    bytes: int = 0
    seconds_per_language: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def validate_record(record: dict, where: str) -> None:
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(f"{where}: record is missing field '{name}'")
    if not isinstance(record.get("translations", {}), dict):
        raise ValueError(f"{where}: field 'translations' must be a mapping of language -> text")


class ShardWriter:
    """Writes `<prefix>-000000.tar`, ... into `out_dir`, starting a new shard past `max_bytes` (or `max_samples`).

    Each shard is written under a `.partial` name and renamed when complete, so a reader
    never sees half a shard and a crashed build leaves only `.partial` files behind.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_bytes: int = 256 * 1024**2, max_samples: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples  # 0: no limit
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._current: ShardInfo | None = None
        self._partial: Path | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._partial = self.out_dir / (name + ".partial")
        # PAX: no 100-byte limit on member names; plain tar, webdataset and Python read it.
        self._tar = tarfile.open(self._partial, "w", format=tarfile.PAX_FORMAT)
        self._current = ShardInfo(name=name)

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))
        self._current.bytes += len(data) + 512

    def write(self, record: dict, audio_flac: bytes | None = None) -> None:
        key = str(record["id"])
        validate_record(record, f"sample {key}")
        if "." in key or "/" in key:
            raise ValueError(f"sample id {key!r} must not contain '.' or '/' (webdataset splits keys on them)")
        if self._tar is None:
            self._open()
        self._add_member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        if audio_flac is not None:
            self._add_member(f"{key}.flac", audio_flac)
        self._current.samples += 1
        self._current.seconds_per_language[record["language"]] += float(record["duration"])
        if self._current.bytes >= self.max_bytes or (self.max_samples and self._current.samples >= self.max_samples):
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar.fileobj = None
        with open(self._partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self._partial, self.out_dir / self._current.name)
        self.shards.append(self._current)
        self._tar = self._current = self._partial = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_index(out_dir: str | Path, shards: list[ShardInfo], extra: dict | None = None) -> Path:
    """Writes `index.json`: samples and hours per language, per shard and in total."""
    out_dir = Path(out_dir)
    totals: dict[str, float] = defaultdict(float)
    entries = []
    for shard in sorted(shards, key=lambda s: s.name):
        for lang, sec in shard.seconds_per_language.items():
            totals[lang] += sec
        entries.append(
            {
                "name": shard.name,
                "samples": shard.samples,
                "bytes": shard.bytes,
                "hours_per_language": {k: round(v / 3600, 6) for k, v in sorted(shard.seconds_per_language.items())},
            }
        )
    index = {
        "shards": entries,
        "total_samples": sum(s.samples for s in shards),
        "hours_per_language": {k: round(v / 3600, 6) for k, v in sorted(totals.items())},
        **(extra or {}),
    }
    path = out_dir / INDEX_NAME
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- shard patterns and sizes


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
        for index_path in {Path(s).parent / INDEX_NAME for s in shards if "://" not in s}:
            if index_path.exists():
                index = json.loads(index_path.read_text())
                names = {Path(s).name for s in shards}
                for entry in index["shards"]:
                    if entry["name"] in names:
                        hours = entry["hours_per_language"].get(lang, 0.0)
                        size += hours if hours > 0 else entry["samples"]
        sizes[lang] = size if size > 0 else float(len(shards))
    return sizes


# ---------------------------------------------------------------- reading


def iter_tar_samples(url: str, counters: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive tar members by key. A truncated or unreadable tar ends the shard and is counted."""
    import webdataset as wds  # here, not at the top: the builders import this module to write shards only

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
