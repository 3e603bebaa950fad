"""Draw one run's training loss and held-out metrics, with its stages.

Reads RUN_DIR's train_log.jsonl, eval_step_*.json and final.json (what train.py writes into output_dir) and
writes RUN_DIR/run.png (or --out): the training loss with the stage boundaries, and the held-out ASR error rate
per language and S2TT BLEU per direction at each evaluation (`eval.every`, and the final one).

examples:
    python -m part plot runs/tiny_part                      # writes runs/tiny_part/run.png (the demo's last step)
    python -m part plot runs/tiny_part --out docs/tiny_part_run.png
"""

from __future__ import annotations

import argparse
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode, exit_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("run_dir", help="a train.py output_dir (e.g. runs/tiny_part)")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/run.png)")
    args = parser.parse_args(argv)
    from part.evaluation.plots import plot_run

    try:
        path = plot_run(args.run_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"wrote {path}")
    return ExitCode.OK


if __name__ == "__main__":
    exit_process(main())
