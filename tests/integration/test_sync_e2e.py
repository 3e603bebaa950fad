"""Host synchronisations per training step, counted through the real `deepspeed` launcher (2 ranks, the tiny
models) by tests/sync_guard.py over the whole step as the trainer runs it (tests/integration/guarded_train.py):
part's code asks for `part_reads(k)` per step with k micro-batches (each micro-batch's all-ranks finiteness
check, the step's losses and gradient norm, the wait for the device that times the step, the log's sums over
ranks), in every step of every stage; the libraries (DeepSpeed, transformers, peft) for at most
`library_reads(k)` more, except in an engine's first two steps (where ZeRO-3 records and then checks its
parameter-fetch trace). Here at the large recipes' settings at toy size: ZeRO-2, bf16 where the CPU has it,
batches filled to their bounds with clips packed into encoder rows, up to 12 clips a batch (and, extended, with
gradient accumulation and a stage where text-only samples join).
tests/integration/test_train_e2e.py checks the same bounds on every stage of a ZeRO-3 curriculum,
tests/integration/test_frame_loss_e2e.py part's with the frame objectives."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, train_under_guard, write_config

pytestmark = pytest.mark.slow

WARMUP = 2  # an engine's first steps, whose library reads are not bounded
SYNC_LINE = re.compile(r"sync guard: (\d+) steps \(([^)]*)\)")
STEP = re.compile(r"part (\d+) all (\d+)")


def part_reads(micro_batches: int = 1) -> int:
    """part's host synchronisations in a step of `micro_batches` micro-batches."""
    return micro_batches + 3


def library_reads(micro_batches: int = 1) -> int:
    """The most the libraries add to part's in a steady step of `micro_batches` micro-batches."""
    return 4 + 6 * micro_batches


def step_syncs(stdout: str, steps: int) -> list[list[tuple[int, int]]]:
    """(part's, all) host synchronisations of every step, one list per rank, from the sync guard's lines in a
    run's output (tests/integration/guarded_train.py)."""
    lines = list(SYNC_LINE.finditer(stdout))
    assert len(lines) == 2 and all(int(m[1]) == steps for m in lines), stdout[-3000:]
    return [[(int(p), int(a)) for p, a in STEP.findall(m[0])] for m in lines]


def assert_bounded(stdout: str, stage_starts: list[int], steps: int, part: int,
                   libraries: int | None = library_reads()) -> None:
    """part's count is at most `part` in every step; everything's at most `part` + `libraries` in every step but
    an engine's first two (`libraries` None: not bounded)."""
    warm = {s + k for s in stage_starts for k in range(WARMUP)}
    said = "\n".join(re.findall(r"sync guard: [^;]*; part's: [^;]*", stdout))  # the counts, where part's were
    for rank in step_syncs(stdout, steps):
        assert max(p for p, _ in rank) <= part, said
        if libraries is not None:
            assert max(a for i, (_, a) in enumerate(rank) if i not in warm) <= part + libraries, said


def large_recipe_settings(tmp_path, bf16: bool, micro_batches: int = 1) -> list[str]:
    """configs/part_large.yaml's engine and batching at toy size: ZeRO-2 (bf16 where the CPU has it), batches
    filled first-fit to their bounds, clips packed into 30-s encoder rows; `micro_batches` a step."""
    ds = json.loads((REPO / "ds_configs" / "zero2_cpu.json").read_text())
    ds["bf16"]["enabled"] = bf16
    ds["gradient_accumulation_steps"] = micro_batches
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    return [f"ds_config={tmp_path / 'zero2.json'}", "zero_stage=2", f"precision={'bf16' if bf16 else 'fp32'}",
            f"optim.grad_accum_steps={micro_batches}",
            "data.batching=fill", "data.audio_row_seconds=30", "data.max_duration=15", "data.max_batch_size=12",
            "data.max_batch_seconds=90", "data.max_batch_tokens=2048", "eval.per_language=0", "checkpoint.every=100"]


def bf16_on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_bf16_supported())


LORA = """\
  - {name: lora, steps: 4, tasks: {asr: 0.5, s2tt: 0.5}, translation_targets: [en],
     trainable: [adapter, llm.lora], lr: 1.0e-3, warmup_steps: 0}
"""
TEXT_JOINS = """\
  - {name: text_joins, steps: 2, tasks: {asr: 0.4, s2tt: 0.3, mt: 0.2, text: 0.1}, translation_targets: [en],
     trainable: [llm.lora], lr: 1.0e-3, warmup_steps: 0}
"""


def test_every_step_at_the_large_recipes_settings_has_bounded_host_syncs(corpus, tiny_models, tmp_path):
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, LORA)
    proc = train_under_guard(config, large_recipe_settings(tmp_path, bf16_on_cpu()))
    assert_bounded(proc.stdout, [0], 4, part_reads())
    assert {p for rank in step_syncs(proc.stdout, 4) for p, _ in rank} == {part_reads()}
    # `train.py --check`'s bytes per checkpoint against the ZeRO-2 files this run wrote at its end
    from part.config import load_config
    from part.train.checkpoint_contents import checkpoint_sizes
    from part.train.preflight import skeleton

    cfg = load_config(config, large_recipe_settings(tmp_path, bf16_on_cpu()))
    estimate = checkpoint_sizes(cfg, skeleton(cfg), world_size=2)[0]
    ckpt = config.parent / "ckpt" / "step_0000004"
    deepspeed = sum(f.stat().st_size for f in [*(ckpt / "ds").iterdir(), *ckpt.glob("zero_to_*.py")])
    assert estimate.weights == (ckpt / "model.safetensors").stat().st_size
    assert abs(estimate.optimizer - deepspeed) < 0.03 * deepspeed, (estimate, deepspeed)


@pytest.mark.extended
def test_gradient_accumulation_adds_one_host_sync_per_micro_batch(corpus, tiny_models, tmp_path):
    """Two micro-batches a step, and a stage where text-only samples join, at the same settings."""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, LORA + TEXT_JOINS)
    proc = train_under_guard(config, large_recipe_settings(tmp_path, bf16_on_cpu(), micro_batches=2))
    assert_bounded(proc.stdout, [0, 4], 6, part_reads(2), library_reads(2))
    assert {p for rank in step_syncs(proc.stdout, 6) for p, _ in rank} == {part_reads(2)}
