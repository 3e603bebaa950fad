"""Evaluation metrics: text normalisation, WER/CER, BLEU and result tables. Knows nothing of models or torch.

Conventions
- ASR is scored with WER on normalised text, except for `CER_LANGUAGES` (no word spacing), which use CER on the
  normalised text with every whitespace character removed. Rates are corpus-level: total edits / total reference
  units, in percent. The normaliser is one of `NORMALIZERS` (`normalize`): 'part' (`normalize_text`) or
  'whisper' (`whisper_normalize`, Whisper's own, for numbers comparable with published ones).
- S2TT / MT are scored with corpus BLEU (sacrebleu) on the raw, cased text, with a tokenizer chosen from the
  target language (`bleu_tokenizer`); every BLEU row carries sacrebleu's signature.
- Every scoring function returns a plain dict with at least {"metric", "value", "n"} so its output, plus the
  task and language keys, can go straight into `results_table` / `compare_table`.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import cache

import jiwer
import numpy as np
from numpy.typing import ArrayLike
from sacrebleu.metrics import BLEU

from part.config import NORMALIZERS, EvalConfig

DEFAULT_NORMALIZER = EvalConfig.normalizer
NORMALIZER_DESCRIPTIONS = {
    "part": "the project's Whisper-style basic normaliser (NFKC, lowercase, bracketed spans dropped, punctuation "
            "and symbols to spaces; combining marks kept, in-word apostrophes kept for en/fr/it)",
    "whisper": "Whisper's normalisers as transformers ships them: EnglishTextNormalizer for English (numbers to "
               "digits, contractions and titles spelled out, fillers dropped; British spellings not mapped), "
               "BasicTextNormalizer for every other language (combining marks become spaces)",
}
# Whisper's British -> American spelling list (english.json in the openai-whisper package, normalizer.json beside
# a Hugging Face Whisper tokenizer) ships with no installed package, and nothing is downloaded: no spelling is mapped.
ENGLISH_SPELLINGS: dict[str, str] = {}

CER_LANGUAGES = {"zh", "ja", "ko", "yue", "th"}
# Languages whose in-word apostrophes are part of the word ("don't", "l'homme", "dell'anno").
APOSTROPHE_LANGUAGES = {"en", "fr", "it"}
# Languages whose scripts do not separate words by spaces: spaces between two such characters are removed.
# Korean is deliberately absent: it writes spaces between words, and its CER ignores all spaces anyway.
_NO_SPACE_LANGUAGES = {"zh", "ja", "yue", "th"}

_BRACKETS = re.compile(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)|\{[^}]*\}")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_ZERO_WIDTH = str.maketrans({"\u200b": None, "\ufeff": None})
_WHITESPACE = re.compile(r"\s+")
# Han (incl. extensions and compatibility ideographs), kana, CJK iteration/closing marks, Thai.
_NO_SPACE_CHARS = (
    "\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002ebef\U0002f800-\U0002fa1f\u0e00-\u0e7f"
)
_SPACE_BETWEEN_NO_SPACE_CHARS = re.compile(f"(?<=[{_NO_SPACE_CHARS}])\\s+(?=[{_NO_SPACE_CHARS}])")


def base_language(language: str) -> str:
    """'zh-CN' / 'zh_cn' / 'ZH' -> 'zh'."""
    return re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]


def _replace_symbols(text: str, keep_inword_apostrophe: bool) -> str:
    """Replace punctuation (P*) and symbols (S*) with spaces; optionally keep an apostrophe between two letters.

    Combining marks (M*) are kept, unlike Whisper's BasicTextNormalizer: turning them into spaces destroys words
    in Thai and Indic scripts (vowel signs, viramas), and after NFKC Latin accents are precomposed anyway.
    """
    out = []
    last = len(text) - 1
    for i, char in enumerate(text):
        if char == "'" and keep_inword_apostrophe and 0 < i < last and text[i - 1].isalpha() and text[i + 1].isalpha():
            out.append(char)
        elif unicodedata.category(char)[0] in "PS":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def normalize_text(text: str, language: str) -> str:
    """The 'part' normaliser: Whisper-style basic normalisation plus a few per-language rules, applied identically
    to refs and hyps.

    Steps: NFKC (full-width -> half-width, compatibility forms), lowercase (`str.lower`, so German ß is kept;
    Turkish/Azerbaijani dotted and dotless I are mapped first), drop [..], <..>, (..), {..} spans (noise tags,
    speaker labels), drop zero-width spaces, replace punctuation and symbols with spaces (apostrophes inside words
    are kept for `APOSTROPHE_LANGUAGES`; curly apostrophes count as "'"), collapse whitespace, and for
    zh/ja/yue/th remove spaces between two Han/kana/Thai characters. Korean keeps its word spacing.
    """
    lang = base_language(language)
    text = unicodedata.normalize("NFKC", text)
    if lang in {"tr", "az"}:
        text = text.replace("İ", "i").replace("I", "ı")
    text = text.lower()
    text = _BRACKETS.sub(" ", text)
    text = text.translate(_ZERO_WIDTH)
    keep_apostrophe = lang in APOSTROPHE_LANGUAGES
    if keep_apostrophe:
        text = text.translate(_APOSTROPHES)
    text = _replace_symbols(text, keep_apostrophe)
    text = _WHITESPACE.sub(" ", text).strip()
    if lang in _NO_SPACE_LANGUAGES:
        text = _SPACE_BETWEEN_NO_SPACE_CHARS.sub("", text)
    return text


@cache
def _whisper_normalizers() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(English, every other language): transformers' copies of Whisper's normalisers, as Whisper's own evaluation
    builds them (BasicTextNormalizer() keeps diacritics; its remove_symbols turns combining marks into spaces)."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer(ENGLISH_SPELLINGS), BasicTextNormalizer()


def whisper_normalize(text: str, language: str) -> str:
    """Whisper's normalisation: EnglishTextNormalizer for English ("Mr. Smith's TV cost twenty-five dollars" ->
    "mister smith is tv cost $25"), BasicTextNormalizer for the rest; leading and trailing spaces stripped (WER
    ignores them; an all-noise reference then counts as empty)."""
    english, basic = _whisper_normalizers()
    return (english if base_language(language) == "en" else basic)(text).strip()


def normalizers_from(first: str) -> list[str]:
    """Every one of `NORMALIZERS`, `first` first: the columns of a table that leads with `first`'s rows."""
    _normalizer(first)
    return [first] + [name for name in NORMALIZERS if name != first]


