"""Where a trained model's held-out ASR errors come from: the speech side, or the LLM.

Reads a finished run: `<run>/final` (the model, and its resolved config `train_config.yaml`) and the final
evaluation's ASR hypotheses (`<run>/final_hypotheses.jsonl`). On the same held-out clips it scores the adapter
frames' own reading (`FrameAlignment.greedy_reading`: each frame's likeliest token through the LLM's head, repeats
merged, blanks dropped, as greedy CTC) beside the LLM's hypotheses, per language, with the final table's metric
(WER; CER for zh, ja, ko, yue, th). Frames that read about as well as the hypotheses: the speech side (encoder,
adapter) limits. Frames that read much better: the LLM loses what the speech side found. With --draft-margin M, a
third column: the frames' reading checked by the LLM in one teacher-forced pass (each token kept where the LLM
gives it a log-probability within M of its likeliest token's, else replaced by that token). The table and each
language's first clips (reference, frames, hypothesis) are written to --out (default <run>/frame_readout.md); the
table is printed. The work is done by part.evaluation.readout.

examples:
    python -m part frame_readout runs/tiny_part          # prints and writes runs/tiny_part/frame_readout.md
    python -m part frame_readout runs/tiny_part --blank-penalty 1 --out /tmp/readout_b1.md
    python -m part frame_readout runs/tiny_part --draft-margin 2 --out /tmp/readout_checked.md
"""

from __future__ import annotations

import argparse
import sys

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    from part.config import ConfigError
    from part.evaluation.readout import OUT_NAME, write_frame_readout

    parser = argparse.ArgumentParser(prog=command_prog(__file__), **help_text(__doc__))
    parser.add_argument("run", help="a finished run's output_dir (holds final/ and final_hypotheses.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    parser.add_argument("--blank-penalty", type=float, default=0.0,
                        help="subtracted from the blank's logit before the greedy reading (default 0)")
    parser.add_argument("--draft-margin", type=float, default=None,
                        help="also score the frames' reading checked by the LLM at this log-probability margin")
    parser.add_argument("--out", help=f"the markdown report (default: <run>/{OUT_NAME})")
    args = parser.parse_args(argv)

    try:
        table, out = write_frame_readout(args.run, args.batch_size, args.blank_penalty, args.out, args.draft_margin)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"error: {args.run}: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(table)
    print(f"wrote {out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
