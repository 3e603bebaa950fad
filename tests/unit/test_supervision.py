"""A rank follows its launcher (part/train/supervision.py), and a failing process ends its children
(part/exit_codes.exit_process)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil

from part.train.supervision import FollowedProcess, LauncherWatch, is_running


def followed(proc: subprocess.Popen, name: str = "the launcher") -> FollowedProcess:
    return FollowedProcess(proc.pid, psutil.Process(proc.pid).create_time(), name)


def test_a_killed_launcher_is_noticed_and_the_grace_ends_the_process():
    launcher = subprocess.Popen(["sleep", "60"])
    gone, exited = threading.Event(), []
    LauncherWatch(lambda name: gone.set(), [followed(launcher)], poll=0.05, grace=0.3, exit=exited.append).start()
    time.sleep(0.3)
    assert not gone.is_set()  # it runs
    launcher.kill()  # not reaped yet: a zombie is gone too
    assert gone.wait(5)
    time.sleep(1.0)
    assert exited == [1]  # ExitCode.FAILED: the stop did not end the process within the grace
    launcher.wait()


def test_a_stop_within_the_grace_exits_nothing():
    launcher = subprocess.Popen(["sleep", "60"])
    exited = []
    watch = LauncherWatch(lambda name: watch.stop(), [followed(launcher)], poll=0.05, grace=0.3,
                          exit=exited.append).start()
    launcher.kill()
    launcher.wait()
    time.sleep(1.0)
    assert exited == []


def test_a_reused_pid_is_not_the_launcher():
    me = psutil.Process()
    assert is_running(FollowedProcess(me.pid, me.create_time(), "me"))
    assert not is_running(FollowedProcess(me.pid, me.create_time() - 5, "an earlier process with this pid"))


RANK = textwrap.dedent("""
    import sys, time
    import torch.multiprocessing as mp
    from part.train.supervision import launcher_processes, LauncherWatch
    from part.exit_codes import exit_process

    def worker():  # a DataLoader worker: ignores SIGTERM
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)

    if __name__ == "__main__":
        child = mp.get_context("fork").Process(target=worker, daemon=True)
        child.start()
        print("child", child.pid, "follows", [p.pid for p in launcher_processes()], flush=True)
        LauncherWatch(lambda name: print("gone:", name, flush=True), poll=0.1, grace=1.0).start()
        time.sleep(600)
""")


def test_a_rank_whose_parent_dies_exits_and_ends_its_children(tmp_path):
    """A parent (standing in for launch.py) starts a 'rank' with a SIGTERM-proof child and is SIGKILLed: the rank
    notices, exits after its grace, and kills its child on the way out."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / "out.txt"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, "
                               f"{str(script)!r}], stdout=open({str(out)!r}, 'w')).wait()"], env=env)
    deadline = time.time() + 60
    while "child" not in (out.read_text() if out.exists() else ""):
        assert time.time() < deadline
        time.sleep(0.1)
    words = out.read_text().split()
    child = int(words[1])
    assert f"[{parent.pid}]" in out.read_text()  # it follows its parent
    rank = psutil.Process(child).parent()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    rank.wait(timeout=10)
    assert "gone: the parent process python" in out.read_text()
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_loader_workers_error_is_reported_by_its_own_message():
    """DataLoader re-raises a worker's exception in the rank with the worker's traceback as its text; the run's
    error line is the worker's message and which worker it was."""
    from torch._utils import ExceptionWrapper

    from part.data.shards import DataError
    from part.train.supervision import failure_message, lost_a_peer

    try:
        raise DataError("shard en-000000.tar: member 'a.pyd' has a pickle extension; refusing to decode it")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    try:
        wrapped.reraise()
    except DataError as exc:
        assert failure_message(exc) == ("shard en-000000.tar: member 'a.pyd' has a pickle extension; refusing "
                                        "to decode it (DataError in DataLoader worker process 1)")
    assert failure_message(ValueError("bad")) == "ValueError: bad"
    assert lost_a_peer(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:52954"))
    assert not lost_a_peer(RuntimeError("injected"))
