"""The command line's dispatcher (part/cli/__init__.py): `python -m part --help` lists every command with its
summary, each command's own `--help` works through it, an unknown command is refused with exit status 2."""

from __future__ import annotations

import pytest
from conftest import call_main, run

from part import cli

EXPECTED = {"train", "infer", "export", "compare", "rescore", "plot", "convert", "tiny", "align", "frame_vocabulary",
            "frame_readout", "whisper_reference"}


def test_help_lists_every_command_with_its_summary(capsys):
    code, out, _ = call_main(cli.main, ["--help"], capsys)
    assert code == 0
    assert set(cli.COMMANDS) == EXPECTED
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert set(listed) == EXPECTED
    for name in EXPECTED:
        assert listed[name] == cli.summary(name) and len(listed[name]) > 20, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_command_help_through_the_dispatcher(name, capsys):
    code, out, err = call_main(cli.main, [name, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"usage: python -m part {name} ")
    assert "--help" in out and len(out.splitlines()) > 3


def test_unknown_command_and_no_command_exit_2(capsys):
    code, _, err = call_main(cli.main, ["trian"], capsys)
    assert code == 2 and "unknown command 'trian'" in err and "train" in err
    code, out, err = call_main(cli.main, [], capsys)
    assert code == 2 and out == "" and "usage: python -m part COMMAND" in err


def test_command_arguments_pass_through(capsys):
    """The dispatcher hands the rest of the line to the command: its own errors and exit status come back."""
    code, _, err = call_main(cli.main, ["infer", "--model", "m", "--task", "s2tt", "--language", "de", "a.wav"],
                             capsys)
    assert code == 2 and "python -m part infer: error: s2tt needs a target language" in err


def test_module_entry_points_in_subprocesses():
    """`python -m part COMMAND` and `python -m part.cli.COMMAND` as users type them."""
    for argv in (["python", "-m", "part", "plot", "--help"], ["python", "-m", "part.cli.plot", "--help"]):
        proc = run(argv)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: python -m part plot ")
    proc = run(["python", "-m", "part", "--help"])
    assert proc.returncode == 0 and all(f"  {name} " in proc.stdout for name in EXPECTED)
