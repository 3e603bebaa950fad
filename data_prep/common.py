"""What every builder shares: parallel conversion with progress, per-language shards, a summary."""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from part.data.audio import AudioDecodeError, encode_flac, load_audio, resample
from part.data.shards import ShardWriter, write_index
from part.features import SAMPLE_RATE

RESAMPLE_PAD = 0.05  # s of context read on each side of a span of a non-16 kHz file, so filter edges fall outside


@dataclass
class Item:
    """One sample to convert: where its audio is (path, or bytes, or a segment of a file) and its record."""

    record: dict
    audio_path: str | bytes | None = None  # a path, or the encoded file's bytes
    start: float | None = None  # seconds, for segments of long recordings
    end: float | None = None
    channel: int | None = None  # one channel of a multi-channel file (0-based); None: the mix of all channels
    tts_args: list[str] | None = None  # espeak-ng arguments: the audio is synthesised from the transcript


@dataclass
class BuildSummary:
    written: Counter = field(default_factory=Counter)
    seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    skipped: Counter = field(default_factory=Counter)

    def table(self) -> str:
        lines = ["language  samples     hours"]
        for lang in sorted(self.written):
            lines.append(f"{lang:<9} {self.written[lang]:>7} {self.seconds[lang] / 3600:>9.3f}")
        lines.append(f"{'total':<9} {sum(self.written.values()):>7} {sum(self.seconds.values()) / 3600:>9.3f}")
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)


def read_span(handle: sf.SoundFile, begin: float, end: float | None, channel: int | None = None) -> np.ndarray:
    """Mono float32 at 16 kHz of [begin, end) seconds (end None: the end of the file) of an open file: the mix of
    its channels, or only `channel`. Seeks to the span, so a long file is not decoded in full."""
    sr = handle.samplerate
    if channel is not None and not 0 <= channel < handle.channels:
        raise ValueError(f"channel {channel} of a {handle.channels}-channel file")
    pad = round(RESAMPLE_PAD * sr) if sr != SAMPLE_RATE else 0
    first = round(begin * sr)
    last = handle.frames if end is None else min(round(end * sr), handle.frames)
    lo, hi = max(0, first - pad), min(handle.frames, last + pad)
    if last <= first:
        return np.zeros(0, dtype=np.float32)
    handle.seek(lo)
    frames = handle.read(hi - lo, dtype="float32", always_2d=True)
    wave = frames.mean(axis=1) if channel is None else frames[:, channel]
    wave = resample(wave, sr, SAMPLE_RATE)
    lead = round((first - lo) * SAMPLE_RATE / sr)
    return wave[lead : lead + round((last - first) * SAMPLE_RATE / sr)]


def load_item_audio(item: Item) -> np.ndarray:
    """The item's 16 kHz mono waveform: the whole clip, or its span / channel of a file. Raises AudioDecodeError."""
    if not isinstance(item.audio_path, str) or (item.start is None and item.end is None and item.channel is None):
        return load_audio(item.audio_path)
    try:
        with sf.SoundFile(item.audio_path) as handle:
            return read_span(handle, item.start or 0.0, item.end, item.channel)
    except (RuntimeError, ValueError, OSError) as exc:  # soundfile's errors are RuntimeErrors
        raise AudioDecodeError(f"cannot decode audio {item.audio_path}: {exc}") from exc


def convert_item(item: Item, max_duration: float) -> tuple[dict, bytes | None, str | None]:
    """Decode, cut and re-encode one item. Returns (record, flac, skip_reason)."""
    record = dict(item.record)
    if not str(record.get("transcript", "")).strip():
        return record, None, "empty_transcript"
    if item.tts_args is not None:
        return _synthesise(item, record, max_duration)
    if item.audio_path is None:  # text-only sample
        record["duration"] = 0.0
        return record, None, None
    try:
        wave = load_item_audio(item)
    except AudioDecodeError:
        return record, None, "unreadable_audio"
    if isinstance(item.audio_path, bytes) and (item.start is not None or item.end is not None):
        first = int((item.start or 0.0) * SAMPLE_RATE)
        wave = wave[first : int(item.end * SAMPLE_RATE) if item.end is not None else None]
    duration = len(wave) / SAMPLE_RATE
    if duration <= 0.05:
        return record, None, "empty_audio"
    if duration > max_duration:
        return record, None, "too_long"
    record["duration"] = round(duration, 3)
    return record, encode_flac(wave), None


