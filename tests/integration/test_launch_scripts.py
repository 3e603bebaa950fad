"""launch/single_node.sh picks a free rendezvous port unless MASTER_PORT is given (a second run on the same
machine used to fail on the busy default port 29500)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def dry_run(**env: str) -> str:
    python = sys.executable
    full = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    full.update(DRY_RUN="1", PYTHON=python, DEEPSPEED=str(Path(python).parent / "deepspeed"), **env)
    proc = subprocess.run(["bash", "launch/single_node.sh"], cwd=REPO, env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_free_port_by_default_and_master_port_honoured():
    with socket.socket() as busy:  # the old default taken by another job
        busy.bind(("127.0.0.1", 0))
        port = int(re.search(r"--master_port (\d+)", dry_run()).group(1))
        assert port != 29500 and port != busy.getsockname()[1]
    with socket.socket() as probe:  # the chosen port was free
        probe.bind(("127.0.0.1", port))
    assert "--master_port 29611" in dry_run(MASTER_PORT="29611")
