"""A non-Whisper encoder through the real `deepspeed` launcher: 2 ranks, ZeRO-3, gloo on CPU. WavLM is the family
with the most that ZeRO-3 could miss (its GroupNorm front end, weight-normalised position convolution and
relative position bias), so it is the one trained here: three steps with `encoder.top.1` trainable, then the
final evaluation (generation under ZeRO-3) and export. The other families train in-process in
tests/unit/test_encoders.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_under_guard, write_config
from safetensors.torch import load_file
from tiny_encoders import build_tiny_encoder

from part.config import load_config
from part.model.encoders import WavLMFamily
from part.model.groups import group_parameters
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer

# extended: the launcher path is the default run's (Whisper); WavLM's modules train in-process in test_encoders.py
pytestmark = [pytest.mark.slow, pytest.mark.extended]

STAGES = "  - {name: s1_top, steps: 3, tasks: {asr: 1.0}, trainable: [adapter, encoder.top.1], lr: 3.0e-3, " \
         "warmup_steps: 0}"


def test_wavlm_top_layer_trains_through_the_launcher(corpus, tiny_models, tmp_path):
    wavlm = build_tiny_encoder("wavlm", tmp_path / "wavlm")
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGES)
    overrides = [f"model.encoder.pretrained={wavlm}", "eval.per_language=1", "eval.tasks=[asr]"]
    train_under_guard(config, overrides)

    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert (out / "final.json").is_file()  # the final evaluation generated under ZeRO-3

    # Exactly the top layer changed in the encoder (WavLM's post-norm layers have no norm above them).
    cfg = load_config(config)
    cfg.model.encoder.pretrained = str(wavlm)
    initial = SpeechLLM(cfg.model, load_tokenizer(str(tiny_models / "llm")))
    top = set(group_parameters(initial, "encoder.top.1"))
    assert top and all(n.startswith("encoder.encoder.layers.2.") for n in top)
    final = load_file(str(out / "final" / "model.safetensors"))
    encoder = {n: p for n, p in initial.state_dict().items() if n.startswith("encoder.")}
    changed = {n for n, p in encoder.items() if not torch.equal(final[n], p)}
    assert changed == top, sorted(changed ^ top)[:5]

    # The exported model names its encoder family and feature extractor and loads without the WavLM directory.
    extractor = json.loads((out / "final" / "encoder_config" / "preprocessor_config.json").read_text())
    assert extractor["do_normalize"] is False
    loaded, _ = SpeechLLM.from_pretrained(out / "final")
    assert isinstance(loaded.encoder_family, WavLMFamily)
