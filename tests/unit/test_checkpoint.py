"""Atomic checkpoints: publish by rename, keep the previous one on a crash or a full disk; content hashes checked
at resume with a fallback; non-finite weights never written; pruning and `latest` by step number."""

import errno
import json
from pathlib import Path

import pytest
import torch

from part.config import AdapterConfig, EncoderConfig, LLMConfig, ModelConfig
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.train.checkpoint import (
    SUMS,
    Checkpointer,
    NonFiniteWeightsError,
    read_data_state,
    read_trainer_state,
    verify_sums,
)


class FakeEngine:
    """Stands in for DeepSpeed's engine: writes an optimizer file, or fails like a full disk."""

    def __init__(self):
        self.fail: Exception | None = None

    def save_checkpoint(self, path, tag, save_latest, exclude_frozen_parameters):
        if self.fail:
            raise self.fail
        (Path(path) / tag).mkdir()
        (Path(path) / tag / "optim.pt").write_bytes(b"x" * 10)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_models):
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm")))
    tok = load_tokenizer(str(tiny_models / "llm"))
    return SpeechLLM(cfg, tok), tok


def test_publish_prune_and_reload(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None, keep=2)
    engine = FakeEngine()
    for step in (10, 20, 30):
        with torch.no_grad():
            model.adapter.proj.bias.fill_(step)
        path = ck.save(engine, model, tok, step, {"engine_stage": 0, "stage": "s1"}, {"consumed": step})
        assert path.name == f"step_{step:07d}"
    assert ck.latest() == tmp_path / "ck" / "step_0000030"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_0000020", "step_0000030"]
    state = read_trainer_state(ck.latest())
    assert state["step"] == 30 and state["stage"] == "s1" and state["world_size"] == 1
    assert read_data_state(ck.latest(), 0) == {"consumed": 30}
    assert read_data_state(ck.latest(), 1) is None
    loaded, _ = SpeechLLM.from_pretrained(ck.latest())  # safetensors weights: no pickle involved
    assert torch.all(loaded.adapter.proj.bias == 30)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_full_disk_keeps_previous_checkpoint(tmp_path, model_and_tokenizer, capsys):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None)
    engine = FakeEngine()
    good = ck.save(engine, model, tok, 5, {"engine_stage": 0, "stage": "s1"}, {})
    # a full disk as the OS reports it, and as libraries do (safetensors and torch.save raise other types)
    for step, error in ((6, OSError(errno.ENOSPC, "No space left on device")), (7, RuntimeError("write failed"))):
        engine.fail = error
        assert ck.save(engine, model, tok, step, {"engine_stage": 0, "stage": "s1"}, {}) == good
        assert f"checkpoint at step {step} failed" in capsys.readouterr().out
        assert ck.latest() == good
        assert not list((tmp_path / "ck").glob("*.partial"))


def test_crash_mid_save_leaves_latest_intact(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None)
    good = ck.save(FakeEngine(), model, tok, 5, {"engine_stage": 0, "stage": "s1"}, {})
    # a process killed while writing step 6 leaves a partial directory and never moves `latest`
    crashed = tmp_path / "ck" / "step_0000006.partial"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a file")
    assert ck.latest() == good
    ck.save(FakeEngine(), model, tok, 7, {"engine_stage": 0, "stage": "s1"}, {})
    assert not crashed.exists()  # cleaned on the next successful save


def test_latest_pointing_at_incomplete_directory_is_an_error(tmp_path):
    root = tmp_path / "ck"
    (root / "step_0000001").mkdir(parents=True)
    (root / "latest").write_text("step_0000001")
    with pytest.raises(FileNotFoundError, match="step_0000001, which has no trainer_state.json"):
        Checkpointer(root, None).latest()
    reports = []  # a resume does not stop there: it reports and takes the newest complete one (none here)
    assert Checkpointer(root, None).newest_good(report=reports.append) is None
    assert "which has no trainer_state.json; using the newest complete checkpoint instead" in reports[0]


def test_trainer_state_is_json(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    path = Checkpointer(tmp_path, None).save(FakeEngine(), model, tok, 1, {"engine_stage": 2, "stage": "x"}, {})
    assert json.loads((path / "trainer_state.json").read_text())["engine_stage"] == 2


def test_hashes_are_checked_and_a_damaged_checkpoint_falls_back(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None, keep=3)
    first = ck.save(FakeEngine(), model, tok, 10, {"engine_stage": 0, "stage": "s1"}, {})
    second = ck.save(FakeEngine(), model, tok, 20, {"engine_stage": 0, "stage": "s1"}, {})
    assert (second / SUMS).read_text().count("\n") == len([f for f in second.rglob("*") if f.is_file()]) - 1
    assert verify_sums(second) is None and ck.newest_good() == second
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights: still loads, silently wrong
    weights.write_bytes(bytes(data))
    assert "model.safetensors does not match its SHA-256" in verify_sums(second)
    reports = []
    assert ck.newest_good(report=reports.append) == first
    assert len(reports) == 1 and "step_0000020 is damaged" in reports[0] and "model.safetensors" in reports[0]
    (first / SUMS).unlink()  # as an older version wrote it: used, and said to be unverified
    reports.clear()
    assert ck.newest_good(report=reports.append) == first and "not verified" in reports[-1]


def test_non_finite_weights_are_never_written(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None)
    good = ck.save(FakeEngine(), model, tok, 5, {"engine_stage": 0, "stage": "s1"}, {})
    saved = model.adapter.proj.bias.detach().clone()
    with torch.no_grad():
        model.adapter.proj.bias[0] = float("nan")
    try:
        with pytest.raises(NonFiniteWeightsError, match="step 6"):
            ck.save(FakeEngine(), model, tok, 6, {"engine_stage": 0, "stage": "s1"}, {})
    finally:
        with torch.no_grad():
            model.adapter.proj.bias.copy_(saved)
    assert ck.latest() == good and [p.name for p in ck.complete()] == ["step_0000005"]
    assert not list((tmp_path / "ck").glob("*.partial"))


def test_latest_and_pruning_go_by_step_number(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None, keep=2)
    for step in (9, 10, 11):
        ck.save(FakeEngine(), model, tok, step, {"engine_stage": 0, "stage": "s1"}, {})
    (tmp_path / "ck" / "latest").unlink()  # lost pointer: the newest complete checkpoint, by number
    assert ck.latest().name == "step_0000011" and ck.newest_good().name == "step_0000011"
    assert [p.name for p in ck.complete()] == ["step_0000010", "step_0000011"]
