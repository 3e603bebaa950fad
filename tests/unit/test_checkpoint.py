"""Atomic checkpoints: publish by rename, keep the previous one on a crash or a full disk; content hashes checked
at resume with a fallback; non-finite weights never written; pruning and `latest` by step number. Lean
checkpoints: which weights each stage's checkpoint holds, in which dtype, the sources of the others checked by
digest, and the size `--check` expects."""

import copy
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from part.config import (
    AdapterConfig,
    CheckpointConfig,
    EncoderConfig,
    LLMConfig,
    LoraConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
)
from part.model import weight_sources
from part.model.speech_llm import WEIGHTS_NAME, SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.model.weight_sources import SOURCES_NAME, SourceError, WeightSource, read_sources, sources_problem
from part.train.checkpoint import (
    SUMS,
    TRUST_UNVERIFIED_FLAG,
    Checkpointer,
    NonFiniteWeightsError,
    UnverifiedCheckpoint,
    export_final,
    read_data_state,
    read_trainer_state,
    verify_sums,
)
from part.train.checkpoint_contents import checkpoint_sizes, leaves_out


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


def test_a_checkpoint_without_sums_is_refused_unless_trusted(tmp_path, model_and_tokenizer):
    """A checkpoint without SHA256SUMS (an older version's, or the file lost) cannot be checked: the resume is
    refused naming it and the train.py flag that trusts it; with the flag it is taken, and said to be unverified.
    The flag is one train.py accepts, with --resume only."""
    from part.cli.train import parse_args

    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None, keep=3)
    first = ck.save(FakeEngine(), model, tok, 10, {"engine_stage": 0, "stage": "s1"}, {})
    second = ck.save(FakeEngine(), model, tok, 20, {"engine_stage": 0, "stage": "s1"}, {})
    (second / SUMS).unlink()
    with pytest.raises(UnverifiedCheckpoint) as refused:
        ck.newest_good(report=print)
    message = str(refused.value)
    assert f"checkpoint {second} has no {SUMS}" in message and TRUST_UNVERIFIED_FLAG in message
    reports = []
    assert ck.newest_good(report=reports.append, trust_unverified=True) == second
    assert reports == [f"note: checkpoint step_0000020 has no {SUMS}: used unverified ({TRUST_UNVERIFIED_FLAG})"]
    shutil.rmtree(second)
    third = ck.save(FakeEngine(), model, tok, 30, {"engine_stage": 0, "stage": "s1"}, {})
    assert ck.newest_good() == third  # with its sums: taken as ever, without the flag
    (third / "trainer_state.json").write_text("{}")  # damaged: the fallback onto one without sums is refused too
    (first / SUMS).unlink()
    with pytest.raises(UnverifiedCheckpoint, match="step_0000010 has no SHA256SUMS"):
        ck.newest_good(report=print)
    assert ck.newest_good(report=print, trust_unverified=True) == first
    assert TRUST_UNVERIFIED_FLAG == "--trust-unverified-checkpoint"
    assert parse_args(["--config", "c.yaml", "--resume", TRUST_UNVERIFIED_FLAG]).trust_unverified_checkpoint
    assert not parse_args(["--config", "c.yaml", "--resume"]).trust_unverified_checkpoint
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml", TRUST_UNVERIFIED_FLAG])


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


def test_stage_end_checkpoints_outlive_pruning(tmp_path, model_and_tokenizer):
    """checkpoint.keep_stage_ends: the checkpoints at the stages' ends are never pruned, the others as before."""
    model, tok = model_and_tokenizer
    ck = Checkpointer(tmp_path / "ck", None, keep=2, kept_steps=[10, 20])
    for step in (5, 10, 15, 20, 25, 30):
        ck.save(FakeEngine(), model, tok, step, {"engine_stage": 0, "stage": "s1"}, {})
    assert [p.name for p in ck.complete()] == ["step_0000010", "step_0000020", "step_0000025", "step_0000030"]


# ---------------------------------------------------------------- lean checkpoints: weights referenced by source

STAGES = [StageConfig(name="s1", steps=1, trainable=["adapter"]),
          StageConfig(name="s2", steps=1, trainable=["adapter", "encoder"]),
          StageConfig(name="s3", steps=1, trainable=["llm.lora"])]


@pytest.fixture
def sourced(tiny_models, tmp_path):
    """A model read from copies of the tiny pretrained directories (which the tests may change), with LoRA; its
    training config over the three stages above (fp32)."""
    for name in ("whisper", "llm"):
        shutil.copytree(tiny_models / name, tmp_path / "pretrained" / name)
    cfg = TrainConfig(model=ModelConfig(encoder=EncoderConfig(pretrained=str(tmp_path / "pretrained" / "whisper")),
                                        adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                                        llm=LLMConfig(pretrained=str(tmp_path / "pretrained" / "llm"),
                                                      lora=LoraConfig(rank=4, alpha=8))),
                      stages=STAGES, precision="fp32")
    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    model = SpeechLLM(cfg.model, tok)
    with torch.no_grad():  # trained LoRA, so that it is not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return cfg, model, tok


