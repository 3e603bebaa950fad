"""Common Voice release -> per-language WebDataset shards.

Layout (as unpacked from a release, e.g. cv-corpus-17.0-2024-03-15/):
  <root>/<locale>/{validated,train,dev,test}.tsv   header: client_id, path, [sentence_id,] sentence, [sentence_domain,]
                                                   up_votes, down_votes, age, gender, accents, variant, locale, segment
  <root>/<locale>/clips/<path>                     mp3 clips
The TSVs are unquoted (a sentence may hold '"'). Locales become ISO 639-1 codes: zh-CN -> zh, sv-SE -> sv, pt -> pt,
zh-HK -> yue (Cantonese); codes without an ISO 639-1 form (e.g. kab, cnh) are kept.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path, PurePosixPath

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.manifest import (
    add_selection_args,
    drop_duplicate_ids,
    folders_with,
    iso639_1,
    make_record,
    read_tsv,
    sanitize_id,
    write_selected,
)

SPLITS = ("train", "dev", "test", "validated")
SENTENCE_COLUMNS = ("sentence", "text")  # `text` in a few derived releases
SOURCE = "common_voice"

EXAMPLES = """\
examples:
  python -m data_prep.common_voice --root cv-corpus-17.0-2024-03-15 --locales de,zh-CN --split train \
      --out shards/cv_train --workers 8
  python -m data_prep.common_voice --root cv-corpus-17.0-2024-03-15 --locales de --split test --out shards/cv_test
"""


def clip_path(root: Path, locale: str, path: str) -> Path:
    """Where a TSV `path` lives; the oldest releases list clip names without the .mp3 suffix."""
    name = path.strip()
    if not PurePosixPath(name).suffix:
        name += ".mp3"
    return root / locale / "clips" / name


def locale_items(root: Path, locale: str, split: str) -> list[Item]:
    """Items of `<root>/<locale>/<split>.tsv`."""
    tsv = root / locale / f"{split}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"no {split}.tsv for locale {locale}: {tsv}")
    rows = read_tsv(tsv, required=("path", SENTENCE_COLUMNS), quoting=csv.QUOTE_NONE)
    language = iso639_1(locale)
    items = []
    for where, row in rows:
        if not row["path"].strip():
            raise ValueError(f"{where}: missing field 'path'")
        audio = clip_path(root, locale, row["path"])
        sentence = next(row[c] for c in SENTENCE_COLUMNS if c in row)
        rec = make_record(sanitize_id(PurePosixPath(audio.name).stem), language, sentence, SOURCE)
        items.append(Item(record=rec, audio_path=str(audio)))
    return items



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--root", type=Path, required=True, help="release directory holding one folder per locale")
    parser.add_argument("--locales", default="", help="comma-separated locales, e.g. de,zh-CN,sv-SE (default: all)")
    parser.add_argument("--split", default="train", choices=SPLITS, help="which TSV to convert")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    try:
        locales = [x.strip() for x in args.locales.split(",") if x.strip()]
        locales = locales or folders_with(args.root, f"{args.split}.tsv")
        if not locales:
            raise FileNotFoundError(f"no <locale>/{args.split}.tsv under {args.root}")
        items = [item for locale in locales for item in locale_items(args.root, locale, args.split)]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = {"source": SOURCE, "split": args.split, "locales": locales}
    write_selected(drop_duplicate_ids(items), args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
