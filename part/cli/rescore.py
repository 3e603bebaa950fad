r"""Score a finished evaluation's hypotheses again, under either text normaliser or both, without the model.

Reads RUN_DIR/final_hypotheses.jsonl, or the *_hypotheses.jsonl file given (one JSON record per utterance, as the
evaluation writes them: key, task, language, target_language, reference, hypothesis), scores it as the
evaluation does (WER; CER for zh, ja, ko, yue, th; BLEU with its sacrebleu signature) and prints the table in
final.md's form: the rows under the first normaliser, the BLEU signatures, and with `both` the WER/CER under each
normaliser side by side. `both` leads with the normaliser the run was scored with (the "normalizer" of the
results file beside the hypotheses: final.json, eval_step_N.json), so the output is then the run's final.md
again. Normalisers: `part` (the project's) and `whisper` (Whisper's EnglishTextNormalizer for English,
BasicTextNormalizer otherwise, as papers score); docs/evaluation.md says what each does.

A file that is missing, a line that is not JSON, a record without those fields or a translation without its
target_language exits with 2, naming the file and the line or the record.

examples:
    python -m part rescore runs/tiny_part                          # its final_hypotheses.jsonl, both normalisers
    python -m part rescore runs/tiny_part/eval_step_200_hypotheses.jsonl --normalizer whisper
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from part.config import NORMALIZERS

    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("source", metavar="RUN_DIR_OR_HYPOTHESES_JSONL",
                        help="a run's output_dir (its final_hypotheses.jsonl is read) or a *_hypotheses.jsonl file")
    parser.add_argument("--normalizer", choices=[*NORMALIZERS, "both"], default="both",
                        help="the WER/CER text normaliser (default: both, side by side)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from part.config import NORMALIZERS
    from part.evaluation.comparison import read_hypotheses
    from part.evaluation.evaluator import score_each
    from part.evaluation.metrics import DEFAULT_NORMALIZER, evaluation_report, normalizers_from
    from part.evaluation.rescore import hypotheses_path, recorded_normalizer

    try:
        path = hypotheses_path(Path(args.source))
        records = read_hypotheses(path, strict=True)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if not records:
        print(f"error: {path}: no hypotheses", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if untargeted := next((r for r in records if r["task"] != "asr" and not r.get("target_language")), None):
        print(f"error: {path}: the {untargeted['task']} record {untargeted['key']!r} ({untargeted['language']}) has "
              "no target_language", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.normalizer == "both":
        recorded = recorded_normalizer(path)
        normalizers = normalizers_from(recorded if recorded in NORMALIZERS else DEFAULT_NORMALIZER)
    else:
        normalizers = [args.normalizer]
    print(f"{len(records)} utterances from {path}, normalisers: {', '.join(normalizers)}", file=sys.stderr)
    print(evaluation_report(score_each(records, normalizers), normalizers[0]))
    return ExitCode.OK
