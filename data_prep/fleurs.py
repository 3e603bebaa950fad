"""FLEURS (google/fleurs) -> per-language WebDataset shards.

Layout (the TSVs and unpacked audio archives of the release):
  <root>/<lang_code>/{train,dev,test}.tsv      no header; columns: id, file_name, raw_transcription, transcription,
                                               phonemes/words, num_samples, gender
  <root>/<lang_code>/audio/<split>/<file_name> 16 kHz wav
`id` is the FLORES sentence id, shared by every speaker's recording of it; sample ids come from `file_name`.
Language codes become ISO 639-1: en_us -> en, de_de -> de, cmn_hans_cn -> zh, yue_hant_hk -> yue.
The transcript is `raw_transcription` (cased, punctuated); --text normalized takes `transcription` instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

from data_prep.common import OUTPUT_HELP, Item, add_common_args
from data_prep.manifest import (
    add_selection_args,
    drop_duplicate_ids,
    folders_with,
    iso639_1,
    make_record,
    sanitize_id,
    write_selected,
)

SPLITS = ("train", "dev", "test")
SOURCE = "fleurs"
MIN_COLUMNS = 4  # id, file_name, raw_transcription, transcription (the release has 7)

EXAMPLES = """\
examples:
  python -m data_prep.fleurs --root fleurs --lang-codes en_us,de_de,cmn_hans_cn --split train --out shards/fleurs_train
  python -m data_prep.fleurs --root fleurs --split test --text normalized --out shards/fleurs_test --workers 8
"""


def lang_code_items(root: Path, lang_code: str, split: str, text: str = "raw") -> list[Item]:
    """Items of `<root>/<lang_code>/<split>.tsv`."""
    tsv = root / lang_code / f"{split}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"no {split}.tsv for {lang_code}: {tsv}")
    audio_dir = root / lang_code / "audio" / split
    language = iso639_1(lang_code)
    column = 2 if text == "raw" else 3
    items = []
    with open(tsv, encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < MIN_COLUMNS:
                raise ValueError(f"{tsv}:{line_no}: expected 7 tab-separated columns, found {len(cols)}")
            file_name = cols[1].strip()
            if not file_name:
                raise ValueError(f"{tsv}:{line_no}: missing field 'file_name'")
            key = sanitize_id(f"fleurs_{lang_code}_{PurePosixPath(file_name).stem}")
            rec = make_record(key, language, cols[column], SOURCE)
            items.append(Item(record=rec, audio_path=str(audio_dir / file_name)))
    return items



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OUTPUT_HELP + EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--root", type=Path, required=True, help="directory holding one folder per language code")
    parser.add_argument("--lang-codes", default="", help="comma-separated codes, e.g. en_us,de_de (default: all)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--text", default="raw", choices=("raw", "normalized"),
                        help="raw_transcription (default) or the normalized transcription")
    add_selection_args(parser)
    args = parser.parse_args(argv)
    try:
        codes = [x.strip() for x in args.lang_codes.split(",") if x.strip()]
        codes = codes or folders_with(args.root, f"{args.split}.tsv")
        if not codes:
            raise FileNotFoundError(f"no <lang_code>/{args.split}.tsv under {args.root}")
        items = [item for code in codes for item in lang_code_items(args.root, code, args.split, args.text)]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = {"source": SOURCE, "split": args.split, "lang_codes": codes}
    write_selected(drop_duplicate_ids(items), args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
