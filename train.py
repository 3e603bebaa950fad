"""Train a Speech LLM with the PART curriculum under DeepSpeed.

    deepspeed --num_gpus 8 train.py --config configs/part_large.yaml [--resume [--reevaluate]] [key.sub=value ...]
    python train.py --config configs/part_large.yaml --check --world-size 8   # validate; start nothing

Reads the config, checks it with every stage's data and the model's parameter groups, then hands the run to
part.train.trainer.Trainer (stages, resume, checkpoints, evaluation, the final export).
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

from part.exit_codes import ExitCode, exit_process

if TYPE_CHECKING:
    from part.train.callbacks import TrainerCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.0.lr=5e-4")
    parser.add_argument("--resume", action="store_true",
                        help="continue from checkpoint.dir/latest (checked against its SHA256SUMS; a damaged one "
                             "falls back to the newest good one) if present; refused if the config changed where "
                             "a resume cannot follow. A run that is already complete (all stages trained, final/ "
                             "and its evaluation saved) only prints its saved results")
    parser.add_argument("--reevaluate", action="store_true",
                        help="with --resume, on an already complete run: evaluate the final model again (and "
                             "export final/ with the new table) instead of only printing the saved results")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, every stage's data and trainable groups, print each stage's memory "
                             "estimate per rank, then exit (start nothing)")
    parser.add_argument("--world-size", type=int, default=1, help="with --check: the number of ranks to check for")
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="with --check: one device's memory for the per-stage estimate (default: this "
                             "machine's GPU, else 80)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.reevaluate and not args.resume:
        parser.error("--reevaluate evaluates a finished run again: use it with --resume")
    return args


def print_memory_estimate(cfg, model, world_size: int, device_memory_gb: float | None) -> None:
    """`model`: the skeleton preflight built."""
    import torch

    from part.train.memory import GIB, memory_report

    if device_memory_gb is None:
        cuda = torch.cuda.is_available()
        device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * GIB
    else:
        device_bytes = device_memory_gb * GIB
    report, _, warnings = memory_report(cfg, model, world_size, device_bytes)
    print(report)
    for warning in warnings:
        print(warning)


def main(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """`callbacks` are for tests (fault injection: tests/integration/nan_loss_train.py)."""
    args = parse_args(argv)
    from part.config import ConfigError, load_config
    from part.train.preflight import preflight

    try:  # before any process starts or any step is spent; WORLD_SIZE is set by the launcher (and the scripts)
        cfg = load_config(args.config, args.overrides)
        model = preflight(cfg, int(os.environ.get("WORLD_SIZE", args.world_size)), source=args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.check:
        print(f"{args.config}: OK ({len(cfg.stages)} stages, {cfg.total_steps} steps)")
        print_memory_estimate(cfg, model, int(os.environ.get("WORLD_SIZE", args.world_size)), args.device_memory_gb)
        return ExitCode.OK
    from part.train.trainer import RunRefused, Trainer  # imports DeepSpeed: not for --check

    # torch.distributed's deprecation notice for each collective DeepSpeed calls (all_gather_into_tensor, ...):
    # hundreds in a run's log, nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    from part.data.shards import DataError

    # Every failure ends here with its exit code and message; exit_process then ends the loader workers and
    # skips the interpreter's teardown, which would wait on them.
    try:
        return Trainer(cfg, resume=args.resume, callbacks=callbacks, reevaluate=args.reevaluate).fit()
    except RunRefused as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except DataError as exc:  # a shard refused while training reads it (e.g. a member only pickle decodes)
        print(f"error: {failure_message(exc)}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT) where no checkpoint could be written first; --resume continues from "
              "the last one", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    except Exception as exc:  # noqa: BLE001  the traceback, then the one-line reason
        if lost_a_peer(exc):  # another rank ended first: its exit code and message are the run's
            print(f"error: a collective failed, another rank ended first ({failure_message(exc)})", file=sys.stderr,
                  flush=True)
            time.sleep(PEER_FAILURE_DELAY_S)
            return ExitCode.FAILED
        traceback.print_exc()
        print(f"error: {failure_message(exc)}", file=sys.stderr, flush=True)
        return ExitCode.FAILED


# A rank that lost a peer waits this long before exiting, so that DeepSpeed's launcher (which polls its ranks
# every second and reports the first failed one's exit code) reports the rank that failed first.
PEER_FAILURE_DELAY_S = 3.0


def lost_a_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank's process ended (gloo says so in its
    message; NCCL raises DistBackendError)."""
    import torch.distributed as dist

    text = str(exc)
    return (isinstance(exc, getattr(dist, "DistBackendError", ())) or "Connection closed by peer" in text
            or "Connection reset by peer" in text)


def failure_message(exc: BaseException) -> str:
    """`exc`'s message; for one a DataLoader worker raised (re-raised in the rank with the worker's traceback as
    its text), the worker's own message and which worker it was."""
    text = str(exc)
    lines = text.rstrip().splitlines()
    if text.startswith("Caught ") and "Original Traceback" in text and len(lines) > 1:
        where = lines[0].removeprefix("Caught ").rstrip(".")  # "DataError in DataLoader worker process 0"
        _, _, message = lines[-1].partition(": ")
        return f"{message or lines[-1]} ({where})"
    from part.data.shards import DataError

    return text if isinstance(exc, DataError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    exit_process(main())
