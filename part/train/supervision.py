"""A rank follows its launcher: when the process that started it is gone, the rank stops too.

Under `deepspeed train.py` the process tree is: the `deepspeed` command (DeepSpeed's runner) -> its launch.py ->
the ranks -> their DataLoader workers. launch.py forwards SIGTERM/SIGINT to the ranks (and kills them 30 s later),
but on one node the runner forwards nothing: a SIGTERM to the `deepspeed` process ends that process alone, and a
SIGKILL of either launcher process leaves the ranks training with no one to stop them. Each rank therefore
records, at its start, its parent (launch.py) and, when that is DeepSpeed's launch.py, the runner above it, and a
daemon thread polls them. When one is gone the rank stops as on SIGTERM (a checkpoint at the next step boundary,
which every rank must reach: the ranks agree on it), and if that has not ended the process within the stop grace
(StopGrace: derived from the run's measured step and checkpoint-write times, at least
LAUNCHER_GONE_GRACE_SECONDS; a peer is gone, or blocked) the rank exits without a checkpoint.

A rank that stops responding (SIGSTOP, a hang, a stalled network) leaves its peers waiting in a collective. The
process group's timeout (distributed.timeout_s) makes gloo and NCCL raise there; StallWatch turns that into
CollectiveTimeout (exit STALLED), and its thread ends the rank itself where the backend's timeout does not fire.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
                 poll: float = LAUNCHER_POLL_SECONDS, grace: float | Callable[[], float] = LAUNCHER_GONE_GRACE_SECONDS,
                 exit: Callable[[int], object] = exit_process, label: str = ""):
        """`grace`: seconds, or what gives them when the launcher is found gone (StopGrace.seconds)."""
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
        grace = self.grace() if callable(self.grace) else self.grace
        self.on_gone(gone.name)
        if self._stopped.wait(grace):
            return
        print(f"{self.label}{gone.name} is gone and this process did not stop at a step boundary within "
              f"{grace:.0f} s (a peer is gone or blocked): exiting without a checkpoint; --resume continues "
              "from the last one", flush=True)
        self.exit(ExitCode.FAILED)


class StopGrace:
    """The time a rank gives its step and checkpoint after losing its launcher: `fixed` (distributed.stop_grace_s)
    when set, else twice a step and a checkpoint write as measured in this run (the longest of the recent ones:
    the notice may come just as a step starts), and never under `floor`."""

    MATERIAL = 0.2  # a change by this fraction (and by at least 5 s) is stated again

    def __init__(self, fixed: float | None = None, floor: float = LAUNCHER_GONE_GRACE_SECONDS, window: int = 20):
        self.fixed, self.floor = fixed, floor
        self._steps: deque[float] = deque(maxlen=window)
        self._checkpoints: deque[float] = deque(maxlen=3)
        self._stated = self.seconds()

    def seconds(self) -> float:
        if self.fixed is not None:
            return float(self.fixed)
        return max(self.floor, 2.0 * (max(self._steps, default=0.0) + max(self._checkpoints, default=0.0)))

    def describe(self) -> str:
        grace = self.seconds()
        if self.fixed is not None:
            why = "distributed.stop_grace_s"
        elif grace > self.floor:
            why = (f"2 x (step {max(self._steps, default=0.0):.1f} s + checkpoint write "
                   f"{max(self._checkpoints, default=0.0):.1f} s), as measured")
        else:
            why = "the floor; measured step and checkpoint-write times raise it"
        return f"stop grace after losing the launcher: {grace:.0f} s ({why})"

    def step_took(self, seconds: float) -> str | None:
        """Records a step's time; the line to log when the grace changed materially, else None."""
        self._steps.append(seconds)
        return self._changed()

    def checkpoint_took(self, seconds: float) -> str | None:
        """Records a checkpoint write's time; the line to log when the grace changed materially, else None."""
        self._checkpoints.append(seconds)
        return self._changed()

    def _changed(self) -> str | None:
        now = self.seconds()
        if abs(now - self._stated) < max(5.0, self.MATERIAL * self._stated):
            return None
        self._stated = now
        return self.describe()


