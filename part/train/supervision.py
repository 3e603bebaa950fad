"""A rank follows its launcher: when the process that started it is gone, the rank stops too.

Under `deepspeed train.py` the process tree is: the `deepspeed` command (DeepSpeed's runner) -> its launch.py ->
the ranks -> their DataLoader workers. launch.py forwards SIGTERM/SIGINT to the ranks (and kills them 30 s later),
but on one node the runner forwards nothing: a SIGTERM to the `deepspeed` process ends that process alone, and a
SIGKILL of either launcher process leaves the ranks training with no one to stop them. Each rank therefore
records, at its start, its parent (launch.py) and, when that is DeepSpeed's launch.py, the runner above it, and a
daemon thread polls them. When one is gone the rank stops as on SIGTERM (a checkpoint at the next step boundary,
which every rank must reach: the ranks agree on it), and if that has not ended the process within
LAUNCHER_GONE_GRACE_SECONDS (a peer is gone, or blocked) the rank exits without a checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from part.exit_codes import ExitCode, exit_process

LAUNCHER_POLL_SECONDS = 1.0
# From noticing the launcher's end to exiting: with the poll, every rank is gone within about 30 s.
LAUNCHER_GONE_GRACE_SECONDS = 25.0


@dataclass(frozen=True)
class FollowedProcess:
    pid: int
    started: float  # its create time: a pid reused by another process is not taken for it
    name: str  # what it is, for the messages


def _is_deepspeed_launch(proc: psutil.Process) -> bool:
    return any("deepspeed.launcher.launch" in arg for arg in proc.cmdline())


def _is_deepspeed_runner(proc: psutil.Process) -> bool:
    """The `deepspeed` command (a Python script named deepspeed, or the runner module)."""
    return any(arg.rsplit("/", 1)[-1] == "deepspeed" or "deepspeed.launcher.runner" in arg for arg in proc.cmdline())


def _followed(proc: psutil.Process, name: str) -> FollowedProcess:
    return FollowedProcess(proc.pid, proc.create_time(), f"{name} (pid {proc.pid})")


def launcher_processes() -> list[FollowedProcess]:
    """The processes this rank follows: its parent, and the `deepspeed` runner when the parent is DeepSpeed's
    launch.py started by it (multi-node runs start launch.py through ssh/pdsh or MPI instead: the parent only)."""
    try:
        parent = psutil.Process().parent()
        if parent is None:
            return []
        if not _is_deepspeed_launch(parent):
            return [_followed(parent, f"the parent process {parent.name()}")]
        followed = [_followed(parent, "DeepSpeed's launch.py")]
        runner = parent.parent()
        if runner is not None and _is_deepspeed_runner(runner):
            followed.append(_followed(runner, "the deepspeed launcher"))
        return followed
    except psutil.Error:  # gone while we looked: nothing to follow that still means anything
        return []


def is_running(process: FollowedProcess) -> bool:
    """Whether `process` still runs (an exited process its parent has not reaped yet, a zombie, does not)."""
    try:
        proc = psutil.Process(process.pid)
        return proc.create_time() == process.started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class LauncherWatch:
    """Polls `followed` from a daemon thread. When one is gone: `on_gone(name)` once (from that thread), then,
    unless `stop()` is called within `grace` seconds, prints why and calls `exit(ExitCode.FAILED)`."""

    def __init__(self, on_gone: Callable[[str], None], followed: Sequence[FollowedProcess] | None = None,
                 poll: float = LAUNCHER_POLL_SECONDS, grace: float = LAUNCHER_GONE_GRACE_SECONDS,
                 exit: Callable[[int], object] = exit_process, label: str = ""):
        self.followed = list(launcher_processes() if followed is None else followed)
        self.on_gone, self.poll, self.grace, self.exit, self.label = on_gone, poll, grace, exit, label
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)

    def start(self) -> LauncherWatch:
        if self.followed:
            self._thread.start()
        return self

    def stop(self) -> None:
        """The process is ending on its own: no exit from here."""
        self._stopped.set()

    def _run(self) -> None:
        gone = None
        while gone is None:
            if self._stopped.wait(self.poll):
                return
            gone = next((p for p in self.followed if not is_running(p)), None)
        self.on_gone(gone.name)
        if self._stopped.wait(self.grace):
            return
        print(f"{self.label}{gone.name} is gone and this process did not stop at a step boundary within "
              f"{self.grace:.0f} s (a peer is gone or blocked): exiting without a checkpoint; --resume continues "
              "from the last one", flush=True)
        self.exit(ExitCode.FAILED)


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
    from part.data.shards import DataError

    text = str(exc)
    lines = text.rstrip().splitlines()
    if text.startswith("Caught ") and "Original Traceback" in text and len(lines) > 1:
        where = lines[0].removeprefix("Caught ").rstrip(".")  # "DataError in DataLoader worker process 0"
        _, _, message = lines[-1].partition(": ")
        return f"{message or lines[-1]} ({where})"
    return text if isinstance(exc, DataError) else f"{type(exc).__name__}: {text}"
