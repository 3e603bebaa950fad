"""The shard format, written and read here only: size-bounded WebDataset tars, written atomically, with an index.

A sample is `<key>.json` (the record) plus, for speech, `<key>.flac` (16 kHz mono).
Record fields: id, language, duration (s), transcript, translations {lang: text}, source.
Text-only samples (for the `mt` and `text` tasks) have no audio and duration 0.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import io
import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

REQUIRED_FIELDS = ("id", "language", "duration", "transcript")
INDEX_NAME = "index.json"
# Extensions whose only decoder is pickle. A member with one of these is refused, never decoded.
PICKLE_EXTENSIONS = {"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt"}
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3")


class DataError(RuntimeError):
    """Fatal data problem (no shards, unsafe member); the message names the shard or pattern."""


# ---------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    name: str
    samples: int = 0
    bytes: int = 0
    seconds_per_language: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def validate_record(record: dict, where: str) -> None:
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(f"{where}: record is missing field '{name}'")
    if not isinstance(record.get("translations", {}), dict):
        raise ValueError(f"{where}: field 'translations' must be a mapping of language -> text")


class ShardWriter:
    """Writes `<prefix>-000000.tar`, ... into `out_dir`, starting a new shard past `max_bytes` (or `max_samples`).

    Each shard is written under a `.partial` name and renamed when complete, so a reader
    never sees half a shard and a crashed build leaves only `.partial` files behind.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_bytes: int = 256 * 1024**2, max_samples: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples  # 0: no limit
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._current: ShardInfo | None = None
        self._partial: Path | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._partial = self.out_dir / (name + ".partial")
        # PAX: no 100-byte limit on member names; plain tar, webdataset and Python read it.
        self._tar = tarfile.open(self._partial, "w", format=tarfile.PAX_FORMAT)
        self._current = ShardInfo(name=name)

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))
        self._current.bytes += len(data) + 512

    def write(self, record: dict, audio_flac: bytes | None = None) -> None:
        key = str(record["id"])
        validate_record(record, f"sample {key}")
        if "." in key or "/" in key:
            raise ValueError(f"sample id {key!r} must not contain '.' or '/' (webdataset splits keys on them)")
        if self._tar is None:
            self._open()
        self._add_member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        if audio_flac is not None:
            self._add_member(f"{key}.flac", audio_flac)
        self._current.samples += 1
        self._current.seconds_per_language[record["language"]] += float(record["duration"])
        if self._current.bytes >= self.max_bytes or (self.max_samples and self._current.samples >= self.max_samples):
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar.fileobj = None
        with open(self._partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self._partial, self.out_dir / self._current.name)
        self.shards.append(self._current)
        self._tar = self._current = self._partial = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_index(out_dir: str | Path, shards: list[ShardInfo], extra: dict | None = None) -> Path:
    """Writes `index.json`: samples and hours per language, per shard and in total."""
    out_dir = Path(out_dir)
    totals: dict[str, float] = defaultdict(float)
    entries = []
    for shard in sorted(shards, key=lambda s: s.name):
        for lang, sec in shard.seconds_per_language.items():
            totals[lang] += sec
        entries.append(
            {
                "name": shard.name,
                "samples": shard.samples,
                "bytes": shard.bytes,
                "hours_per_language": {k: round(v / 3600, 6) for k, v in sorted(shard.seconds_per_language.items())},
            }
        )
    index = {
        "shards": entries,
        "total_samples": sum(s.samples for s in shards),
        "hours_per_language": {k: round(v / 3600, 6) for k, v in sorted(totals.items())},
        **(extra or {}),
    }
    path = out_dir / INDEX_NAME
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- shard patterns and sizes


def expand_shards(pattern: str, language: str | None = None) -> list[str]:
    """`{lang}` substituted, then brace ranges expanded; local patterns with * or ? are globbed."""
    if language is not None:
        pattern = pattern.replace("{lang}", language)
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if is_remote(item):
            urls.append(item)  # remote: checked when opened
        else:
            urls.extend(sorted(glob.glob(item)))  # local: only files that exist (a plain path globs to itself)
    return urls


def language_sizes(pattern: str, languages: list[str]) -> dict[str, float]:
    """Hours (speech) or samples (text) per language from the builders' index.json; shard counts otherwise."""
    sizes = {}
    for lang in languages:
        shards = expand_shards(pattern, lang)
        size = 0.0
        for index_path in {Path(s).parent / INDEX_NAME for s in shards if not is_remote(s)}:
            if index_path.exists():
                index = json.loads(index_path.read_text())
                names = {Path(s).name for s in shards}
                for entry in index["shards"]:
                    if entry["name"] in names:
                        hours = entry["hours_per_language"].get(lang, 0.0)
                        size += hours if hours > 0 else entry["samples"]
        sizes[lang] = size if size > 0 else float(len(shards))
    return sizes


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class RemoteReads:
    """How a shard read over the network (`http(s)://`, `pipe:`, any other URL) survives faults: an attempt that
    fails (connection refused or lost, an HTTP 5xx/408/429, a command's non-zero exit, no byte for `timeout` s)
    is retried up to `retries` times, `wait` s after the first failure and twice as long after each next one (at
    most MAX_RETRY_WAIT s). Then the shard is counted as `unreadable_shard` and skipped. The data fields
    `data.shard_retries`, `data.shard_retry_wait` and `data.shard_timeout` set them."""

    retries: int = 5
    wait: float = 2.0
    timeout: float = 60.0


