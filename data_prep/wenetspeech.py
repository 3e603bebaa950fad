"""WenetSpeech (Mandarin) -> WebDataset shards, one sample per labelled segment of the long recordings.

Layout:
  <root>/WenetSpeech.json   {"audios": [{"aid", "path", "duration", "segments": [{"sid", "begin_time", "end_time",
                            "text", "confidence", "subsets": ["L", "M", "S", ...]}, ...]}, ...]}
  <root>/<path>             the long recordings, e.g. audio/train/youtube/B00000/X0000.opus (Ogg Opus)
Subsets: S, M, L, W (train), DEV, TEST_NET, TEST_MEETING. All records are language `zh`.

Each recording is opened once per batch of its segments by a worker process, which seeks to each segment and decodes
only that span (Ogg Opus seeks), so a long file is never decoded in full per segment. The workers hand 16 kHz
segments to build_shards, which encodes and writes them (its own conversion runs in the main process).
Note: WenetSpeech.json of the full release is large (GBs); it is read whole into memory.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.common import OUTPUT_HELP, Item, add_common_args, build_shards, read_span
from data_prep.manifest import Log, build_options, log_stderr, make_record, sanitize_id
from part.features import SAMPLE_RATE

SOURCE = "wenetspeech"
LANGUAGE = "zh"
SUBSETS = ("S", "M", "L", "W", "DEV", "TEST_NET", "TEST_MEETING")
SEGMENTS_PER_JOB = 64

Span = tuple[float, float]

EXAMPLES = """\
examples:
  python -m data_prep.wenetspeech --root WenetSpeech --subset M --out shards/wenet_m --workers 8
  python -m data_prep.wenetspeech --root WenetSpeech --subset DEV --min-confidence 0.95 --out shards/wenet_dev
"""


def _wav_bytes(wave: np.ndarray) -> bytes:
    if wave.size == 0:  # a span outside the file: one sample, so build_shards counts it as empty_audio
        wave = np.zeros(1, dtype=np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def cut_segments(path: str, spans: list[Span]) -> tuple[list[bytes], str | None]:
    """16 kHz float WAV bytes per span of `path` (b'' where it cannot be decoded), and the first error if any."""
    error = None
    try:
        handle = sf.SoundFile(path)
    except (RuntimeError, ValueError, OSError) as exc:  # soundfile's errors are RuntimeErrors
        return [b""] * len(spans), f"cannot decode audio {path}: {exc}"
    out = []
    with handle:
        for begin, end in spans:
            try:
                out.append(_wav_bytes(read_span(handle, begin, end)))
            except (RuntimeError, ValueError, OSError) as exc:
                out.append(b"")
                error = error or f"cannot decode {begin}-{end}s of {path}: {exc}"
    return out, error


def _text(segment: dict) -> str:
    return (segment.get("text") or "").strip()


def _jobs(audios: list[dict], root: Path, subset: str, min_confidence: float) -> Iterator[tuple[str, list[dict]]]:
    """(long file, its segments of `subset`, at most SEGMENTS_PER_JOB), in time order within a file."""
    for audio in audios:
        segments = [
            s for s in audio.get("segments", [])
            if subset in s.get("subsets", []) and float(s.get("confidence", 1.0)) >= min_confidence
        ]
        segments.sort(key=lambda s: float(s["begin_time"]))
        for i in range(0, len(segments), SEGMENTS_PER_JOB):
            yield str(root / audio["path"]), segments[i : i + SEGMENTS_PER_JOB]


def _cut_all(jobs: Iterable[tuple[str, list[Span]]], workers: int) -> Iterator[tuple[list[bytes], str | None]]:
    """cut_segments over jobs in order, with at most 2 * workers jobs in flight."""
    if workers <= 1:
        for path, spans in jobs:
            yield cut_segments(path, spans)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for path, spans in jobs:
            pending.append(pool.submit(cut_segments, path, spans))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def segment_items(
    audios: list[dict], root: Path, subset: str, *, workers: int = 1, min_confidence: float = 0.0,
    log: Log = log_stderr,
) -> Iterator[Item]:
    """Items whose audio is the cut 16 kHz segment (bytes); segments without text carry no audio."""
    jobs: deque = deque()

    def labelled() -> Iterator[tuple[str, list[Span]]]:
        for path, segments in _jobs(audios, root, subset, min_confidence):
            jobs.append((path, segments))
            labelled_spans = [(float(s["begin_time"]), float(s["end_time"])) for s in segments if _text(s)]
            yield path, labelled_spans

    for blobs, error in _cut_all(labelled(), workers):
        _, segments = jobs.popleft()
        if error:
            log(f"warning: {error}")
        blobs = iter(blobs)
        for seg in segments:
            text = _text(seg)
            rec = make_record(sanitize_id(seg["sid"]), LANGUAGE, text, SOURCE)
            yield Item(record=rec, audio_path=next(blobs) if text else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--root", type=Path, required=True, help="directory holding WenetSpeech.json and audio/")
    parser.add_argument("--json", type=Path, default=None, help="metadata file (default: <root>/WenetSpeech.json)")
    parser.add_argument("--subset", default="S", type=str.upper, choices=SUBSETS, help="which labelled subset")
    parser.add_argument("--min-confidence", type=float, default=0.0, help="skip segments labelled less surely")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the order of the recordings")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the order of WenetSpeech.json")
    args = parser.parse_args(argv)
    meta = args.json or args.root / "WenetSpeech.json"
    try:
        with open(meta, encoding="utf-8") as fh:
            audios = json.load(fh)["audios"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {meta}: {exc!r}", file=sys.stderr)
        return 2
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(audios)
    total = sum(len(seg) for _, seg in _jobs(audios, args.root, args.subset, args.min_confidence))
    options = build_options(args)
    items = segment_items(audios, args.root, args.subset, workers=options.pop("workers"),
                          min_confidence=args.min_confidence)
    # The cutting workers above do the decoding; build_shards only re-encodes, in this process.
    build_shards(items, args.out, workers=1, total=total, index_extra={"source": SOURCE, "subset": args.subset},
                 **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
