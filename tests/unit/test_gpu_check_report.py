"""The GPU check's per-stage report (bench/gpu_check.py): steady-state steps only, a resume's repeated steps
counted once, MFU from the records' own peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_check import anatomy_markdown, report_markdown, stage_report, step_anatomy  # noqa: E402

PEAK = 1e15


def record(step: int, stage: str, seconds: float, flops: float = 2e14, process_steps: int | None = None) -> dict:
    return {"step": step, "stage": stage, "step_time": seconds, "tokens": 1000, "audio_seconds": 100.0,
            "flops": flops, "padded_flops": 1.25 * flops, "llm_padding": 0.1, "audio_padding": 0.05,
            "mfu": flops / seconds / PEAK, "peak_memory_gib": step / 10,
            "process_steps": step if process_steps is None else process_steps}


def test_report_per_stage(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [record(1, "a", 9.0), record(2, "a", 5.0), record(3, "a", 1.0), record(4, "a", 2.0), record(5, "a", 1.0),
            record(6, "b", 7.0), record(7, "b", 6.0),
            # killed after step 9, resumed from step 7: the resume dropped the first 8-9 from the log and logged them
            # again as its process's steps 1-2 (its warm-up), then 10
            record(8, "b", 8.0, process_steps=1), record(9, "b", 4.0, process_steps=2),
            record(10, "b", 2.0, process_steps=3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = stage_report(log)
    assert (a["stage"], a["steps"], a["timed"]) == ("a", 5, 3)
    assert a["median_s"] == 1.0 and a["max_s"] == 2.0 and a["max_over_median"] == 2.0
    assert a["tokens_per_s"] == pytest.approx(3000 / 4.0) and a["mfu"] == pytest.approx(3 * 2e14 / 4.0 / PEAK)
    assert a["first_steps_s"] == [9.0, 5.0] and a["peak_memory_gib"] == 0.5
    assert a["mfu_padded"] == pytest.approx(1.25 * a["mfu"]) and (a["llm_padding"], a["audio_padding"]) == (0.1, 0.05)
    # stage b: steps 6-10, 6-7 its warm-up, 8-9 the resumed process's warm-up
    assert (b["steps"], b["timed"], b["median_s"]) == (5, 1, 2.0)
    assert "| a | 5 (3) |" in report_markdown([a, b]) and "| 10.0% | 5.0% |" in report_markdown([a, b])


def test_no_mfu_without_a_peak(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [dict(record(i, "cpu", 1.0), mfu=None) for i in range(1, 5)]
    for r in rows:
        del r["mfu"]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = stage_report(log)
    assert row["mfu"] is None and "n/a" in report_markdown([row])


def test_anatomy_per_stage_and_attention_setting():
    record = {"stage": "s1", "kernel_seconds": 0.3, "profiled_seconds": 0.6, "kernel_kind": "device kernels", "modes": [
        {"mode": "cuDNN attention on (default)", "first": [2.0, 1.0, 1.5], "replay": [0.5, 0.5, 0.6],
         "new_shape": [True, False, True]},
        {"mode": "cuDNN attention off", "first": [0.7, 0.6, 0.8], "replay": [0.6, 0.6, 0.6],
         "new_shape": [True, True, False]}]}
    rows = anatomy_markdown([record]).splitlines()
    # medians 1.5 / 0.5; the new shapes cost 1.5 and 0.9 over their replay (median 1.2); 0.3 s of the profiled 0.6
    assert rows[2] == "| s1 | cuDNN attention on (default) | 3 (2) | 1.500 | 0.500 | 3.00 | 1.200 | 0.300 | 50% |"
    assert rows[3] == "| s1 | cuDNN attention off | 3 (2) | 0.700 | 0.600 | 1.17 | 0.050 |  | |"
    assert "the own time of the device kernels per replayed step" in rows[-1]
    no_new = dict(record, modes=[dict(record["modes"][0], new_shape=[False] * 3)])
    assert "| 3 (0) |" in anatomy_markdown([no_new]) and "| n/a |" in anatomy_markdown([no_new])


def test_no_anatomy_stage_starts_in_the_last_minute_of_the_budget(tmp_path, capsys):
    import time

    records, failed = step_anatomy(tmp_path / "none.yaml", tmp_path, tmp_path, [0, 1, 2], 2, 180,
                                   deadline=time.time() + 30)
    assert (records, failed) == ([], [])  # nothing launched: the config does not even exist
    assert capsys.readouterr().out.count("skipped (the check's time budget is spent)") == 3
