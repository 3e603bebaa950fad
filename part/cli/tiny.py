"""Build the tiny default encoder, LLM and tokenizer.

    python -m part tiny --text corpus.txt --out cache/tiny [--corpus DIR --pretrain-steps N] [size flags]

Writes `<out>/whisper` and `<out>/llm` (with its tokenizer); the work is done by part.convert.tiny.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from part.cli import command_prog
from part.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), description=__doc__)
    parser.add_argument("--text", type=Path, required=True, help="text file to train the tokenizer on")
    parser.add_argument("--out", type=Path, required=True, help="output directory (gets whisper/ and llm/)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--corpus", type=Path, help="corpus directory (train/, text/) for the LLM's pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="LLM pretraining steps on text tasks")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of the pretraining")
    parser.add_argument("--pretrain-batch-tokens", type=int, default=2048, help="padded tokens per batch")
    parser.add_argument("--llm-hidden", type=int, default=192, help="the tiny LLM's width")
    parser.add_argument("--llm-layers", type=int, default=4, help="the tiny LLM's depth")
    parser.add_argument("--llm-heads", type=int, default=6, help="attention heads (2 key/value heads)")
    args = parser.parse_args(argv)
    from part.convert.tiny import build_tiny

    whisper_dir, llm_dir = build_tiny(args.text, args.out, args.vocab_size, corpus=args.corpus,
                                      pretrain_steps=args.pretrain_steps, llm_hidden=args.llm_hidden,
                                      llm_layers=args.llm_layers, llm_heads=args.llm_heads,
                                      pretrain_lr=args.pretrain_lr, pretrain_batch_tokens=args.pretrain_batch_tokens)
    print(f"tiny encoder: {whisper_dir}\ntiny LLM + tokenizer: {llm_dir}", file=sys.stderr)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
