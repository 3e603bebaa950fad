"""The `python -m part infer` command in a subprocess: JSONL and TSV output, --skip-bad, and exit status 2 with a
message naming the problem (no traceback) for bad files, bad task arguments and a directory that is not a model
(one of those through a subprocess, the others through part.cli.infer.main in this process: the same code, without
a Python start-up each)."""

import json

import pytest
from conftest import (
    AIFF,
    FIELDS,
    FLAC,
    IGNORE_INPUTS_EMBEDS_WARNING,
    LONG,
    OGG,
    TOKENS,
    WAV,
    call_main,
    check_records,
    run,
)

from part.cli import infer
from part.inference import transcribe

pytestmark = IGNORE_INPUTS_EMBEDS_WARNING


def cli(*args: str):
    return run(["python", "-m", "part", "infer", *args])


def test_cli_jsonl_matches_transcribe(model_dir, loaded, tmp_path, durations):
    model, tok = loaded
    (tmp_path / "list.txt").write_text(f"{OGG}\n{AIFF}\n")
    proc = cli("--model", str(model_dir), "--language", "de", "--max-new-tokens", str(TOKENS), "--batch-size", "2",
               "--device", "cpu", "--jsonl", FLAC, f"@{tmp_path / 'list.txt'}", WAV)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    paths = [FLAC, OGG, AIFF, WAV]
    check_records(lines, paths, durations)
    assert all(set(r) == set(FIELDS) for r in lines)
    expected = transcribe(model, tok, paths, "asr", "de", batch_size=2, max_new_tokens=TOKENS)
    assert [r["text"] for r in lines] == [r["text"] for r in expected]


def test_cli_tsv_with_skip_bad(model_dir, tmp_path):
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"OggS" + bytes(200))
    missing = str(tmp_path / "missing.wav")
    proc = cli("--model", str(model_dir), "--task", "s2tt", "--language", "en", "--target", "de", "--beams", "2",
               "--max-new-tokens", str(TOKENS), "--device", "cpu", "--skip-bad", "--frames", WAV, missing,
               str(broken), LONG, FLAC)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [WAV, FLAC] and all(len(r) == 3 for r in rows)  # path, text, frames
    for name in (missing, str(broken), LONG):
        assert name in proc.stderr
    assert "skipped 3 of 5" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing", "broken", "too_long", "no_target", "same_target", "not_a_model"])
def test_cli_errors_exit_2_and_name_the_problem(case, model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC" + bytes(100))
    args = {
        "missing": (["--language", "en", FLAC, str(tmp_path / "gone.wav")], str(tmp_path / "gone.wav")),
        "broken": (["--language", "en", str(broken), FLAC], str(broken)),
        "too_long": (["--language", "en", FLAC, LONG], LONG),
        "no_target": (["--task", "s2tt", "--language", "en", FLAC], "--target"),
        "same_target": (["--task", "s2tt", "--language", "en", "--target", "en", FLAC], "must differ"),
        "not_a_model": (["--language", "en", FLAC], "part_model.json"),
    }[case]
    model = tmp_path if case == "not_a_model" else model_dir
    argv = ["--model", str(model), "--device", "cpu", "--max-new-tokens", "2", *args[0]]
    if case == "missing":
        proc = cli(*argv)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = call_main(infer.main, argv, capsys)
    assert code == 2, err
    assert args[1] in err
    assert "Traceback" not in err and out == ""
