"""CoVoST 2 speech translation -> per-language WebDataset shards with translations.

Inputs:
  <tsv_dir>/covost_v2.<src>_<tgt>.<split>.tsv   columns: path, sentence, translation, client_id (as written by
                                                CoVoST's get_covost_splits.py: unquoted, '\\'-escaped; quoted
                                                fields are read too)
  <cv_root>/<src>/clips/<path>                  the Common Voice clips (CoVoST 2 is built on Common Voice 4)
`src` and `tgt` are Common Voice locales (de, zh-CN, sv-SE, en, ...). A clip in several pairs (en_de, en_ja, ...)
becomes one sample with all its translations: {"de": ..., "ja": ...}. Languages become ISO 639-1 codes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.common_voice import clip_path
from data_prep.manifest import (
    add_selection_args,
    iso639_1,
    make_record,
    read_tsv,
    sanitize_id,
    write_selected,
)

SPLITS = ("train", "dev", "test")
SOURCE = "covost2"
_TSV_NAME = re.compile(r"^covost_v2\.(?P<src>[^._]+)_(?P<tgt>[^._]+)\.(?P<split>[^.]+)\.tsv$")

EXAMPLES = """\
examples:
  python -m data_prep.covost2 --tsv-dir covost_tsv --cv-root cv-corpus-4 --pairs de_en,zh-CN_en --split train \
      --out shards/covost_train --workers 8
"""


def tsv_path(tsv_dir: Path, pair: str, split: str) -> Path:
    return tsv_dir / f"covost_v2.{pair}.{split}.tsv"


def split_pair(pair: str) -> tuple[str, str]:
    """'de_en' -> ('de', 'en'); 'zh-CN_en' -> ('zh-CN', 'en')."""
    src, sep, tgt = pair.partition("_")
    if not sep or not src or not tgt or "_" in tgt:
        raise ValueError(f"bad pair {pair!r}: expected <src>_<tgt>, e.g. de_en or en_zh-CN")
    return src, tgt


def find_pairs(tsv_dir: Path, split: str) -> list[str]:
    found = (_TSV_NAME.match(p.name) for p in tsv_dir.iterdir())
    return sorted(f"{m['src']}_{m['tgt']}" for m in found if m and m["split"] == split)


def covost_items(tsv_dir: Path, cv_root: Path, pairs: list[str], split: str) -> list[Item]:
    """One item per source clip, with the translations of every pair that has it."""
    by_clip: dict[tuple[str, str], Item] = {}
    for pair in pairs:
        src, tgt = split_pair(pair)
        tsv = tsv_path(tsv_dir, pair, split)
        if not tsv.is_file():
            raise FileNotFoundError(f"no CoVoST 2 TSV for {pair} {split}: {tsv}")
        rows = read_tsv(tsv, required=("path", "sentence", "translation"), escapechar="\\")
        language, target = iso639_1(src), iso639_1(tgt)
        for where, row in rows:
            if not row["path"].strip():
                raise ValueError(f"{where}: missing field 'path'")
            audio = clip_path(cv_root, src, row["path"])
            item = by_clip.get((src, audio.name))
            if item is None:
                key = sanitize_id(PurePosixPath(audio.name).stem)
                item = Item(record=make_record(key, language, row["sentence"], SOURCE), audio_path=str(audio))
                by_clip[(src, audio.name)] = item
            if row["translation"].strip():
                item.record["translations"][target] = row["translation"].strip()
    return list(by_clip.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--tsv-dir", type=Path, required=True, help="directory of covost_v2.<src>_<tgt>.<split>.tsv")
    parser.add_argument("--cv-root", type=Path, required=True, help="Common Voice release (<locale>/clips/...)")
    parser.add_argument("--pairs", default="", help="comma-separated pairs, e.g. de_en,fr_en,en_de (default: all)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    add_selection_args(parser)
    args = parser.parse_args(argv)
    try:
        pairs = [x.strip() for x in args.pairs.split(",") if x.strip()] or find_pairs(args.tsv_dir, args.split)
        if not pairs:
            raise FileNotFoundError(f"no covost_v2.*.{args.split}.tsv in {args.tsv_dir}")
        items = covost_items(args.tsv_dir, args.cv_root, pairs, args.split)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = {"source": SOURCE, "split": args.split, "pairs": pairs}
    write_selected(items, args, extra, "note: CoVoST 2 uses Common Voice 4 clips; a newer release may lack some")
    return 0


if __name__ == "__main__":
    sys.exit(main())
