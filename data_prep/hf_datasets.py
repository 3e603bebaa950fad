"""Hugging Face `datasets` with an audio column (save_to_disk folders or parquet files) -> per-language shards.

Inputs (--input, one or more), read offline through the `datasets` library:
  a folder written by Dataset.save_to_disk (state.json, data-*.arrow), or by DatasetDict.save_to_disk
    (dataset_dict.json and a folder per split; --split picks splits, default all of them)
  a .parquet file, or a folder of them (searched recursively, e.g. a hub snapshot's data/train-00000-of-00002.parquet)
    Parquet is converted to Arrow in --cache-dir (default: a temporary folder in --out, removed at the end).
Columns (the defaults are the names hub datasets use):
  --audio-column (audio)  an `Audio` feature as stored: {bytes, path} (the encoded file, or a path only); a plain
      path string; or decoded {array, sampling_rate}. Any format soundfile reads, any sample rate and channel count:
      mixed to mono and resampled to 16 kHz, as every builder does (the library's own decoder is not used, so
      torchcodec is not needed). A path is absolute, or relative to --audio-root (default: the input's folder).
  --text-column (the first of text, sentence, transcription)  the transcript
  --language-column (the first of language, locale)  ISO 639 codes or tags (de, zh-CN) or English names (German);
      --language is the language of rows without one, or of every row when there is no such column
  --id-column  sample ids (default: made from the audio's path, else <input name>_<row>)
  translations: columns named `translation_<lang>`, and --translation-column LANG=COLUMN (e.g. en=translation for
      CoVoST 2)
A row is named `<input>:row <index>` (0-based, as dataset[index] reads it). Bad rows (no text, no audio, an unknown
language, a missing file, a repeated id) are skipped, each named with its field, and counted in the summary at the
end (and in index.json); the command exits 2 when no sample survives.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.manifest import (
    BadRows,
    add_selection_args,
    id_from_audio,
    language_code,
    log_stderr,
    make_record,
    sanitize_id,
    write_selected,
)

SOURCE = "hf_datasets"
TEXT_COLUMNS = ("text", "sentence", "transcription")
LANGUAGE_COLUMNS = ("language", "locale")
BATCH = 4096  # rows of the text columns read at a time


@dataclass
class Input:
    label: str  # how rows are named: <label>:row <index>
    dataset: object  # datasets.Dataset
    base: Path  # where relative audio paths start

EXAMPLES = """\
examples:
  python -m data_prep.hf_datasets --input fleurs_de/train --out shards/fleurs_hf --language-column '' --language de
  python -m data_prep.hf_datasets --input cv_de/data --text-column sentence --out shards/cv_de
"""


def _datasets():
    """The `datasets` library, offline, its log quiet (its progress bars show the parquet conversion)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    return datasets


def open_inputs(paths: list[Path], splits: list[str], cache_dir: Path) -> list[Input]:
    """Datasets of save_to_disk folders (the chosen splits of a DatasetDict) and of parquet files."""
    datasets = _datasets()
    inputs = []
    for path in paths:
        if (path / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(path))
            missing = [s for s in splits if s not in saved]
            if missing:
                raise ValueError(f"{path}: no split {', '.join(missing)} (it has {', '.join(saved)})")
            inputs += [Input(f"{path}/{s}", saved[s], path) for s in (splits or list(saved))]
        elif (path / "state.json").is_file():
            inputs.append(Input(str(path), datasets.load_from_disk(str(path)), path))
        elif path.is_dir() or path.suffix == ".parquet":
            files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
            if not files:
                raise FileNotFoundError(f"{path}: neither a save_to_disk folder nor a folder of .parquet files")
            for file in files:
                try:
                    dataset = datasets.Dataset.from_parquet(str(file), cache_dir=str(cache_dir))
                except Exception as exc:  # pyarrow's and the library's errors alike mean "not readable parquet"
                    raise ValueError(f"{file}: cannot read it as parquet: {exc}") from exc
                inputs.append(Input(str(file), dataset, file.parent))
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        else:
            raise ValueError(f"{path}: neither a save_to_disk folder nor a .parquet file")
    return inputs


def audio_kind(feature: object, where: str) -> str:
    """How a column stores audio: 'encoded' ({bytes, path}: an Audio feature or a plain struct), 'path' (a string)
    or 'array' ({array, sampling_rate})."""
    datasets = _datasets()
    if isinstance(feature, datasets.Audio):
        return "encoded"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return "encoded"
    if isinstance(feature, dict) and {"array", "sampling_rate"} <= set(feature):
        return "array"
    raise ValueError(f"{where}: the column is {feature}, not audio (an Audio feature, a path, or array/sampling_rate)")


