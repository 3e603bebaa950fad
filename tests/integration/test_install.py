"""`pip install .` gives a working `part` command: the package (pyproject.toml's packages and console script)
installed into a fresh virtual environment, outside the repository, whose `part --help` lists the commands.

Nothing is downloaded: the environment sees this interpreter's packages (setuptools to build with; the commands'
--help needs no other), and pip installs without dependencies or an index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from part.cli import COMMANDS


@pytest.mark.slow
def test_pip_install_gives_the_part_command(tmp_path):
    src = tmp_path / "src"  # a copy: an in-tree build would write build/ and *.egg-info into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("part", "data_prep"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's packages after the new environment's own (pip, setuptools; nothing of the repository's)
    Path(site, "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--disable-pip-version-check", "--quiet", str(src)],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    where = subprocess.run([python, "-c", "import part.cli; print(part.cli.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the repository's
    help_ = subprocess.run([venv / "bin" / "part", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: python -m part COMMAND")
    assert [line.split()[0] for line in help_.stdout.splitlines() if line.startswith("  ")] == list(COMMANDS)
    plot = subprocess.run([venv / "bin" / "part", "plot", "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert plot.returncode == 0 and plot.stdout.startswith("usage: python -m part plot"), plot.stderr
    unknown = subprocess.run([venv / "bin" / "part", "nope"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr
