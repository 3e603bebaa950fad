"""Write the frame vocabulary a config names: the tokens of its training transcripts.

The adapter's frames are classified over that set (`model.alignment.vocabulary`; see
part/objectives/frame_vocabulary.py).

Reads `data.train_shards` for `data.languages` (every transcript, tokenised by the LLM's tokenizer as the training
stream tokenises it) and writes the sorted token ids with where they came from, as JSON, to --out (default: the
file `model.alignment.vocabulary` names). With `model.alignment.vocabulary_min_count` N, only the tokens seen at
least N times and the characters that spell the rarer ones are kept. Build it again when the corpus, its
languages or the tokenizer change: a transcript token its tokens cannot spell stops training with an error
naming it.

examples:
    python -m part frame_vocabulary --config configs/tiny_part.yaml      # writes model.alignment.vocabulary's file
    python -m part frame_vocabulary --config configs/tiny_part.yaml --out /tmp/vocabulary.json data.languages=[en,de]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("--config", required=True, help="the training config (YAML)")
    parser.add_argument("--out", help="where to write it (default: the config's model.alignment.vocabulary)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (as train.py takes them)")
    args = parser.parse_args(argv)
    from part.config import ConfigError, load_config
    from part.data.vocabulary import transcript_token_counts
    from part.model.tokenizer import load_tokenizer
    from part.objectives.frame_vocabulary import choose_frame_vocabulary, write_frame_vocabulary

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    out = args.out or (cfg.model.alignment.vocabulary if cfg.model.alignment else None)
    if not out:
        print(f"error: {args.config}: model.alignment.vocabulary is not set (or give --out)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    tokenizer_dir = cfg.model.llm.tokenizer or cfg.model.llm.pretrained
    tokenizer = load_tokenizer(tokenizer_dir)
    counters: Counter = Counter()
    counts = transcript_token_counts(
        cfg.data.train_shards, cfg.data.languages,
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], counters)
    if not counts:
        print(f"error: {cfg.data.train_shards}: no transcripts for {cfg.data.languages} "
              f"({dict(counters) or 'no shards'})", file=sys.stderr)
        return ExitCode.BAD_INPUT
    min_count = cfg.model.alignment.vocabulary_min_count if cfg.model.alignment else 1
    ids, spelling = choose_frame_vocabulary(counts, tokenizer, min_count)
    write_frame_vocabulary(out, ids, about={
        "train_shards": cfg.data.train_shards, "languages": cfg.data.languages, "tokenizer": tokenizer_dir,
        "transcripts": counters["clips"], "tokens": sum(counts.values()), "distinct_tokens": len(counts),
        **spelling})
    skipped = {k: v for k, v in counters.items() if k != "clips"}
    spelled = (f"; {spelling['spelled_tokens']} tokens seen fewer than {spelling['min_count']} times spelled with "
               f"the others ({spelling['pieces_per_token']} pieces per transcript token)"
               if spelling["spelled_tokens"] else "")
    print(f"wrote {out}: {len(ids)} tokens of {len(tokenizer)} for {len(counts)} distinct transcript tokens from "
          f"{counters['clips']} transcripts{spelled}" + (f" (skipped: {skipped})" if skipped else ""))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
