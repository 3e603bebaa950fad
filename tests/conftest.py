"""Shared fixtures: a small real corpus (FLORES sentences spoken by espeak-ng) and the tiny models, built once;
the model directory and real clips the inference tests use.

tests/unit holds fast in-process tests of the library; tests/integration runs the commands (train.py through the
deepspeed launcher, `python -m part infer`, ...) in subprocesses. `-m "not slow"` skips the longest launcher runs.
Tests marked `extended` (variants of paths the default run already covers) are skipped unless `--extended` is
given: the default run, which CI runs, stays under 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.text_sources import default_shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = default_shared_dir()
LANGS = "en,de,zh"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true",
                     help="also run the tests marked `extended` (skipped by default to keep the run short)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--extended"):
        return
    skip = pytest.mark.skip(reason="extended: run with `bash launch/test.sh --extended`")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def call_main(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """A command's `main` in this process, as its command line runs it: (exit status, stdout, stderr); argparse's
    errors (SystemExit) give their status too. Spares the Python start-up a subprocess costs."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


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
    from part.convert.tiny import build_tiny

    build_tiny(corpus / "tokenizer_text.txt", out, vocab_size=2000)
    return out


@pytest.fixture(scope="session")
def tiny_gemma_models(corpus, tmp_path_factory) -> Path:
    """The tiny models with a Gemma 3-architecture LLM (scaled embeddings, tied head, sliding-window layers), the
    demo's LLM family: `<out>/whisper`, `<out>/llm`."""
    out = tmp_path_factory.mktemp("tiny_gemma")
    from part.convert.tiny import build_tiny

    build_tiny(corpus / "tokenizer_text.txt", out, vocab_size=2000, llm_family="gemma3")
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
precision: fp32
output_dir: {path.parent}/out
{extra}
""")
    return path


def train_under_guard(config: Path, overrides: list[str], nproc: int = 2,
                       timeout: int = 900) -> subprocess.CompletedProcess:
    """train.py under the collective guard (tests/integration/guarded_train.py) through the real `deepspeed`
    launcher on `nproc` CPU ranks, one thread each; fails the test with the output's tail unless it exits 0."""
    from part.train.launcher import deepspeed_command

    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = deepspeed_command("tests/integration/guarded_train.py", ["--config", str(config), *overrides], nproc,
                            launcher=launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture
def python() -> str:
    return sys.executable


# ---------------------------------------------------------------- inference: a saved model and real clips

CLIPS = SHARED / "speech" / "clips"
OGG = str(CLIPS / "fleurs_de_000.ogg")  # 17.94 s, Opus, 16 kHz, German
FLAC = str(CLIPS / "ljspeech_LJ001-0002.flac")  # 1.9 s, 22.05 kHz
WAV = str(CLIPS / "sr_english_one_two_three.wav")  # 2.745 s, 44.1 kHz
AIFF = str(CLIPS / "sr_french_dictee.aiff")  # 2.533 s, 44.1 kHz
STEREO = str(CLIPS / "jfk_inaugural.flac")  # 11 s, 44.1 kHz, 2 channels
LONG = str(CLIPS / "earnings22_4482311_3_62.wav")  # 59.62 s: beyond the encoder's 30 s window
FIELDS = ("audio", "task", "language", "target", "text", "duration")
TOKENS = 6  # max_new_tokens: enough to exercise decoding, cheap on CPU
# SpeechLLM.generate passes inputs_embeds, so transformers notes that its repetition penalties see new tokens only
IGNORE_INPUTS_EMBEDS_WARNING = pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning")


@pytest.fixture(scope="session")
def durations() -> dict[str, float]:
    with open(SHARED / "speech" / "transcripts.tsv", encoding="utf-8") as fh:
        return {str(SHARED / "speech" / r["path"]): float(r["duration_s"]) for r in csv.DictReader(fh, delimiter="\t")}


@pytest.fixture(scope="session")
def model_dir(tiny_models, tmp_path_factory):
    """A directory as training writes it (model.safetensors, part_model.json, tokenizer/)."""
    from part.config import AdapterConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer

    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8)))
    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("infer") / "final"
    SpeechLLM(cfg, tok).save_pretrained(out, tok)
    return out


@pytest.fixture(scope="session")
def loaded(model_dir):
    from part.model.speech_llm import SpeechLLM

    model, tok = SpeechLLM.from_pretrained(model_dir)
    return model.eval(), tok


def check_records(records, paths, durations, task="asr", language="de", target=None):
    assert [r["audio"] for r in records] == paths  # one per input, in input order
    for r in records:
        assert all(k in r for k in FIELDS)
        assert (r["task"], r["language"], r["target"]) == (task, language, target)
        assert isinstance(r["text"], str)
        assert abs(r["duration"] - durations[r["audio"]]) <= 0.05, r


@pytest.fixture(scope="session")
def ct2_files():
    """The CTranslate2 files of the Whisper-base wheels pinned in requirements.txt (a hard requirement: no skip)."""
    from part.convert import whisper_ct2

    try:
        return whisper_ct2.ct2_files_in_packages()
    except whisper_ct2.CT2SourceError as exc:
        missing = str(exc)  # failed outside the except block, so the report is one line, not a chained traceback
    pytest.fail(f"the Whisper-base wheels are missing: {missing}", pytrace=False)


@pytest.fixture(scope="session")
def converted(ct2_files, tmp_path_factory) -> tuple[Path, float]:
    """The wheels converted once, through the CLI: (output directory, seconds)."""
    import time

    from part.cli import convert

    out = tmp_path_factory.mktemp("whisper_base") / "hf"
    start = time.perf_counter()
    assert convert.main(["whisper-ct2", "--from-packages", str(out)]) == 0
    return out, time.perf_counter() - start
