"""The command line: `python -m part COMMAND [args]` (or the `part` script an install provides) runs COMMAND.

Each command is a module of this package with `main(argv=None) -> int` (also runnable as
`python -m part.cli.COMMAND`): it parses its arguments, calls the library and turns the library's errors into
messages and exit codes (part/exit_codes.py). The work itself is done in the library, never here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from part.exit_codes import ExitCode

# The commands, in the order `python -m part --help` lists them; each is the module part/cli/<name>.py.
COMMANDS = ("train", "infer", "export", "compare", "rescore", "plot", "convert", "tiny", "align", "frame_vocabulary",
            "frame_readout", "whisper_reference")
LAUNCHER = "python -m part"


def command_prog(module_file: str) -> str:
    """The usage name of the command in file `module_file` (part/cli/infer.py -> `python -m part infer`)."""
    return f"{LAUNCHER} {Path(module_file).stem}"


def help_text(doc: str) -> dict:
    """argparse's `description`, `epilog` and formatter from a command's docstring, printed as written: the
    paragraphs before the line `examples:` describe the command (what it does, what it reads and writes), that line
    and what follows it are the epilog."""
    head, found, tail = doc.partition("\nexamples:\n")
    return {"description": head.strip(), "epilog": "examples:\n" + tail.rstrip() if found else None,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def summary(name: str) -> str:
    """The first line of the command's docstring: what it does."""
    doc = importlib.import_module(f"part.cli.{name}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {LAUNCHER} COMMAND [args]   ({LAUNCHER} COMMAND --help: the command's own help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    lines += ["", f"example: {LAUNCHER} infer --model runs/tiny_part/final --language de clip.flac",
              "Training across processes goes through the DeepSpeed launcher: deepspeed train.py --config CONFIG"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs `argv[0]`'s command with the rest of `argv`; `--help` (or nothing) lists the commands."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return ExitCode.OK if args else ExitCode.BAD_INPUT
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{LAUNCHER}: error: unknown command '{name}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return importlib.import_module(f"part.cli.{name}").main(rest)
