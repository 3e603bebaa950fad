"""Rank-0 logging: the console line, train_log.jsonl and an offline wandb run that `wandb sync` can upload."""

import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO
from wandb_offline import Table, offline_runs, raw_records, read_offline_run

from part.config import ConfigError, LoggingConfig, StageConfig, TrainConfig, load_config
from part.curriculum import Curriculum
from part.train.logging import RunLogger
from part.train.records import StepRecord


def test_console_jsonl_and_offline_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=4, lr=1e-3, group_lr={"adapter": 3e-3})],
                      output_dir=str(tmp_path),
                      logging=LoggingConfig(every=2, wandb_project="part-test", wandb_mode="online", run_name="t"))
    logger = RunLogger(cfg, rank=0, world_size=1)
    span = Curriculum(cfg.stages).at(0)
    counters = (Counter({"asr/de": 3}), Counter({"too_long": 1}))
    logger.stage(span, {"adapter": 1000}, 0)
    for step in (1, 2):
        logger.step(StepRecord(step=step, loss_sum=20.0, tokens=10, samples=4, audio_seconds=12.0, lr=1e-3,
                               grad_norm=0.5, step_time=0.5, data_wait=0.01, sequence_tokens=300, flops=1e12,
                               skipped_samples=step - 1), span, counters)
    logger.close()
    out = capsys.readouterr().out
    assert "WANDB_API_KEY is not set; logging offline" in out
    assert "trainable 1,000 params (adapter=1,000)" in out and "peak lr 0.001, adapter 0.003" in out
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
                           step_time=0.1, data_wait=0.0), Curriculum(cfg.stages).at(0))
    logger.close()
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "o").exists()


def test_mfu_from_the_device_peak(tmp_path, capsys):
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=1)], output_dir=str(tmp_path))
    logger = RunLogger(cfg, rank=0, world_size=2, peak_flops=1e13)
    logger.step(StepRecord(step=1, lr=1e-3, loss_sum=1.0, tokens=1, samples=1, audio_seconds=1.0, grad_norm=1.0,
                           step_time=0.5, data_wait=0.0, flops=4e12, peak_memory=3 * 1024**3),
                Curriculum(cfg.stages).at(0))
    assert "mfu 40.0%" in capsys.readouterr().out  # 4e12 / (0.5 s x 2 devices x 1e13)
    row = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert row["mfu"] == 0.4 and row["peak_memory_gib"] == 3.0


def test_other_ranks_never_start_wandb(tmp_path):
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=2)], output_dir=str(tmp_path),
                      logging=LoggingConfig(wandb_project="part-test"))
    logger = RunLogger(cfg, rank=1, world_size=2)
    assert logger.wandb_enabled and logger.wandb_due(2, Curriculum(cfg.stages).at(0))  # it gathers counters...
    assert logger.wandb is None  # ...but only rank 0 has a run
    logger.stage(Curriculum(cfg.stages).at(0), {"adapter": 1}, 0)
    logger.evaluation(2, [{"task": "asr", "language": "en", "metric": "wer", "value": 1.0, "n": 1}], [])
    logger.close()
    assert not (tmp_path / "wandb").exists()


