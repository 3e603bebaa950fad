"""Exit codes of the commands (train.py, the comparison, inference), named once so scripts and tests agree."""

from __future__ import annotations

import os
import sys
from enum import IntEnum
from typing import NoReturn


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the work itself failed (e.g. the comparison found no run directory)
    BAD_INPUT = 2  # invalid configuration, data layout, arguments or input files: found before any work started
    NON_FINITE_LOSS = 3  # optim.max_bad_steps non-finite losses in a row; resume from the last checkpoint
    CHECKPOINT_FAILED = 4  # the stage-boundary checkpoint could not be written (the next stage is built from it)
    NON_FINITE_WEIGHTS = 5  # the weights became non-finite: nothing was saved; the last good checkpoint is kept
    STOPPED = 6  # SIGTERM/SIGINT: every rank wrote a checkpoint at the step boundary and stopped; --resume goes on


def exit_process(code: int) -> NoReturn:
    """Ends the process with `code` once stdout is flushed. A failure skips the interpreter's teardown
    (os._exit): DataLoader workers and gloo groups of an interrupted distributed run can hang in it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)
