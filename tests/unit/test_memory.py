"""The per-stage memory estimate of `train.py --check`: model states agree with DeepSpeed's own estimators when
everything trains, and shrink with what a stage freezes; activations follow the batch and checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from part.config import ActivationCheckpointingConfig, TrainConfig
from part.model.flops import Shapes, Trainable
from part.train.memory import StageMemory, activation_bytes, evaluation_estimate, model_state_bytes

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
