"""Speech encoder families (part/model/encoders.py) on tiny random encoders saved as real checkpoints are: the
family comes from config.json, its feature extractor feeds the data pipeline, a clip encodes the same alone and
batched, frame counts, `encoder.top.N`, activation checkpointing, save/load, training, FLOPs and memory."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from test_flops import CPU_ATTENTION
from tiny_encoders import FAMILIES, LAYERS, build_tiny_encoder
from torch.utils.flop_counter import FlopCounterMode

from part.config import ActivationCheckpointingConfig, AdapterConfig, EncoderConfig, LLMConfig, ModelConfig
from part.data.audio import encode_flac
from part.data.batching import collate
from part.data.samples import Sample, encode_text
from part.features import SAMPLE_RATE, FbankFeatures, LogMelFeatures, WaveformFeatures, audio_features
from part.model.encoders import (
    EncoderError,
    W2vBertFamily,
    Wav2Vec2Family,
    WavLMFamily,
    WhisperFamily,
    encoder_family,
)
from part.model.flops import batch_flops
from part.model.groups import group_parameters, set_trainable
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer

EXPECTED = {"whisper": (WhisperFamily, LogMelFeatures), "wav2vec2": (Wav2Vec2Family, WaveformFeatures),
            "hubert": (Wav2Vec2Family, WaveformFeatures), "wavlm": (WavLMFamily, WaveformFeatures),
            "wav2vec2-bert": (W2vBertFamily, FbankFeatures)}
# The encoder's frames for a clip of n samples, by the family's front end: Whisper's 10 ms mel frames halved by
# its stride-2 conv; the wav2vec2 CNN's 400-sample receptive field and 320-sample stride; w2v-BERT's 25 ms / 10 ms
# fbank frames stacked in pairs.
FRAMES = {"whisper": lambda n: (n // 160 + 1) // 2, "wav2vec2": lambda n: (n - 400) // 320 + 1,
          "hubert": lambda n: (n - 400) // 320 + 1, "wavlm": lambda n: (n - 400) // 320 + 1,
          "wav2vec2-bert": lambda n: (1 + (n - 400) // 160) // 2}
# The top layer's parameter prefix and what else `encoder.top.N` holds (the final norm, where there is one).
TOP = {"whisper": ("encoder.layers.", ("encoder.layer_norm.",)),
       "wav2vec2": ("encoder.encoder.layers.", ()),
       "hubert": ("encoder.encoder.layers.", ("encoder.encoder.layer_norm.",)),  # pre-norm layers, norm on top
       "wavlm": ("encoder.encoder.layers.", ()),
       "wav2vec2-bert": ("encoder.encoder.layers.", ())}


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("encoders")
    return {family: build_tiny_encoder(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def tok(tiny_models):
    return load_tokenizer(str(tiny_models / "llm"))


def model_config(encoder_dir, tiny_models, **fields) -> ModelConfig:
    return ModelConfig(encoder=EncoderConfig(pretrained=str(encoder_dir)),
                       adapter=AdapterConfig(hidden=32, layers=1, heads=4),
                       llm=LLMConfig(pretrained=str(tiny_models / "llm")), **fields)


@pytest.fixture(scope="module")
def models(encoder_dirs, tiny_models, tok) -> dict:
    out = {}
    for family, path in encoder_dirs.items():
        torch.manual_seed(0)
        out[family] = SpeechLLM(model_config(path, tiny_models), tok).eval()
    return out


def waves(*seconds: float) -> list[np.ndarray]:
    """Noise clips; a clip of a given length is the same clip in every call."""
    out = []
    for s in seconds:
        n = int(s * SAMPLE_RATE)
        out.append((0.1 * np.random.default_rng(n).standard_normal(n)).astype(np.float32))
    return out


# Clip lengths for the padding checks: 1.1 s + 77 samples. Whisper's log-mel extractor pads the batch's waveforms
# before its centred STFT, so a clip's last mel frame reads the batch's zero padding where alone it reads its own
# reflection, unless the clip ends at least 40 samples past a 160-sample hop boundary (as this one does). That
# front end is kept as it was (its numbers unchanged); the encoders themselves are masked.
LONG, SHORT = 2.3 + 77 / SAMPLE_RATE, 1.1 + 77 / SAMPLE_RATE


def speech_batch(model, tok, seconds=(LONG, SHORT), text_only: bool = False):
    """A batch through the data pipeline's collator, with the model's own feature extractor."""
    end = model.end_token_id
    samples = []
    for i, w in enumerate(waves(*seconds)):
        s = Sample("asr", "de", None, str(i), "mem", model.prompt_format.prompt("asr", "de"), "Guten Tag",
                   len(w) / SAMPLE_RATE, encode_flac(w), transcript="Guten Tag")
        encode_text(tok, s, end)
        samples.append(s)
    if text_only:
        s = Sample("mt", "de", "en", "t", "mem", model.prompt_format.prompt("mt", "de", "en", "Hallo"), "Hello", 0.0,
                   None)
        encode_text(tok, s, end)
        samples.append(s)
    batch = collate(samples, model.audio_features, Counter())
    assert batch is not None and len(batch) == len(samples)
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_features_come_from_config_json(encoder_dirs, models, family):
    fam = encoder_family(encoder_dirs[family])
    family_class, features_class = EXPECTED[family]
    assert type(fam) is family_class and type(fam.features) is features_class
    assert type(models[family].encoder_family) is family_class
    # the extractor is the directory's (preprocessor_config.json): for WavLM unnormalised, for w2v-BERT padded with 1
    saved = json.loads((encoder_dirs[family] / "preprocessor_config.json").read_text())
    for key in ("do_normalize", "padding_value", "stride"):
        if key in saved and family != "whisper":
            assert getattr(fam.features.extractor, key) == saved[key], key
    # a bare transformers extractor resolves to the same kind (what older callers of collate pass)
    assert type(audio_features(fam.features.extractor)) is features_class


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderError, match=r"model_type 'bert' is not supported \(supported: whisper, wav2vec2, "
                                           r"hubert, wavlm, wav2vec2-bert\)"):
        encoder_family(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_counts_and_frame_rate(models, family):
    """Feature lengths -> encoder frames: what the family predicts is what the encoder gives a clip alone, and
    what its front end's arithmetic says; 50 frames per second."""
    model = models[family]
    fam = model.encoder_family
    clips = waves(0.1, 0.77, 1.0, 2.0, 3.3)
    for w in clips:
        features, lengths = fam.features([w])
        with torch.no_grad():
            out, out_lengths = fam.encode(model.encoder, features, lengths)
        expected = FRAMES[family](len(w))
        assert int(fam.output_lengths(lengths)[0]) == int(out_lengths[0]) == out.shape[1] == expected, len(w)
    assert FRAMES[family](2 * SAMPLE_RATE) in (99, 100) and fam.frames_per_second == 50


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_encodes_the_same_alone_and_batched(models, tok, family):
    """Padding changes nothing: a clip's encoder frames and audio embeddings are the same alone and batched with
    a longer clip (features, convolutions, norms and attention are all masked)."""
    model = models[family]
    both = speech_batch(model, tok, seconds=(LONG, SHORT))
    alone = speech_batch(model, tok, seconds=(SHORT,))
    fam = model.encoder_family
    n = int(alone.feature_frames[0])
    assert int(both.feature_frames[1]) == n
    time_axis = 0 if family == "wav2vec2-bert" else -1  # fbank: [frames, 160]
    assert torch.equal(both.input_features[1].narrow(time_axis, 0, n), alone.input_features[0])
    with torch.no_grad():
        enc_both, len_both = fam.encode(model.encoder, both.input_features, both.feature_frames)
        enc_alone, len_alone = fam.encode(model.encoder, alone.input_features, alone.feature_frames)
        emb_both, emb_len_both = model.encode_audio(both.input_features, both.feature_frames)
        emb_alone, emb_len_alone = model.encode_audio(alone.input_features, alone.feature_frames)
    k = int(len_alone[0])
    assert int(len_both[1]) == k and enc_alone.shape[1] == k < enc_both.shape[1]
    assert torch.allclose(enc_both[1, :k], enc_alone[0], atol=1e-5), (enc_both[1, :k] - enc_alone[0]).abs().max()
    assert not enc_both[1, k:].any()  # padded frames are zero
    m = int(emb_len_alone[0])
    assert int(emb_len_both[1]) == m
    assert torch.allclose(emb_both[1, :m], emb_alone[0, :m], atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "whisper"])
