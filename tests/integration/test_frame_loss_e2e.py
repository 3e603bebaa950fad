"""The frame loss and the vocabulary readout through the real training path (the `deepspeed` launcher, 2 ranks,
ZeRO-3, train.py) with the real Whisper-base encoder (converted from its wheels) and a stand-in LLM made from its
decoder (same vocabulary, so the alignment heads' timings are the LLM's tokens): a frame-loss-only stage memorises
sixteen clips' per-frame targets (`span`, as the tiny recipes; the LLM never runs), then a LoRA stage trains on
the LM loss reading the frames through the readout, and the final evaluation generates under ZeRO-3. The frames
are classified over the clips' own tokens (`model.alignment.vocabulary`, as in the tiny recipes). A second run
trains the same frame objective for an LLM with a tokenizer of its own (the tiny Qwen2-style LLM): its tokens take
the time spans of the characters they cover."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import train_under_guard, write_config
from test_sync_e2e import assert_bounded, part_reads

pytestmark = pytest.mark.slow

STAGES = """\
  - {name: frames, steps: 14, tasks: {asr: 1.0}, trainable: [adapter], lr: 3.0e-3, warmup_steps: 5,
     min_lr_ratio: 0.3, lm_loss: false}
  - {name: lora, steps: 2, tasks: {asr: 1.0}, trainable: [llm.lora], lr: 1.0e-3, warmup_steps: 0}
"""


def frame_objective_reads(clips: int) -> int:
    """The host synchronisations the frame objectives (`model.alignment`, `targets: span`) add to a micro-batch of
    `clips` transcribed clips, all in part/objectives/: the clips' rows, frame and state lengths and the frame
    vocabulary check (4), the span loss's data-dependent shapes (6), and per clip its transcript and the
    teacher's alignment-head weights for the DTW (2)."""
    return 10 + 2 * clips


@pytest.fixture(scope="module")
def standin(converted, tmp_path_factory) -> Path:
    from part.convert.whisper_llm import build_whisper_llm

    whisper_dir, _ = converted
    return build_whisper_llm(whisper_dir, tmp_path_factory.mktemp("standin") / "llm", log=lambda _: None)


def test_frame_loss_memorises_clips_without_running_the_llm(corpus, tiny_models, converted, standin, tmp_path):
    whisper_dir, _ = converted
    clips = corpus / "train" / "en-00000[01].tar"  # the fixture writes 8 clips per shard; a shard per rank
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGES)
    overrides = [f"model.encoder.pretrained={whisper_dir}", f"model.llm.pretrained={standin}",
                 "model.llm.lora.target_modules=[q_proj,v_proj]",
                 "model.alignment.frame_targets={weight: 1.0, targets: span}",  # as the tiny recipes train
                 "model.alignment.readout={temperature: 0.2}", f"data.train_shards={clips}",
                 f"data.eval_shards={clips}",
                 "data.languages=[en]", "data.window=8", "data.max_batch_size=4", "data.max_batch_seconds=200",
                 "data.max_batch_tokens=4096", "eval.tasks=[asr]", "eval.per_language=2", "eval.max_new_tokens=12",
                 "eval.batch_size=4", "checkpoint.every=1000", "logging.every=10"]
    # the frames classified over the clips' own tokens (as the tiny recipes do), the file written by its command
    from part.cli.frame_vocabulary import main as write_frame_vocabulary

    vocabulary = tmp_path / "frame_vocabulary.json"
    overrides.append(f"model.alignment.vocabulary={vocabulary}")
    assert write_frame_vocabulary(["--config", str(config), *overrides]) == 0
    proc = train_under_guard(config, overrides)
    assert_bounded(proc.stdout, [0, 14], 16, part_reads() + frame_objective_reads(4), libraries=None)

    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))
    frames, lora = log[:14], log[14:]
    # stage 1: the frame loss alone (no target token scored: the LM loss is null, the LLM did not run) ...
    assert all(r["loss"] is None and math.isfinite(r["frame_loss"]) for r in frames), frames[:3]
    assert all(r["tokens"] == 0 for r in frames)  # no position went through the LLM
    first, last = frames[0]["frame_loss"], sum(r["frame_loss"] for r in frames[-5:]) / 5
    assert first > 3.0 and last < first / 4, (first, last)  # ... memorises the clips' frame targets
    # stage 2: the LM loss through the readout, the frame term still logged
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["frame_loss"]) and r["tokens"] > 0 for r in lora), lora
    assert (out / "final.json").is_file()  # generation read the frames through the readout under ZeRO-3
    # the final model keeps its frame vocabulary: the file's tokens and the blank (the pad token)
    from part.model.speech_llm import SpeechLLM
    from part.objectives.frame_vocabulary import read_frame_vocabulary

    model, tokenizer = SpeechLLM.from_pretrained(out / "final")
    classes = read_frame_vocabulary(vocabulary, len(tokenizer), blank=tokenizer.pad_token_id)
    assert model.objectives[0].token_ids.tolist() == classes and len(classes) < len(tokenizer) / 20
    assert "[part] step 10/16 stage 1:frames loss - frame " in proc.stdout


def test_frame_loss_falls_for_an_llm_with_its_own_tokenizer(corpus, tiny_models, converted, tmp_path):
    """The frame objective users can run with any LLM: Whisper-base's encoder and alignment heads as the teacher,
    the tiny Qwen2-style LLM with its own sentencepiece tokenizer (not Whisper's), frames classified over its
    tokens of the clips' transcripts. Through the launcher, 2 ranks, ZeRO-3: the frame loss falls."""
    whisper_dir, _ = converted
    clips = corpus / "train" / "en-00000[01].tar"
    stages = """\
  - {name: frames, steps: 12, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-2, warmup_steps: 2,
     min_lr_ratio: 0.3, lm_loss: false}
"""
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, stages)
    overrides = [f"model.encoder.pretrained={whisper_dir}",
                 "model.alignment.frame_targets={weight: 1.0, targets: span}",
                 f"data.train_shards={clips}", "data.languages=[en]", "data.window=8", "data.max_batch_size=4",
                 "data.max_batch_seconds=200", "data.max_batch_tokens=4096", "eval.per_language=0",
                 "checkpoint.every=1000", "logging.every=4"]
    from part.cli.frame_vocabulary import main as write_frame_vocabulary

    vocabulary = tmp_path / "frame_vocabulary.json"
    overrides.append(f"model.alignment.vocabulary={vocabulary}")
    assert write_frame_vocabulary(["--config", str(config), *overrides]) == 0
    proc = train_under_guard(config, overrides)
    assert_bounded(proc.stdout, [0], 12, part_reads() + frame_objective_reads(4), libraries=None)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(r["loss"] is None and math.isfinite(r["frame_loss"]) for r in log), log[:3]
    first, last = (sum(r["frame_loss"] for r in part) / 4 for part in (log[:4], log[-4:]))
    assert last < 0.9 * first, [round(r["frame_loss"], 2) for r in log]
