"""`python -m part frame_readout` on a finished run's directory: the adapter frames' reading beside the LLM's
hypotheses."""

from __future__ import annotations

import json
import shutil

from conftest import write_config

from part.cli.frame_readout import main
from part.config import load_config
from part.data.eval_sets import eval_batches
from part.model.tokenizer import load_tokenizer

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
    assert table.split("\n", 2)[2].strip() in capsys.readouterr().out

    (run / "final_hypotheses.jsonl").write_text("{not json\n")
    assert main([str(run)]) == 2
    assert "final_hypotheses.jsonl, line 1: not JSON" in capsys.readouterr().err