def normalize(text: str, language: str, normalizer: str = DEFAULT_NORMALIZER) -> str:
    """`text` normalised for WER/CER by one of `NORMALIZERS`: 'part' (`normalize_text`) or 'whisper'
    (`whisper_normalize`)."""
    return _normalizer(normalizer)(text, language)


def _normalizer(name: str) -> Callable[[str, str], str]:
    if name == "part":
        return normalize_text
    if name == "whisper":
        return whisper_normalize
    raise ValueError(f"unknown normalizer {name!r} (known: {', '.join(NORMALIZERS)})")


def _scored_pairs(refs: list[str], hyps: list[str], language: str,
                  normalizer: str) -> tuple[bool, list[int], list[str], list[str]]:
    """(use_cer, kept indices, normalised refs, normalised hyps) of the pairs `error_rate` scores: those whose
    normalised reference is not empty. For CER every whitespace character is removed."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    lang = base_language(language)
    use_cer = lang in CER_LANGUAGES
    norm = _normalizer(normalizer)
    kept: list[int] = []
    kept_refs: list[str] = []
    kept_hyps: list[str] = []
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        norm_ref, norm_hyp = norm(ref, lang), norm(hyp or "", lang)
        if use_cer:
            norm_ref, norm_hyp = _WHITESPACE.sub("", norm_ref), _WHITESPACE.sub("", norm_hyp)
        if norm_ref:
            kept.append(i)
            kept_refs.append(norm_ref)
            kept_hyps.append(norm_hyp)
    return use_cer, kept, kept_refs, kept_hyps


def error_rate(refs: list[str], hyps: list[str], language: str, normalizer: str = DEFAULT_NORMALIZER) -> dict:
    """Corpus WER (or CER for `CER_LANGUAGES`) in percent on text normalised by `normalizer` (`normalize`).

    Pairs whose normalised reference is empty are skipped and counted in "skipped_empty". When nothing is left,
    "value" is None. Returned keys: metric, value, n, normalizer, errors, ref_units, substitutions, deletions,
    insertions, skipped_empty.
    """
    use_cer, _, kept_refs, kept_hyps = _scored_pairs(refs, hyps, language, normalizer)
    result = {
        "metric": "cer" if use_cer else "wer",
        "value": None,
        "normalizer": normalizer,
        "n": len(kept_refs),
        "errors": 0,
        "ref_units": 0,
        "substitutions": 0,
        "deletions": 0,
        "insertions": 0,
        "skipped_empty": len(refs) - len(kept_refs),
    }
    if not kept_refs:
        return result
    out = jiwer.process_characters(kept_refs, kept_hyps) if use_cer else jiwer.process_words(kept_refs, kept_hyps)
    errors = out.substitutions + out.deletions + out.insertions
    ref_units = out.hits + out.substitutions + out.deletions
    result.update(
        value=100.0 * errors / ref_units,
        errors=errors,
        ref_units=ref_units,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
    )
    return result


def error_counts(refs: list[str], hyps: list[str], language: str,
                 normalizer: str = DEFAULT_NORMALIZER) -> list[tuple[int, int]]:
    """Per-utterance (errors, reference units) of `error_rate`, (0, 0) for a pair it skips (empty normalised
    reference). They sum exactly to its corpus "errors" and "ref_units", so a resample's corpus rate is the ratio
    of the resampled sums (see part.evaluation.bootstrap)."""
    use_cer, kept, kept_refs, kept_hyps = _scored_pairs(refs, hyps, language, normalizer)
    counts = [(0, 0)] * len(refs)
    if not kept:
        return counts
    out = jiwer.process_characters(kept_refs, kept_hyps) if use_cer else jiwer.process_words(kept_refs, kept_hyps)
    # One alignment for the whole corpus, split per sentence: an edit chunk costs max(its ref span, its hyp span)
    # (a substitution spans both equally, a deletion only the reference, an insertion only the hypothesis).
    for i, chunks in zip(kept, out.alignments):
        errors = units = 0
        for c in chunks:
            ref_span, hyp_span = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            units += ref_span
            if c.type != "equal":
                errors += max(ref_span, hyp_span)
        counts[i] = (errors, units)
    return counts


_MECAB_TOKENIZERS = {
    "ja-mecab": ("tokenizer_ja_mecab", "TokenizerJaMecab", "日本語の文を分割します"),
    "ko-mecab": ("tokenizer_ko_mecab", "TokenizerKoMecab", "한국어 문장을 나눕니다"),
}


@cache
def mecab_tokenizer_available(name: str) -> bool:
    """True when sacrebleu's 'ja-mecab' / 'ko-mecab' tokenizer imports and tokenizes (mecab + dictionary installed)."""
    module_name, class_name, sample = _MECAB_TOKENIZERS[name]
    try:
        module = importlib.import_module(f"sacrebleu.tokenizers.{module_name}")
        return bool(getattr(module, class_name)()(sample).strip())
    except (ImportError, RuntimeError, AssertionError, OSError, ValueError):  # missing deps / wrong dictionary
        return False