# What the offline run must hold, as the dashboards read it: stage markers, mixture and skip counters, the metric
# table and the hypotheses per language. Run in a child process that records every name lookup and INET connect,
# including those made at interpreter exit (where wandb's own telemetry would send its batch).
OFFLINE_SCRIPT = r"""
import atexit, json, socket, sys
attempts = []
real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *a, **k):
    attempts.append(["getaddrinfo", str(host)])
    return real_getaddrinfo(host, *a, **k)
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(["connect", str(address)])
    return real_connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(attempts)))

from collections import Counter
from part.config import LoggingConfig, StageConfig, TrainConfig
from part.curriculum import Curriculum
from part.train.logging import RunLogger
from part.train.records import StepRecord

cfg = TrainConfig(stages=[StageConfig(name="s1", steps=2), StageConfig(name="s2", steps=2, tasks={"asr": 0.5,
                  "s2tt": 0.5})], output_dir=sys.argv[1],
                  logging=LoggingConfig(every=1, wandb_project="part-test", wandb_samples=1, run_name="t"))
logger = RunLogger(cfg, rank=0, world_size=2)
curriculum = Curriculum(cfg.stages)
for step in range(1, 5):
    span = curriculum.at(step - 1)
    if step - 1 == span.start:
        logger.stage(span, {"adapter": 10}, step - 1)
    mixed = Counter({"asr/de": 2 * step, "asr/zh": step}) if span.index == 0 else Counter({"asr/de": 1,
                                                                                         "s2tt/de-en": step})
    logger.step(StepRecord(step=step, loss_sum=4.0, tokens=2, samples=3, audio_seconds=5.0, lr=1e-3, grad_norm=1.0,
                           step_time=0.5, data_wait=0.0, skipped_samples=1), span, (mixed, Counter({"too_long": 1})))
rows = [{"task": "asr", "language": "de", "metric": "wer", "value": 50.0, "n": 2},
        {"task": "asr", "language": "zh", "metric": "cer", "value": 20.0, "n": 1},
        {"task": "s2tt", "source": "de", "target": "en", "metric": "bleu", "value": 3.5, "n": 2}]
records = [{"task": "asr", "language": "de", "target_language": None, "key": k, "reference": "ein haus",
            "hypothesis": "ein maus"} for k in ("de-b", "de-a")]
records += [{"task": "s2tt", "language": "de", "target_language": "en", "key": "de-a", "reference": "a house",
             "hypothesis": "a mouse"},
            {"task": "asr", "language": "zh", "target_language": None, "key": "zh-a", "reference": "房子",
             "hypothesis": "房"}]
logger.evaluation(4, rows, records)
logger.close()
"""


def test_offline_run_holds_what_the_dashboards_read(tmp_path):
    attempts = tmp_path / "attempts.json"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "out"), str(attempts)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(attempts.read_text()) == []  # no server, not even a name lookup
    assert "wandb: offline run in" in proc.stdout
    [run_dir] = offline_runs(tmp_path / "out")
    run = read_offline_run(run_dir)
    assert run.config["logging"]["wandb_project"] == "part-test"
    # stage boundaries: a marker at each stage's first step, the stage index on every logged step
    assert run.values("stage/started") == {0: 0, 2: 1}
    assert run.values("stage/name") == {0: "s1", 2: "s2"}
    assert run.values("stage/index") == {1: 0, 2: 0, 3: 1, 4: 1}
    [curriculum] = run.values("curriculum").values()
    assert [r["stage"] for r in curriculum.rows()] == ["s1", "s2"] and curriculum.rows()[1]["first_step"] == 2
    # the mixture actually drawn (counts and shares per task/language and per task) and the skip counters
    assert run.values("data/mixed/asr/zh") == {1: 1, 2: 2}
    assert run.values("data/share/asr/de")[2] == pytest.approx(4 / 6)
    assert run.values("data/task_share/s2tt")[4] == pytest.approx(4 / 5)
    assert run.values("data/skipped/too_long") == {1: 1, 2: 1, 3: 1, 4: 1}
    assert set(run.values("data/mixture")) == {2, 4}  # the table at each stage's end
    assert run.values("data/mixture")[4].rows() == [
        {"stage": "s2", "task": "asr", "language": "de", "samples": 1, "share": 0.2, "task_weight": 0.5},
        {"stage": "s2", "task": "s2tt", "language": "de-en", "samples": 4, "share": 0.8, "task_weight": 0.5}]
    # the evaluation: scalars, the per-language table (with averages, as final.md), hypotheses per language
    assert run.values("eval/asr/wer/de") == {4: 50.0} and run.values("eval/s2tt/bleu/de-en") == {4: 3.5}
    metrics = run.values("eval/metrics")[4]
    assert isinstance(metrics, Table) and metrics.columns == ["task", "metric", "lang", "value", "n"]
    assert ["asr", "wer", "de", 50.0, 2] in metrics.data and ["s2tt", "bleu", "average", 3.5, 2] in metrics.data
    de = run.values("eval/hypotheses/de")[4].rows()
    assert [(r["task"], r["key"]) for r in de] == [("asr", "de-a"), ("s2tt", "de-a")]  # wandb_samples: 1 each
    assert de[1] == {"task": "s2tt", "target": "en", "key": "de-a", "reference": "a house", "hypothesis": "a mouse"}
    assert run.values("eval/hypotheses/zh")[4].rows()[0]["reference"] == "房子"
    assert run.values("train/loss")[4] == 2.0


