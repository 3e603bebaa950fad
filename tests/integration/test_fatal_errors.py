"""Fatal errors end the whole run promptly through the real `deepspeed` launcher (2 CPU ranks): a shard member
only pickle decodes, found by one rank's DataLoader worker, and an exception inside a loader worker. Each run
ends with its exit code and message, and no process of the run (launcher, ranks, loader workers) is left."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, write_config
from test_train_e2e import deepspeed_cmd, env

from part.data.shards import expand_shards

pytestmark = pytest.mark.slow

STAGE = "  - {name: s1, steps: 6, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"
ENDS_WITHIN_S = 60


def processes_of_group(pgid: int) -> list[str]:
    """The live processes (not zombies) of process group `pgid`, described."""
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:160]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def start_run(config: Path, *extra: str, script: str = "tests/integration/guarded_train.py",
              nproc: int = 2) -> subprocess.Popen:
    """The launcher in a session of its own: its process group is the run's (launch.py, ranks, workers)."""
    return subprocess.Popen(deepspeed_cmd(config, *extra, script=script, nproc=nproc), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def follow_until_exit(run: subprocess.Popen, marker: str, timeout: float = 400) -> tuple[str, float | None]:
    """The run's output until it ends, and when `marker` appeared in it (None: never). Kills the run's process
    group past `timeout`."""
    lines, seen_at, deadline = [], None, time.time() + timeout
    for line in run.stdout:
        lines.append(line)
        if seen_at is None and marker in line:
            seen_at = time.time()
        if time.time() > deadline:
            os.killpg(run.pid, signal.SIGKILL)
            pytest.fail("the run did not end:\n" + "".join(lines[-60:]))
    run.wait(timeout=60)
    return "".join(lines), seen_at


def assert_nothing_left(run: subprocess.Popen) -> None:
    for _ in range(20):  # the launcher has exited; its last children may take a moment to be reaped
        left = processes_of_group(run.pid)
        if not left:
            return
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)
    pytest.fail(f"processes of the run left behind: {left}")


def poison_corpus(corpus: Path, out: Path, language: str = "en") -> list[str]:
    """A copy of the corpus whose `language` training shards read by data worker 0 of 2 (shards 0, 2, ...) start
    with a member only pickle would decode. Returns the poisoned shards' paths."""
    out.mkdir()
    for part in ("text", "eval"):
        (out / part).symlink_to(corpus / part)
    shutil.copytree(corpus / "train", out / "train")
    poisoned = expand_shards(str(out / "train" / f"{language}-*.tar"))[0::2]
    for shard in poisoned:
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("evil.pyd")
            payload = b"\x80\x04K\x01."  # pickle of the integer 1
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
    return poisoned


def test_a_forbidden_shard_member_ends_every_rank(corpus, tiny_models, tmp_path):
    """Rank 0's worker refuses the member (exit 2, naming shard and member); rank 1, waiting for rank 0 in a
    collective, ends too, and so do the launcher and every loader worker."""
    poisoned = poison_corpus(corpus, tmp_path / "corpus")
    config = write_config(tmp_path / "c.yaml", tmp_path / "corpus", tiny_models, STAGE)
    run = start_run(config, "eval.per_language=0", "stages.0.languages=[en]")
    out, failed_at = follow_until_exit(run, "has a pickle extension")
    assert failed_at is not None, out[-4000:]
    assert time.time() - failed_at < ENDS_WITHIN_S
    assert run.returncode == 2, out[-4000:]
    assert any(f"error: shard {shard}: member 'evil.pyd' has a pickle extension; refusing to decode it" in out
               for shard in poisoned), out[-4000:]
    assert_nothing_left(run)
    assert not (tmp_path / "ckpt" / "run.lock").exists()  # released on the way out


def test_an_exception_in_a_loader_worker_ends_every_rank(corpus, tiny_models, tmp_path):
    """A bug in the data code: rank 1's loader worker raises at its 20th sample (in step 2's window)."""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGE)
    run = start_run(config, "--fail-rank", "1", "--fail-sample", "20", "eval.per_language=0",
                    script="tests/integration/worker_fault_train.py")
    out, failed_at = follow_until_exit(run, "injected: the data code failed")
    assert failed_at is not None, out[-4000:]
    assert time.time() - failed_at < ENDS_WITHIN_S
    assert run.returncode == 1, out[-4000:]
    assert "error: injected: the data code failed at sample 20 (RuntimeError in DataLoader worker process 0)" in out
    assert "Original Traceback" in out  # the worker's traceback, for the bug's author
    assert_nothing_left(run)
