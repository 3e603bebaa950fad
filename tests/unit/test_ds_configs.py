"""Every DeepSpeed JSON in ds_configs/ is well-formed and accepted by DeepSpeed's own parser (the engine runs
through the launcher: tests/integration/test_ds_launcher.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

DS_DIR = REPO / "ds_configs"
CONFIGS = sorted(DS_DIR.glob("*.json"))
FP32_CONFIGS = [p for p in CONFIGS if p.stem.endswith("_cpu")]
BF16_CONFIGS = [p for p in CONFIGS if not p.stem.endswith("_cpu")]

# What the trainer passes itself, so a DeepSpeed JSON must not carry it.
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
        assert section not in config, f"{path.name}: '{section}' is set by the trainer and must not be in the JSON"
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
        # The trainer hands DeepSpeed a torch AdamW; DeepSpeed refuses it under offload unless told otherwise.
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
