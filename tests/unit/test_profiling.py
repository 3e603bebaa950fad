import json
import re

import torch

from part.train.profiling import StepProfiler


def _run(profiler: StepProfiler, steps: int, stage_end: int = 10**9) -> None:
    """A training-like loop: the trainer's calls around steps 0..steps-1, a matmul per step in a region named
    after the step (1-based), and after the stage's last step a "checkpoint" region."""
    a = torch.randn(64, 64)
    for done in range(steps):
        profiler.before_step(done)
        with torch.profiler.record_function(f"step_{done + 1}"):
            (a @ a).sum()
        profiler.after_step(done + 1, stage_end)
        if done + 1 == stage_end:
            with torch.profiler.record_function("checkpoint"):
                (a + 1).sum()


def _events(trace_path) -> set[str]:
    return {event.get("name", "") for event in json.loads(trace_path.read_text())["traceEvents"]}


def test_profiles_exactly_the_window_and_writes_trace_and_table(tmp_path):
    profiler = StepProfiler(tmp_path, rank=1, start=2, steps=2, device=torch.device("cpu"))
    _run(profiler, 6)
    trace, top = tmp_path / "rank1_steps3-4.trace.json", tmp_path / "rank1_steps3-4.top.txt"
    assert profiler.written == [trace, top]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([trace.name, top.name])
    names = _events(trace)
    assert {"step_3", "step_4"} <= names  # steps 3 and 4 (1-based) are in it ...
    assert not names & {"step_1", "step_2", "step_5", "step_6"}  # ... and no other
    assert "aten::mm" in names
    table = top.read_text()
    assert table.startswith("steps 3-4, rank 1, sorted by self_cpu_time_total")
    assert "aten::mm" in table
    # how much of the window's wall time the operators' own time fills, and the rest
    wall, busy, share, rest = map(float, re.search(
        r"^([\d.]+) ms wall, ([\d.]+) ms in operators on the host \(([\d.]+)%\), ([\d.]+) ms else$", table,
        re.M).groups())
    # (the figures are printed rounded: a window of a fraction of a millisecond moves the share by some tenths)
    assert 0 < busy <= wall and abs(share - 100 * busy / wall) < 1 and abs(rest - (wall - busy)) < 2e-3


def test_window_stops_at_the_stage_end_before_its_checkpoint(tmp_path):
    profiler = StepProfiler(tmp_path, rank=0, start=3, steps=10, device=torch.device("cpu"))
    _run(profiler, 5, stage_end=5)
    names = _events(tmp_path / "rank0_steps4-5.trace.json")
    assert {"step_4", "step_5"} <= names and "checkpoint" not in names
    _run(profiler, 8)  # one window a run: a later stage does not profile again
    assert len(list(tmp_path.iterdir())) == 2


def test_window_left_early_is_written_on_close(tmp_path):
    profiler = StepProfiler(tmp_path, rank=0, start=3, steps=10, device=torch.device("cpu"))
    _run(profiler, 5)
    assert profiler.written == []  # still open: step 13 not reached
    profiler.close(5)  # e.g. a stop signal after step 5
    assert {"step_4", "step_5"} <= _events(tmp_path / "rank0_steps4-5.trace.json")


def test_disabled_or_passed_window_profiles_nothing(tmp_path):
    off = StepProfiler(tmp_path / "off", rank=0, start=-1, steps=3, device=torch.device("cpu"))
    _run(off, 4)
    off.close(4)
    resumed = StepProfiler(tmp_path / "resumed", rank=0, start=1, steps=2, device=torch.device("cpu"))
    for done in range(5, 8):  # a run resumed at step 5 never sees step 2
        resumed.before_step(done)
        resumed.after_step(done + 1, 10)
    resumed.close(8)
    assert not (tmp_path / "off").exists() and not (tmp_path / "resumed").exists()
