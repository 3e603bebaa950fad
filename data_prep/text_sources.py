"""Readers for the parallel text shipped in `../shared/data`: FLORES-200, NTREX-128, Tatoeba.

FLORES is shipped as a tar.xz and is unpacked on demand into a cache directory (never committed).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

# ISO 639-1 (what records and prompts use) -> FLORES-200 / NTREX / Tatoeba file codes.
FLORES_CODES = {
    "en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "es": "spa_Latn", "it": "ita_Latn",
    "pt": "por_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans", "ja": "jpn_Jpan", "ko": "kor_Hang",
    "nl": "nld_Latn", "pl": "pol_Latn", "tr": "tur_Latn", "ar": "arb_Arab", "hi": "hin_Deva",
    "vi": "vie_Latn", "uk": "ukr_Cyrl", "yue": "yue_Hant",
}
NTREX_CODES = {
    "en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por", "ru": "rus",
    "zh": "zho_Hans", "ja": "jpn", "ko": "kor", "nl": "nld", "pl": "pol", "tr": "tur", "ar": "arb",
    "hi": "hin", "vi": "vie", "uk": "ukr", "yue": "yue",
}
TATOEBA_CODES = {"de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por", "ru": "rus",
                 "zh": "zho", "ja": "jpn", "ko": "kor", "nl": "nld"}
# espeak-ng voice per language. Mandarin: `cmn-latn-pinyin`, not `cmn`: espeak-ng 1.51's `cmn` ("latin as
# English") turns hanzi into pinyin with tone digits and then reads the digits as English numbers ("ta one mei two
# you three ...", all on one tone; Whisper transcribes such clips as strings of digits). The pinyin voice speaks
# the syllables with their tones; it reads Latin letters inside a Chinese sentence (a name, "802.11n") as pinyin.
ESPEAK_VOICES = {"zh": "cmn-latn-pinyin", "yue": "yue"}


def default_shared_dir() -> Path:
    """`$PART_SHARED_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get("PART_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def flores_lines(shared: Path, lang: str, split: str, cache: Path) -> list[str]:
    """Lines of FLORES-200 `split` (dev|devtest) for `lang`, unpacking the archive member into `cache`."""
    if lang not in FLORES_CODES:
        raise ValueError(f"no FLORES-200 code known for language '{lang}' (known: {sorted(FLORES_CODES)})")
    member = f"flores200_dataset/{split}/{FLORES_CODES[lang]}.{split}"
    target = cache / member
    if not target.exists():
        archive = shared / "flores200" / "flores200_all_204langs.tar.xz"
        if not archive.exists():
            raise FileNotFoundError(f"FLORES-200 archive not found: {archive}")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extract(member, cache, filter="data")
    return target.read_text(encoding="utf-8").splitlines()


def ntrex_lines(shared: Path, lang: str) -> list[str]:
    path = shared / "ntrex128" / f"{NTREX_CODES[lang]}.txt"
    if not path.exists():
        raise FileNotFoundError(f"NTREX-128 file for '{lang}' not found: {path}")
    return path.read_text(encoding="utf-8").splitlines()


# Tatoeba's zho file mixes varieties and scripts; its .labels file names each line's. Only these are kept.
TATOEBA_KEEP_LABELS = {"zh": {"cmn_Hans"}}


def tatoeba_pairs(shared: Path, lang: str) -> list[tuple[str, str]]:
    """(english, lang) sentence pairs from the Tatoeba test set; empty when not shipped."""
    code = TATOEBA_CODES.get(lang)
    if code is None:
        return []
    eng = shared / "tatoeba" / f"eng-{code}.eng"
    other = shared / "tatoeba" / f"eng-{code}.{code}"
    if not eng.exists():
        return []
    pairs = list(zip(eng.read_text(encoding="utf-8").splitlines(), other.read_text(encoding="utf-8").splitlines()))
    keep = TATOEBA_KEEP_LABELS.get(lang)
    labels = shared / "tatoeba" / f"eng-{code}.{code}.labels"
    if keep and labels.exists():
        names = [line.split("\t")[0].strip() for line in labels.read_text(encoding="utf-8").splitlines()]
        pairs = [p for p, name in zip(pairs, names) if name in keep]
    return pairs
