"""Host synchronisations per training step, counted through the real `deepspeed` launcher (2 ranks, ZeRO-3, the
tiny models, adapter and LoRA training) by tests/sync_guard.py: part's code asks for at most 2 per step, everything
together (DeepSpeed, transformers, peft) for at most 8, at batches of up to 12 clips here and of up to 4 in the
reference run of tests/integration/test_train_e2e.py (every stage of a curriculum). The first two steps of an
engine are left out: ZeRO-3 records and then checks its parameter-fetch trace over them (hundreds of reads, once
per stage)."""

from __future__ import annotations

import re

import pytest
from conftest import train_under_guard, write_config

pytestmark = pytest.mark.slow

STEPS = 5
WARMUP = 2
STAGE = f"""\
  - {{name: lora, steps: {STEPS}, tasks: {{asr: 0.5, s2tt: 0.5}}, translation_targets: [en],
     trainable: [adapter, llm.lora], lr: 1.0e-3, warmup_steps: 0}}
"""
SYNC_LINE = re.compile(r"sync guard: (\d+) steps \(([^)]*)\).*")
STEP = re.compile(r"part (\d+) all (\d+)")


def steady_syncs(stdout: str, stage_starts: list[int], steps: int) -> list[tuple[int, int]]:
    """(part's, all) host synchronisations of each steady step (not the first two of a stage) on each rank, from
    the sync guard's lines in a run's output (tests/integration/guarded_train.py)."""
    lines = list(SYNC_LINE.finditer(stdout))
    assert len(lines) == 2 and all(int(m[1]) == steps for m in lines), stdout[-3000:]
    warm = {s + k for s in stage_starts for k in range(WARMUP)}
    return [(int(p), int(a)) for m in lines for i, (p, a) in enumerate(STEP.findall(m[0])) if i not in warm]


def test_a_training_step_makes_at_most_two_host_syncs_in_part_and_eight_in_all(corpus, tiny_models, tmp_path):
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGE)
    proc = train_under_guard(config, ["data.max_batch_size=12", "data.max_batch_seconds=200", "eval.per_language=0",
                                      "checkpoint.every=100"])
    steps = steady_syncs(proc.stdout, [0], STEPS)
    assert len(steps) == 2 * (STEPS - WARMUP)
    assert max(p for p, _ in steps) <= 2 and max(a for _, a in steps) <= 8, steps
