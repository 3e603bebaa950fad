"""`python -m part plot RUN_DIR`: one run's loss with its stage boundaries and its per-language metrics."""

from __future__ import annotations

import json

import matplotlib.image

from part.cli import plot


def rows(step: int) -> list[dict]:
    asr = [{"task": "asr", "metric": "wer", "language": lang, "value": 90.0 - step, "n": 10} for lang in ("de", "en")]
    return asr + [{"task": "s2tt", "metric": "bleu", "source": "de", "target": "en", "value": step / 10, "n": 10}]


def test_plot_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    log = [{"step": s, "stage": "s1" if s <= 10 else "s2", "stage_index": int(s > 10), "loss": 5 - s / 10,
            "ctc_loss": 9 - s / 5} for s in range(1, 21)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "eval_step_10.json").write_text(json.dumps({"step": 10, "rows": rows(10)}))
    (run / "final.json").write_text(json.dumps({"step": 20, "rows": rows(20)}))
    assert plot.main([str(run)]) == 0
    assert f"wrote {run / 'run.png'}" in capsys.readouterr().out
    assert matplotlib.image.imread(run / "run.png").shape[:2] == (450, 1500)
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