def test_encoding_is_the_transformers_models(encoder_dirs, models, family):
    """On one unpadded clip the family's written-out forward gives what the transformers model's own forward
    gives (eval mode: no SpecAugment, dropout or LayerDrop there either)."""
    model = models[family]
    features, lengths = model.audio_features(waves(1.7))
    with torch.no_grad():
        ours, _ = model.encoder_family.encode(model.encoder, features, lengths)
        key = "input_features" if family == "wav2vec2-bert" else "input_values"
        theirs = model.encoder(**{key: features}).last_hidden_state
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_top_n_is_the_top_layers(models, tok, family):
    model = models[family]
    prefix, above = TOP[family]
    names = [n for n, _ in model.named_parameters()]
    assert model.encoder_layout.layers == LAYERS == len(model.encoder_layers)
    for k in (1, 2):
        top = group_parameters(model, f"encoder.top.{k}")
        layers = {n[len(prefix):].split(".")[0] for n in top if n.startswith(prefix)}
        assert layers == {str(i) for i in range(LAYERS - k, LAYERS)}
        assert {n for n in top if not n.startswith(prefix)} == {n for n in names if n.startswith(above)}
    assert group_parameters(model, f"encoder.top.{LAYERS}") == [n for n in names if n.startswith((prefix, *above))]
    assert group_parameters(model, "encoder.layers.0") == [n for n in names if n.startswith(prefix + "0.")]
    assert group_parameters(model, "encoder.layers.0") and not group_parameters(model, f"encoder.layers.{LAYERS}")
    # the meta-device skeleton of `train.py --check` has the same names and groups
    skeleton = SpeechLLM.skeleton(model.cfg, tok)
    assert [n for n, _ in skeleton.named_parameters()] == names
    assert group_parameters(skeleton, "encoder.top.1") == group_parameters(model, "encoder.top.1")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(models, tok, family, tmp_path):
    """The saved directory carries the encoder's config and feature extractor and loads as the same model."""
    model = models[family]
    batch = speech_batch(model, tok, text_only=True)
    with torch.no_grad():
        before = model(batch)["loss"]
    model.save_pretrained(tmp_path / "saved", tok)
    saved = tmp_path / "saved" / "encoder_config"
    assert json.loads((saved / "config.json").read_text())["model_type"] == family
    assert (saved / "preprocessor_config.json").is_file() == (family != "whisper")
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "saved")
    assert type(loaded.encoder_family) is type(model.encoder_family)
    assert loaded.audio_features.extractor.to_json_string() == model.audio_features.extractor.to_json_string()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch)["loss"], before)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_changes_no_gradient(encoder_dirs, tiny_models, tok, family):
    def grads(checkpointed: bool):
        cfg = model_config(encoder_dirs[family], tiny_models,
                           activation_checkpointing=ActivationCheckpointingConfig(encoder=checkpointed))
        torch.manual_seed(0)
        model = SpeechLLM(cfg, tok).train()
        set_trainable(model, ["adapter", "encoder"])
        batch = speech_batch(model, tok)
        torch.manual_seed(1)  # the same dropout masks in both runs (recomputation replays the RNG state)
        model(batch)["loss"].backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and any(".layers.0." in n for n in plain)
    for name, g in plain.items():
        assert torch.allclose(g, recomputed[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("family", FAMILIES)
def test_training_the_top_layer_changes_it_alone(encoder_dirs, tiny_models, tok, family):
    """A few optimizer steps with `encoder.top.1` trainable (dropout on, as in training): the loss is finite, the
    top layer (and a final norm above it) changes, the layers and front end below do not."""
    torch.manual_seed(0)
    model = SpeechLLM(model_config(encoder_dirs[family], tiny_models), tok).train()
    set_trainable(model, ["adapter", "encoder.top.1"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("encoder.")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = speech_batch(model, tok, text_only=True)
    for _ in range(3):
        loss = model(batch)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    top = set(group_parameters(model, "encoder.top.1"))
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed == top


def _measured(run) -> tuple[float, float]:
    """FlopCounterMode's forward and backward operations of `run()` (which returns what to backpropagate)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as forward:
        out = run()
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as backward:
        out.backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_flop_count_is_close_to_the_flop_counter(models, tok, family):
    """The written-out count against FlopCounterMode (exact for Whisper's front end, approximate for the other
    families): the encoder alone while all of it trains, and a whole step with the top layer training."""
    model = models[family]
    batch = speech_batch(model, tok, text_only=True)
    model.train()
    try:
        set_trainable(model, ["adapter", "encoder"])
        fwd, bwd = _measured(lambda: model.encoder_family.encode(model.encoder, batch.input_features,
                                                                 batch.feature_frames)[0].sum())
        counted = batch_flops(model, batch).encoder
        assert counted.forward == pytest.approx(fwd, rel=0.15) and counted.backward == pytest.approx(bwd, rel=0.15)
        model.zero_grad(set_to_none=True)
        set_trainable(model, ["adapter", "encoder.top.1"])
        fwd, bwd = _measured(lambda: model(batch)["loss"])
        counted = batch_flops(model, batch)
    finally:
        model.zero_grad(set_to_none=True)
        set_trainable(model, [])
        model.eval()
    forward = sum(c.forward for c in (counted.encoder, counted.adapter, counted.llm, counted.head))
    assert forward == pytest.approx(fwd, rel=0.1) and counted.total - forward == pytest.approx(bwd, rel=0.1)
    assert counted.encoder.backward > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_estimate_counts_the_encoder(encoder_dirs, tiny_models, tok, family):
    from part.config import StageConfig, TrainConfig
    from part.train.memory import estimate_stages

    cfg = TrainConfig()
    cfg.model = model_config(encoder_dirs[family], tiny_models)
    cfg.stages = [StageConfig(name="a", steps=1, trainable=["adapter"]),
                  StageConfig(name="b", steps=1, trainable=["adapter", "encoder"])]
    adapter_only, whole = estimate_stages(cfg, 1, SpeechLLM.skeleton(cfg.model, tok))
    assert whole.activations > adapter_only.activations > 0 and whole.optimizer > adapter_only.optimizer


@pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "whisper"])
def test_transcribe_uses_the_family_features(models, tok, family, tmp_path):
    """`python -m part infer`'s path: audio files through the model's own feature extractor, a clip's text the
    same alone and batched with a longer clip."""
    import soundfile as sf

    from part.inference import max_audio_seconds, transcribe

    model = models[family]
    paths = []
    for name, w in zip(("long", "short"), waves(LONG, SHORT)):
        sf.write(tmp_path / f"{name}.wav", w, SAMPLE_RATE, subtype="FLOAT")
        paths.append(str(tmp_path / f"{name}.wav"))
    alone = transcribe(model, tok, paths[1:], "asr", "de", max_new_tokens=4)
    both = transcribe(model, tok, paths, "asr", "de", max_new_tokens=4, batch_size=2)
    assert both[1]["token_ids"] == alone[0]["token_ids"] and isinstance(alone[0]["text"], str)
    assert max_audio_seconds(model) == 30.0
