"""Synthetic multilingual speech corpus: FLORES-200 / NTREX-128 sentences spoken by espeak-ng.

Transcripts and translations are real (multi-way aligned human translations); only the voice is synthetic.
Splits written under --out:
  train/  FLORES-200 dev + NTREX-128 sentences, speech, with translations into every other language; optionally
          short Tatoeba sentences, speech, with their English translation
  eval/   FLORES-200 devtest sentences, speech (held out: never used for training or the tokenizer)
  text/   Tatoeba sentence pairs, text only (for the `mt` and `text` tasks)
  tokenizer_text.txt  the training-side text, for training the tiny default's tokenizer
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from data_prep.common import Item, add_common_args, build_shards
from data_prep.text_sources import (
    ESPEAK_VOICES,
    default_shared_dir,
    flores_lines,
    ntrex_lines,
    tatoeba_pairs,
)

# ja works too, but espeak-ng reads most kanji letter by letter, so clips run long.
DEFAULT_LANGUAGES = "en,de,fr,es,it,pt,ru,zh"
VOICE_VARIANTS = ["", "+m1", "+m3", "+f1", "+f2", "+f4"]

EXAMPLES = """\
input: the shared data folder (--shared, default $PART_SHARED_DATA or ../shared/data beside the repository) with
flores200/flores200_all_204langs.tar.xz, ntrex128/<code>.txt and tatoeba/eng-<code>.*; espeak-ng on PATH.
Each split gets its own per-language WebDataset shards and index.json (docs/data.md describes the format).
Exit status 2 when espeak-ng is missing; a missing text file stops it with an error naming the file.

examples:
  python -m data_prep.synthetic --out cache/corpus --languages en,de,es,zh --ntrex-per-language 500 \\
      --tatoeba-speech-per-language 2000 --eval-per-language 130 --text-per-language 3000 --max-duration 20
  python -m data_prep.synthetic --out /tmp/small --languages en,de --train-per-language 50 --eval-per-language 10
"""


def tts_args(lang: str, rng: random.Random) -> list[str]:
    """A voice per sample: language voice, a speaker variant and a speaking rate, for acoustic variety."""
    voice = ESPEAK_VOICES.get(lang, lang) + rng.choice(VOICE_VARIANTS)
    return ["-v", voice, "-s", str(rng.randint(140, 190))]


def speech_items(
    sentences: dict[str, list[str]], languages: list[str], prefix: str, source: str, limit: int, seed: int
) -> list[Item]:
    """One item per (line, language) with the aligned lines of the other languages as translations."""
    rng = random.Random(seed)
    n_lines = min(len(v) for v in sentences.values())
    lines = list(range(n_lines))[:limit] if limit > 0 else list(range(n_lines))
    items = []
    for i in lines:
        for lang in languages:
            text = sentences[lang][i].strip()
            record = {
                "id": f"{prefix}-{lang}-{i:05d}",
                "language": lang,
                "duration": 0.0,
                "transcript": text,
                "translations": {o: sentences[o][i].strip() for o in languages if o != lang},
                "source": source,
            }
            items.append(Item(record=record, tts_args=tts_args(lang, rng)))
    rng.shuffle(items)  # shards hold a shuffled order, so a stream of them is already mixed
    return items


def tatoeba_speech_items(shared: Path, languages: list[str], skip: int, limit: int, seed: int) -> list[Item]:
    """Short spoken sentences: the non-English side of Tatoeba pairs (translation: its English side), and for
    English the English sides of every pair file (translation: the other side). Lines `[skip, skip + limit)` of
    each pair file, so they do not repeat the text-only split's first `skip` pairs."""
    rng = random.Random(seed)
    pairs = {lang: tatoeba_pairs(shared, lang)[skip : skip + limit] for lang in languages if lang != "en"}
    items = []
    for lang, lang_pairs in pairs.items():
        for i, (eng, other) in enumerate(lang_pairs):
            record = {"id": f"tatoeba-speech-{lang}-{i:05d}", "language": lang, "duration": 0.0,
                      "transcript": other.strip(), "translations": {"en": eng.strip()}, "source": "tatoeba+espeak-ng"}
            items.append(Item(record=record, tts_args=tts_args(lang, rng)))
    if "en" in languages:
        seen: set[str] = set()
        english = []  # round-robin over the pair files, so every file's English side contributes
        for row in zip(*pairs.values()):
            for lang, (eng, other) in zip(pairs, row):
                if eng.strip() not in seen:
                    seen.add(eng.strip())
                    english.append((lang, eng.strip(), other.strip()))
        for i, (lang, eng, other) in enumerate(english[:limit]):
            record = {"id": f"tatoeba-speech-en-{i:05d}", "language": "en", "duration": 0.0, "transcript": eng,
                      "translations": {lang: other}, "source": "tatoeba+espeak-ng"}
            items.append(Item(record=record, tts_args=tts_args("en", rng)))
    rng.shuffle(items)
    return items


