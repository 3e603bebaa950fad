"""Pretrained directories as the source of the weights a saved model leaves out.

A weight read from a pretrained directory (`model.encoder.pretrained`, `model.llm.pretrained`) that training never
changed need not be written again: a saved model may reference it instead, by its directory and the SHA-256 of the
directory's weight and config files (`weight_sources.json` beside `model.safetensors`). Loading such a model checks
the digests first, refuses a changed or missing source naming the directory and file, reads the referenced weights
from their directories, then the saved ones; the keys the file lacks must be exactly the referenced ones.

Which weights a checkpoint leaves out: those of a pretrained directory that no trainable group of its stage or an
earlier one selects (`left_out`). Each file is hashed once per process (`file_digest`: cached by path, inode,
size, mtime and ctime, so a same-size rewrite in place is noticed even with its mtime restored).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from part.model.groups import EncoderLayout, group_parameters

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

SOURCES_NAME = "weight_sources.json"
# What `from_pretrained` reads of a model directory: its config and its weights (shards and their index)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class SourceError(ValueError):
    """A referenced pretrained directory that is gone or changed; the message names the directory and the file."""


@dataclass(frozen=True)
class PretrainedPart:
    """The state-dict keys of one module (`encoder`, `llm`) that a fresh build reads from `directory`."""

    module: str
    directory: str
    keys: frozenset[str]


@dataclass(frozen=True)
class WeightSource:
    """Weights a saved model references instead of holding: `keys`, read from `directory`, whose files had these
    SHA-256 digests (file name -> hex digest)."""

    module: str
    directory: str
    files: dict[str, str]
    keys: tuple[str, ...]


def source_files(directory: str | Path) -> list[Path]:
    """The files of a model directory its weights are built from: config.json, the weight files and their index."""
    directory = Path(directory)
    return sorted(f for f in directory.iterdir() if f.is_file() and (
        f.name == "config.json" or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json")))


_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
# A digest is kept only for a file unchanged this long before it was hashed: a rewrite within one tick of the file
# system's clock would leave size, mtime and ctime as they were.
SETTLED_NS = 1_000_000_000


def file_digest(path: Path) -> str:
    """SHA-256 of `path`, computed once per process for a given file (device, inode), size, mtime and ctime. Any
    write changes the ctime (which, unlike the mtime, cannot be set back), so a same-size rewrite in place is
    hashed again; so is a file replaced by another (a new inode)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) >= SETTLED_NS:
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def directory_digests(directory: str | Path) -> dict[str, str]:
    """File name -> SHA-256 of the directory's `source_files`; SourceError when it holds none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"pretrained directory {directory} does not exist")
    files = source_files(directory)
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
        raise SourceError(f"pretrained directory {directory} holds no weight file")
    return {f.name: file_digest(f) for f in files}


def reference(part: PretrainedPart) -> WeightSource:
    """The reference a saved model keeps for `part`: its directory (absolute) and its files' digests now."""
    directory = Path(part.directory).resolve()
    return WeightSource(part.module, str(directory), directory_digests(directory), tuple(sorted(part.keys)))


def verify(source: WeightSource) -> None:
    """SourceError naming the directory and the file unless every recorded file is there with its digest."""
    directory = Path(source.directory)
    what = f"the {source.module} weights this model references ({len(source.keys)} tensors)"
    if not directory.is_dir():
        raise SourceError(f"pretrained directory {directory} is missing: {what} are read from it")
    for name, digest in sorted(source.files.items()):
        file = directory / name
        if not file.is_file():
            raise SourceError(f"{file} is missing from pretrained directory {directory}: {what} are read from it")
        if file_digest(file) != digest:
            raise SourceError(f"{file} in pretrained directory {directory} has changed since the model was saved "
                              f"(its SHA-256 differs): {what} cannot be read from it")


def write_sources(directory: str | Path, sources: Sequence[WeightSource]) -> None:
    data = [{"module": s.module, "directory": s.directory, "files": s.files, "keys": list(s.keys)} for s in sources]
    (Path(directory) / SOURCES_NAME).write_text(json.dumps({"sources": data}, indent=1))


def read_sources(directory: str | Path) -> list[WeightSource]:
    """The references a saved model directory holds (none when it holds every weight)."""
    file = Path(directory) / SOURCES_NAME
    if not file.exists():
        return []
    return [WeightSource(s["module"], s["directory"], dict(s["files"]), tuple(s["keys"]))
            for s in json.loads(file.read_text())["sources"]]


def sources_problem(directory: str | Path) -> str | None:
    """None when every source a saved model directory references is as recorded; else what is wrong."""
    try:
        for source in read_sources(directory):
            verify(source)
    except SourceError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- what a checkpoint leaves out


class SourcedModel(Protocol):
    """What `left_out` reads of a model (part.model.speech_llm.SpeechLLM): its parameters, its encoder's layout
    (for the groups) and what it reads from pretrained directories."""

    @property
    def encoder_layout(self) -> EncoderLayout: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def pretrained_parts(self) -> list[PretrainedPart]: ...


def trained_keys(model: SourcedModel, groups: Iterable[str]) -> set[str]:
    """Every name (tied duplicates included) of the parameters `groups` select."""
    selected = {name for group in set(groups) for name in group_parameters(model, group)}
    params = {id(p) for name, p in model.named_parameters() if name in selected}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in params}


def left_out(model: SourcedModel, trained_groups: Iterable[str]) -> list[PretrainedPart]:
    """The weights a checkpoint need not hold: per pretrained directory, the keys read from it that none of
    `trained_groups` (every group trained so far) selects."""
    trained = trained_keys(model, trained_groups)
    out = []
    for part in model.pretrained_parts():
        keys = part.keys - trained
        if keys:
            out.append(PretrainedPart(part.module, part.directory, frozenset(keys)))
    return out
