"""The fp32 `*_cpu.json` DeepSpeed configs train a tiny model through the real `deepspeed` launcher with a torch
AdamW client optimizer, exactly as the trainer uses them. The bf16 ones get an engine run only where CUDA is
available."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

ROOT = REPO
DS_DIR = ROOT / "ds_configs"
SMOKE = ROOT / "tests" / "integration" / "ds_smoke.py"
CONFIGS = sorted(DS_DIR.glob("*.json"))
FP32_CONFIGS = [p for p in CONFIGS if p.stem.endswith("_cpu")]
BF16_CONFIGS = [p for p in CONFIGS if not p.stem.endswith("_cpu")]
STEPS = 2
LAUNCH_TIMEOUT_S = 300


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------- real engine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from deepspeed.launcher.runner import main; sys.exit(main())"]


def _launch(configs: list[Path], nproc: int) -> subprocess.CompletedProcess:
    """Run tests/ds_smoke.py under the real `deepspeed` launcher with `nproc` local ranks.

    On the CPU accelerator `--num_gpus N` (alias `--num_accelerators N`) is what gives N local ranks: the
    launcher takes the slot list straight from it, whereas the detected device count is the number of NUMA
    nodes (usually 1) and `--include localhost:0,1` is checked against that count and fails.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # light: several ranks on a small CPU
    cmd = _launcher() + ["--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                         str(SMOKE.relative_to(ROOT)), "--steps", str(STEPS)]
    cmd += [str(p.relative_to(ROOT)) for p in configs]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _losses(proc: subprocess.CompletedProcess, path: Path) -> list[float]:
    name = re.escape(str(path.relative_to(ROOT)))
    return [float(m.group(1)) for m in re.finditer(rf"^DS_SMOKE config={name} step=\d+ loss=(\S+)$", proc.stdout, re.M)]


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def fp32_run() -> subprocess.CompletedProcess:
    # One launcher run for all fp32 configs (each builds its own engine in turn): the launcher and the
    # per-rank imports dominate the cost, not the two steps.
    nproc = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    return _launch(FP32_CONFIGS, nproc)


def test_fp32_launcher_exits_zero(fp32_run):
    assert fp32_run.returncode == 0, _report(fp32_run)


@pytest.mark.parametrize("path", FP32_CONFIGS, ids=_ids(FP32_CONFIGS))
def test_fp32_config_trains(fp32_run, path: Path):
    losses = _losses(fp32_run, path)
    assert len(losses) == STEPS, _report(fp32_run)
    assert all(math.isfinite(v) for v in losses), losses
    assert f"DS_SMOKE config={path.relative_to(ROOT)} done" in fp32_run.stdout


def test_fp32_configs_agree(fp32_run):
    # Same model, data and fp32 AdamW: ZeRO-2, ZeRO-3 and ZeRO-3 with offload are the same optimisation, so the
    # losses match up to reduction order. The second step shows the update happened (and happened alike).
    runs = {p.name: _losses(fp32_run, p) for p in FP32_CONFIGS}
    assert all(len(v) == STEPS for v in runs.values()), _report(fp32_run)
    first = next(iter(runs.values()))
    assert first[1] != first[0]
    for losses in runs.values():
        assert losses == pytest.approx(first, rel=1e-4, abs=1e-6), runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 engine test needs a CUDA GPU")
def test_bf16_configs_train_on_gpu():
    proc = _launch(BF16_CONFIGS, min(2, torch.cuda.device_count()))
    assert proc.returncode == 0, _report(proc)
    for path in BF16_CONFIGS:
        losses = _losses(proc, path)
        assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), _report(proc)
