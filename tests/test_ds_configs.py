"""Every DeepSpeed JSON in ds_configs/ is well-formed, accepted by DeepSpeed's own parser, and (for the fp32
`*_cpu.json` ones) trains a tiny model through the real `deepspeed` launcher with a torch AdamW client
optimizer, exactly as train.py uses them. The bf16 ones get an engine run only where CUDA is available."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
SMOKE = ROOT / "tests" / "ds_smoke.py"
CONFIGS = sorted(DS_DIR.glob("*.json"))
FP32_CONFIGS = [p for p in CONFIGS if p.stem.endswith("_cpu")]
BF16_CONFIGS = [p for p in CONFIGS if not p.stem.endswith("_cpu")]
STEPS = 2
LAUNCH_TIMEOUT_S = 300

# What train.py passes itself, so a DeepSpeed JSON must not carry it.
FORBIDDEN_SECTIONS = ("optimizer", "scheduler")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _ds_config(config: dict):
    # With torch.distributed not initialised, DeepSpeedConfig falls back to rank 0 / world size 1
    # (it catches the "not initialized" assertion), so no environment variables are needed.
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


def test_expected_files_present():
    names = {p.name for p in CONFIGS}
    for name in ("zero3.json", "zero3_cpu.json", "zero3_offload.json", "zero3_offload_cpu.json", "zero2.json",
                 "zero2_cpu.json"):
        assert name in names, f"ds_configs/{name} is missing"
    assert FP32_CONFIGS and BF16_CONFIGS


# --------------------------------------------------------------------------------------------- shape


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_json_shape(path: Path):
    config = _load(path)
    assert isinstance(config, dict)
    for section in FORBIDDEN_SECTIONS:
        assert section not in config, f"{path.name}: '{section}' is set by train.py and must not be in the JSON"
    assert isinstance(config.get("train_micro_batch_size_per_gpu"), int)
    assert config["train_micro_batch_size_per_gpu"] >= 1
    assert "train_batch_size" not in config, f"{path.name}: let DeepSpeed derive train_batch_size from the world size"
    assert config.get("zero_optimization", {}).get("stage") in (2, 3), f"{path.name}: zero_optimization.stage"
    assert not config.get("fp16", {}).get("enabled", False), f"{path.name}: fp16 is not used by this project"
    bf16 = config.get("bf16", {}).get("enabled", False)
    assert bf16 is (not path.stem.endswith("_cpu")), f"{path.name}: *_cpu.json are fp32, the others bf16"
    zero = config["zero_optimization"]
    offload = "offload_optimizer" in zero or "offload_param" in zero
    assert offload is ("offload" in path.stem), f"{path.name}: offload sections belong in *offload*.json only"
    if offload:
        # train.py hands DeepSpeed a torch AdamW; DeepSpeed refuses it under offload unless told otherwise.
        assert config.get("zero_force_ds_cpu_optimizer") is False, f"{path.name}: needs zero_force_ds_cpu_optimizer"
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_top_level_keys_known_to_deepspeed(path: Path):
    # DeepSpeedConfig silently ignores unknown top-level keys (only zero_optimization is strict), so a typo
    # such as "gradient_cliping" would pass unnoticed; check against DeepSpeed's own key constants.
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}
    unknown = sorted(set(_load(path)) - known)
    assert not unknown, f"{path.name}: keys DeepSpeed does not know: {unknown}"


# --------------------------------------------------------------------------------------------- DeepSpeed's parser


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_accepted_by_deepspeed_config(path: Path):
    config = _load(path)
    ds = _ds_config(config)
    assert ds.train_micro_batch_size_per_gpu == config["train_micro_batch_size_per_gpu"]
    assert ds.gradient_accumulation_steps == config.get("gradient_accumulation_steps", 1)
    # world_size is 1 here unless some other test initialised deepspeed.comm in this process
    assert ds.train_batch_size == ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * ds.world_size
    assert ds.zero_enabled and ds.zero_optimization_stage == config["zero_optimization"]["stage"]
    assert ds.optimizer_name is None and ds.scheduler_name is None
    assert ds.gradient_clipping == config.get("gradient_clipping", 0.0)
    assert ds.bfloat16_config.enabled is (not path.stem.endswith("_cpu"))
    assert not ds.float16_config.enabled
    offload = "offload" in path.stem
    assert (ds.zero_config.offload_optimizer is not None) is offload
    assert (ds.zero_config.offload_param is not None) is offload
    assert ds.zero_force_ds_cpu_optimizer is (not offload)
    if ds.zero_optimization_stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save is False
    # The file as a path goes through DeepSpeed's hjson loader (which rejects duplicate keys) too.
    assert _ds_config(str(path)).zero_optimization_stage == ds.zero_optimization_stage


@pytest.mark.parametrize("path", BF16_CONFIGS, ids=_ids(BF16_CONFIGS))
def test_bf16_configs_enable_bf16(path: Path):
    assert _ds_config(_load(path)).bfloat16_config.enabled is True


def test_deepspeed_config_rejects_bad_zero_key():
    # The parser this file relies on really is strict about zero_optimization (so the test above means something).
    config = _load(DS_DIR / "zero3_cpu.json")
    config["zero_optimization"] = dict(config["zero_optimization"], stage3_prefetch_bucket_sise=1)
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sise"):
        _ds_config(config)


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
