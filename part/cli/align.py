"""Token timings of a known transcript in a clip, from a Whisper model's alignment heads.

Reads a transformers Whisper directory with alignment heads and one clip (up to Whisper's 30 s window) with its
transcript. The decoder is teacher-forced on the transcript, its alignment heads' cross-attention is aligned to
the audio by DTW, and one line per token of Whisper's tokenizer is printed to stdout: start and end in seconds,
then the token's text (JSON lines with --json). Exit status 2, naming the file, on an unreadable clip, a
directory without alignment heads, an unknown language or a clip over 30 s. The work is done by
part.objectives.whisper_align.

examples:
    python -m part align cache/whisper-base clip.wav --language en --text "In an interview, he said ..."
    python -m part align cache/whisper-base clip.flac --language de --text "..." --json
"""

from __future__ import annotations

import argparse
import json
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("whisper", help="a transformers Whisper directory (e.g. cache/whisper-base, which the demo "
                                        "converts from the pinned wheels)")
    parser.add_argument("audio", help="the clip (wav/flac/ogg/opus/mp3/aiff, any sample rate)")
    parser.add_argument("--text", required=True, help="the clip's transcript")
    parser.add_argument("--language", required=True, help="the transcript's language code (en, de, zh, ...)")
    parser.add_argument("--json", action="store_true", help="JSON lines: token_id, text, start, end")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return ExitCode.BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.data.audio import AudioDecodeError, load_audio
    from part.objectives.whisper_align import WhisperAligner

    try:
        audio = load_audio(args.audio)
    except AudioDecodeError as exc:
        return _fail(str(exc))
    try:
        aligner = WhisperAligner(args.whisper)
    except (ValueError, OSError) as exc:
        return _fail(f"{args.whisper}: {exc}")
    try:
        timings = aligner.align(audio, args.text, args.language)
    except ValueError as exc:
        return _fail(f"{args.audio}: {exc}")
    for t in timings:
        if args.json:
            print(json.dumps({"token_id": t.token_id, "text": t.text, "start": round(t.start, 2),
                              "end": round(t.end, 2)}, ensure_ascii=False))
        else:
            print(f"{t.start:6.2f} {t.end:6.2f}  {t.text!r}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
