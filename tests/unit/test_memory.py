"""The per-stage memory estimate of `train.py --check`: model states agree with DeepSpeed's own estimators when
everything trains, and shrink with what a stage freezes; activations follow the batch and checkpointing."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from part.config import ActivationCheckpointingConfig, TrainConfig
from part.model.flops import Shapes, Trainable
from part.train.memory import GIB, StageMemory, activation_bytes, evaluation_estimate, model_state_bytes

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

P, LARGEST = 1_500_000_000, 50_000_000


@pytest.mark.parametrize("ranks", [1, 8])
def test_all_trainable_model_states_match_deepspeed(ranks):
    _, zero3, _ = estimate_zero3_model_states_mem_needs(P, LARGEST, num_gpus_per_node=ranks, cpu_offload=False)
    assert sum(model_state_bytes(P, P, LARGEST, 3, ranks, "bf16")) == pytest.approx(zero3, rel=1e-6)
    _, zero2 = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=ranks, cpu_offload=False)
    assert sum(model_state_bytes(P, P, LARGEST, 2, ranks, "bf16")) == pytest.approx(zero2, rel=1e-6)


def test_frozen_parameters_cost_their_16_bit_copy_only():
    params, grads, optim = model_state_bytes(P, 10_000_000, LARGEST, 3, 1, "bf16")
    assert params == 2 * P + 4 * LARGEST and grads == 4e7 and optim == 1.2e8
    assert model_state_bytes(P, 10_000_000, LARGEST, 3, 1, "bf16", offload_optimizer=True)[2] == 0


def test_activations_follow_batch_and_checkpointing():
    shapes = Shapes(n_mels=128, enc_dim=1280, enc_layers=32, enc_ffn=5120, downsample=4, adapter_kind="transformer",
                    adapter_hidden=2048, adapter_layers=2, llm_dim=1536, llm_layers=28, llm_q_dim=1536,
                    llm_kv_dim=256, llm_ffn=8960, vocab=151936, lora_rank=16, lora_targets=("q_proj",),
                    frame_head=False)
    cfg = TrainConfig()
    cfg.data.max_batch_seconds, cfg.data.max_batch_tokens = 480, 8192
    adapter_only = activation_bytes(shapes, Trainable(adapter=True), cfg)
    whole_encoder = activation_bytes(shapes, Trainable(adapter=True, encoder_layers=frozenset(range(32))), cfg)
    # 480 s = 24,000 encoder frames x 32 layers x (8 x 1280 + 2 x 5120) elements x 2 bytes: about 29 GiB more
    assert (whole_encoder - adapter_only) / 1024**3 == pytest.approx(30.0, rel=0.1)
    cfg.model = dataclasses.replace(cfg.model, activation_checkpointing=ActivationCheckpointingConfig(True, True))
    checkpointed = activation_bytes(shapes, Trainable(adapter=True, encoder_layers=frozenset(range(32))), cfg)
    assert checkpointed < whole_encoder / 3
    cfg.data.max_batch_seconds = 240
    assert activation_bytes(shapes, Trainable(adapter=True), cfg) < adapter_only


def test_the_evaluation_replica_adds_a_whole_copy_of_the_weights_to_the_largest_model_states():
    cfg = TrainConfig(precision="bf16", zero_stage=3)
    stages = [StageMemory("adapter", 1e9, 1e8, 3e8, 5e9), StageMemory("lora", 1e9, 2e8, 6e8, 9e9)]
    replica = evaluation_estimate(stages, cfg, P)
    assert (replica.params, replica.grads, replica.optimizer, replica.activations) == (1e9 + 2 * P, 2e8, 6e8, 0)
    assert evaluation_estimate(stages, dataclasses.replace(cfg, zero_stage=2), P) is None  # weights whole already
    cfg.eval.replicate = False
    assert evaluation_estimate(stages, cfg, P) is None  # the engine decodes: nothing more than training


@pytest.fixture(scope="module")
def large_shapes(tmp_path_factory):
    """Config-only directories of Whisper-large-v3 and Qwen2.5-7B (bench/large_recipe_memory.py)."""
    from large_recipe_memory import write_shapes

    return write_shapes(tmp_path_factory.mktemp("large_shapes"))


def quoted_totals(recipe: Path) -> dict[str, float]:
    """The per-stage totals a recipe's comment quotes: its table rows (`#   <stage> p g o a total`), or for a
    one-stage recipe the 'about N GiB' of its memory line."""
    text = recipe.read_text()
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^#\s+(\w+)(?:\s+[\d.]+){4}\s+([\d.]+)\s*$", text, re.M)}
    if not rows:
        about = re.search(r"^# Memory per rank.*about ([\d.]+) GiB", text, re.M)
        assert about, f"{recipe} quotes no memory estimate"
        rows = {"": float(about[1])}
    return rows


@pytest.mark.parametrize("recipe", ["part_large.yaml", "baseline_large.yaml"])
def test_the_large_recipes_quote_their_current_memory_estimate(recipe, large_shapes):
    """Every stage fits an 80 GB GPU at the configured batch, and the comment says what --check prints now."""
    from large_recipe_memory import recipe_report

    path = REPO / "configs" / recipe
    report, rows = recipe_report(path, large_shapes, world_size=8, device_memory_gb=80)
    assert "warning" not in report, report
    estimated = {r.stage: round(r.total / GIB, 1) for r in rows}
    quoted = quoted_totals(path)
    if "" in quoted:  # one stage
        assert list(estimated.values()) == [quoted[""]], (estimated, quoted)
    else:
        assert estimated == quoted, f"{recipe}: the comment quotes {quoted}, --check estimates {estimated}"
    assert max(estimated.values()) < 0.9 * 80
