import math

import pytest

from part.config import StageConfig
from part.curriculum import Curriculum


def stages():
    return [
        StageConfig(name="a", steps=10, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1),
        StageConfig(name="b", steps=5, lr=5e-4, warmup_steps=0, min_lr_ratio=0.0),
        StageConfig(name="c", steps=1, lr=1e-4, warmup_steps=0),
    ]


def test_boundaries():
    c = Curriculum(stages())
    assert c.total_steps == 16
    assert [c.at(s).name for s in (0, 9, 10, 14, 15)] == ["a", "a", "b", "b", "c"]
    assert c.at(16).name == "c"  # past the end: the last stage
    assert (c.at(10).start, c.at(10).end) == (10, 15)
    assert [s for s in range(17) if c.is_boundary(s)] == [10, 15]
    with pytest.raises(ValueError):
        c.at(-1)


def test_learning_rate_schedule():
    c = Curriculum(stages())
    # warmup: lr * (local + 1) / (warmup + 1)
    assert c.lr(0) == pytest.approx(1e-3 * 1 / 5)
    assert c.lr(3) == pytest.approx(1e-3 * 4 / 5)
    # first step after warmup: cosine at progress 0 -> peak
    assert c.lr(4) == pytest.approx(1e-3)
    # stage a decays over 6 steps from 1e-3 to 1e-4: step 7 is progress 3/6 -> midpoint 5.5e-4
    assert c.lr(7) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # stage b restarts at its own peak (no warmup)
    assert c.lr(10) == pytest.approx(5e-4)
    assert c.lr(14) == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))


def test_empty_curriculum_refused():
    with pytest.raises(ValueError):
        Curriculum([])


def test_the_groups_trained_up_to_a_stage():
    c = Curriculum([StageConfig(name="a", steps=1, trainable=["adapter"]),
                    StageConfig(name="b", steps=1, trainable=["adapter", "encoder.top.2"]),
                    StageConfig(name="c", steps=1, trainable=["llm.lora"])])
    assert c.trained_through(0) == ["adapter"]
    assert c.trained_through(1) == ["adapter", "encoder.top.2"]
    assert c.trained_through(2) == ["adapter", "encoder.top.2", "llm.lora"]