def audio_refs(dataset, column: str, kind: str) -> Iterator[tuple[str | None, bool]]:
    """(path, holds the audio itself) per row, read from the Arrow columns without reading the audio bytes."""
    for chunk in dataset.data.column(column).chunks:
        if kind == "path":
            yield from ((p, False) for p in chunk.to_pylist())
            continue
        valid = chunk.is_valid().to_pylist()
        data = chunk.field("bytes" if kind == "encoded" else "array").is_valid().to_pylist()
        names = {chunk.type.field(i).name for i in range(chunk.type.num_fields)}
        paths = chunk.field("path").to_pylist() if "path" in names else [None] * len(chunk)
        for ok, held, path in zip(valid, data, paths):
            yield (path if ok else None), bool(ok and held)


def _pick(columns: list[str], given: str | None, defaults: tuple[str, ...], what: str, label: str) -> str | None:
    """The column `given` (it must exist; '' means none), else the first of `defaults` the dataset has."""
    if given is not None:
        if given and given not in columns:
            raise ValueError(f"{label}: no {what} column '{given}' (columns: {', '.join(columns)})")
        return given or None
    return next((c for c in defaults if c in columns), None)


def _wav(array: object, sampling_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(array, dtype=np.float32).T, int(sampling_rate), format="WAV", subtype="FLOAT")
    return buf.getvalue()


