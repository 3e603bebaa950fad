"""Reads an offline wandb run from disk, without a server or an account: what `wandb sync` would upload.

A run logged offline lives in `<output_dir>/wandb/offline-run-<time>-<id>/`: `run-<id>.wandb` holds the records
(config, history rows, summary, ...) and `files/` holds the media, among them each logged table as
`files/media/table/<key>_<step>_<hash>.table.json`. The `.wandb` file is a LevelDB-style log (checked with wandb
0.31): a 7-byte header (`:W&B`, magic 0xBEE1, version), then 32 KiB blocks of chunks, each a 7-byte header (CRC-32
of type + data, little-endian length, type: full, first, middle, last) and its data; a record is one full chunk or
first + middle... + last, and is a serialised `wandb.proto.wandb_internal_pb2.Record`. wandb itself ships no reader
for it any more (its sync is in the Go core), so this is one, for the tests and for looking into a run by hand.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B"
HEADER_LEN = 7
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    """Each record's bytes, in file order. A record cut short at the end (the run was killed mid-write) ends the
    iteration; a chunk whose checksum is wrong is an error naming the offset."""
    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path}: not a wandb run file (header {data[:4]!r})")
    pos, pending = HEADER_LEN, None
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(chunk) < length:
            return
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE and pending is not None:
            pending += chunk
        elif kind == LAST and pending is not None:
            yield pending + chunk
            pending = None


def _items_to_dict(items) -> dict:
    """wandb's {key | nested_key, value_json} items as a nested dict (keys with '/' stay whole)."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class Table:
    columns: list[str]
    data: list[list]

    def rows(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.data]


@dataclass
class OfflineRun:
    path: Path  # the offline-run-* directory
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per logged step; tables read into `Table`
    summary: dict = field(default_factory=dict)

    def values(self, key: str) -> dict[int, object]:
        """{step: value} of one history key."""
        return {row["_step"]: row[key] for row in self.history if key in row}

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise ValueError(f"{run_dir}: expected one run-*.wandb file, found {len(files)}")
    run = OfflineRun(run_dir)
    for raw in raw_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the config given to wandb.init
            run.config.update(_items_to_dict(record.run.config.update))
        elif kind == "history":
            row = _items_to_dict(record.history.item)
            run.history.append({k: _resolve(run_dir, v) for k, v in row.items()})
        elif kind == "config":  # later changes to it
            run.config.update(_items_to_dict(record.config.update))
        elif kind == "summary":
            run.summary.update(_items_to_dict(record.summary.update))
    return run


def _resolve(run_dir: Path, value: object) -> object:
    if isinstance(value, dict) and value.get("_type") == "table-file":
        table = json.loads((run_dir / "files" / value["path"]).read_text(encoding="utf-8"))
        return Table(table["columns"], table["data"])
    return value


def offline_runs(output_dir: str | Path) -> list[Path]:
    """The offline runs a training run wrote (`<output_dir>/wandb/offline-run-*`), oldest first."""
    return sorted((Path(output_dir) / "wandb").glob("offline-run-*"))
