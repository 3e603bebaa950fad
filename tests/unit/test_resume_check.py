"""What `--resume` refuses: changes that would misplace weights, optimizer state or the data position."""

from __future__ import annotations

import copy

import pytest

from part.config import StageConfig, TrainConfig, to_dict
from part.train.resume_check import resume_conflicts


def config() -> TrainConfig:
    cfg = TrainConfig(stages=[
        StageConfig(name="s1", steps=10, trainable=["adapter"]),
        StageConfig(name="s2", steps=10, trainable=["adapter", "encoder.top.2"]),
        StageConfig(name="s3", steps=10, trainable=["adapter", "llm.lora"], tasks={"asr": 0.5, "s2tt": 0.5}),
    ])
    cfg.data.train_shards = "x/{lang}.tar"
    return cfg


def changed(edit) -> TrainConfig:
    cfg = copy.deepcopy(config())
    edit(cfg)
    return cfg


SAVED = to_dict(config())


@pytest.mark.parametrize("edit, step, field", [
    (lambda c: setattr(c.stages[1], "trainable", ["adapter", "encoder.top.4"]), 15, "stages[1].trainable"),
    (lambda c: setattr(c.stages[0], "steps", 12), 15, "stages[0].steps"),  # would resume stage 2 into stage 1
    (lambda c: setattr(c.model.adapter, "hidden", 512), 5, "model.adapter.hidden"),
    (lambda c: setattr(c.data, "window", 64), 5, "data.window"),
    (lambda c: setattr(c, "zero_stage", 2), 5, "zero_stage"),
    (lambda c: setattr(c.stages[1], "tasks", {"asr": 0.5, "s2tt": 0.5}), 15, "stages[1].tasks"),
    (lambda c: setattr(c.stages[1], "steps", 3), 15, "stages[1].steps"),  # ends before the resumed step
    (lambda c: c.stages.pop(), 25, "stages: the run now ends at step 20"),
    (lambda c: setattr(c.stages[1], "group_lr", {"encoder.top.2": 1e-4}), 15, "stages[1].group_lr"),  # param groups
])
def test_refused(edit, step, field):
    conflicts = resume_conflicts(SAVED, changed(edit), step)
    assert any(c.startswith(field) for c in conflicts), conflicts


@pytest.mark.parametrize("edit, step", [
    (lambda c: setattr(c.stages[2], "trainable", ["adapter", "llm"]), 15),  # a later stage
    (lambda c: setattr(c.stages[1], "steps", 20), 15),  # the resumed stage's own length
    (lambda c: setattr(c.stages[0], "steps", 15), 10),  # the stage the boundary checkpoint ends: extended
    (lambda c: setattr(c.stages[1], "lr", 1e-5), 15),
    (lambda c: setattr(c.stages[1], "trainable", ["adapter", "encoder"]), 10),  # at the boundary: not begun
    (lambda c: setattr(c.eval, "per_language", 200), 15),
    (lambda c: setattr(c.checkpoint, "every", 7), 15),
    (lambda c: setattr(c.checkpoint, "lean", False), 15),  # each checkpoint says what it holds
    (lambda c: setattr(c.data, "num_workers", 4), 15),  # restarts the stage's stream, checked separately
    (lambda c: setattr(c.data, "shard_retries", 9), 15),  # how network reads are retried, not what they give
    (lambda c: setattr(c.model.activation_checkpointing, "llm", True), 15),
    (lambda c: c.stages.append(StageConfig(name="s4", steps=5)), 25),
    (lambda c: setattr(c.stages[0], "group_lr", {"adapter": 1e-2}), 15),  # a finished stage's optimizer is gone
])
def test_allowed(edit, step):
    assert resume_conflicts(SAVED, changed(edit), step) == []


def test_a_field_added_after_the_checkpoint_is_not_compared():
    """A checkpoint written before a config field existed resumes under its default or any value; the fields it
    has are compared as ever, and data-valued dicts (tasks, group_lr) by every key."""
    saved = copy.deepcopy(SAVED)
    del saved["model"]["adapter"]["hidden"], saved["data"]["window"]
    assert resume_conflicts(saved, changed(lambda c: setattr(c.data, "window", 64)), 5) == []
    conflicts = resume_conflicts(saved, changed(lambda c: setattr(c.model.adapter, "layers", 7)), 5)
    assert [c.split(":")[0] for c in conflicts] == ["model.adapter.layers"]
    saved["stages"][1]["group_lr"] = {}
    conflicts = resume_conflicts(saved, changed(lambda c: setattr(c.stages[1], "group_lr", {"adapter": 1e-3})), 15)
    assert [c.split(":")[0] for c in conflicts] == ["stages[1].group_lr.adapter"]