MAX_RETRY_WAIT = 60.0


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


class _CommandOutput(io.RawIOBase):
    """The standard output of a `pipe:` command, read with a timeout: no byte for `timeout` s is a TimeoutError,
    and a non-zero exit status an OSError at the end of the output (so a command cut off mid-shard is retried,
    not taken for the shard's end). Closing kills the command if it still runs."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        # its own process group: closing ends a pipeline (`curl ... | zstd -d`) whole, not just the shell
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"no data from `{self.command}` for {self.timeout:g} s")
        data = os.read(fd, len(buffer))
        if not data:
            try:
                status = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"`{self.command}` closed its output but did not exit") from None
            if status != 0:
                raise OSError(f"`{self.command}` exited with status {status}")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc.stdout.close()
        super().close()


class _HttpBody(io.RawIOBase):
    """An HTTP response's body that ends in a ConnectionError when the connection closes before the declared
    Content-Length (http.client takes that for the body's end)."""

    def __init__(self, url: str, timeout: float):
        self.response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310  the configured shard URL
        self.expected, self.received = self.response.length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.response.read1(len(buffer))  # what has arrived: a stall loses none of it
        self.received += len(data)
        if not data and len(buffer) and self.expected is not None and self.received < self.expected:
            raise ConnectionError(f"the connection closed after {self.received} of {self.expected} bytes")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()
        super().close()


def _open_shard(url: str, timeout: float):
    """A readable stream of the shard's bytes. http(s) is read here (a socket timeout bounds every wait);
    `pipe:` runs the command; other URLs go to webdataset's openers, without the timeout."""
    import webdataset as wds  # here, not at the top: the builders import this module to write shards only

    if url.startswith(("http://", "https://")):
        return io.BufferedReader(_HttpBody(url, timeout), 1 << 20)
    if url.startswith("pipe:"):
        return io.BufferedReader(_CommandOutput(url[len("pipe:"):], timeout), 1 << 20)
    return wds.gopen(url, "rb")


def _retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: lost connections, timeouts, failed commands and server errors, but
    not an HTTP answer that will not change (404, 403, ...)."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, OSError | http.client.HTTPException)


def _tar_groups(stream, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members grouped by key; a group is yielded once the next one begins (or the tar ends)."""
    current, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.split("/")[-1]
            key, _, ext = name.partition(".")
            if ext.lower() in PICKLE_EXTENSIONS:
                raise DataError(f"shard {url}: member '{info.name}' has a pickle extension; refusing to decode it")
            data = tar.extractfile(info).read()
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = data
    if current is not None and members:
        yield current, members


def iter_tar_samples(url: str, counters: Counter,
                     reads: RemoteReads | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The shard's samples: its tar members grouped by key. Never raises for an unreadable shard (only DataError
    for a member it refuses): a local file that cannot be opened, or is truncated or corrupt, ends the shard and is
    counted. A remote shard whose transport fails is reopened as `reads` says, skipping the samples already
    yielded, so the shard gives the same samples as an undisturbed read; when every attempt failed, the rest of it
    is skipped and counted as `unreadable_shard`, with a warning naming the URL."""
    reads = reads or RemoteReads()
    over_network = is_remote(url)
    done = 0  # samples yielded so far: a reopened shard skips them
    attempt = 0
    while True:
        attempt += 1
        try:
            stream = _open_shard(url, reads.timeout)
        except Exception as exc:  # noqa: BLE001  whatever the opener raises: counted, never fatal
            failure = exc
        else:
            try:
                for seen, group in enumerate(_tar_groups(stream, url)):
                    if seen >= done:
                        yield group
                        done += 1
                return
            except DataError:
                raise
            except (tarfile.TarError, EOFError) as exc:  # the bytes arrived but are no valid tar: no retry
                counters["truncated_shard"] += 1
                _warn(f"shard {url} is truncated or corrupt ({exc}); skipping the rest of it")
                return
            except (OSError, http.client.HTTPException) as exc:
                if not over_network:
                    counters["truncated_shard"] += 1
                    _warn(f"shard {url} is truncated or corrupt ({exc}); skipping the rest of it")
                    return
                failure = exc
            finally:
                with contextlib.suppress(Exception):  # webdataset's pipes raise a failed exit again on close
                    stream.close()
        if not over_network or attempt > reads.retries or not _retryable(failure):
            counters["unreadable_shard"] += 1
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            rest = f"the rest of it ({done} samples read)" if done else "it"
            _warn(f"cannot read shard {url}{tries} ({_describe(failure)}); skipping {rest}")
            return
        wait = min(reads.wait * 2 ** (attempt - 1), MAX_RETRY_WAIT)
        _warn(f"shard {url}: {_describe(failure)} ({done} samples read); retrying in {wait:g} s "
              f"(attempt {attempt + 1} of {reads.retries + 1})")
        time.sleep(wait)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
