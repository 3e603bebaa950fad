"""The GPU check end to end (bench/gpu_check.py): real shapes, three stages, checkpoints, kill -9 and resume,
evaluation, the per-stage report with MFU. Needs a CUDA GPU (about 6 minutes on an H200); skipped elsewhere.
At toy shapes the same path runs on CPU with `python bench/gpu_check.py --small`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU check needs a CUDA GPU")
def test_gpu_check(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--work", str(tmp_path / "work"), "--out", str(out),
                           "--timeout", "900", "--budget", "1200"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "gpu_check_zero2.md").read_text()
    for stage in ("s1_adapter_asr", "s2_adapter_encoder", "s3_adapter_lora_s2tt"):
        assert f"| {stage} |" in report
    assert "% |" in report  # an MFU figure, not n/a
    assert "## Profile" in report and "aten::" in report
    # the step's anatomy: both cuDNN attention settings in every stage
    for stage in ("s1_adapter_asr", "s2_adapter_encoder", "s3_adapter_lora_s2tt"):
        assert report.count(f"| {stage} | cuDNN attention o") == 2


@pytest.mark.slow
@pytest.mark.extended  # before a run on a GPU: bash launch/test.sh --extended tests/integration/test_gpu_check.py
def test_gpu_check_script_at_toy_shapes_on_cpu(tmp_path):
    """The script itself (a GPU lease is 15 minutes: a broken script wastes it): toy shapes, fp32, CPU, the same
    stages, checkpoints, kill -9 and resume, evaluation, profile window and report. Extended: the paths it drives
    are the default run's launcher tests, its report is tests/unit/test_gpu_check_report.py."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--small", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--steps", "3", "--every", "2", "--clips", "8",
                           "--eval-per-language", "2", "--batch-seconds", "60", "--timeout", "500", "--budget", "1200"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "gpu_check_zero2.md").read_text()
    assert "training exit code 0" in report and "kill -9 at step 6, resume included" in report
    for stage in ("s1_adapter_asr", "s2_adapter_encoder", "s3_adapter_lora_s2tt"):
        assert f"| {stage} |" in report
    # the default window: stage 3's 4th step, or its last one: step 9 of 9, the window cut at the run's end
    assert "## Profile" in report and "steps 9-9, rank 0, sorted by self_cpu_time_total" in report
    assert "## Evaluation" in report
    # the step's anatomy, per stage: new shapes vs replayed batches, the share in (aten) operators
    for stage in ("s1_adapter_asr", "s2_adapter_encoder", "s3_adapter_lora_s2tt"):
        assert f"| {stage} | cpu | 2 (" in report
    assert "the own time of the operators on the host per replayed step" in report