def _synthesise(item: Item, record: dict, max_duration: float) -> tuple[dict, bytes | None, str | None]:
    proc = subprocess.run(
        ["espeak-ng", *item.tts_args, "--stdout", record["transcript"]], capture_output=True, timeout=120
    )
    if proc.returncode != 0 or not proc.stdout:
        return record, None, "tts_failed"
    try:
        wave = load_audio(proc.stdout, name=f"espeak-ng output for {record['id']}")
    except AudioDecodeError:
        return record, None, "tts_failed"
    duration = len(wave) / SAMPLE_RATE
    if duration > max_duration:
        return record, None, "too_long"
    record["duration"] = round(duration, 3)
    return record, encode_flac(wave), None


def _convert_star(args: tuple[Item, float]) -> tuple[dict, bytes | None, str | None]:
    return convert_item(*args)


def build_shards(
    items: Iterable[Item],
    out_dir: str | Path,
    *,
    workers: int = 1,
    max_bytes: int = 256 * 1024**2,
    max_samples: int = 0,
    max_duration: float = 30.0,
    total: int | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    index_extra: dict | None = None,
    skipped: dict[str, int] | None = None,
) -> BuildSummary:
    """Converts items in parallel and writes `<out_dir>/<language>-NNNNNN.tar` plus `index.json`. `skipped`: rows
    the caller already left out, by reason (bad metadata), counted in the summary and the index with the rest."""
    out_dir = Path(out_dir)
    writers: dict[str, ShardWriter] = {}
    summary = BuildSummary()
    summary.skipped.update(skipped or {})
    started = last = time.time()
    done = 0

    def consume(result: tuple[dict, bytes | None, str | None]) -> None:
        nonlocal done, last
        record, flac, reason = result
        done += 1
        if reason is not None:
            summary.skipped[reason] += 1
        else:
            lang = record["language"]
            if lang not in writers:
                writers[lang] = ShardWriter(out_dir, lang, max_bytes=max_bytes, max_samples=max_samples)
            writers[lang].write(record, flac)
            summary.written[lang] += 1
            summary.seconds[lang] += record["duration"]
        if time.time() - last > 5:
            last = time.time()
            rate = done / (last - started)
            eta = f", eta {((total or done) - done) / rate:.0f}s" if total else ""
            log(f"[{out_dir.name}] {done}{'/' + str(total) if total else ''} samples, {rate:.1f}/s{eta}")

    work = ((item, max_duration) for item in items)
    if workers <= 1:
        for args in work:
            consume(_convert_star(args))
    else:
        # Bounded submission: a generator of millions of items is streamed, not materialised.
        with ProcessPoolExecutor(workers) as pool:
            while chunk := list(itertools.islice(work, 256 * workers)):
                for result in pool.map(_convert_star, chunk, chunksize=8):
                    consume(result)
    shards = [s for w in writers.values() for s in w.close()]
    if not shards:  # every item skipped: the summary says why; an index of nothing is not written
        log(f"[{out_dir.name}] no sample survived\n{summary.table()}")
        return summary
    extra = {**(index_extra or {}), "skipped": dict(summary.skipped)}
    write_index(out_dir, shards, extra)
    log(f"[{out_dir.name}] wrote {len(shards)} shards in {time.time() - started:.1f}s\n{summary.table()}")
    return summary


# What every shard builder writes, for its --help (the builders' epilogs start with it).
OUTPUT_HELP = """\
output: --out gets per-language WebDataset shards, <language>-NNNNNN.tar (each sample an <id>.flac, 16 kHz mono,
and an <id>.json record: id, language, duration, transcript, translations, source), and index.json (samples and
hours per language and shard, and the skipped rows counted by reason). Exit status 0 when shards were written, 2
when the input cannot be read or no sample survives (nothing is written then). docs/data.md describes the format.

"""


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for shards and index.json")
    parser.add_argument("--workers", type=int, default=2, help="parallel conversion processes")
    parser.add_argument("--shard-mb", type=float, default=256, help="target shard size in MB")
    parser.add_argument("--shard-samples", type=int, default=0,
                        help="also start a new shard after this many samples (0: size only); small corpora need "
                        "at least ranks x loader workers shards per language")
    parser.add_argument("--max-duration", type=float, default=30.0, help="skip clips longer than this (s)")
