"""Exit codes of the commands (train.py, the comparison, inference), named once so scripts and tests agree."""

from __future__ import annotations

import os
import signal
import sys
from enum import IntEnum
from typing import NoReturn


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the work itself failed (e.g. the comparison found no run directory)
    BAD_INPUT = 2  # invalid configuration, data layout, arguments or input files: found before any work started
    # (and a shard refused while training reads it, e.g. a member with a pickle extension)
    NON_FINITE_LOSS = 3  # optim.max_bad_steps non-finite losses in a row; resume from the last checkpoint
    CHECKPOINT_FAILED = 4  # the stage-boundary checkpoint could not be written (the next stage is built from it)
    NON_FINITE_WEIGHTS = 5  # the weights became non-finite: nothing was saved; the last good checkpoint is kept
    STOPPED = 6  # SIGTERM/SIGINT: every rank wrote a checkpoint at the step boundary and stopped; --resume goes on
    # (also when the launcher is gone: part/train/supervision.py)
    STALLED = 7  # a training step or a collective did not complete within distributed.timeout_s: a rank stopped
    # responding (stopped, hung or its network stalled); the message names the step or collective and, on this
    # host, the stalled rank; --resume continues from the last checkpoint


def end_child_processes(timeout: float = 5.0) -> None:
    """Kills every process this one started (DataLoader workers ignore SIGTERM, so that a stop signal to the
    process group reaches the rank alone) and reaps them, waiting at most `timeout` seconds."""
    import psutil

    try:  # torch's SIGCHLD handler would raise in the middle of this, seeing its workers die
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread: the handler stays; os._exit follows at once anyway
        pass
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(children, timeout=timeout)


def exit_process(code: int) -> NoReturn:
    """Ends the process with `code` once stdout is flushed. A failure ends this process's children, then skips
    the interpreter's teardown (os._exit): it would wait forever on a DataLoader worker that ignores SIGTERM, and
    gloo groups of an interrupted distributed run can hang in it. Callable from any thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        try:
            end_child_processes()
        finally:
            os._exit(code)
    sys.exit(0)