def bleu_tokenizer(target_language: str) -> str:
    """sacrebleu tokenizer for a target language: zh/yue 'zh', ja 'ja-mecab', ko 'ko-mecab', th 'char', else '13a'.

    ja and ko fall back to 'char' when mecab (and its dictionary) is not installed; the choice is recorded in the
    BLEU signature, so scores from the two tokenizers are never silently mixed.
    """
    lang = base_language(target_language)
    if lang in {"zh", "yue"}:
        return "zh"
    if lang in {"ja", "ko"}:
        name = f"{lang}-mecab"
        return name if mecab_tokenizer_available(name) else "char"
    if lang == "th":
        return "char"
    return "13a"


def bleu(refs: list[str], hyps: list[str], target_language: str) -> dict:
    """Corpus BLEU (sacrebleu, default exp smoothing, one reference) on raw cased text.

    Returns metric, value (= score), score, tokenizer, n, signature, precisions, bp, sys_len, ref_len;
    value, score and signature are None for an empty corpus.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    tokenizer = bleu_tokenizer(target_language)
    metric = BLEU(tokenize=tokenizer)
    result = {
        "metric": "bleu",
        "value": None,
        "score": None,
        "tokenizer": tokenizer,
        "n": len(refs),
        "signature": None,
        "precisions": [],
        "bp": None,
        "sys_len": 0,
        "ref_len": 0,
    }
    if not refs:
        return result
    score = metric.corpus_score([h or "" for h in hyps], [list(refs)])
    result.update(
        value=score.score,
        score=score.score,
        signature=str(metric.get_signature()),
        precisions=list(score.precisions),
        bp=score.bp,
        sys_len=score.sys_len,
        ref_len=score.ref_len,
    )
    return result


def bleu_statistics(refs: list[str], hyps: list[str], target_language: str) -> list[list[int]]:
    """Per-sentence sufficient statistics of `bleu` (same tokenizer): [hyp_len, ref_len, matches of orders 1-4,
    n-gram totals of orders 1-4] per pair. Their column sums give the corpus score (`bleu_from_statistics`), so a
    resample's BLEU is exact without re-tokenizing. Uses sacrebleu's segment-statistics API, the one its own
    paired bootstrap uses."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return []
    metric = BLEU(tokenize=bleu_tokenizer(target_language))
    return [[int(x) for x in row] for row in metric._extract_corpus_statistics([h or "" for h in hyps], [list(refs)])]


