"""Tests for the comparison (part.evaluation.comparison and the `python -m part compare` command, on hand-made run
directories, no training) and the baseline / large recipes.

Every expected number is worked out by hand in the comments from the made-up rows below.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from part.cli import compare
from part.config import TrainConfig, build_config
from part.evaluation import comparison
from part.train import launcher, recipe_pair

# ---------------------------------------------------------------- fake runs


def asr(lang: str, value: float, metric: str = "wer", n: int = 20) -> dict:
    return {"task": "asr", "language": lang, "metric": metric, "value": value, "n": n}


def s2tt(src: str, value: float, n: int = 20) -> dict:
    return {"task": "s2tt", "source": src, "target": "en", "metric": "bleu", "value": value, "n": n}


def rows(en: float, de: float, zh: float, de_en: float, zh_en: float, **extra_wer: float) -> list[dict]:
    out = [asr("de", de), asr("en", en), asr("zh", zh, "cer"), s2tt("de", de_en), s2tt("zh", zh_en)]
    return out + [asr(lang, v) for lang, v in extra_wer.items()]


def write_run(run_dir: Path, stages: list[tuple[str, int]], evals: dict[int, list[dict]], final: list[dict],
              final_step: int, extra_log: str = "") -> Path:
    run_dir.mkdir(parents=True)
    lines, step = [], 0
    for index, (name, steps) in enumerate(stages):
        for _ in range(steps):
            step += 1
            lines.append(json.dumps({"step": step, "stage": name, "stage_index": index, "loss": 10.0 - step * 0.5,
                                     "lr": 1e-3, "samples": 8.0, "audio_seconds": 40.0, "step_time": 1.0,
                                     "data_wait": 0.0}))
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n" + extra_log)
    for s, r in evals.items():
        (run_dir / f"eval_step_{s}.json").write_text(json.dumps({"step": s, "rows": r, "table": {}}))
    (run_dir / "final.json").write_text(json.dumps({"step": final_step, "rows": final, "table": {}}))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    # A resume re-logged step 5 (the log is appended): the last record wins. The last line is half-written.
    resumed = json.dumps({"step": 5, "stage": "s2_encoder", "stage_index": 1, "loss": 1.25}) + "\n"
    part = write_run(
        tmp_path / "part_run", [("s1_adapter", 4), ("s2_encoder", 3), ("s3_lora", 3)],
        evals={4: rows(80, 90, 70, 1, 2), 8: rows(40, 50, 60, 10, 12)},
        final=rows(20, 30, 40, 20, 10), final_step=10, extra_log=resumed + '{"step": 11, "lo',
    )
    baseline = write_run(
        tmp_path / "baseline_run", [("baseline_all_tasks", 10)],
        evals={4: rows(90, 95, 100, 0.5, 0.5), 8: rows(60, 70, 80, 5, 7)},
        final=rows(25, 35, 50, 15, 5, fr=45), final_step=10,  # fr: a row the PART run does not have
    )
    return part, baseline


# ---------------------------------------------------------------- load_run


def test_load_run_reads_log_evals_and_final(runs):
    part = comparison.load_run(runs[0])
    assert [r["step"] for r in part["train"]] == list(range(1, 11))  # deduplicated, sorted, torn line dropped
    assert part["train"][4]["loss"] == 1.25  # step 5: the re-logged record
    assert part["stages"] == [
        {"index": 0, "name": "s1_adapter", "start": 0, "end": 4},
        {"index": 1, "name": "s2_encoder", "start": 4, "end": 7},  # first logged step 5 -> boundary at 4
        {"index": 2, "name": "s3_lora", "start": 7, "end": 10},
    ]
    assert [(e["step"], e["final"]) for e in part["evals"]] == [(4, False), (8, False), (10, True)]
    assert part["final_step"] == 10 and part["last_step"] == 10 and len(part["final"]) == 5


def test_load_run_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        comparison.load_run(tmp_path / "nope")


# ---------------------------------------------------------------- write_comparison


def test_write_comparison(runs, tmp_path):
    part, baseline = (comparison.load_run(r) for r in runs)
    out = tmp_path / "cmp"
    md_path = comparison.write_comparison(part, baseline, out, "# header line\n- command: `x`")
    assert md_path == out / "compare.md"
    md = md_path.read_text()
    lines = md.splitlines()
    assert lines[0] == "# header line"
    assert "| task | metric | lang | part | baseline |" in lines
    for expected in [
        "| asr | wer | de | 30.00 | 35.00 |",
        "| asr | wer | en | 20.00 | 25.00 |",
        "| asr | wer | fr | n/a | 45.00 |",
        "| asr | wer | average | 25.00 | 30.00 |",  # over de, en (both have them): (30+20)/2, (35+25)/2
        "| asr | cer | zh | 40.00 | 50.00 |",
        "| asr | cer | average | 40.00 | 50.00 |",
        "| s2tt | bleu | de→en | 20.00 | 15.00 |",
        "| s2tt | bleu | zh→en | 10.00 | 5.00 |",
        "| s2tt | bleu | average | 15.00 | 10.00 |",  # (20+10)/2, (15+5)/2
        # shared rows en, de, zh: (20+30+40)/3 = 30, (25+35+50)/3 = 36.666..
        f"| {comparison.SUMMARY_LABELS['asr_error']} | 30.00 | 36.67 |",
        f"| {comparison.SUMMARY_LABELS['asr_wer']} | 25.00 | 30.00 |",
        f"| {comparison.SUMMARY_LABELS['asr_cer']} | 40.00 | 50.00 |",
        f"| {comparison.SUMMARY_LABELS['s2tt_bleu']} | 15.00 | 10.00 |",
        # during training, each run over its own rows: step 4 (80+90+70)/3, (90+95+100)/3; BLEU (1+2)/2, 0.5
        "| 4 | 80.00 | 95.00 | 1.50 | 0.50 |",
        "| 8 | 50.00 | 70.00 | 11.00 | 6.00 |",
        # step 10 = final.json; the baseline's fr counts here: (25+35+50+45)/4 = 38.75
        "| 10 | 30.00 | 38.75 | 15.00 | 10.00 |",
    ]:
        assert expected in lines, expected
    assert "_asr/wer average over the 2 of 3 rows every system has._" in lines
    assert "s1_adapter (steps 0-4), s2_encoder (steps 4-7), s3_lora (steps 7-10)" in md
    assert "![training curves](curves.png)" in lines

    data = json.loads((out / "compare.json").read_text())
    assert data["header"].startswith("# header line")
    assert data["averages"]["part"] == {"asr_error": 30.0, "asr_wer": 25.0, "asr_cer": 40.0, "s2tt_bleu": 15.0}
    assert data["averages"]["baseline"]["asr_error"] == pytest.approx(110 / 3)
    assert data["averages"]["baseline"]["s2tt_bleu"] == 10.0
    assert "asr/wer/fr" not in data["averaged_over"] and "asr/cer/zh" in data["averaged_over"]
    assert [e["step"] for e in data["evals"]["part"]] == [4, 8, 10]
    assert data["evals"]["baseline"][-1]["asr_error"] == 38.75
    assert [s["start"] for s in data["stages"]] == [0, 4, 7]
    assert data["final"]["part"]["source"] == "final.json, step 10"
    assert len(data["final"]["baseline"]["rows"]) == 6

    png = (out / "curves.png").read_bytes()
    assert len(png) > 1000
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 450)  # FIG_SIZE 12 x 4.5 in at 100 dpi


def test_write_comparison_without_final_uses_last_eval(runs, tmp_path):
    (runs[1] / "final.json").unlink()
    part, baseline = (comparison.load_run(r) for r in runs)
    md = comparison.write_comparison(part, baseline, tmp_path / "cmp").read_text()
    assert "no final.json: last evaluation, step 8" in md
    assert "| asr | wer | en | 20.00 | 60.00 |" in md.splitlines()


# ---------------------------------------------------------------- bootstrap confidence intervals

WORDS = "the a cat dog sat ran on under mat house red blue big small quickly slowly and or but with".split()
HAN = "我们今天去公园散步天气很好明年想要学习中文"


def hyp_record(key: str, task: str, lang: str, ref: str, hyp: str, target: str | None = None) -> dict:
    return {"key": key, "task": task, "language": lang, "target_language": target, "reference": ref,
            "duration": 3.0, "hypothesis": hyp}


def write_hypotheses(part_dir: Path, baseline_dir: Path, n: int = 40) -> tuple[list[dict], list[dict]]:
    """final_hypotheses.jsonl for both runs, with known differences:
    asr en: part perfect, baseline every other utterance empty (WER 0 vs 50: part better);
    asr de: the same hypotheses (one wrong word in ten each: difference exactly 0);
    asr zh: part drops 2 of 8 characters (CER 25), baseline perfect (baseline better);
    s2tt de→en: part perfect (BLEU 100), baseline an unrelated sentence (part better); zh→en: the same."""
    import random

    rng = random.Random(0)

    def sentence(k: int = 10) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    part, base = [], []
    for i in range(n):
        key = f"utt{i:03d}"
        en, de, zh, tr = sentence(), sentence(), "".join(rng.choice(HAN) for _ in range(8)), sentence()
        de_hyp = " ".join(["xyz"] + de.split()[1:])
        part += [hyp_record(key, "asr", "en", en, en), hyp_record(key, "asr", "de", de, de_hyp),
                 hyp_record(key, "asr", "zh", zh, zh[:6]), hyp_record(key, "s2tt", "de", tr, tr, "en"),
                 hyp_record(key, "s2tt", "zh", tr, tr[: len(tr) // 2], "en")]
        base += [hyp_record(key, "asr", "en", en, en if i % 2 == 0 else ""), hyp_record(key, "asr", "de", de, de_hyp),
                 hyp_record(key, "asr", "zh", zh, zh), hyp_record(key, "s2tt", "de", tr, sentence(), "en"),
                 hyp_record(key, "s2tt", "zh", tr, tr[: len(tr) // 2], "en")]
    base.append(hyp_record("only_baseline", "asr", "en", "one more", "one more"))  # unpaired: left out
    for run_dir, records in ((part_dir, part), (baseline_dir, base)):
        with open(run_dir / "final_hypotheses.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return part, base


def test_write_comparison_bootstrap_intervals(runs, tmp_path):
    from part.evaluation.metrics import bleu, error_rate

    part_records, base_records = write_hypotheses(*runs)
    part, baseline = (comparison.load_run(r) for r in runs)
    assert part["final_hypotheses"] == str(runs[0] / "final_hypotheses.jsonl")
    out = tmp_path / "cmp"
    md = comparison.write_comparison(part, baseline, out, resamples=1000, seed=0).read_text()
    lines = md.splitlines()
    assert ("| task | metric | lang | n | part | part 95% CI | baseline | baseline 95% CI | Δ part − baseline "
            "| Δ 95% CI | significant |") in lines
    assert "1000 resamples of the utterances (seed 0)" in md
    by_row = {tuple(line.split(" | ")[:3]): line for line in lines if line.startswith(("| asr |", "| s2tt |"))
              and "CI" not in line and line.count("[") == 3}
    en = by_row[("| asr", "wer", "en")]
    assert en.startswith("| asr | wer | en | 40 | 0.00 | [0.00, 0.00] | 50.00 | [")
    assert en.endswith("yes, part better |")
    assert "| -50.00 | [" in en
    assert by_row[("| asr", "wer", "de")].endswith("| +0.00 | [0.00, 0.00] | no |")
    assert by_row[("| asr", "cer", "zh")].endswith("yes, baseline better |")
    assert by_row[("| s2tt", "bleu", "de→en")].endswith("yes, part better |")
    assert by_row[("| s2tt", "bleu", "zh→en")].endswith("| +0.00 | [0.00, 0.00] | no |")
    assert by_row[("| asr", "wer", "average")].startswith("| asr | wer | average | 80 | ")
    assert "_asr/wer en: 40 utterances in both runs (part 40, baseline 41); the others are left out._" in lines
    assert "Significant differences (the 95% interval of part − baseline excludes 0):" in lines
    assert any(line.startswith("- asr wer en: **part** is better — part's WER is 50.00 points lower") for line in lines)
    assert any(line.startswith("- asr cer zh: **baseline** is better — part's CER is 25.00 points higher")
               for line in lines)
    assert "Not significant (the interval contains 0): asr wer de, s2tt bleu zh→en." in lines

    data = json.loads((out / "compare.json").read_text())["bootstrap"]
    assert (data["resamples"], data["seed"], data["confidence"]) == (1000, 0, 0.95)
    rows = {(r["task"], r["metric"], r["key"]): r for r in data["rows"]}
    assert list(rows) == [("asr", "wer", "de"), ("asr", "wer", "en"), ("asr", "wer", "average"),
                          ("asr", "cer", "zh"), ("asr", "cer", "average"), ("s2tt", "bleu", "de→en"),
                          ("s2tt", "bleu", "zh→en"), ("s2tt", "bleu", "average")]
    en = rows[("asr", "wer", "en")]
    assert en["significant"] and en["better"] == "part"
    assert en["diff"]["value"] == -50.0 and en["diff"]["low"] <= -50.0 <= en["diff"]["high"] < 0
    assert rows[("asr", "wer", "de")]["diff"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    for r in rows.values():  # every interval contains its point estimate
        for side in ("part", "baseline", "diff"):
            assert r[side]["low"] <= r[side]["value"] <= r[side]["high"]
    # The point estimates are the corpus metrics the evaluator computes on the same (paired) records.
    def pick(records, task, lang):
        return [r for r in records if r["task"] == task and r["language"] == lang and r["key"] != "only_baseline"]
    de = pick(part_records, "asr", "de")
    expected = error_rate([r["reference"] for r in de], [r["hypothesis"] for r in de], "de")["value"]
    assert rows[("asr", "wer", "de")]["part"]["value"] == pytest.approx(expected)
    tr = pick(base_records, "s2tt", "de")
    expected = bleu([r["reference"] for r in tr], [r["hypothesis"] for r in tr], "en")["value"]
    assert rows[("s2tt", "bleu", "de→en")]["baseline"]["value"] == pytest.approx(expected)
    assert rows[("s2tt", "bleu", "de→en")]["part"]["value"] == pytest.approx(100.0)
    average = rows[("asr", "wer", "average")]
    assert average["part"]["value"] == pytest.approx((0.0 + rows[("asr", "wer", "de")]["part"]["value"]) / 2)

    # Deterministic: the same seed writes the same intervals; another seed moves them.
    again = json.loads((comparison.write_comparison(part, baseline, tmp_path / "again", resamples=1000, seed=0)
                        .parent / "compare.json").read_text())["bootstrap"]
    assert again["rows"] == data["rows"]
    other = json.loads((comparison.write_comparison(part, baseline, tmp_path / "other", resamples=1000, seed=1)
                        .parent / "compare.json").read_text())["bootstrap"]
    assert other["rows"] != data["rows"]


def test_write_comparison_without_hypotheses_or_bootstrap(runs, tmp_path):
    write_hypotheses(*runs)
    (runs[1] / "final_hypotheses.jsonl").unlink()
    part, baseline = (comparison.load_run(r) for r in runs)
    md = comparison.write_comparison(part, baseline, tmp_path / "a").read_text()
    assert "_No per-utterance hypotheses file for baseline (final_hypotheses.jsonl): no confidence intervals._" in md
    assert json.loads((tmp_path / "a" / "compare.json").read_text())["bootstrap"] is None
    write_hypotheses(*runs)
    part, baseline = (comparison.load_run(r) for r in runs)
    md = comparison.write_comparison(part, baseline, tmp_path / "b", resamples=0).read_text()
    assert "_Bootstrap confidence intervals disabled (--bootstrap 0)._" in md and "95% CI" not in md


def test_write_comparison_bootstrap_uses_the_last_evaluation_without_final(runs, tmp_path):
    """Without final.json the intervals come from the hypotheses of the evaluation the table shows."""
    part_records, base_records = write_hypotheses(*runs)
    for run_dir in runs:
        (run_dir / "final.json").unlink()
        (run_dir / "final_hypotheses.jsonl").rename(run_dir / "eval_step_8_hypotheses.jsonl")
    part, baseline = (comparison.load_run(r) for r in runs)
    assert part["final_hypotheses"] is None and part["evals"][-1]["hypotheses"].endswith("eval_step_8_hypotheses.jsonl")
    md = comparison.write_comparison(part, baseline, tmp_path / "cmp", resamples=200).read_text()
    assert "200 resamples of the utterances" in md and "yes, part better" in md


def test_bootstrap_cli_flags():
    args = compare.parse_args(["--part", "a.yaml", "--baseline", "b.yaml", "--out", "o"])
    assert (args.bootstrap, args.seed) == (1000, 0)
    args = compare.parse_args(["--part", "a.yaml", "--baseline", "b.yaml", "--out", "o", "--bootstrap", "0",
                               "--seed", "3", "stages.0.lr=1e-3"])
    assert (args.bootstrap, args.seed, args.overrides) == (0, 3, ["stages.0.lr=1e-3"])


# ---------------------------------------------------------------- the command line (no training)


def load_config_tree(path: Path) -> TrainConfig:
    return build_config(TrainConfig, yaml.safe_load(Path(path).read_text()), "")


def test_run_overrides():
    cfg = build_config(TrainConfig, yaml.safe_load((REPO / "configs/tiny_part.yaml").read_text()), "")
    out = Path("runs/cmp")
    assert recipe_pair.run_overrides("part", cfg, out, False, ["stages.0.lr=1e-3"], None) == [
        "stages.0.lr=1e-3", f"eval.every={cfg.total_steps // 5}", "output_dir=runs/cmp/part",
        "checkpoint.dir=runs/cmp/part/checkpoints"]
    assert recipe_pair.run_overrides("part", cfg, out, True, ["eval.every=25"], 100) == ["eval.every=25"]
    assert recipe_pair.run_overrides("baseline", cfg, out, True, [], 0) == ["eval.every=0"]


def test_stream_prefixes_lines_and_returns_the_exit_code(capsys):
    code = launcher.run_prefixed([sys.executable, "-c", "print('a'); print('b', end=''); raise SystemExit(3)"], "part",
                          dict(os.environ))
    assert code == 3
    assert capsys.readouterr().out.splitlines()[1:] == ["[part] a", "[part] b"]


def test_main_skip_training(runs, tmp_path, capsys):
    """The whole command on existing run dirs: configs validated (model dirs faked), nothing trained."""
    from safetensors.torch import save_file

    for d in ("whisper", "llm"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")  # what --check asks of a model directory
    # what the frame loss's check asks of the Whisper directory: its type, alignment heads and decoder weights
    (tmp_path / "whisper" / "config.json").write_text('{"model_type": "whisper"}')
    (tmp_path / "whisper" / "generation_config.json").write_text('{"alignment_heads": [[0, 0]]}')
    save_file({"model.decoder.embed_tokens.weight": torch.zeros(1)}, str(tmp_path / "whisper" / "model.safetensors"))
    configs = {}
    for name, src in (("part", "tiny_part"), ("baseline", "tiny_baseline")):
        data = yaml.safe_load((REPO / f"configs/{src}.yaml").read_text())
        data["model"]["encoder"]["pretrained"] = str(tmp_path / "whisper")
        data["model"]["llm"]["pretrained"] = str(tmp_path / "llm")
        data["ds_config"] = str(REPO / "ds_configs/zero3_cpu.json")
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(data))
    out = tmp_path / "cmp"
    # --use-config-dirs with output_dir overrides would point both runs at one dir: refused.
    assert compare.main(["--part", str(configs["part"]), "--baseline", str(configs["baseline"]), "--out", str(out),
                         "--skip-training", "--use-config-dirs", f"output_dir={runs[0]}"]) == 2
    # Default layout: <out>/part and <out>/baseline.
    out.mkdir(exist_ok=True)
    runs[0].rename(out / "part")
    runs[1].rename(out / "baseline")
    code = compare.main(["--part", str(configs["part"]), "--baseline", str(configs["baseline"]), "--out", str(out),
                         "--skip-training"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| s2tt | bleu | average | 15.00 | 10.00 |" in printed
    md = (out / "compare.md").read_text()
    assert md.startswith("# PART vs one-stage baseline")
    total = load_config_tree(configs["part"]).total_steps
    assert f"{total} steps in 5 stages" in md and f"{total} steps in 1 stage(s)" in md
    assert "- command: `python -m part compare --part " in md and "--skip-training`" in md and "- date: " in md
    assert (out / "curves.png").stat().st_size > 0 and (out / "compare.json").is_file()
    # Training needs the launcher: a missing one is refused before anything runs, naming it.
    capsys.readouterr()
    assert compare.main(["--part", str(configs["part"]), "--baseline", str(configs["baseline"]), "--out", str(out),
                         "--deepspeed", str(tmp_path / "no-launcher")]) == 2
    assert f"the launcher '{tmp_path / 'no-launcher'}' is neither on PATH" in capsys.readouterr().err


def test_find_launcher(tmp_path, monkeypatch):
    assert launcher.find_launcher("sh") == shutil.which("sh")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert launcher.find_launcher("sh") is None
    # a virtual environment's launcher, found beside its Python though the environment is not activated
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    tool = bin_dir / "deepspeed"
    tool.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert launcher.find_launcher("deepspeed") is None  # not executable
    tool.chmod(0o755)
    assert launcher.find_launcher("deepspeed") == str(tool)
    assert launcher.find_launcher("other") is None


# ---------------------------------------------------------------- the recipes


def build(name: str) -> TrainConfig:
    return build_config(TrainConfig, yaml.safe_load((REPO / "configs" / name).read_text()), "")


def test_tiny_baseline_matches_tiny_part():
    part, base = build("tiny_part.yaml"), build("tiny_baseline.yaml")
    assert base.total_steps == part.total_steps
    assert len(base.stages) == 1
    stage = base.stages[0]
    assert not [g for g in stage.trainable if g.startswith("llm")]  # the LLM is frozen
    assert set(stage.trainable) == {"adapter", "encoder"}
    # each group at its PART rate: the adapter at stage 1's, the encoder at stage 2a's
    assert stage.group_lr == {"adapter": part.stages[0].lr} and stage.lr == part.stages[1].lr
    assert stage.tasks == part.stages[-1].tasks and set(stage.tasks) == {"asr", "s2tt", "mt", "text"}
    assert stage.translation_targets == part.stages[-1].translation_targets
    assert base.model == part.model and base.data == part.data and base.eval == part.eval
    assert base.ds_config == part.ds_config
    assert base.output_dir == "runs/tiny_baseline" and base.checkpoint.dir == "runs/tiny_baseline/checkpoints"


def test_large_recipes_parse_and_match():
    part, base = build("part_large.yaml"), build("baseline_large.yaml")
    assert part.total_steps == base.total_steps == 80000
    assert [s.name for s in part.stages][0] == "s1_adapter_asr" and len(part.stages) == 5
    assert len(base.stages) == 1 and not [g for g in base.stages[0].trainable if g.startswith("llm")]
    assert part.model == base.model and part.data == base.data and part.eval == base.eval
    assert part.ds_config == base.ds_config == "ds_configs/zero2.json" and part.zero_stage == base.zero_stage == 2
    assert part.model.activation_checkpointing.encoder and part.model.activation_checkpointing.llm
    assert part.logging.wandb_project and part.model.llm.lora is not None
    assert "{lang}" in part.data.train_shards


# ---------------------------------------------------------------- the normaliser of the comparison


def test_write_comparison_under_each_normaliser(tmp_path):
    """Both runs' results files hold their rows under each normaliser (the evaluator's writer): the comparison
    takes both under the one asked for, and its bootstrap scores the hypotheses under it too."""
    import sacrebleu

    from part.evaluation.evaluator import write_evaluation

    ref = "Mr. Smith's TV cost twenty-five dollars"
    # part writes the amount in digits: under part 4 errors / 7 words per utterance (mr/mister and twenty/25
    # substituted, five and dollars deleted) = 57.14; under whisper both sides read "mister smith is tv cost $25"
    part = [hyp_record(f"u{i}", "asr", "en", ref, "Mister Smith's TV cost $25.") for i in range(12)]
    baseline = [hyp_record(f"u{i}", "asr", "en", ref, ref) for i in range(12)]
    for records in (part, baseline):
        records.append(hyp_record("t0", "s2tt", "de", "the cat sat on the mat", "the cat sat on a mat", "en"))
    dirs = {}
    for name, records in (("part", part), ("baseline", baseline)):
        dirs[name] = tmp_path / name
        write_evaluation(dirs[name], "final", 10, records, "part")
    runs = {name: comparison.load_run(d) for name, d in dirs.items()}
    assert runs["part"]["normalizer"] == "part" and list(runs["part"]["final_by_normalizer"]) == ["part", "whisper"]

    md = comparison.write_comparison(runs["part"], runs["baseline"], tmp_path / "a", resamples=200).read_text()
    lines = md.splitlines()
    assert any(line.startswith("- normaliser of WER/CER: `part`, the project's") for line in lines)
    signature = f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert f"- BLEU: sacrebleu corpus BLEU on the raw cased text, `{signature}` (de→en)." in lines  # once: the same
    assert "| asr | wer | en | 57.14 | 0.00 |" in lines
    assert any(line.startswith("| asr | wer | en | 12 | 57.14 | [57.14, 57.14] | 0.00 |") for line in lines)

    md = comparison.write_comparison(runs["part"], runs["baseline"], tmp_path / "b", resamples=200,
                                     normalizer="whisper").read_text()
    lines = md.splitlines()
    assert any(line.startswith("- normaliser of WER/CER: `whisper`, Whisper's normalisers") for line in lines)
    assert "| asr | wer | en | 0.00 | 0.00 |" in lines and "no WER/CER under" not in md
    assert any(line.startswith("| asr | wer | en | 12 | 0.00 | [0.00, 0.00] | 0.00 |") for line in lines)
    data = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert data["normalizer"] == "whisper" and data["not_under_normalizer"] == {"part": [], "baseline": []}
    assert data["bleu_signatures"]["part"] == data["bleu_signatures"]["baseline"]
    assert data["averages"]["part"]["asr_wer"] == 0.0

    # a results file that holds its rows under one normaliser only: kept, and said to be so
    final = dirs["baseline"] / "final.json"
    saved = json.loads(final.read_text())
    del saved["by_normalizer"], saved["normalizer"]  # as files without them read: scored with part
    final.write_text(json.dumps(saved))
    runs["baseline"] = comparison.load_run(dirs["baseline"])
    md = comparison.write_comparison(runs["part"], runs["baseline"], tmp_path / "c", resamples=0,
                                     normalizer="whisper").read_text()
    assert ("- **baseline: no WER/CER under `whisper` in final.json (`part`): the rows from there are under the "
            "normaliser named, not comparable**") in md.splitlines()
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["not_under_normalizer"]["baseline"] == [
        "final.json (`part`)"]
    assert compare.parse_args(["--part", "a", "--baseline", "b", "--out", "o", "--normalizer", "whisper"]).normalizer \
        == "whisper"
