"""Rank-0 logging: the console line, train_log.jsonl and an offline wandb run that `wandb sync` can upload."""

import json

from part.config import LoggingConfig, StageConfig, TrainConfig
from part.data.stream import StreamPosition, StreamTracker
from part.train.curriculum import Curriculum
from part.train.logging import RunLogger
from part.train.records import StepRecord


def test_console_jsonl_and_offline_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=4)], output_dir=str(tmp_path),
                      logging=LoggingConfig(every=2, wandb_project="part-test", wandb_mode="online", run_name="t"))
    logger = RunLogger(cfg, rank=0, world_size=1)
    span = Curriculum(cfg.stages).at(0)
    tracker = StreamTracker()
    tracker.update(StreamPosition(worker=0, window_state={}, next_batch=1, mixed={"asr/de": 3},
                                  skipped={"too_long": 1}))
    logger.stage(span, {"adapter": 1000}, 0)
    for step in (1, 2):
        logger.step(StepRecord(step=step, loss_sum=20.0, tokens=10, samples=4, audio_seconds=12.0, lr=1e-3,
                               grad_norm=0.5, step_time=0.5, data_wait=0.01, sequence_tokens=300, flops=1e12,
                               skipped_samples=step - 1), span, tracker)
    logger.close()
    out = capsys.readouterr().out
    assert "WANDB_API_KEY is not set; logging offline" in out
    assert "trainable 1,000 params (adapter=1,000)" in out
    line = next(x for x in out.splitlines() if x.startswith("[part] step 2/4"))
    assert "loss 2.0000" in line and "8.0 samples/s" in line and "24.0 audio-s/s" in line and "data-wait 2.0%" in line
    assert "600 tok/s" in line and "skipped 1 samples" in line and "mfu" not in line  # no peak known on CPU
    assert "step 1/4" not in out  # every=2
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 2.0
    assert [r["skipped_samples"] for r in rows] == [0, 1] and rows[1]["flops"] == 1e12 and rows[1]["tokens"] == 300
    assert [r["process_steps"] for r in rows] == [1, 2]
    # a resume at step 1 drops the later records, which the resumed run logs again: each step once
    logger.resumed_at(1)
    assert [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_other_ranks_write_nothing(tmp_path, capsys):
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=2)], output_dir=str(tmp_path / "o"),
                      logging=LoggingConfig(wandb_project="part-test"))
    logger = RunLogger(cfg, rank=1, world_size=2)
    logger.info("hello")
    logger.step(StepRecord(step=1, lr=1e-3, loss_sum=1.0, tokens=1, samples=1, audio_seconds=1.0, grad_norm=None,
                           step_time=0.1, data_wait=0.0), Curriculum(cfg.stages).at(0), StreamTracker())
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "o").exists()


def test_mfu_from_the_device_peak(tmp_path, capsys):
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=1)], output_dir=str(tmp_path))
    logger = RunLogger(cfg, rank=0, world_size=2, peak_flops=1e13)
    logger.step(StepRecord(step=1, lr=1e-3, loss_sum=1.0, tokens=1, samples=1, audio_seconds=1.0, grad_norm=1.0,
                           step_time=0.5, data_wait=0.0, flops=4e12, peak_memory=3 * 1024**3),
                Curriculum(cfg.stages).at(0), StreamTracker())
    assert "mfu 40.0%" in capsys.readouterr().out  # 4e12 / (0.5 s x 2 devices x 1e13)
    row = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert row["mfu"] == 0.4 and row["peak_memory_gib"] == 3.0