def save_stage(root: Path, cfg: TrainConfig, model: SpeechLLM, tok, index: int, step: int = 1) -> Path:
    return Checkpointer(root, None, keep=10).save(FakeEngine(), model, tok, step,
                                                   {"engine_stage": index, "stage": STAGES[index].name}, {},
                                                   left=leaves_out(cfg, model, index))


def test_a_checkpoint_holds_the_weights_its_stages_may_have_changed(tmp_path, sourced):
    cfg, model, tok = sourced
    every = set(model.state_dict())
    own = {n for n in every if n.startswith("adapter.") or "lora_" in n}  # no pretrained directory holds them
    encoder = {n for n in every if n.startswith("encoder.")}
    assert own and encoder and not own & encoder
    for index, held in ((0, own), (1, own | encoder), (2, own | encoder)):
        ckpt = save_stage(tmp_path / "ck", cfg, model, tok, index, step=index + 1)
        assert set(load_file(str(ckpt / WEIGHTS_NAME))) == held, index
        sources = {s.module: s for s in read_sources(ckpt)}
        assert set(sources) == ({"encoder", "llm"} if index == 0 else {"llm"})
        assert set().union(*(s.keys for s in sources.values())) == every - held
        llm = sources["llm"]
        assert llm.directory == str((tmp_path / "pretrained" / "llm").resolve())
        assert set(llm.files) == {"config.json", "model.safetensors"}
        assert llm.files["model.safetensors"] == hashlib.sha256(
            (tmp_path / "pretrained" / "llm" / "model.safetensors").read_bytes()).hexdigest()
        assert verify_sums(ckpt) is None  # weight_sources.json is in SHA256SUMS
        loaded, _ = SpeechLLM.from_pretrained(ckpt)  # the referenced weights from their directories
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), (index, name)
        assert loaded.lora_runs  # trained LoRA runs
    # checkpoint.lean: false writes every weight and references none
    full = Checkpointer(tmp_path / "full", None).save(
        FakeEngine(), model, tok, 1, {"engine_stage": 0, "stage": "s1"}, {},
        left=leaves_out(dataclasses.replace(cfg, checkpoint=CheckpointConfig(lean=False)), model, 0))
    assert set(load_file(str(full / WEIGHTS_NAME))) == every and not (full / SOURCES_NAME).exists()


def test_weights_are_written_in_their_own_dtype(tmp_path, sourced):
    cfg, model, tok = sourced
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # as the engine holds them under precision bf16
    ckpt = save_stage(tmp_path / "ck", cfg, bf16, tok, 0)
    held = load_file(str(ckpt / WEIGHTS_NAME))
    assert {t.dtype for t in held.values()} == {torch.bfloat16}
    loaded, _ = SpeechLLM.from_pretrained(ckpt)
    assert torch.equal(loaded.adapter.proj.weight, bf16.adapter.proj.weight.float())
    assert torch.equal(loaded.encoder.layers[0].fc1.weight, model.encoder.layers[0].fc1.weight)  # from its source


def test_a_changed_source_is_refused_naming_the_file(tmp_path, sourced):
    cfg, model, tok = sourced
    ckpt = save_stage(tmp_path / "ck", cfg, model, tok, 0)
    weights = tmp_path / "pretrained" / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one byte else: it would load, silently other weights
    weights.write_bytes(bytes(data))
    later = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))
    with pytest.raises(SourceError, match=re.escape(f"{weights} in pretrained directory {weights.parent} has "
                                                    "changed since the model was saved")):
        SpeechLLM.from_pretrained(ckpt)
    assert str(weights) in sources_problem(ckpt)
    config = tmp_path / "pretrained" / "whisper" / "config.json"
    config.write_text(config.read_text().replace('"d_model": 128', '"d_model": 128 '))
    assert str(config) in sources_problem(ckpt)  # the encoder's directory is checked first


def test_a_missing_source_is_refused_naming_it(tmp_path, sourced):
    cfg, model, tok = sourced
    ckpt = save_stage(tmp_path / "ck", cfg, model, tok, 0)
    (tmp_path / "pretrained" / "llm" / "config.json").unlink()
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path / 'pretrained' / 'llm' / 'config.json'} is missing "
                                                    f"from pretrained directory {tmp_path / 'pretrained' / 'llm'}")):
        SpeechLLM.from_pretrained(ckpt)
    shutil.rmtree(tmp_path / "pretrained" / "whisper")
    with pytest.raises(SourceError, match=re.escape(f"pretrained directory {tmp_path / 'pretrained' / 'whisper'} "
                                                    "is missing: the encoder weights")):
        SpeechLLM.from_pretrained(ckpt)
    # what is not there now is no source: the next checkpoint holds those weights itself
    assert leaves_out(cfg, model, 0) == []
    later = save_stage(tmp_path / "ck", cfg, model, tok, 0, step=2)
    assert set(load_file(str(later / WEIGHTS_NAME))) == set(model.state_dict()) and not read_sources(later)


