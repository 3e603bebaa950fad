"""`train.py --check`, what the launch scripts run first: exit 2 naming the field before any DeepSpeed start, for
the config, for every stage's data at the world size, and for a trainable group that matches no parameter of the
configured model (resolved against the real parameter names of the model built on the meta device). One call per
test goes through a subprocess (the command as users run it); the others call train.main in this process."""

import subprocess
import sys

import pytest
from conftest import REPO, call_main, write_config

import train

ONE_STAGE = "  - {name: s1, steps: 4, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"


def check(capsys: pytest.CaptureFixture, path, *args: str) -> tuple[int, str, str]:
    """train.py --check in this process: (exit code, stdout, stderr)."""
    return call_main(train.main, ["--config", str(path), "--check", *args], capsys)


def test_check_fails_before_any_process(tmp_path, corpus, tiny_models, capsys):
    """`train.py --check` is what the launch scripts run first: exit 2, the field named, no DeepSpeed start."""
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    bad = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "stages.0.warmup_steps=9"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stages[0].warmup_steps: must be between 0 and steps" in bad.stderr
    assert "Traceback" not in bad.stderr
    # data is checked too: 2 ranks x 8 loader workers need more shards than the fixture has
    code, _, err = check(capsys, path, "--world-size", "2", "data.num_workers=8")
    assert code == 2 and "fewer than ranks x workers = 2 x 8" in err, err
    code, out, err = check(capsys, path, "--world-size", "2")
    assert code == 0, err
    assert "OK (1 stages, 4 steps)" in out
    # the per-stage memory estimate, and its warning on a device too small for the stage
    assert "estimated memory per rank (2 ranks, ZeRO-3" in out and "| s1 |" in out
    assert "warning" not in out
    code, out, _ = check(capsys, path, "--device-memory-gb", "0.01")
    assert code == 0 and "warning: stage 's1' needs about" in out, out


def test_check_rejects_a_group_that_matches_no_parameter(tmp_path, corpus, tiny_models, capsys):
    """The names are known patterns, but the tiny LLM has 4 layers and the encoder 4: nothing to train."""
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    for group in ("llm.layers.99", "encoder.layers.7"):
        code, _, err = check(capsys, path, f"stages.0.trainable=[adapter, {group}]")
        assert code == 2, err
        assert f"stages[0].trainable: group '{group}' matches no parameter of the configured model" in err
    code, _, err = check(capsys, path, "stages.0.trainable=[adapter, llm.layers.3, encoder.top.9, llm.lora]")
    assert code == 0, err
