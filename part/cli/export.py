"""Export a trained Speech LLM to a self-contained Hugging Face directory (transformers with trust_remote_code).

RUN_OR_CHECKPOINT is a run's output directory (its final/ is exported), a model directory training wrote
(<output_dir>/final, <checkpoint dir>/step_N), or a checkpoint directory (the step its `latest` names). OUT gets
config.json and generation_config.json, model.safetensors (LoRA merged into the LLM's weights), the processor
(feature extractor, tokenizer with its chat template, prompts) and the modelling code (configuration_part.py,
modeling_part.py, processing_part.py), which imports only torch and transformers. Load it with

    model = AutoModel.from_pretrained(OUT, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(OUT, trust_remote_code=True)
    inputs = processor(audio=wave_16khz, sampling_rate=16000, task="asr", language="de")
    text = processor.batch_decode(model.generate(**inputs))

Greedy decoding gives the token ids `python -m part infer` gives on the same clips (docs/export.md).
Exit status 2, with a message naming the path, when the source is not a trained model or OUT is not empty.
The work is done by part.hf_export.exporter.

examples:
    python -m part export runs/tiny_part runs/tiny_part_hf                  # a run's output directory: its final/
    python -m part export runs/x/ckpt/step_0000300 hf_step300 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def build_parser() -> argparse.ArgumentParser:
    from part.cli.infer import positive_int
    from part.hf_export.exporter import DTYPES

    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run's output directory, its final/, a checkpoint directory or one of its step_N")
    parser.add_argument("out", metavar="OUT", help="the directory to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="the floating-point weights' type in model.safetensors (default: float32, as trained)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generation_config.json's default length (default: `python -m part infer`'s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from part.cli.infer import build_parser as infer_parser
    from part.hf_export.exporter import ExportError, export, main_report

    max_new_tokens = args.max_new_tokens or infer_parser().get_default("max_new_tokens")
    try:
        export(args.source, args.out, dtype=args.dtype, max_new_tokens=max_new_tokens, overwrite=args.overwrite,
               report=main_report)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return 0
