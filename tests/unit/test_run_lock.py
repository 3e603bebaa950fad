"""checkpoint.dir's lock: one run at a time, the owner named in a refusal, a dead owner's lock taken over, another
host's lock refused, released at the end."""

import json
import socket
import subprocess
import sys

import pytest

from part.train.run_lock import LOCK_NAME, CheckpointDirInUse, CheckpointDirLock, this_process_owner


def test_acquire_names_the_owner_and_a_second_run_is_refused(tmp_path):
    first = CheckpointDirLock(tmp_path / "ckpt")  # the directory is made
    first.acquire()
    owner = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    me = this_process_owner()
    assert (owner["host"], owner["pid"], owner["started"]) == (me["host"], me["pid"], me["started"])
    second = CheckpointDirLock(tmp_path / "ckpt")  # its own open file: flock refuses it as another process
    with pytest.raises(CheckpointDirInUse, match=rf"in use by another run \(host {socket.gethostname()}, pid "
                                                 rf"{me['pid']}, started {owner['started_at']}"):
        second.acquire()
    assert not second.held
    first.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    second.acquire()  # free again
    assert second.held
    second.release()


def test_a_dead_owner_on_this_host_is_taken_over_saying_so(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {"host": socket.gethostname(), "pid": pid, "started": 1.0, "started_at": "long ago", "command": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    heard = []
    lock = CheckpointDirLock(tmp_path)
    lock.acquire(report=heard.append)
    assert len(heard) == 1 and "taking over the lock of a run that no longer runs" in heard[0]
    assert f"pid {pid}" in heard[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == this_process_owner()["pid"]
    lock.release()


def test_a_live_owner_without_flock_is_still_refused(tmp_path):
    """A file system that does not lock: the file names a process that runs (this one), so it is not taken."""
    (tmp_path / LOCK_NAME).write_text(json.dumps(this_process_owner()))
    with pytest.raises(CheckpointDirInUse, match="in use by another run"):
        CheckpointDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_refused_naming_it(tmp_path):
    other = {"host": "node-b.example", "pid": 4242, "started": 1.0, "started_at": "2026-01-01 00:00:00",
             "command": "train.py --config c.yaml"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(CheckpointDirInUse, match=r"names a run on another host \(host node-b.example, pid 4242.*"
                                                 rf"delete {tmp_path / LOCK_NAME}"):
        CheckpointDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other  # untouched


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    lock = CheckpointDirLock(tmp_path)
    lock.acquire()
    (tmp_path / LOCK_NAME).unlink()  # removed by hand, then another run took the directory
    other = CheckpointDirLock(tmp_path)
    other.acquire()
    lock.release()
    assert (tmp_path / LOCK_NAME).exists() and other.held
    other.release()
    assert not (tmp_path / LOCK_NAME).exists()
