"""`python -m part frame_readout` on a finished run's directory: the adapter frames' reading beside the LLM's
hypotheses."""

from __future__ import annotations

import dataclasses
import json
import shutil

import torch
from conftest import write_config

from part.cli.frame_readout import main
from part.config import load_config
from part.data.eval_sets import eval_batches
from part.model.tokenizer import load_tokenizer
from part.packing import with_layouts

STAGE = "  - {name: s1, steps: 1, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 0}"


def test_frames_and_hypotheses_are_scored_on_the_same_clips(model_dir, corpus, tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGE)
    shutil.copy(config, run / "final" / "train_config.yaml")
    cfg = load_config(config, [])
    tok = load_tokenizer(str(tiny_models / "llm"))
    clips = [m for lang in cfg.data.languages
             for b in eval_batches(cfg.data, [lang], ["asr"], [], cfg.eval.per_language, 8, tok, 80, 0, 1)
             for m in b.meta]
    assert len(clips) == 2 * len(cfg.data.languages)
    # the hypotheses are the references (the LLM perfect), one en clip has none and an s2tt record is not ASR
    records = [{"task": "asr", "language": m.language, "key": m.key, "reference": m.reference,
                "hypothesis": m.reference} for m in clips[1:]]
    records.append({"task": "s2tt", "language": "de", "key": clips[0].key, "reference": "y", "hypothesis": "x"})
    (run / "final_hypotheses.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    assert main([str(run)]) == 0
    table = (run / "frame_readout.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "lang" not in line}
    assert set(rows) == {"en", "de", "zh"} and rows["zh"][0] == "cer" and rows["en"][0] == "wer"
    assert [rows[lang][3] for lang in ("en", "de", "zh")] == ["1", "2", "2"]  # the clip without a hypothesis
    assert all(float(r[2]) == 0 for r in rows.values())  # the LLM column: the hypotheses were the references
    assert all(float(r[1]) > 0 for r in rows.values())  # an untrained adapter's frames read nothing right
    assert table.split("\n", 2)[2].split("\n\n")[0].strip() in capsys.readouterr().out
    # each language's first clips: the reference, the frames' reading and the hypothesis (here the reference)
    examples = table.split("## The first clips of each language", 1)[1]
    for clip in clips[1:]:
        assert f"- {clip.language} reference: `{clip.reference}`" in examples
        assert f"  - LLM: `{clip.reference}`" in examples
    assert examples.count("  - frames: `") == len(clips) - 1

    (run / "final_hypotheses.jsonl").write_text("{not json\n")
    assert main([str(run)]) == 2
    assert "final_hypotheses.jsonl, line 1: not JSON" in capsys.readouterr().err


def test_the_llm_checks_the_frames_reading_token_by_token(model_dir, corpus, tiny_models, tmp_path):
    """--draft-margin: with an unbounded margin every draft token stays (the reading, cut at an end token); at
    margin 0 every token is the LLM's likeliest after the draft's prefix; a wider margin keeps at least as much of
    the draft; the report gets the column."""
    import math

    from part.evaluation.readout import readout_table, verified_readings
    from part.model.speech_llm import SpeechLLM
    from part.objectives.frames import frame_alignment

    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGE)
    cfg = load_config(config, [])
    model, tok = SpeechLLM.from_pretrained(model_dir)
    model.eval()
    batch = next(iter(eval_batches(cfg.data, ["en"], ["asr"], [], 2, 2, tok, model.audio_features, 0, 1)))
    readings = frame_alignment(model).greedy_reading(model, batch)
    end = model.end_token_id
    assert all(readings)
    assert verified_readings(model, batch, readings, math.inf) == [r[:r.index(end)] if end in r else r
                                                                 for r in readings]
    strict = verified_readings(model, batch, readings, 0.0)
    assert strict != readings
    # the second token of each clip: the LLM's likeliest after the draft's first token, recomputed apart
    assert all(len(c) > 1 for c in strict)
    prefix = dataclasses.replace(batch, target_ids=[torch.tensor([d[0], c[1]]) for d, c in zip(readings, strict)],
                                 layout=None, prompt_layout=None)
    laid = with_layouts(prefix, model.layout_spec(packed=False, length_multiple=1)).layout
    with torch.no_grad():
        logits = model.target_logits(model.embed(laid, model.encode(batch.input_features, batch.feature_frames)),
                                     laid)
    assert logits.argmax(-1)[1::2].tolist() == [c[1] for c in strict]  # two targets a sample, in sample order
    kept = [sum(a == b for a, b in zip(r, v)) for r, v in zip(readings, verified_readings(model, batch, readings, 3.0))]
    assert all(k >= sum(a == b for a, b in zip(r, s)) for k, r, s in zip(kept, readings, strict))
    rows = [{"language": "en", "metric": "wer", "frames": 50.0, "llm": 60.0, "verified": 55.0, "n": 2}]
    assert "| frames checked by the LLM (margin 2) |" in readout_table(rows, 2.0)
    assert "| en | wer | 50.00 | 60.00 | 55.00 | 2 |" in readout_table(rows, 2.0)
