"""Fatal errors end the whole run promptly through the real `deepspeed` launcher (2 CPU ranks): a shard member
only pickle decodes, found by one rank's DataLoader worker, an exception inside a loader worker, and a rank that
stops responding (SIGSTOP). Each run ends with its exit code and message, and no process of the run (launcher,
ranks, loader workers) is left."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import write_config
from test_train_e2e import RunOutput, assert_nothing_left, rank_process, start_run

from part.data.shards import expand_shards

pytestmark = pytest.mark.slow

STAGE = "  - {name: s1, steps: 6, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"
ENDS_WITHIN_S = 60


def follow_until_exit(run: subprocess.Popen, marker: str, timeout: float = 400) -> tuple[str, float | None]:
    """The run's output once it ended, and when `marker` appeared in it (None: never). Kills the run's process
    group and fails past `timeout`, also when the run is silent."""
    out = RunOutput(run)
    out.until_exit(timeout)
    return out.text(), out.seen_at(marker)


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


@pytest.mark.extended  # the same exit path as the forbidden member's, which the default run keeps
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


STALL_TIMEOUT_S = 20
# launch.py, seeing the first rank fail, gives the others 30 s before SIGKILL (a stopped rank takes all of it)
STALL_ENDS_WITHIN_S = STALL_TIMEOUT_S + 45


@pytest.mark.extended  # about 90 s: the timeout and launch.py's 30 s before it kills the stopped rank
def test_a_stopped_rank_ends_the_run_within_the_collective_timeout(corpus, tiny_models, tmp_path):
    """Rank 1 is SIGSTOPped mid-training: rank 0 waits in a collective, which times out after
    distributed.timeout_s; it names the step, the collective and the stopped rank and exits 7, launch.py kills the
    stopped rank, and the launcher returns 7 with no process of the run left."""
    stage = STAGE.replace("steps: 6", "steps: 40")
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, stage)
    run = start_run(config, "eval.per_language=0", f"distributed.timeout_s={STALL_TIMEOUT_S}")
    out = RunOutput(run)
    out.wait_for("[part] step 3/")
    victim = rank_process(run, 1)
    assert victim is not None
    victim.suspend()  # SIGSTOP
    stopped = time.time()
    code = out.until_exit(STALL_ENDS_WITHIN_S + 60)
    took = time.time() - stopped
    text = out.text()
    assert code == 7, text[-4000:]  # ExitCode.STALLED, passed on by launch.py and the runner
    assert STALL_TIMEOUT_S <= took < STALL_ENDS_WITHIN_S, (took, text[-4000:])
    # the step or the checkpoint the stop caught, and the collective when it was one of part's
    stall = re.search(r"error: ((?:the checkpoint of )?step \d+[^:]*): (did not complete|not completed) within 20 s "
                      r"\(distributed.timeout_s\); "
                      r"the stalled rank: rank 1 \(pid (\d+)\) is stopped", text)
    assert stall is not None, text[-4000:]
    assert int(stall.group(3)) == victim.pid
    reported = out.seen_at(stall.group(0))
    assert STALL_TIMEOUT_S <= reported - stopped < STALL_TIMEOUT_S + 15, reported - stopped
    assert_nothing_left(run)
