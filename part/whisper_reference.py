r"""How well the Whisper checkpoint a recipe builds on reads that recipe's held-out speech by itself.

    python -m part.whisper_reference --config configs/tiny_part.yaml [--whisper DIR] [--per-language N] \
        [--tasks asr,s2tt] [--out runs/whisper_reference] [key.sub=value ...]

Whisper's own decoder (greedy, the language given) transcribes the first `eval.per_language` clips of each
language in `data.eval_shards` (the clips the trained model is evaluated on) and translates the non-English ones
into English; the rows are scored as the training run's final table is (WER, zh CER, BLEU), in final.md's form
(under each normaliser). The Whisper directory defaults to the config's `model.encoder.pretrained`. On the
embedded default this is the model the encoder and the frame targets come from: what its features carry of this
speech for a decoder trained on them (a reference for the table, not a bound: the recipe's stage 2 trains the
encoder on the speech). Writes `reference.md` (the
table) and `reference_hypotheses.jsonl` into `--out` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from part.exit_codes import ExitCode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m part.whisper_reference", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--config", required=True, help="the recipe whose eval shards and languages are read")
    parser.add_argument("--whisper", default=None, help="a transformers Whisper directory (default: the config's "
                                                        "model.encoder.pretrained)")
    parser.add_argument("--per-language", type=int, default=None, help="clips per language (default: "
                                                                         "eval.per_language)")
    parser.add_argument("--tasks", default=None, help="comma-separated, of asr and s2tt (default: eval.tasks)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/whisper_reference", help="output directory")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides, as train.py takes them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import ConfigError, load_config
    from part.evaluation.evaluator import score_each
    from part.evaluation.metrics import evaluation_report, normalizers_from
    from part.evaluation.reference import held_out_utterances, whisper_records

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    whisper = Path(args.whisper or cfg.model.encoder.pretrained or "")
    if not (whisper / "config.json").is_file() or not (whisper / "generation_config.json").is_file():
        print(f"error: {whisper}: not a transformers Whisper directory with its decoder (config.json, "
              "generation_config.json)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    tasks = args.tasks.split(",") if args.tasks else list(cfg.eval.tasks)
    unknown = sorted(set(tasks) - {"asr", "s2tt"})
    if unknown:
        print(f"error: --tasks: {', '.join(unknown)} (Whisper reads asr and s2tt into English)", file=sys.stderr)
        return ExitCode.BAD_INPUT
    per_language = args.per_language or cfg.eval.per_language
    skipped: Counter = Counter()
    utterances = held_out_utterances(cfg.data, cfg.data.languages, per_language, skipped)
    if skipped:
        print("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())), file=sys.stderr)
    if not utterances:
        print(f"error: no readable clips of {cfg.data.languages} in {cfg.data.eval_shards}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"{len(utterances)} clips ({', '.join(cfg.data.languages)}), {whisper}, tasks {','.join(tasks)}",
          file=sys.stderr)
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        print(f"batch {done}/{total}, {elapsed / 60:.1f} min, eta {elapsed / done * (total - done) / 60:.1f} min",
              file=sys.stderr)

    from transformers.utils import logging as transformers_logging

    # Whisper's generation config sets max_length (448) and we pass max_new_tokens: transformers warns at every
    # batch that the latter wins, which is what we mean
    transformers_logging.set_verbosity_error()
    records = whisper_records(whisper, utterances, tasks, batch_size=args.batch_size, progress=progress)
    table = evaluation_report(score_each(records, normalizers_from(cfg.eval.normalizer)), cfg.eval.normalizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reference_hypotheses.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    header = f"Whisper's own decoder ({whisper}) on {args.config}'s held-out speech, greedy\n\n"
    (out / "reference.md").write_text(header + table + "\n", encoding="utf-8")
    print(table)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