def test_the_keys_missing_from_the_file_must_be_the_referenced_ones(tmp_path, sourced):
    cfg, model, tok = sourced
    ckpt = save_stage(tmp_path / "ck", cfg, model, tok, 1)
    state = load_file(str(ckpt / WEIGHTS_NAME))
    lost = state.pop("adapter.proj.bias")
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing \['adapter.proj.bias'\]"):
        SpeechLLM.from_pretrained(ckpt)
    # a referenced weight the file holds too: the directory contradicts itself
    referenced = read_sources(ckpt)[0].keys[0]
    state.update({"adapter.proj.bias": lost, referenced: model.state_dict()[referenced].clone()})
    save_file(state, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=re.escape(f"references them ['{referenced}']")):
        SpeechLLM.from_pretrained(ckpt)


def test_the_bytes_estimate_is_the_weight_file_s_size(tmp_path, sourced):
    """`--check`'s figure for model.safetensors, per stage, against the files a save writes (the optimizer state's
    against DeepSpeed's files: tests/integration/test_wandb_and_rerun.py)."""
    cfg, model, tok = sourced
    sizes = checkpoint_sizes(cfg, model, world_size=1)
    for index in range(3):
        ckpt = save_stage(tmp_path / "ck", cfg, model, tok, index, step=index + 1)
        assert sizes[index].weights == (ckpt / WEIGHTS_NAME).stat().st_size, index
    full = (save_stage(tmp_path / "full", dataclasses.replace(cfg, checkpoint=CheckpointConfig(lean=False)),
                       model, tok, 0) / WEIGHTS_NAME).stat().st_size
    assert sizes[0].every_weight == full and sizes[0].weights < full / 4
    bf16 = checkpoint_sizes(dataclasses.replace(cfg, precision="bf16"), model, world_size=1)
    assert bf16[1].weights == (save_stage(tmp_path / "bf16", cfg, copy.deepcopy(model).to(torch.bfloat16), tok, 1)
                               / WEIGHTS_NAME).stat().st_size


def test_the_final_export_holds_every_weight(tmp_path, sourced):
    cfg, model, tok = sourced
    ckpt = save_stage(tmp_path / "ck", cfg, model, tok, 0)
    with pytest.raises(ValueError, match="leaves weights out"):
        export_final(ckpt, tmp_path / "final")
    export_final(ckpt, tmp_path / "final", weights={k: v.clone() for k, v in model.state_dict().items()})
    assert not (tmp_path / "final" / SOURCES_NAME).exists()
    shutil.rmtree(tmp_path / "pretrained")  # final/ reads no other directory
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "final")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_randomly_initialised_encoder_is_always_written(sourced):
    cfg, _, tok = sourced
    fresh = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder=EncoderConfig()))
    model = SpeechLLM(fresh.model, tok)
    left = leaves_out(fresh, model, 0)
    assert [part.module for part in left] == ["llm"]
    assert not any(key.startswith("encoder.") for key in left[0].keys)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Same size, same file (inode), the mtime set back to what it was."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_a_same_size_rewrite_with_its_mtime_restored_is_noticed(tmp_path, monkeypatch):
    """The digest cache keys on inode and ctime too: a weight file rewritten in place at the same size, its mtime
    set back, is hashed again, and a reference to its old digest is refused naming the file."""
    monkeypatch.setattr(weight_sources, "SETTLED_NS", 0)  # every digest cached at once
    directory = tmp_path / "pretrained"
    directory.mkdir()
    weights = directory / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    (directory / "config.json").write_text("{}")
    old = weight_sources.file_digest(weights)
    cached = len(weight_sources._DIGESTS)
    assert weight_sources.file_digest(weights) == old == hashlib.sha256(b"A" * 4096).hexdigest()
    assert len(weight_sources._DIGESTS) == cached  # a file unchanged is hashed once
    source = WeightSource("llm", str(directory), weight_sources.directory_digests(directory), ("w",))
    weight_sources.verify(source)
    time.sleep(0.05)  # past a tick of the file system's clock
    rewrite_in_place(weights, b"B" * 4096)
    assert weight_sources.file_digest(weights) == hashlib.sha256(b"B" * 4096).hexdigest()
    with pytest.raises(SourceError, match=r"model.safetensors in pretrained directory .* has changed"):
        weight_sources.verify(source)


def test_a_digest_is_not_kept_for_a_file_changed_just_before_it_was_hashed(tmp_path):
    """Within one tick of the clock a rewrite could leave size, mtime and ctime as they were: the digest of a file
    changed less than SETTLED_NS before is not cached, so even an immediate same-size rewrite is noticed."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    cached = len(weight_sources._DIGESTS)
    assert weight_sources.file_digest(weights) == hashlib.sha256(b"A" * 4096).hexdigest()
    assert len(weight_sources._DIGESTS) == cached
    rewrite_in_place(weights, b"B" * 4096)
    assert weight_sources.file_digest(weights) == hashlib.sha256(b"B" * 4096).hexdigest()
