"""Shards read over the network: HTTP from a real server on 127.0.0.1 (http.server in a thread) and `pipe:`
commands. A server that dies mid-shard and comes back, one that answers 5xx, one that stalls, a command that
fails or hangs: each shard is retried, then read (the same samples as the local file, none repeated) or skipped
and counted with its URL named, within a bounded time. A stream resumed after such a fault continues exactly."""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pytest

from part.config import DataConfig, StageConfig
from part.data.shards import RemoteReads, iter_tar_samples
from part.data.stream import MixtureStream, StreamTracker, make_loader
from part.model.tokenizer import load_tokenizer

FAST = RemoteReads(retries=3, wait=0.1, timeout=0.5)  # waits 0.1, 0.2, 0.4 s


class ShardServer:
    """Serves the files of `root` on 127.0.0.1. `faults` maps the number of a request (1, 2, ... in arrival
    order) to what it gets instead of the file: an HTTP status, `die` (half of the file, then the server is down
    for `down_s` and comes back on the same port) or `stall` (half of the file, then nothing until the test
    ends)."""

    def __init__(self, root: Path, faults: dict[int, int | str] | None = None, down_s: float = 0.8):
        self.root, self.faults, self.down_s = root, dict(faults or {}), down_s
        self.requests: list[str] = []
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.port = 0
        self._start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  http.server's name
                name = self.path.lstrip("/")
                with owner.lock:
                    owner.requests.append(name)
                    fault = owner.faults.get(len(owner.requests))
                file = owner.root / name
                if isinstance(fault, int) or not file.is_file():
                    self.send_error(fault if isinstance(fault, int) else 404)
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is None:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if fault == "stall":
                    owner.released.wait(30)
                else:  # the server goes away with the connection cut mid-body
                    threading.Thread(target=owner._down_and_back, daemon=True).start()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _down_and_back(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()  # connections are refused from now on
        if not self.released.wait(self.down_s):  # back unless the test has ended meanwhile
            self._start()

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    servers = []

    def start(faults=None, **kw) -> ShardServer:
        servers.append(ShardServer(tmp_path, faults, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def write_shard(path: Path, n: int, payload: int = 20_000) -> list[str]:
    """A shard of `n` samples (a record and a payload member each, the payload large enough that half the file
    holds several samples); returns the keys."""
    buf = io.BytesIO()
    keys = [f"s{i:03d}" for i in range(n)]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, key in enumerate(keys):
            for name, data in ((f"{key}.json", json.dumps({"id": key, "transcript": f"sample {i}"}).encode()),
                               (f"{key}.bin", bytes([i % 251]) * payload)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return keys


def read(url: str, reads: RemoteReads = FAST) -> tuple[list[tuple[str, dict]], Counter, float]:
    counters: Counter = Counter()
    start = time.monotonic()
    samples = list(iter_tar_samples(url, counters, reads))
    return samples, counters, time.monotonic() - start


def test_http_gives_the_local_file_s_samples(tmp_path, served):
    keys = write_shard(tmp_path / "en-000000.tar", 12)
    server = served()
    local, _, _ = read(str(tmp_path / "en-000000.tar"))
    remote, counters, _ = read(server.url("en-000000.tar"))
    assert [k for k, _ in local] == keys
    assert remote == local and not counters
    assert server.requests == ["en-000000.tar"]


def test_a_server_that_dies_mid_shard_and_comes_back_gives_every_sample_once(tmp_path, served, capsys):
    keys = write_shard(tmp_path / "en-000000.tar", 12)
    server = served({1: "die"}, down_s=0.5)
    url = server.url("en-000000.tar")
    samples, counters, seconds = read(url)
    assert [k for k, _ in samples] == keys  # the first half not repeated, the second half read after the return
    assert samples == read(str(tmp_path / "en-000000.tar"))[0]
    assert not counters
    err = capsys.readouterr().err
    retries = [line for line in err.splitlines() if line.startswith(f"warning: shard {url}: ")]
    assert retries and "retrying in 0.1 s (attempt 2 of 4)" in retries[0]
    read_before = int(re.search(r"\((\d+) samples read\)", retries[0]).group(1))
    assert 0 < read_before < len(keys)  # the fault came mid-shard, after samples were yielded
    assert 2 <= len(server.requests) <= 4 and seconds < 5


def test_a_server_down_for_longer_than_the_retries_skips_the_rest_of_the_shard(tmp_path, served, capsys):
    keys = write_shard(tmp_path / "en-000000.tar", 12)
    server = served({1: "die"}, down_s=5.0)
    url = server.url("en-000000.tar")
    samples, counters, seconds = read(url)
    read_keys = [k for k, _ in samples]
    assert 0 < len(read_keys) < len(keys) and read_keys == keys[: len(read_keys)]  # the half that arrived
    assert counters == Counter(unreadable_shard=1)
    assert f"warning: cannot read shard {url} after 4 attempts" in capsys.readouterr().err
    assert server.requests == ["en-000000.tar"]  # the others were refused
    assert 0.7 <= seconds < 3  # 0.1 + 0.2 + 0.4 s of waiting


def test_5xx_is_retried_then_read_or_skipped(tmp_path, served, capsys):
    keys = write_shard(tmp_path / "en-000000.tar", 4)
    server = served({1: 503, 2: 500})
    samples, counters, _ = read(server.url("en-000000.tar"))
    assert [k for k, _ in samples] == keys and not counters
    assert len(server.requests) == 3

    always = served(dict.fromkeys(range(1, 10), 503))
    url = always.url("en-000000.tar")
    samples, counters, seconds = read(url)
    assert samples == [] and counters == Counter(unreadable_shard=1)
    assert len(always.requests) == 4 and seconds < 3
    err = capsys.readouterr().err
    assert f"cannot read shard {url} after 4 attempts (HTTPError: HTTP Error 503" in err

    missing = served()
    samples, counters, _ = read(missing.url("en-000001.tar"))  # 404 will not change: no retry
    assert samples == [] and counters == Counter(unreadable_shard=1) and len(missing.requests) == 1


def test_a_stalled_server_times_out_and_the_shard_is_skipped(tmp_path, served, capsys):
    keys = write_shard(tmp_path / "en-000000.tar", 12)
    server = served(dict.fromkeys(range(1, 10), "stall"))
    url = server.url("en-000000.tar")
    samples, counters, seconds = read(url)
    read_keys = [k for k, _ in samples]
    assert 0 < len(read_keys) < len(keys) and read_keys == keys[: len(read_keys)]  # each attempt gave the same half
    assert counters == Counter(unreadable_shard=1) and len(server.requests) == 4
    assert f"cannot read shard {url} after 4 attempts (TimeoutError" in capsys.readouterr().err
    assert 4 * 0.5 <= seconds < 6  # four attempts of 0.5 s without a byte, 0.7 s of waiting


def test_pipe_commands_are_retried_timed_out_and_ended(tmp_path, capsys):
    shard = tmp_path / "en-000000.tar"
    keys = write_shard(shard, 12)
    samples, counters, _ = read(f"pipe:cat {shard}")
    assert [k for k, _ in samples] == keys and not counters
    # the first run stops half-way with exit 1; the second gives the whole shard
    marker = tmp_path / "ran"
    flaky = (f"pipe:if [ -e {marker} ]; then cat {shard}; else touch {marker}; head -c {shard.stat().st_size // 2} "
             f"{shard}; exit 1; fi")
    samples, counters, _ = read(flaky)
    assert [k for k, _ in samples] == keys and not counters
    assert "exited with status 1" in capsys.readouterr().err
    # a command that hangs is killed after the timeout, every attempt
    samples, counters, seconds = read("pipe:sleep 30", RemoteReads(retries=1, wait=0.1, timeout=0.5))
    assert samples == [] and counters == Counter(unreadable_shard=1) and seconds < 3
    assert "cannot read shard pipe:sleep 30 after 2 attempts (TimeoutError: no data from `sleep 30` for 0.5 s)" \
        in capsys.readouterr().err
    assert not [p for p in psutil.Process().children(recursive=True) if "sleep" in " ".join(p.cmdline())]


def test_a_stream_over_http_with_a_fault_resumes_exactly(corpus, tiny_models, served, capsys):
    """One source's shards over HTTP, the server dying mid-shard once: the batches are those of the local shards;
    a resume from a position saved after the fault (through JSON, as in a checkpoint) continues exactly."""
    tokenizer = load_tokenizer(str(tiny_models / "llm"))
    stage = StageConfig(name="n", steps=1, tasks={"asr": 1.0}, languages=["de"])

    def cfg(pattern: str) -> DataConfig:
        return DataConfig(train_shards=pattern, languages=["de"], num_workers=0, window=8, max_batch_seconds=40.0,
                          max_batch_size=4, max_duration=15.0, shard_retries=3, shard_retry_wait=0.1,
                          shard_timeout=1.0)

    def take(stream, n):
        it = iter(make_loader(stream))
        return [next(it) for _ in range(n)]

    shards = sorted((corpus / "train").glob("de-*.tar"))
    assert len(shards) >= 3
    braces = "{" + ",".join(p.name for p in shards) + "}"
    local = take(MixtureStream(cfg(f"{corpus}/train/{braces}"), stage, tokenizer, 80, 0, 1), 12)
    server = ShardServer(corpus / "train", {2: "die"}, down_s=0.3)
    try:
        remote = take(MixtureStream(cfg(server.url(braces)), stage, tokenizer, 80, 0, 1), 12)
        assert "retrying in 0.1 s" in capsys.readouterr().err
        assert len(server.requests) > len(set(server.requests))  # a shard was requested again
        for a, b in zip(local, remote, strict=True):
            assert [m.key for m in a.meta] == [m.key for m in b.meta]
            assert np.array_equal(a.input_features.numpy(), b.input_features.numpy())
        assert remote[-1].position.skipped == local[-1].position.skipped
        tracker = StreamTracker()
        for b in remote[:7]:
            tracker.update(b.position)
        state = json.loads(json.dumps(tracker.state()))
        resumed = take(MixtureStream(cfg(server.url(braces)), stage, tokenizer, 80, 0, 1, resume=state), 5)
        for a, b in zip(local[7:], resumed, strict=True):
            assert [m.key for m in a.meta] == [m.key for m in b.meta]
            assert np.array_equal(a.input_features.numpy(), b.input_features.numpy())
    finally:
        server.close()
