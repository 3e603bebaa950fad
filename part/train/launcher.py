"""Commands for the `deepspeed` launcher, shared by the comparison, the benchmark and the integration tests."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def find_launcher(name: str = "deepspeed") -> str | None:
    """The launcher's path: `name` itself when it is a path or on PATH, else the one beside this Python (a virtual
    environment used without activating it); None when neither exists."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if os.sep not in name and beside.is_file() and os.access(beside, os.X_OK) else None


def deepspeed_command(script: str | Path, script_args: Sequence[str], nproc: int, launcher: str = "deepspeed",
                      master_port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus N --master_port P script args...`: N local ranks (GPUs, or CPU processes on the CPU
    accelerator, where --num_gpus is what sets the rank count) rendezvousing on a free port by default."""
    port = master_port if master_port is not None else free_port()
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(port), str(script), *script_args]


def run_prefixed(cmd: list[str], prefix: str, env: dict[str, str]) -> int:
    """Runs `cmd` (in this process's working directory, against which the configs' relative paths were
    validated), printing each output line with `[prefix] `; returns its exit code."""
    print(f"[{prefix}] $ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{prefix}] {line}", end="" if line.endswith("\n") else "\n", flush=True)
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the launcher too (same process group); let it stop its ranks
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        raise
