"""`train.py --check`, what the launch scripts run first: exit 2 naming the field before any DeepSpeed start, for
the config, for every stage's data at the world size, and for a trainable group that matches no parameter of the
configured model (resolved against the real parameter names of the model built on the meta device)."""

import subprocess
import sys

from conftest import REPO, write_config

ONE_STAGE = "  - {name: s1, steps: 4, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"


def test_check_fails_before_any_process(tmp_path, corpus, tiny_models):
    """`train.py --check` is what the launch scripts run first: exit 2, the field named, no DeepSpeed start."""
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    bad = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "stages.0.warmup_steps=9"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stages[0].warmup_steps: must be between 0 and steps" in bad.stderr
    # data is checked too: 2 ranks x 8 loader workers need more shards than the fixture has
    few = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "--world-size", "2",
                          "data.num_workers=8"], cwd=REPO, capture_output=True, text=True)
    assert few.returncode == 2
    assert "fewer than ranks x workers = 2 x 8" in few.stderr
    good = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "--world-size", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "OK (1 stages, 4 steps)" in good.stdout
    # the per-stage memory estimate, and its warning on a device too small for the stage
    assert "estimated memory per rank (2 ranks, ZeRO-3" in good.stdout and "| s1 |" in good.stdout
    assert "warning" not in good.stdout
    small = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "--device-memory-gb",
                            "0.01"], cwd=REPO, capture_output=True, text=True)
    assert small.returncode == 0 and "warning: stage 's1' needs about" in small.stdout, small.stdout


def test_check_rejects_a_group_that_matches_no_parameter(tmp_path, corpus, tiny_models):
    """The names are known patterns, but the tiny LLM has 4 layers and the encoder 4: nothing to train."""
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    for group in ("llm.layers.99", "encoder.layers.7"):
        bad = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check",
                              f"stages.0.trainable=[adapter, {group}]"], cwd=REPO, capture_output=True, text=True)
        assert bad.returncode == 2, bad.stderr
        assert f"stages[0].trainable: group '{group}' matches no parameter of the configured model" in bad.stderr
        assert "Traceback" not in bad.stderr
    good = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check",
                           "stages.0.trainable=[adapter, llm.layers.3, encoder.top.9, llm.lora]"],
                          cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
