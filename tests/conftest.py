"""Shared fixtures: a small real corpus (FLORES sentences spoken by espeak-ng) and the tiny models, built once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.text_sources import default_shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = default_shared_dir()
LANGS = "en,de,zh"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """train/ eval/ text/ shards for en, de, zh: small shards so 2 ranks x 2 workers each get some."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required (launch/setup_env.sh installs it)")
    out = tmp_path_factory.mktemp("corpus")
    from data_prep import synthetic

    code = synthetic.main(["--out", str(out), "--languages", LANGS, "--train-per-language", "48",
                           "--eval-per-language", "6", "--text-per-language", "40", "--shard-samples", "8",
                           "--max-duration", "15", "--workers", "2"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_models(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    from part.tiny import build_tiny

    build_tiny(corpus / "tokenizer_text.txt", out, vocab_size=2000)
    return out


def write_config(path: Path, corpus: Path, tiny: Path, stages: str, extra: str = "") -> Path:
    """A tiny YAML config over the fixture corpus; `stages` is the YAML list body."""
    path.write_text(f"""
model:
  encoder: {{pretrained: {tiny}/whisper}}
  adapter: {{downsample: 4, kind: transformer, hidden: 64, layers: 1, heads: 4}}
  llm:
    pretrained: {tiny}/llm
    lora: {{rank: 4, alpha: 8}}
data:
  train_shards: {corpus}/train/{{lang}}-*.tar
  text_shards: {corpus}/text/{{lang}}-*.tar
  eval_shards: {corpus}/eval/{{lang}}-*.tar
  languages: [en, de, zh]
  num_workers: 1
  window: 16
  max_batch_seconds: 40
  max_batch_size: 4
  max_duration: 15
stages:
{stages}
checkpoint: {{dir: {path.parent}/ckpt, every: 3, keep: 3}}
logging: {{every: 1}}
eval: {{per_language: 2, max_new_tokens: 8, batch_size: 4}}
ds_config: {REPO}/ds_configs/zero3_cpu.json
output_dir: {path.parent}/out
{extra}
""")
    return path


@pytest.fixture
def python() -> str:
    return sys.executable
