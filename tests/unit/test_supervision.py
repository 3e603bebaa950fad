"""A rank follows its launcher (part/train/supervision.py), within a stop grace derived from the run's step and
checkpoint times; a stalled peer ends the run (StallWatch); a failing process ends its children
(part/exit_codes.exit_process)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from part.exit_codes import ExitCode
from part.train.supervision import (
    CollectiveTimeout,
    FollowedProcess,
    LauncherWatch,
    StallWatch,
    StopGrace,
    is_running,
)


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


def test_the_stop_grace_is_twice_a_measured_step_and_checkpoint_and_at_least_25_s():
    grace = StopGrace()
    assert grace.seconds() == 25.0
    assert "25 s (the floor" in grace.describe()
    assert grace.step_took(4.0) is None and grace.seconds() == 25.0  # 2 x 4 s: under the floor
    line = grace.checkpoint_took(30.0)  # 2 x (4 + 30) = 68 s
    assert grace.seconds() == 68.0
    assert line == ("stop grace after losing the launcher: 68 s (2 x (step 4.0 s + checkpoint write 30.0 s), as "
                    "measured)")
    assert grace.step_took(5.0) is None and grace.seconds() == 70.0  # +2 s: not stated again
    assert grace.step_took(20.0) is not None and grace.seconds() == 100.0  # the longest recent step counts
    for _ in range(20):  # ... of the last 20: the slow step falls out of the window
        grace.step_took(5.0)
    assert grace.seconds() == 70.0


def test_a_configured_stop_grace_overrides_the_measurements():
    grace = StopGrace(300.0)
    assert grace.describe() == "stop grace after losing the launcher: 300 s (distributed.stop_grace_s)"
    assert grace.step_took(400.0) is None and grace.checkpoint_took(100.0) is None
    assert grace.seconds() == 300.0


def test_the_launcher_watch_takes_the_grace_of_the_moment_it_notices():
    launcher = subprocess.Popen(["sleep", "60"])
    grace, exited = [30.0], []
    LauncherWatch(lambda name: None, [followed(launcher)], poll=0.05, grace=lambda: grace[0],
                  exit=exited.append).start()
    grace[0] = 0.2  # measured before the launcher is lost
    launcher.kill()
    launcher.wait()
    time.sleep(1.0)
    assert exited == [1]


def test_a_backend_timeout_inside_a_wait_names_the_step_and_the_collective():
    watch = StallWatch(20.0, peers=lambda: ["rank 1 (pid 42) is stopped"])  # not started: no thread
    with pytest.raises(CollectiveTimeout) as caught:
        with watch.waiting("step 4"), watch.waiting("all_reduce (all_finite)"):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv "
                               "operation to complete")
    assert str(caught.value) == ("step 4, in all_reduce (all_finite): did not complete within 20 s "
                                 "(distributed.timeout_s); the stalled rank: rank 1 (pid 42) is stopped")
    with pytest.raises(ValueError), watch.waiting("step 5"):  # other errors pass through as they are
        raise ValueError("bad")
    assert watch._waits == []


def test_a_wait_past_the_timeout_ends_the_process_with_exit_7(capsys):
    exited = []
    watch = StallWatch(0.3, label="[rank 0] ", exit=exited.append, poll=0.05, margin=0.2, peers=lambda: []).start()
    with watch.waiting("step 1"):
        time.sleep(0.2)  # within the timeout
    time.sleep(0.6)
    assert exited == []  # no wait in progress, however long the pause
    with watch.waiting("step 2"), watch.waiting("barrier"):
        started = time.monotonic()
        while not exited and time.monotonic() - started < 5:
            time.sleep(0.05)
    assert exited == [ExitCode.STALLED] == [7]
    assert 0.5 <= time.monotonic() - started < 1.5
    assert ("[rank 0] error: step 2, in barrier: not completed within 0.3 s (distributed.timeout_s); no other rank "
            "on this host is stopped") in capsys.readouterr().out


def test_a_stopped_rank_on_this_host_is_named():
    """Two children of this process: a 'rank 1' that is SIGSTOPped, and a 'rank 0' that looks for its stalled
    peers among its siblings."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    peer = subprocess.Popen(["sleep", "60"], env=dict(env, RANK="1"))
    other = subprocess.Popen(["sleep", "60"], env=dict(env, RANK="2"))  # running: not named
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        deadline = time.time() + 10
        while psutil.Process(peer.pid).status() != psutil.STATUS_STOPPED:
            assert time.time() < deadline
            time.sleep(0.05)
        code = "from part.train.supervision import stalled_peers; print(stalled_peers())"
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, RANK="0"), capture_output=True, text=True,
                             timeout=60)
        assert out.stdout.strip() == str([f"rank 1 (pid {peer.pid}) is stopped"]), out.stderr[-2000:]
    finally:
        for proc in (peer, other):
            proc.kill()
            proc.wait()