class CollectiveTimeout(RuntimeError):
    """A training step or a collective did not complete within distributed.timeout_s; the message names it."""


def timed_out(exc: BaseException) -> bool:
    """Whether `exc` is a collective's timeout (gloo: "Timed out waiting ... for recv operation"; NCCL's watchdog:
    "collective operation timeout")."""
    text = str(exc)
    return "Timed out waiting" in text or "operation timeout" in text.lower()


def _rank_of(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get("RANK")
    except psutil.Error:
        return None


def stalled_peers() -> list[str]:
    """The other ranks on this host (the children of this rank's parent that carry a RANK) that are stopped
    (SIGSTOP), in uninterruptible I/O, or gone unreaped, described."""
    found = []
    try:
        siblings = psutil.Process().parent().children()
    except (psutil.Error, AttributeError):
        return found
    states = {psutil.STATUS_STOPPED: "stopped", psutil.STATUS_TRACING_STOP: "stopped",
              psutil.STATUS_DISK_SLEEP: "blocked in I/O", psutil.STATUS_ZOMBIE: "gone"}
    for proc in siblings:
        if proc.pid == os.getpid() or (rank := _rank_of(proc)) is None:
            continue
        try:
            state = states.get(proc.status())
        except psutil.Error:
            state = "gone"
        if state:
            found.append(f"rank {rank} (pid {proc.pid}) is {state}")
    return found


def stall_note(peers: Callable[[], list[str]] = stalled_peers) -> str:
    found = peers()
    if found:
        return "the stalled rank: " + ", ".join(found)
    return "no other rank on this host is stopped: a rank on another host, or the network, stalled"


# The backend's timeout raises inside the collective first; the watch's own exit is for where it does not.
STALL_MARGIN_S = 5.0


class StallWatch:
    """What this rank waits on (a training step, a collective of part's) and since when. `waiting(what)` turns a
    backend's collective timeout inside it into CollectiveTimeout naming what was awaited; a daemon thread ends the
    process (`exit(ExitCode.STALLED)`) when the outermost wait has lasted `timeout` + STALL_MARGIN_S seconds, for
    the waits the backend's timeout does not end."""

    def __init__(self, timeout: float, label: str = "", exit: Callable[[int], object] = exit_process,
                 poll: float = 1.0, margin: float = STALL_MARGIN_S,
                 peers: Callable[[], list[str]] = stalled_peers):
        self.timeout, self.label, self.exit, self.poll, self.margin, self.peers = (
            timeout, label, exit, poll, margin, peers)
        self._waits: list[tuple[str, float]] = []  # outermost first; changed by the training thread only
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)

    def start(self) -> StallWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _what(self, waits: list[tuple[str, float]]) -> str:
        names = [name for name, _ in waits]
        return names[0] if len(names) == 1 else f"{names[0]}, in {names[-1]}"

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self._waits.append((what, time.monotonic()))
        try:
            yield
        except CollectiveTimeout:
            raise
        except Exception as exc:
            if not timed_out(exc):
                raise
            raise CollectiveTimeout(f"{self._what(self._waits)}: did not complete within {self.timeout:g} s "
                                    f"(distributed.timeout_s); {stall_note(self.peers)}") from exc
        finally:
            self._waits.pop()

    def _run(self) -> None:
        while not self._stopped.wait(self.poll):
            waits = list(self._waits)
            if not waits or time.monotonic() - waits[0][1] < self.timeout + self.margin:
                continue
            print(f"{self.label}error: {self._what(waits)}: not completed within {self.timeout:g} s "
                  f"(distributed.timeout_s); {stall_note(self.peers)}: exiting (exit code "
                  f"{int(ExitCode.STALLED)}); --resume continues from the last checkpoint", flush=True)
            self.exit(ExitCode.STALLED)
            return


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