@cache
def _bleu_scorer() -> BLEU:
    return BLEU()  # the score from statistics depends on the smoothing only (default exp), not on the tokenizer


def bleu_from_statistics(stats: ArrayLike) -> np.ndarray:
    """Corpus BLEU from summed `bleu_statistics` columns: [..., 10] -> [...], one score per row."""
    rows = np.rint(np.asarray(stats, dtype=np.float64)).astype(np.int64)  # sums of counts, possibly as floats
    scorer = _bleu_scorer()
    scores = [scorer._compute_score_from_stats([int(x) for x in row]).score for row in rows.reshape(-1, rows.shape[-1])]
    return np.asarray(scores, dtype=np.float64).reshape(rows.shape[:-1])


@dataclass
class EvalResult:
    """One row of results: a language (ASR) or a source→target direction (S2TT / MT) scored with one metric."""

    task: str
    metric: str
    value: float | None
    n: int
    language: str | None = None
    source: str | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if self.language is None and (self.source is None or self.target is None):
            raise ValueError(f"result for task {self.task!r} needs 'language' or both 'source' and 'target'")

    @property
    def key(self) -> str:
        """Row label: the language, or 'src→tgt'."""
        return self.language if self.language is not None else f"{self.source}→{self.target}"

    @classmethod
    def from_dict(cls, row: Mapping) -> EvalResult:
        """Build from a dict; extra keys (errors, signature, ...) are ignored."""
        return cls(
            task=row["task"],
            metric=row["metric"],
            value=row.get("value"),
            n=int(row.get("n", 0)),
            language=row.get("language"),
            source=row.get("source"),
            target=row.get("target"),
        )

    def to_dict(self) -> dict:
        """Plain dict without the unset language/source/target keys."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "value"}


Row = Mapping | EvalResult


def _as_results(rows: Iterable[Row]) -> list[EvalResult]:
    return [r if isinstance(r, EvalResult) else EvalResult.from_dict(r) for r in rows]


def _group(results: list[EvalResult]) -> dict[tuple[str, str], dict[str, EvalResult]]:
    """(task, metric) in first-seen order -> {key: result}; duplicate keys are an error."""
    groups: dict[tuple[str, str], dict[str, EvalResult]] = {}
    for r in results:
        group = groups.setdefault((r.task, r.metric), {})
        if r.key in group:
            raise ValueError(f"duplicate result for {r.task}/{r.metric}/{r.key}")
        group[r.key] = r
    return groups


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def results_table(results: list[Row]) -> tuple[str, dict]:
    """Markdown table and JSON-serialisable dict of results, with an unweighted "average" row per task/metric.

    Groups keep the order in which their (task, metric) first appears; rows inside a group are sorted by key. The
    average is the macro mean over rows whose value is not None (n is the sum of their n). The dict is
    {task: {metric: {key: {"value", "n"}, ..., "average": {"value", "n", "rows"}}}}.
    """
    lines = ["| task | metric | lang | value | n |", "|---|---|---|---:|---:|"]
    summary: dict = {}
    for (task, metric), group in _group(_as_results(results)).items():
        out = summary.setdefault(task, {}).setdefault(metric, {})
        for key in sorted(group):
            r = group[key]
            out[key] = {"value": r.value, "n": r.n}
            lines.append(f"| {task} | {metric} | {key} | {_fmt(r.value)} | {r.n} |")
        scored = [r for r in group.values() if r.value is not None]
        average = {"value": _mean([r.value for r in scored]), "n": sum(r.n for r in scored), "rows": len(scored)}
        out["average"] = average
        lines.append(f"| {task} | {metric} | average | {_fmt(average['value'])} | {average['n']} |")
    return "\n".join(lines), summary


def compare_table(named: dict[str, list[Row]]) -> str:
    """Side-by-side markdown table with one value column per system (e.g. {"part": rows, "baseline": rows}).

    A missing row shows "n/a". Each "average" row is taken over the keys every system has a value for, so the
    columns stay comparable; when that drops rows, a note under the table says so.
    """
    if not named:
        raise ValueError("compare_table needs at least one system")
    systems = list(named)
    grouped = {name: _group(_as_results(rows)) for name, rows in named.items()}
    order: list[tuple[str, str]] = []
    for groups in grouped.values():
        order.extend(g for g in groups if g not in order)
    lines = ["| task | metric | lang | " + " | ".join(systems) + " |", "|---|---|---|" + "---:|" * len(systems)]
    notes = []
    for task, metric in order:
        per_system = [grouped[s].get((task, metric), {}) for s in systems]
        keys = sorted(set().union(*per_system))
        for key in keys:
            cells = [_fmt(g[key].value if key in g else None) for g in per_system]
            lines.append(f"| {task} | {metric} | {key} | " + " | ".join(cells) + " |")
        shared = [k for k in keys if all(k in g and g[k].value is not None for g in per_system)]
        averages = [_fmt(_mean([g[k].value for k in shared])) for g in per_system]
        lines.append(f"| {task} | {metric} | average | " + " | ".join(averages) + " |")
        if len(shared) < len(keys):
            notes.append(f"{task}/{metric} average over the {len(shared)} of {len(keys)} rows every system has.")
    return "\n".join(lines + ([""] + [f"_{n}_" for n in notes] if notes else []))


def bleu_signature_line(rows: Iterable[Row]) -> str | None:
    """One line naming the sacrebleu signature of every scored BLEU row, the rows that share one listed after it
    ("`nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0` (de→en, zh→en)"); None without BLEU rows.
    A row without a "signature" key shows "signature not recorded"."""
    by_signature: dict[str, list[str]] = {}
    for row in rows:
        if isinstance(row, EvalResult) or row.get("metric") != "bleu" or row.get("value") is None:
            continue
        signature = f"`{row['signature']}`" if row.get("signature") else "signature not recorded"
        by_signature.setdefault(signature, []).append(EvalResult.from_dict(row).key)
    if not by_signature:
        return None
    parts = [f"{signature} ({', '.join(sorted(keys))})" for signature, keys in by_signature.items()]
    return "BLEU: sacrebleu corpus BLEU on the raw cased text, " + "; ".join(parts) + "."


def evaluation_report(by_normalizer: Mapping[str, list[Row]], primary: str) -> str:
    """The markdown of final.md: the normaliser of the rows, the rows scored with it (`results_table`), the BLEU
    signatures, and with more than one normaliser in `by_normalizer` ({normaliser: rows}) the WER/CER under each
    side by side (`compare_table`)."""
    rows = by_normalizer[primary]
    table, _ = results_table(rows)
    lines = [f"Normaliser of WER/CER: `{primary}`, {NORMALIZER_DESCRIPTIONS[primary]}.", "", table]
    if signatures := bleu_signature_line(rows):
        lines += ["", signatures]
    asr = {name: [r for r in _as_results(named) if r.task == "asr"] for name, named in by_normalizer.items()}
    if len(asr) > 1 and any(asr.values()):
        lines += ["", "### WER/CER under each normaliser", "", compare_table(asr), ""]
        lines += [f"- `{name}`: {NORMALIZER_DESCRIPTIONS[name]}" for name in asr if name != primary]
    return "\n".join(lines)