class DatasetReader:
    """Rows of the inputs -> items whose audio is fetched (`load`) only when build_shards converts them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.bad = BadRows()
        self.refs: dict[str, tuple[int, int]] = {}  # sample id -> (input, row)
        self.inputs: list[Input] = []
        self.audio: list[tuple[object, str, str]] = []  # per input: the audio column's dataset, name, kind
        self.first_seen: dict[str, str] = {}
        self.translation_columns = dict(self._translation_flag(v) for v in args.translation_column)
        self.default_language = language_code(args.language) if args.language else None

    @staticmethod
    def _translation_flag(value: str) -> tuple[str, str]:
        lang, sep, column = value.partition("=")
        if not sep or not lang.strip() or not column.strip():
            raise ValueError(f"--translation-column {value!r}: expected LANG=COLUMN, e.g. en=translation")
        return language_code(lang), column.strip()

    def read(self, source: Input) -> list[Item]:
        args, ds = self.args, source.dataset
        columns = list(ds.column_names)
        audio = _pick(columns, args.audio_column, (), "audio", source.label)
        text = _pick(columns, args.text_column, TEXT_COLUMNS, "text", source.label)
        language = _pick(columns, args.language_column, LANGUAGE_COLUMNS, "language", source.label)
        id_column = _pick(columns, args.id_column, (), "id", source.label)
        if text is None:
            raise ValueError(f"{source.label}: no text column ({' or '.join(TEXT_COLUMNS)}; --text-column names one)")
        if language is None and self.default_language is None:
            raise ValueError(f"{source.label}: no language column ({' or '.join(LANGUAGE_COLUMNS)}); give "
                             "--language-column or --language")
        kind = audio_kind(ds.features[audio], f"{source.label}: column '{audio}'")
        translations = {k[len("translation_"):]: k for k in columns if k.startswith("translation_")}
        try:
            translations = {language_code(k): v for k, v in translations.items()} | self.translation_columns
        except ValueError as exc:
            raise ValueError(f"{source.label}: {exc}") from None
        for lang, column in translations.items():
            if column not in columns:
                raise ValueError(f"{source.label}: no translation column '{column}' for {lang}")
        if kind == "encoded":
            audio_ds = ds.select_columns([audio]).cast_column(audio, _datasets().Audio(decode=False))
        else:
            audio_ds = ds.select_columns([audio])
        self.inputs.append(source)
        self.audio.append((audio_ds, audio, kind))
        log_stderr(f"{source.label}: {len(ds)} rows; columns: audio '{audio}' ({kind}), text '{text}', language "
                   f"{repr(language) if language else 'none (--language)'}")

        names = [c for c in dict.fromkeys([text, language, id_column, *translations.values()]) if c]
        refs = audio_refs(ds, audio, kind)
        items, row = [], 0
        for batch in ds.select_columns(names).iter(batch_size=BATCH):
            for values in zip(*(batch[c] for c in names)):
                fields = dict(zip(names, values))
                path, held = next(refs)
                item = self._item(source, row, fields, path, held, text, language, id_column, translations)
                if item is not None:
                    items.append(item)
                row += 1
        return items

    def _item(self, source: Input, row: int, fields: dict, path: str | None, held: bool, text: str,
              language: str | None, id_column: str | None, translations: dict[str, str]) -> Item | None:
        where = f"{source.label}:row {row}"
        transcript = fields[text]
        if not isinstance(transcript, str) or not transcript.strip():
            self.bad.skip(f"{where}: field '{text}': no transcript (empty, or not text)", "empty_transcript")
            return None
        lang_value = fields.get(language) if language else None
        if lang_value is None or not str(lang_value).strip():
            if self.default_language is None:
                self.bad.skip(f"{where}: field '{language}': no language (--language gives a default)")
                return None
            lang = self.default_language
        else:
            try:
                lang = language_code(lang_value)
            except ValueError as exc:
                self.bad.skip(f"{where}: field '{language}': {exc}")
                return None
        audio_field = self.audio[-1][1]
        if not held:
            if not path:
                self.bad.skip(f"{where}: field '{audio_field}': no audio (neither bytes nor a path)")
                return None
            file = Path(path) if Path(path).is_absolute() else (self.args.audio_root or source.base) / path
            if not file.is_file():
                self.bad.skip(f"{where}: field '{audio_field}': no such file {file}")
                return None
        if id_column and fields.get(id_column) is not None and str(fields[id_column]).strip():
            raw_id = str(fields[id_column])
        elif path:
            raw_id = id_from_audio(Path(path))
        else:
            raw_id = f"{Path(source.label).name}_{row:07d}"
        key = sanitize_id(raw_id)
        if key in self.first_seen:
            self.bad.skip(f"{where}: field '{id_column or audio_field}': duplicate id '{key}' (first at "
                          f"{self.first_seen[key]})")
            return None
        self.first_seen[key] = where
        texts = {lang_: fields[column] for lang_, column in translations.items()
                 if isinstance(fields[column], str) and lang_ != lang}
        record = make_record(key, lang, transcript, self.args.source, texts)
        self.refs[key] = (len(self.inputs) - 1, row)
        return Item(record=record)

    def load(self, item: Item) -> Item:
        """The item with its audio: the encoded bytes, a path, or WAV bytes of a decoded array."""
        index, row = self.refs[item.record["id"]]
        audio_ds, column, kind = self.audio[index]
        value = audio_ds[row][column]
        if kind == "path":
            path = value
        elif kind == "array":
            return Item(record=item.record, audio_path=_wav(value["array"], value["sampling_rate"]))
        elif value.get("bytes"):
            return Item(record=item.record, audio_path=value["bytes"])
        else:
            path = value["path"]
        base = self.args.audio_root or self.inputs[index].base
        return Item(record=item.record, audio_path=str(path if Path(path).is_absolute() else base / path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--input", nargs="+", required=True, type=Path,
                        help="save_to_disk folders, .parquet files or folders of them")
    parser.add_argument("--split", default="", help="comma-separated splits of a DatasetDict (default: all)")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--text-column", help=f"default: the first of {', '.join(TEXT_COLUMNS)}")
    parser.add_argument("--language-column", help=f"default: the first of {', '.join(LANGUAGE_COLUMNS)}; '' for none")
    parser.add_argument("--language", help="language of rows without one (e.g. de, zh-CN, German)")
    parser.add_argument("--id-column", help="sample ids (default: made from the audio's path)")
    parser.add_argument("--translation-column", action="append", default=[], metavar="LANG=COLUMN",
                        help="a column holding translations into LANG (repeatable)")
    parser.add_argument("--audio-root", type=Path, help="relative audio paths start here (default: the input's folder)")
    parser.add_argument("--cache-dir", type=Path, help="where parquet is converted to Arrow (default: a temporary "
                        "folder in --out, removed at the end)")
    parser.add_argument("--source", default=SOURCE, help="the records' `source`")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix=".parquet_cache_", dir=args.out))
    try:
        try:
            reader = DatasetReader(args)
            items = [item for source in open_inputs(args.input, splits, cache_dir) for item in reader.read(source)]
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _datasets().disable_progress_bars()  # row fetches during the build are not to draw bars over its progress
        write_selected(items, args, {"source": args.source}, skipped=dict(reader.bad.counts), load=reader.load)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
