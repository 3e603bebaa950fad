"""One writer per checkpoint directory: `<checkpoint.dir>/run.lock`, held by rank 0 for the whole run.

Two runs writing one checkpoint directory would publish, prune and resume each other's checkpoints. The lock is
an flock on the file (the kernel drops it when its process dies, however it dies), and the file names its owner
as JSON (host, pid, the process's start time, the command) for the refusal's message. A lock file whose owner
is gone, left by a killed run, is taken over when the owner ran on this host (its pid no longer runs, or runs a
later process); one naming another host is refused, since this host cannot tell whether that run still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

LOCK_NAME = "run.lock"


class CheckpointDirInUse(Exception):
    """Another run owns the checkpoint directory; the message names it."""


def this_process_owner() -> dict:
    me = psutil.Process()
    started = me.create_time()
    return {"host": socket.gethostname(), "pid": me.pid, "started": started,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "command": " ".join(sys.argv)}


def describe(owner: dict) -> str:
    return (f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started_at')}: "
            f"{owner.get('command', '?')}")


def owner_runs(owner: dict) -> bool:
    """Whether the process `owner` names runs on this host (the same pid with the same start time)."""
    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) < 0.01
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _read_owner(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {"host": "?", "pid": "?", "started_at": "?", "command": f"(unreadable lock file: {text[:80]!r})"}
    return owner if isinstance(owner, dict) else None


class CheckpointDirLock:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None
        self._owner: dict | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, report: Callable[[str], None] = print) -> None:
        """Takes the lock or raises CheckpointDirInUse naming the owner. `report` hears about a takeover."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                who = describe(owner) if owner else "its owner has not written its name yet"
                raise CheckpointDirInUse(f"{self.path.parent} is in use by another run ({who}); one run writes a "
                                         "checkpoint directory at a time: wait for it to end or stop it, or give "
                                         "this run another checkpoint.dir") from None
            try:  # the file may have been released and removed between the open and the lock: start again
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            previous = _read_owner(fd)
            if previous is not None:
                self._check_stale(previous)
                report(f"{self.path}: taking over the lock of a run that no longer runs ({describe(previous)})")
            owner = this_process_owner()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(owner) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._owner = fd, owner

    def _check_stale(self, previous: dict) -> None:
        """Raises unless `previous` (the file's owner; its flock is gone) is known to be dead."""
        if previous.get("host") != socket.gethostname():
            raise CheckpointDirInUse(
                f"{self.path} names a run on another host ({describe(previous)}); this host cannot tell whether it "
                f"still runs. If it does not, delete {self.path} and start again")
        if owner_runs(previous):  # a file system without flock: the owner runs, its lock just did not show
            raise CheckpointDirInUse(f"{self.path.parent} is in use by another run ({describe(previous)})")

    def release(self) -> None:
        """Removes the file (when it still names this process) and drops the lock; no-op when not held."""
        if self._fd is None:
            return
        try:
            if _read_owner(self._fd) == self._owner and os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # while still locked: a new run opens a fresh file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = self._owner = None
