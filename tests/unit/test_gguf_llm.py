"""The GGUF LLM converter's refusals (part/convert/gguf_llm.py, `python -m part convert gguf-llm`); the conversion
of the real pinned package is tests/integration/test_gemma_package.py."""

import subprocess
import sys

import pytest

from part.convert.gguf_llm import GGUFSourceError, convert_gguf_llm, gguf_from_package


def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFSourceError, match=r"model\.gguf: not a GGUF file"):
        convert_gguf_llm(bad, tmp_path / "out")
    with pytest.raises(GGUFSourceError, match="no such GGUF file"):
        convert_gguf_llm(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_package_without_the_file_is_refused_naming_it(tmp_path):
    with pytest.raises(GGUFSourceError, match="package no_such_gguf_package is not installed"):
        gguf_from_package("no_such_gguf_package", tmp_path / "x.gguf")
    with pytest.raises(GGUFSourceError, match="package json has no assemble"):
        gguf_from_package("json", tmp_path / "x.gguf")


def test_the_command_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "part", "convert", "gguf-llm", str(bad), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a GGUF file")
    proc = subprocess.run([sys.executable, "-m", "part", "convert", "gguf-llm", str(bad), str(tmp_path / "out"),
                           "--chat-template", str(tmp_path / "none.jinja")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--chat-template" in proc.stderr
