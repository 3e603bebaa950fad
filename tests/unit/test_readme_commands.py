"""The commands the README shows still exist, and every command says how to use it.

Each command the README writes (in a code block or inline) that starts one of the project's entry points
(`python -m part ...`, `python train.py`, `deepspeed ... train.py`, `python -m data_prep.X`, `python data_prep/X.py`,
`python bench/X.py`) runs its `--help` in a subprocess, as a user would type it: it must exit 0 and list every
`--flag` the README's command uses. A renamed command or flag fails here instead of in a reader's shell. (`--check`
is not run: it needs the demo's models and corpus, which are not cheap to build.)

Every command's `--help` (each `python -m part` command and `convert`'s subcommands, train.py, the shard builders,
the bench scripts) ends with examples. The --help subprocesses run in parallel, each once.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO

from part.cli import COMMANDS

README = REPO / "README.md"
DATA_PREP = sorted(p.stem for p in (REPO / "data_prep").glob("*.py") if "\ndef main(" in p.read_text())
BENCH = sorted(p.name for p in (REPO / "bench").glob("*.py") if "argparse.ArgumentParser(" in p.read_text())
CONVERT_SUBCOMMANDS = ("whisper-ct2", "whisper-llm", "gguf-llm")


def readme_commands(text: str) -> list[str]:
    """Every shell command of the README: the lines of its code blocks (continuation lines joined) and its inline
    code spans (which may wrap across lines)."""
    commands, fenced, block = [], False, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                joined = "\n".join(block).replace("\\\n", " ")
                commands += [c.strip() for c in joined.splitlines() if c.strip()]
            fenced, block = not fenced, []
        elif fenced:
            block.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return commands


def entry_point(command: str) -> tuple[tuple[str, ...], list[str]] | None:
    """(the arguments after `python` that print the command's help, the --flags the command uses), or None when the
    command starts none of the project's entry points."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an inline span that is not a whole command (an unbalanced quote)
        return None
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value in front
        words = words[1:]
    if not words:
        return None
    if words[0] == "deepspeed" and "train.py" in words:
        words = ["python", *words[words.index("train.py"):]]
    if words[0] != "python" or len(words) < 2:
        return None
    if words[1] == "-m" and len(words) > 2:
        module, rest = words[2], words[3:]
        if module == "part":
            if not rest or rest[0].startswith("-") or rest[0].isupper():  # `python -m part COMMAND`: a placeholder
                return ("-m", "part", "--help"), []
            name, rest = rest[0], rest[1:]
            if name == "convert" and rest and not rest[0].startswith("-"):
                return ("-m", "part", "convert", rest[0], "--help"), flags(rest[1:])
            return ("-m", "part", name, "--help"), flags(rest)
        if module.startswith("data_prep."):
            return ("-m", module, "--help"), flags(rest)
        return None
    script, rest = words[1], words[2:]
    if script == "train.py" or re.fullmatch(r"(data_prep|bench)/\w+\.py", script):
        return (script, "--help"), flags(rest)
    return None


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and w != "--help"]


def command_help(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """`--help` of every command the README names and of every command of the project, each run once."""
    wanted = {found[0] for found in map(entry_point, readme_commands(README.read_text())) if found}
    wanted |= {("-m", "part", name, "--help") for name in COMMANDS}
    wanted |= {("-m", "part", "convert", sub, "--help") for sub in CONVERT_SUBCOMMANDS}
    wanted |= {("-m", f"data_prep.{name}", "--help") for name in DATA_PREP}
    wanted |= {(f"bench/{name}", "--help") for name in BENCH}
    wanted |= {("train.py", "--help"), ("-m", "part", "--help")}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(wanted, pool.map(command_help, wanted)))


def test_the_readme_shows_commands_of_each_kind():
    found = [entry_point(c) for c in readme_commands(README.read_text())]
    args = {f[0] for f in found if f}
    assert ("-m", "part", "compare", "--help") in args and ("-m", "part", "infer", "--help") in args
    assert ("train.py", "--help") in args and ("bench/benchmark.py", "--help") in args
    assert any(a[1].startswith("data_prep.") for a in args)


def test_every_readme_command_runs_its_help_and_knows_its_flags(helps):
    problems = []
    for command in readme_commands(README.read_text()):
        found = entry_point(command)
        if not found:
            continue
        args, used = found
        proc = helps[args]
        if proc.returncode != 0:
            problems.append(f"{command!r}: `python {' '.join(args)}` exited {proc.returncode}: {proc.stderr[-500:]}")
            continue
        missing = [f for f in used if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", proc.stdout)]
        if missing:
            problems.append(f"{command!r}: --help of `python {' '.join(args[:-1])}` lists no {', '.join(missing)}")
    assert not problems, "\n".join(problems)


def test_every_command_help_ends_with_examples(helps):
    assert len(DATA_PREP) >= 9 and "benchmark.py" in BENCH and "gpu_check.py" in BENCH
    bad = [" ".join(args) for args, proc in helps.items()
           if proc.returncode != 0 or not re.search(r"^examples?\b", proc.stdout, re.M | re.I)]
    assert not bad, "no example in --help of: " + ", ".join(sorted(bad))


def test_the_parser_reads_the_forms_the_readme_uses():
    assert entry_point("python -m part infer --model m --language=de a.wav  # transcribe") == (
        ("-m", "part", "infer", "--help"), ["--model", "--language"])
    assert entry_point("deepspeed --num_gpus 8 train.py --config c.yaml --resume") == (
        ("train.py", "--help"), ["--config", "--resume"])
    assert entry_point("CONFIG=x NUM_GPUS=8 launch/single_node.sh --resume") is None
    assert entry_point("python -m part convert whisper-ct2 --from-packages cache/w") == (
        ("-m", "part", "convert", "whisper-ct2", "--help"), ["--from-packages"])
    assert entry_point("python bench/benchmark.py --steps 30") == (("bench/benchmark.py", "--help"), ["--steps"])
    assert readme_commands("```bash\npython train.py \\\n    --check\n```\nand `python -m part\nplot r`") == [
        "python train.py      --check", "python -m part plot r"]


def test_readme_and_helps_name_no_missing_file():
    """Paths of the repository the README's commands name (configs, scripts) exist."""
    names = set()
    for command in readme_commands(README.read_text()):
        names |= set(re.findall(r"\b((?:configs|launch|bench|ds_configs)/[\w./-]+\.(?:yaml|sh|py|json|sbatch))",
                                command))
    missing = sorted(n for n in names if not (REPO / n).exists())
    assert names and not missing, missing


if __name__ == "__main__":  # the commands found, for a look by hand
    for c in readme_commands(Path(README).read_text()):
        print(entry_point(c), c)
