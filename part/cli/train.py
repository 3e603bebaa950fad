"""Train a Speech LLM with the PART curriculum under DeepSpeed.

The DeepSpeed launcher starts the repository's train.py on every rank, which runs this command; run directly
(`python -m part train` or `python train.py`) it trains in one process.

Reads the config (YAML, with key.sub=value overrides), checks it with every stage's data and the model's parameter
groups, then hands the run to part.train.trainer.Trainer: every stage in turn, checkpoints in checkpoint.dir
(resumable at any step with --resume), evaluation every eval.every steps and at the end. Writes into output_dir:
train_log.jsonl (one record per step), eval_step_N.md|json and final.md|json (the held-out tables),
final_hypotheses.jsonl, and final/ (the trained model with its model card). Exit status: 0 done, 2 bad config or
data (before anything starts), 3 too many non-finite losses, 4 a stage-boundary checkpoint failed, 5 non-finite
weights, 6 stopped by SIGTERM/SIGINT after a checkpoint, 7 a step or collective did not complete within
distributed.timeout_s: a rank stalled (part/exit_codes.py).

examples:
    python train.py --config configs/tiny_part.yaml --check --world-size 2        # validate; start nothing
    deepspeed --num_gpus 2 train.py --config configs/tiny_part.yaml --resume stages.0.steps=50
    deepspeed --num_gpus 8 train.py --config configs/part_large.yaml --resume
    python -m part train --config configs/tiny_part.yaml --resume --reevaluate     # evaluate a finished run again
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from part.cli import command_prog, help_text
from part.exit_codes import ExitCode, exit_process

if TYPE_CHECKING:
    from part.train.callbacks import TrainerCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # the name it was started by: `train.py` under the DeepSpeed launcher, else `python -m part train`
    started_as_script = os.path.basename(sys.argv[0]) == "train.py"
    parser = argparse.ArgumentParser(prog="train.py" if started_as_script else command_prog(__file__),
                                     **help_text(__doc__))
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.0.lr=5e-4")
    parser.add_argument("--resume", action="store_true",
                        help="continue from checkpoint.dir/latest (checked against its SHA256SUMS; a damaged one "
                             "falls back to the newest good one) if present; refused if the config changed where "
                             "a resume cannot follow. A run that is already complete (all stages trained, final/ "
                             "and its evaluation saved) only prints its saved results")
    parser.add_argument("--trust-unverified-checkpoint", action="store_true",
                        help="with --resume: use a checkpoint that has no SHA256SUMS (written by an older version, "
                             "or the file was lost) as it is; without it such a checkpoint is refused (exit 2)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="with --resume, on an already complete run: evaluate the final model again (and "
                             "export final/ with the new table) instead of only printing the saved results")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, every stage's data and trainable groups, print each stage's memory "
                             "estimate per rank and the bytes of its checkpoints, then exit (start nothing)")
    parser.add_argument("--world-size", type=int, default=1, help="with --check: the number of ranks to check for")
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="with --check: one device's memory for the per-stage estimate (default: this "
                             "machine's GPU, else 80)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.reevaluate and not args.resume:
        parser.error("--reevaluate evaluates a finished run again: use it with --resume")
    if args.trust_unverified_checkpoint and not args.resume:
        parser.error("--trust-unverified-checkpoint trusts the checkpoint a resume takes: use it with --resume")
    return args


def main(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """`callbacks` are for tests (fault injection: tests/integration/nan_loss_train.py)."""
    args = parse_args(argv)
    from part.config import ConfigError, load_config
    from part.train.preflight import preflight

    world_size = int(os.environ.get("WORLD_SIZE", args.world_size))  # set by the launcher (and the scripts)
    try:  # before any process starts or any step is spent
        cfg = load_config(args.config, args.overrides)
        model = preflight(cfg, world_size, source=args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.check:
        print(f"{args.config}: OK ({len(cfg.stages)} stages, {cfg.total_steps} steps)")
        from part.train.checkpoint_contents import checkpoint_sizes, checkpoint_table
        from part.train.memory import device_memory_bytes, memory_report

        report, _, notes = memory_report(cfg, model, world_size, device_memory_bytes(args.device_memory_gb))
        print("\n".join([report, *notes]))
        print(checkpoint_table(checkpoint_sizes(cfg, model, world_size), cfg, world_size))
        return ExitCode.OK
    from part.train.trainer import RunRefused, Trainer  # imports DeepSpeed: not for --check

    # torch.distributed's deprecation notice for each collective DeepSpeed calls (all_gather_into_tensor, ...):
    # hundreds in a run's log, nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    from part.data.shards import DataError
    from part.train.supervision import (
        PEER_FAILURE_DELAY_S,
        CollectiveTimeout,
        failure_message,
        lost_a_peer,
        stall_note,
        timed_out,
    )

    # Every failure ends here with its exit code and message; exit_process then ends the loader workers and
    # skips the interpreter's teardown, which would wait on them.
    try:
        return Trainer(cfg, resume=args.resume, callbacks=callbacks, reevaluate=args.reevaluate,
                       trust_unverified=args.trust_unverified_checkpoint).fit()
    except RunRefused as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except DataError as exc:  # a shard refused while training reads it (e.g. a member only pickle decodes)
        print(f"error: {failure_message(exc)}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except CollectiveTimeout as exc:  # a rank stopped responding: named, without this rank's traceback
        print(f"error: {exc}; --resume continues from the last checkpoint", file=sys.stderr, flush=True)
        return ExitCode.STALLED
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT) where no checkpoint could be written first; --resume continues from "
              "the last one", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    except Exception as exc:  # noqa: BLE001  the traceback, then the one-line reason
        if timed_out(exc):  # a collective outside the steps and collectives the stall watch names
            print(f"error: a collective did not complete within {cfg.distributed.timeout_s:g} s "
                  f"(distributed.timeout_s); {stall_note()}; --resume continues from the last checkpoint",
                  file=sys.stderr, flush=True)
            return ExitCode.STALLED
        if lost_a_peer(exc):  # another rank ended first: its exit code and message are the run's
            print(f"error: a collective failed, another rank ended first ({failure_message(exc)})", file=sys.stderr,
                  flush=True)
            time.sleep(PEER_FAILURE_DELAY_S)
            return ExitCode.FAILED
        traceback.print_exc()
        print(f"error: {failure_message(exc)}", file=sys.stderr, flush=True)
        return ExitCode.FAILED


if __name__ == "__main__":
    exit_process(main())
