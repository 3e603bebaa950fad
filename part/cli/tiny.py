r"""Build the tiny test models: a random Whisper-shaped encoder, a small LLM and its tokenizer.

Trains a sentencepiece BPE tokenizer (with byte fallback) on --text, builds a tiny Whisper-shaped encoder with
random weights and a small Qwen2-style LLM, and optionally pretrains the LLM on the text tasks of a shard corpus
(--corpus, --pretrain-steps). Writes `<out>/whisper` (the encoder) and `<out>/llm` (the LLM with its tokenizer),
which a config names as model.encoder.pretrained and model.llm.pretrained. The tests build theirs this way; the
work is done by part.convert.tiny.

examples:
    python -m part tiny --text cache/corpus/tokenizer_text.txt --out cache/tiny
    python -m part tiny --text cache/corpus/tokenizer_text.txt --out cache/tiny \
        --corpus cache/corpus --pretrain-steps 1500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("--text", type=Path, required=True, help="text file to train the tokenizer on")
    parser.add_argument("--out", type=Path, required=True, help="output directory (gets whisper/ and llm/)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="the tokenizer's vocabulary size (default 4000)")
    parser.add_argument("--corpus", type=Path, help="corpus directory (train/, text/) for the LLM's pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="LLM pretraining steps on text tasks")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of the pretraining")
    parser.add_argument("--pretrain-batch-tokens", type=int, default=2048, help="padded tokens per batch")
    parser.add_argument("--llm-hidden", type=int, default=192, help="the tiny LLM's width")
    parser.add_argument("--llm-layers", type=int, default=4, help="the tiny LLM's depth")
    parser.add_argument("--llm-heads", type=int, default=6, help="attention heads (2 key/value heads)")
    parser.add_argument("--llm-family", choices=("qwen2", "gemma3"), default="qwen2",
                        help="the tiny LLM's architecture: Qwen2.5's or Gemma 3's (scaled embeddings)")
    args = parser.parse_args(argv)
    from part.convert.tiny import build_tiny

    whisper_dir, llm_dir = build_tiny(args.text, args.out, args.vocab_size, corpus=args.corpus,
                                      pretrain_steps=args.pretrain_steps, llm_hidden=args.llm_hidden,
                                      llm_layers=args.llm_layers, llm_heads=args.llm_heads,
                                      pretrain_lr=args.pretrain_lr, pretrain_batch_tokens=args.pretrain_batch_tokens,
                                      llm_family=args.llm_family)
    print(f"tiny encoder: {whisper_dir}\ntiny LLM + tokenizer: {llm_dir}", file=sys.stderr)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
