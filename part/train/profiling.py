"""A torch.profiler window over a few training steps (`logging.profile_start`, `logging.profile_steps`).

Each rank writes into `<output_dir>/profile/`: `rank{R}_steps{A}-{B}.trace.json` (a Chrome / Perfetto trace, with
CUDA kernels when the device is a GPU) and `rank{R}_steps{A}-{B}.top.txt` (the operators sorted by their own time,
the table people read first, under a line saying how much of the window's wall time the operators' own time
fills: on a GPU the device's kernels, so the rest is time the device waited on the host). The window is counted in
global optimizer steps, so a resumed run profiles the same steps; a window the run has already passed is not
profiled.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

TOP_ROWS = 40


def operator_time(averages, device_type: str) -> tuple[float, str, str]:
    """The profiled operators' own time in seconds, from torch.profiler's `key_averages()`: the device's kernels
    on a GPU, the operators on the host elsewhere; what it counts, and the event field it sums."""
    field = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    where = "device kernels" if device_type == "cuda" else "operators on the host"
    return sum(getattr(e, field) for e in averages) / 1e6, where, field


class StepProfiler:
    """Starts torch.profiler before global step `start` + 1 and stops it after step `start` + `steps`; `steps` <= 0
    or `start` < 0 never profiles. `before_step(done)` and `after_step(done, stage_end)` take the trainer's count of
    steps done before and after a step (so before_step gets the step's 0-based index)."""

    def __init__(self, out_dir: str | Path, rank: int, start: int, steps: int, device: torch.device):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.first = start + 1  # the first profiled step, 1-based (as logged)
        self.last = start + steps
        self.enabled = start >= 0 and steps > 0
        self.device = device
        self._profile: torch.profiler.profile | None = None
        self._started = 0.0
        self.written: list[Path] = []

    def before_step(self, done: int) -> None:
        if self.enabled and self._profile is None and done + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self._profile.__enter__()
            self._started = time.perf_counter()

    def after_step(self, done: int, stage_end: int) -> None:
        """Stops after the window's last step, or at the stage's last one (`stage_end`, steps done): a window
        holds training steps only, never the checkpoint, evaluation or stage switch that follow."""
        if self._profile is not None and done >= min(self.last, stage_end):
            self._stop(done)

    def close(self, done: int) -> None:
        """Ends a window the run left early (a stop signal, an error): what was profiled is still written."""
        if self._profile is not None:
            self._stop(done)

    def _stop(self, done: int) -> None:
        profile, self._profile = self._profile, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._started
        profile.__exit__(None, None, None)
        self.enabled = False  # one window a run
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self.first}-{done}"
        trace = stem.with_suffix(".trace.json")
        profile.export_chrome_trace(str(trace))
        averages = profile.key_averages()
        busy, where, sort_by = operator_time(averages, self.device.type)
        share = (f"{1e3 * wall:.3f} ms wall, {1e3 * busy:.3f} ms in {where} ({100 * busy / wall:.1f}%), "
                 f"{1e3 * max(wall - busy, 0.0):.3f} ms else")
        table = averages.table(sort_by=sort_by, row_limit=TOP_ROWS, max_name_column_width=60)
        top = stem.with_suffix(".top.txt")
        top.write_text(f"steps {self.first}-{done}, rank {self.rank}, sorted by {sort_by}\n{share}\n{table}\n")
        self.written += [trace, top]
