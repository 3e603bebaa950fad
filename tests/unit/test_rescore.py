"""The evaluation's results files under both normalisers (part.evaluation.evaluator.write_evaluation), the
re-scoring command (`python -m part rescore`), eval.normalizer in the config and the model card.

Expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sacrebleu
from conftest import REPO, call_main, run

from part.cli import rescore
from part.config import ConfigError, EvalConfig, TrainConfig, load_config
from part.evaluation import metrics
from part.evaluation.evaluator import write_evaluation
from part.train.model_card import model_card

SIG_13A = f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
SIG_ZH = SIG_13A.replace("tok:13a", "tok:zh")


def record(key: str, task: str, lang: str, ref: str, hyp: str, target: str | None = None) -> dict:
    """A hypothesis record as the evaluator writes one (SampleMeta's fields and the hypothesis)."""
    return {"key": key, "task": task, "language": lang, "target_language": target, "reference": ref,
            "duration": 2.0, "hypothesis": hyp}


RECORDS = [
    # en1: part 6 errors / 8 words, whisper 3 / 7 (worked out in test_metrics.test_english_wer_under_each_normaliser)
    record("en1", "asr", "en", "Mr. Smith's colour TV cost twenty-five dollars", "mister smiths color tv cost $25"),
    # en2: part "don't stop" (2) vs "do not stop": don't -> do substituted, "not" inserted: 2 / 2;
    # whisper "do not stop" on both sides: 0 / 3. So en: part (6 + 2) / (8 + 2) = 80.00, whisper 3 / 10 = 30.00
    record("en2", "asr", "en", "Don't stop.", "do not stop"),
    # de: one wrong word of four under both: 25.00
    record("de1", "asr", "de", "Das ist ein Haus.", "das ist ein maus"),
    # zh: 今天天气很好 vs 今天天汽很好啊: 1 sub + 1 ins / 6 = 33.33 under both
    record("zh1", "asr", "zh", "今天天气很好", "今天 天汽，很好啊。"),
    # s2tt de→en: the hand-computed 53.73 of test_metrics; en→zh: 86.33
    record("de1", "s2tt", "de", "the cat sat on the mat", "the cat sat on a mat", "en"),
    record("en1", "s2tt", "en", "我们今天去公园散步", "我们今天去公园散心", "zh"),
]


def test_write_evaluation_scores_under_both_normalisers(tmp_path):
    rows, report = write_evaluation(tmp_path, "final", 7, RECORDS, "part")
    data = json.loads((tmp_path / "final.json").read_text())
    assert (data["step"], data["normalizer"]) == (7, "part")
    assert data["rows"] == rows and list(data["by_normalizer"]) == ["part", "whisper"]
    by_key = {n: {(r["task"], r.get("language") or f"{r['source']}→{r['target']}"): r for r in named}
              for n, named in data["by_normalizer"].items()}
    assert by_key["part"][("asr", "en")]["value"] == pytest.approx(80.0)
    assert by_key["whisper"][("asr", "en")]["value"] == pytest.approx(30.0)
    assert by_key["part"][("asr", "en")]["normalizer"] == "part"
    assert by_key["whisper"][("asr", "en")]["normalizer"] == "whisper"
    for n in ("part", "whisper"):
        assert by_key[n][("asr", "de")]["value"] == pytest.approx(25.0)
        assert by_key[n][("asr", "zh")]["metric"] == "cer"
        assert by_key[n][("asr", "zh")]["value"] == pytest.approx(100 / 3)
        de_en, en_zh = by_key[n][("s2tt", "de→en")], by_key[n][("s2tt", "en→zh")]
        assert de_en["value"] == pytest.approx(53.73, abs=0.01) and de_en["signature"] == SIG_13A
        assert en_zh["value"] == pytest.approx(86.33, abs=0.01) and en_zh["signature"] == SIG_ZH
        assert (de_en["tokenizer"], en_zh["tokenizer"]) == ("13a", "zh")
    assert data["table"]["asr"]["wer"]["en"] == {"value": pytest.approx(80.0), "n": 2}

    md = (tmp_path / "final.md").read_text()
    assert md == report + "\n"
    lines = md.splitlines()
    assert lines[0].startswith("Normaliser of WER/CER: `part`, the project's")
    assert "| asr | wer | en | 80.00 | 2 |" in lines
    assert f"BLEU: sacrebleu corpus BLEU on the raw cased text, `{SIG_13A}` (de→en); `{SIG_ZH}` (en→zh)." in lines
    # side by side: en 80.00 / 30.00; the WER average over de and en: (25 + 80) / 2, (25 + 30) / 2
    assert "| asr | wer | en | 80.00 | 30.00 |" in lines
    assert "| asr | wer | average | 52.50 | 27.50 |" in lines
    assert "| asr | cer | zh | 33.33 | 33.33 |" in lines
    saved = [json.loads(line) for line in (tmp_path / "final_hypotheses.jsonl").read_text().splitlines()]
    assert saved == RECORDS


def test_write_evaluation_led_by_whisper(tmp_path):
    rows, report = write_evaluation(tmp_path, "eval_step_3", 3, RECORDS, "whisper")
    assert {r.get("normalizer") for r in rows if r["task"] == "asr"} == {"whisper"}
    assert report.startswith("Normaliser of WER/CER: `whisper`")
    assert "| asr | wer | en | 30.00 | 2 |" in report.splitlines()
    assert "| task | metric | lang | whisper | part |" in report.splitlines()
    assert json.loads((tmp_path / "eval_step_3.json").read_text())["normalizer"] == "whisper"


# ---------------------------------------------------------------- python -m part rescore


def test_rescore_a_run_reprints_its_final_table(tmp_path, capsys):
    write_evaluation(tmp_path, "final", 7, RECORDS, "whisper")
    code, out, err = call_main(rescore.main, [str(tmp_path)], capsys)
    assert code == 0
    assert out == (tmp_path / "final.md").read_text()  # led by the normaliser final.json names
    assert f"6 utterances from {tmp_path / 'final_hypotheses.jsonl'}, normalisers: whisper, part" in err


def test_rescore_one_normaliser(tmp_path, capsys):
    write_evaluation(tmp_path, "eval_step_3", 3, RECORDS, "part")
    path = tmp_path / "eval_step_3_hypotheses.jsonl"
    code, out, _ = call_main(rescore.main, [str(path), "--normalizer", "whisper"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Normaliser of WER/CER: `whisper`")
    # the WER average over de (25.00, 1 utterance) and en (30.00, 2): 27.50 over 3 utterances
    assert "| asr | wer | en | 30.00 | 2 |" in lines and "| asr | wer | average | 27.50 | 3 |" in lines
    assert "under each normaliser" not in out
    assert f"`{SIG_13A}` (de→en)" in out
    # a hypotheses file without its results file beside it: `both` leads with the default normaliser
    alone = tmp_path / "copy.jsonl"
    alone.write_text(path.read_text())
    code, out, _ = call_main(rescore.main, [str(alone)], capsys)
    assert code == 0 and out.startswith(f"Normaliser of WER/CER: `{metrics.DEFAULT_NORMALIZER}`")
    assert "| asr | wer | en | 80.00 | 30.00 |" in out.splitlines()


def test_rescore_bad_input(tmp_path, capsys):
    code, _, err = call_main(rescore.main, [str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such run directory or hypotheses file" in err
    write_evaluation(tmp_path, "eval_step_3", 3, RECORDS, "part")
    code, _, err = call_main(rescore.main, [str(tmp_path)], capsys)
    assert code == 2 and "no final_hypotheses.jsonl (it has eval_step_3_hypotheses.jsonl: pass one of them)" in err
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(RECORDS[0])
    for text, message in [
        (good + "\n{oops\n", "bad.jsonl, line 2: not JSON"),
        (good + "\n" + json.dumps({k: v for k, v in RECORDS[0].items() if k != "hypothesis"}) + "\n",
         "bad.jsonl, line 2: no hypothesis"),
        (json.dumps(dict(RECORDS[4], target_language=None)) + "\n",
         "bad.jsonl: the s2tt record 'de1' (de) has no target_language"),
        ("\n" + json.dumps({"key": "a"}) + "\n", "bad.jsonl, line 2: not a hypothesis record"),
        ("", "bad.jsonl: no hypotheses"),
    ]:
        bad.write_text(text)
        code, _, err = call_main(rescore.main, [str(bad)], capsys)
        assert code == 2 and message in err, (text, err)
    code, _, err = call_main(rescore.main, [str(bad), "--normalizer", "nemo"], capsys)
    assert code == 2 and "invalid choice: 'nemo'" in err


def test_rescore_command_line_and_help(tmp_path, capsys):
    code, out, _ = call_main(rescore.main, ["--help"], capsys)
    assert code == 0
    assert "python -m part rescore runs/tiny_part" in out and "--normalizer {part,whisper,both}" in out
    write_evaluation(tmp_path, "final", 7, RECORDS, "part")
    proc = run([sys.executable, "-m", "part", "rescore", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "final.md").read_text()


# ---------------------------------------------------------------- the config and the model card


def test_eval_normalizer_in_the_config():
    assert EvalConfig().normalizer == metrics.DEFAULT_NORMALIZER == "part"
    config = REPO / "configs" / "tiny_part.yaml"
    with pytest.raises(ConfigError, match="eval.normalizer: 'nemo' is not one of part, whisper"):
        load_config(config, ["eval.normalizer=nemo"])


def test_model_card_names_the_normaliser_and_the_signatures(tmp_path):
    _, report = write_evaluation(tmp_path, "final", 7, RECORDS, "whisper")
    cfg = TrainConfig(eval=EvalConfig(normalizer="whisper", per_language=20, num_beams=4))
    card = model_card(cfg, Path("checkpoints/step_7"), (tmp_path / "final.md").read_text(), "train.py ...")
    assert ("The run's final.md: the first 20 held-out utterances per language, beam search (4 beams); WER/CER on "
            "text normalised by `whisper` (`eval.normalizer`), BLEU with its sacrebleu signature.") in card
    assert report in card and f"`{SIG_13A}` (de→en)" in card
    assert "Not evaluated" in model_card(cfg, Path("c"), None, "x")
