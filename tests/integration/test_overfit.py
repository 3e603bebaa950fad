"""Overfit guard: through the real training path (the `deepspeed` launcher, train.py), six clips drive the loss
near zero and greedy decoding reproduces them. A regression in splicing, loss masking, label shift, the CTC term
or generation makes this fail, where loss-falls tests would still pass.

ZeRO-2, as the large recipes train: on one CPU rank ZeRO-3's per-module gathers make the tiny model's steps 1.5x
slower. Learning under ZeRO-3 is guarded by tests/integration/test_frame_loss_e2e.py (two ranks memorise their
clips' frame targets) and test_train_e2e.py (losses equal to the last digit across kills and resumes)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import REPO, write_config

# Every group trainable, one stage: the fastest way to memorise a handful of clips with the tiny random models.
STAGES = """\
  - {name: memorise, steps: 100, tasks: {asr: 1.0}, trainable: [adapter, encoder, llm], lr: 3.0e-3,
     warmup_steps: 10, min_lr_ratio: 0.3}
"""


def short_clips(shard: Path, out: Path, max_seconds: float) -> int:
    """Copies the clips of `shard` up to `max_seconds` long (their .json record says) into the shard `out`; returns
    how many. The members are copied as bytes, nothing is decoded."""
    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            samples.setdefault(member.name.rsplit(".", 1)[0], []).append((member, tar.extractfile(member).read()))
    kept = [members for members in samples.values()
            if any(m.name.endswith(".json") and json.loads(data)["duration"] <= max_seconds for m, data in members)]
    with tarfile.open(out, "w") as tar:
        for members in kept:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
    return len(kept)


def test_six_clips_are_memorised(corpus, tiny_gemma_models, tmp_path):
    # the fixture's first English shard holds 8 clips; the 6 under 10 s keep the steps short
    clips = tmp_path / "clips.tar"
    assert short_clips(corpus / "train" / "en-000000.tar", clips, max_seconds=10.0) == 6
    # The demo's LLM family (Gemma 3: scaled embeddings, a tied head, sliding-window layers), LoRA on its projections
    config = write_config(tmp_path / "c.yaml", corpus, tiny_gemma_models, STAGES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", "1", "--master_port", str(port), "train.py", "--config", str(config),
           f"data.train_shards={clips}", f"data.eval_shards={clips}", "data.languages=[en]", "data.window=8",
           "data.max_batch_size=8", "data.max_batch_seconds=200", "data.max_batch_tokens=4096",
           "model.alignment.ctc.weight=0.3", "eval.tasks=[asr]", "eval.per_language=8", "eval.max_new_tokens=96",
           "eval.batch_size=8", "checkpoint.every=1000", "logging.every=20", "zero_stage=2",
           f"ds_config={REPO / 'ds_configs' / 'zero2_cpu.json'}"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] > 2.0, log[0]  # it starts from not knowing the clips ...
    assert log[-1]["loss"] < 0.1, log[-5:]  # ... and ends knowing them
    assert log[-1]["ctc_loss"] < log[0]["ctc_loss"] / 2, (log[0], log[-1])  # the CTC term is logged and learns

    final = json.loads((out / "final.json").read_text())
    (row,) = [r for r in final["rows"] if r["task"] == "asr"]
    assert row["language"] == "en" and row["n"] == 6, row
    hyps = [json.loads(line) for line in (out / "final_hypotheses.jsonl").read_text().splitlines()]
    assert row["value"] <= 5.0, [(h["reference"], h["hypothesis"]) for h in hyps]
