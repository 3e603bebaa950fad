"""Atomic checkpoints: publish by rename, keep the previous one on a crash or a full disk."""

import errno
import json
from pathlib import Path

import pytest
import torch

from part.config import AdapterConfig, EncoderConfig, LLMConfig, ModelConfig
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.train.checkpoint import Checkpointer, read_data_state, read_trainer_state


class FakeEngine:
    """Stands in for DeepSpeed's engine: writes an optimizer file, or fails like a full disk."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, path, tag, save_latest, exclude_frozen_parameters):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
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
    engine.fail = True
    assert ck.save(engine, model, tok, 6, {"engine_stage": 0, "stage": "s1"}, {}) == good
    assert "checkpoint at step 6 failed" in capsys.readouterr().out
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


def test_trainer_state_is_json(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    path = Checkpointer(tmp_path, None).save(FakeEngine(), model, tok, 1, {"engine_stage": 2, "stage": "x"}, {})
    assert json.loads((path / "trainer_state.json").read_text())["engine_stage"] == 2
