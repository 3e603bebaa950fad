r"""How well the Whisper checkpoint a recipe builds on reads that recipe's held-out speech by itself.

Whisper's own decoder (greedy, the language given) transcribes the first `eval.per_language` clips of each
language in `data.eval_shards` (the clips the trained model is evaluated on) and translates the non-English ones
into English; the rows are scored as the training run's final table is (WER, zh CER, BLEU), in final.md's form
(under each normaliser). The Whisper directory defaults to the config's `model.encoder.pretrained`. On the
embedded default this is the model the encoder and the frame targets come from: what its features carry of this
speech for a decoder trained on them (a reference for the table, not a bound: the recipe's stage 2 trains the
encoder on the speech). Writes `reference.md` (the table) and `reference_hypotheses.jsonl` into `--out` (default
runs/whisper_reference) and prints the table.

examples:
    python -m part whisper_reference --config configs/tiny_part.yaml      # writes runs/whisper_reference/reference.md
    python -m part whisper_reference --config configs/tiny_part.yaml --whisper cache/whisper-base --per-language 20 \
        --tasks asr --out /tmp/whisper_asr
"""

from __future__ import annotations

import argparse
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("--config", required=True, help="the recipe whose eval shards and languages are read")
    parser.add_argument("--whisper", default=None, help="a transformers Whisper directory (default: the config's "
                                                        "model.encoder.pretrained)")
    parser.add_argument("--per-language", type=int, default=None, help="clips per language (default: "
                                                                         "eval.per_language)")
    parser.add_argument("--tasks", default=None, help="comma-separated, of asr and s2tt (default: those of eval.tasks)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    parser.add_argument("--out", default="runs/whisper_reference", help="output directory")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides, as train.py takes them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import ConfigError, load_config
    from part.evaluation.reference import ReferenceInputError, write_whisper_reference

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from transformers.utils import logging as transformers_logging

    # Whisper's generation config sets max_length (448) and we pass max_new_tokens: transformers warns at every
    # batch that the latter wins, which is what we mean
    transformers_logging.set_verbosity_error()
    try:
        table = write_whisper_reference(cfg, args.config, args.whisper, args.tasks.split(",") if args.tasks else None,
                                        args.per_language, args.batch_size, args.out,
                                        log=lambda message: print(message, file=sys.stderr, flush=True))
    except ReferenceInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(table)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
