"""Transcribe (asr) or translate (s2tt) audio files with a trained Speech LLM.

`--model` is a directory that training writes (`<output_dir>/final` or `<checkpoint dir>/step_N`): model.safetensors,
part_model.json and tokenizer/. Inputs are audio files (wav/flac/ogg/opus/mp3/aiff, any sample rate; decoded to
16 kHz mono) or `@list.txt` files with one path per line (blank lines and `#` comments ignored; relative paths
resolve against the current directory). Files are sorted by length and batched so padding stays small; results
come out in input order, one line per file: `path<TAB>text`, or a JSON object with --jsonl.

Exit status 2, with a message naming the file and no traceback, on a missing or undecodable file or a clip longer
than the Whisper encoder's 30 s window; with --skip-bad such files are reported on stderr and left out instead.

Batching: `SpeechLLM.encode_audio` masks the padding (features, convolutions, attention), so a clip gets the same
audio embeddings and the same text alone or batched with longer clips (tests/unit/test_infer.py checks it).
The work is done by part.inference.

examples:
    python -m part infer --model runs/tiny_part/final --language de a.flac b.ogg
    python -m part infer --model runs/tiny_part/final --task s2tt --language de --target en @clips.txt --jsonl
    python -m part infer --model runs/tiny_part/final --language en --frames clip.wav   # also the frames' reading
"""

from __future__ import annotations

import argparse
import json
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode

JSONL_FIELDS = ("audio", "task", "language", "target", "text", "duration")


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("--model", required=True, help="trained model directory (<output_dir>/final or step_N)")
    parser.add_argument("--task", choices=("asr", "s2tt"), default="asr", help="transcribe (asr) or translate (s2tt)")
    parser.add_argument("--language", required=True, help="the spoken language's code (en, de, zh, ...)")
    parser.add_argument("--target", help="language to translate into (required for s2tt)")
    parser.add_argument("--beams", type=positive_int, default=1, help="beam size (1: greedy)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="longest output in tokens (default 128)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="clips per batch (length-sorted)")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per line instead of path<TAB>text")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    parser.add_argument("--skip-bad", action="store_true",
                        help="warn about missing, undecodable or too long files and go on without them")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--frames", action="store_true",
                        help="also the adapter frames' own reading (greedy CTC through the LLM's head): a third "
                             "column, or `frames` in --jsonl; a word missing there was lost on the speech side, "
                             "not by the LLM")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_@LIST", help="audio files, or @file with one per line")
    return parser


def format_line(record: dict, jsonl: bool) -> str:
    fields = JSONL_FIELDS + (("frames",) if "frames" in record else ())
    if jsonl:
        return json.dumps({k: record[k] for k in fields}, ensure_ascii=False)
    # one line per file, whatever the model generates
    return "\t".join([record["audio"]] + [" ".join(record[k].split()) for k in ("text", "frames") if k in record])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from part.inference import InferError, check_task, load_model, probe, read_inputs, transcribe
    from part.prompts import LANGUAGE_NAMES

    args.language = args.language.strip().lower()
    args.target = args.target.strip().lower() if args.target else None
    try:
        check_task(args.task, args.language, args.target)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    for code in (args.language, args.target):
        if code and code not in LANGUAGE_NAMES:
            print(f"warning: '{code}' is not a language code the prompts name ({', '.join(LANGUAGE_NAMES)}); "
                  f"the prompt will say '{code}'", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    emitted: dict[int, dict] = {}
    next_index = 0

    def emit(i: int, record: dict) -> None:  # prints results in input order as soon as a prefix is complete
        nonlocal next_index
        emitted[i] = record
        while next_index in emitted:
            rec = emitted.pop(next_index)
            if rec.get("error") is None:
                print(format_line(rec, args.jsonl), flush=True)
            next_index += 1

    try:
        paths = read_inputs(args.inputs)
        if not paths:
            raise InferError("no input files (the list files are empty)")
        # Header checks before the model loads, so a typo fails in a second (transcribe checks again).
        if not args.skip_bad:
            for path in paths:
                probe(path, None)
        _quiet_libraries()
        model, tokenizer = load_model(args.model, device, dtype)
        results = transcribe(model, tokenizer, paths, args.task, args.language, args.target, beams=args.beams,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                             dtype=dtype, skip_bad=args.skip_bad, frames=args.frames,
                             progress=not args.quiet and len(paths) > 2 * args.batch_size, on_result=emit)
    except InferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    skipped = sum(r.get("error") is not None for r in results)
    if skipped:
        print(f"warning: skipped {skipped} of {len(results)} files", file=sys.stderr)
        if skipped == len(results):
            print("error: none of the files could be used", file=sys.stderr)
            return ExitCode.BAD_INPUT
    return 0


def _quiet_libraries() -> None:
    """No weight-loading progress bars or library deprecation notices among the results' diagnostics."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # SpeechLLM.generate passes inputs_embeds: its repetition penalties cover the generated text only, as meant.
    warnings.filterwarnings("ignore", message=r"Passing `\w+` with `inputs_embeds`")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