def test_reader_rejects_a_damaged_run_file(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"not a run")
    with pytest.raises(ValueError, match="not a wandb run file"):
        list(raw_records(path))
    path.write_bytes(b":W&B\xe1\xbe\x00" + b"\x00\x00\x00\x00\x03\x00\x01abc")  # a wrong checksum
    with pytest.raises(ValueError, match="checksum mismatch in the chunk at byte 7"):
        list(raw_records(path))


def test_wandb_fields_are_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stages: [{name: s, steps: 1}]\ndata: {train_shards: x}\nmodel: {llm: {pretrained: null}}\n"
                      "logging: {wandb_project: p, wandb_mode: offlne, wandb_samples: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "logging.wandb_mode: 'offlne' is not one of offline, online, disabled" in str(err.value)
    assert "logging.wandb_samples: must be >= 0" in str(err.value)


def test_eval_progress_reports_batches_and_eta_at_most_once_a_minute(monkeypatch):
    from part.evaluation import evaluator

    lines = []

    class Logger:
        def info(self, message):
            lines.append(message)

    clock = iter([0.0, 10.0, 70.0, 80.0, 90.0])
    monkeypatch.setattr(evaluator.time, "monotonic", lambda: next(clock))
    progress = evaluator.EvalProgress(Logger(), step=420)  # started at t=0
    progress(1, 4)  # t=10: under a minute since the start, not printed
    progress(2, 4)  # t=70: printed
    progress(3, 4)  # t=80: 10 s since the last line, not printed
    progress(4, 4)  # t=90: the last batch is always printed
    assert lines == ["eval at step 420: batch 2/4 on this rank, 1.2 min, eta 1.2 min",
                     "eval at step 420: batch 4/4 on this rank, 1.5 min, eta 0.0 min"]


def test_objective_losses_are_logged_and_summed_by_name(tmp_path, capsys):
    """The objectives' losses reach the log by name (a new objective's loss needs no edit here), averaged over the
    micro-batches that computed them; the global batch's record sums every SUMMED field through one collective."""
    cfg = TrainConfig(stages=[StageConfig(name="s1", steps=2, lr=1e-3)], output_dir=str(tmp_path),
                      logging=LoggingConfig(every=1))
    logger = RunLogger(cfg, rank=0, world_size=2)
    span = Curriculum(cfg.stages).at(0)
    record = StepRecord(step=1, lr=1e-3, loss_sum=6.0, tokens=3, samples=2, audio_seconds=4.0, grad_norm=0.5,
                        step_time=1.0, data_wait=0.25, objective_sums={"ctc_loss": 3.0, "frame_loss": 0.0},
                        objective_batches={"ctc_loss": 2, "frame_loss": 0})
    assert record.objective_losses == {"ctc_loss": 1.5}  # no micro-batch computed the frame loss
    calls = []

    def doubled(values):  # two ranks with the same figures
        calls.append(list(values))
        return [2 * v for v in values]

    total = record.summed_over_ranks(doubled)
    assert len(calls) == 1 and len(calls[0]) == 17  # one collective: 13 scalar fields and 2 + 2 named losses
    assert (total.loss_sum, total.tokens, total.samples, total.data_wait) == (12.0, 6, 4, 0.5)
    assert isinstance(total.tokens, int) and total.objective_batches == {"ctc_loss": 4, "frame_loss": 0}
    assert (total.step, total.lr, total.grad_norm, total.step_time) == (1, 1e-3, 0.5, 1.0)  # rank 0's own
    assert total.objective_losses == {"ctc_loss": 1.5}
    logger.step(total, span)
    logger.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[part] step 1/2"))
    assert "loss 2.0000 ctc 1.5000 lr" in line and "frame" not in line
    row = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    assert row["ctc_loss"] == 1.5 and "frame_loss" not in row