def text_items(shared: Path, languages: list[str], limit: int, seed: int) -> list[Item]:
    items = []
    for lang in languages:
        pairs = tatoeba_pairs(shared, lang)[: limit if limit > 0 else None]
        for i, (eng, other) in enumerate(pairs):
            for src, tgt, src_text, tgt_text in (("en", lang, eng, other), (lang, "en", other, eng)):
                if "en" not in languages:
                    continue
                items.append(Item(record={
                    "id": f"tatoeba-{lang}-{src}-{i:05d}", "language": src, "duration": 0.0,
                    "transcript": src_text.strip(), "translations": {tgt: tgt_text.strip()}, "source": "tatoeba",
                }))
    random.Random(seed).shuffle(items)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--shared", type=Path, default=default_shared_dir(), help="the shared data directory")
    parser.add_argument("--languages", default=DEFAULT_LANGUAGES, help="comma-separated ISO 639-1 codes")
    parser.add_argument("--train-per-language", type=int, default=997, help="FLORES dev lines per language")
    parser.add_argument("--ntrex-per-language", type=int, default=0, help="NTREX lines per language (0: none)")
    parser.add_argument("--tatoeba-speech-per-language", type=int, default=0,
                        help="short Tatoeba sentences spoken per language (0: none); taken after the text split's")
    parser.add_argument("--eval-per-language", type=int, default=100, help="FLORES devtest lines per language")
    parser.add_argument("--text-per-language", type=int, default=2000, help="Tatoeba pairs per language")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence draws and the voices")
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("error: espeak-ng is not installed (Debian: apt-get install espeak-ng)", file=sys.stderr)
        return 2
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    out = Path(args.out)
    cache = out / ".cache"
    common = dict(workers=args.workers, max_bytes=int(args.shard_mb * 1024**2), max_samples=args.shard_samples,
                  max_duration=args.max_duration)

    train_sentences = {lang: flores_lines(args.shared, lang, "dev", cache) for lang in languages}
    train = speech_items(train_sentences, languages, "flores-dev", "flores200-dev+espeak-ng",
                         args.train_per_language, args.seed)
    tokenizer_text = [s for lang in languages for s in train_sentences[lang]]
    if args.ntrex_per_language > 0:
        ntrex = {lang: ntrex_lines(args.shared, lang) for lang in languages}
        train += speech_items(ntrex, languages, "ntrex", "ntrex128+espeak-ng", args.ntrex_per_language, args.seed + 1)
        tokenizer_text += [s for lang in languages for s in ntrex[lang][: args.ntrex_per_language]]
    if args.tatoeba_speech_per_language > 0:
        short = tatoeba_speech_items(args.shared, languages, args.text_per_language,
                                     args.tatoeba_speech_per_language, args.seed + 4)
        train += short
        tokenizer_text += [it.record["transcript"] for it in short]
        random.Random(args.seed + 5).shuffle(train)  # shards hold a shuffled order: short and long mixed
    build_shards(train, out / "train", total=len(train), **common)

    eval_sentences = {lang: flores_lines(args.shared, lang, "devtest", cache) for lang in languages}
    evals = speech_items(eval_sentences, languages, "flores-devtest", "flores200-devtest+espeak-ng",
                         args.eval_per_language, args.seed + 2)
    build_shards(evals, out / "eval", total=len(evals), **common)

    texts = text_items(args.shared, languages, args.text_per_language, args.seed + 3)
    if texts:
        build_shards(texts, out / "text", total=len(texts), **common)
        tokenizer_text += [it.record["transcript"] for it in texts]
    (out / "tokenizer_text.txt").write_text("\n".join(tokenizer_text) + "\n", encoding="utf-8")
    print(f"corpus written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
