"""Inference end to end on real clips (Opus .ogg, 22.05 kHz .flac, 44.1 kHz .wav and .aiff, a stereo .flac) with a
model directory saved from the tiny models: `transcribe()`, batching, beam search, s2tt, and the errors for bad
files (the `python -m part infer` command: tests/integration/test_infer_cli.py).

The tiny model is untrained, so its text is garbage: these tests check the pipeline, not the words.
"""

import pytest
import torch
from conftest import AIFF, FLAC, IGNORE_INPUTS_EMBEDS_WARNING, LONG, OGG, STEREO, TOKENS, WAV, check_records

from part.inference import InferError, check_task, read_inputs, transcribe

pytestmark = IGNORE_INPUTS_EMBEDS_WARNING

# ---------------------------------------------------------------- transcribe()


def test_transcribe_real_clips_of_every_format(loaded, durations):
    model, tok = loaded
    paths = [FLAC, OGG, AIFF, STEREO, WAV]  # not length-sorted: the batches are, the output must not be
    records = transcribe(model, tok, paths, "asr", "de", batch_size=2, max_new_tokens=TOKENS)
    check_records(records, paths, durations)
    assert all(len(r["token_ids"]) <= TOKENS and "error" not in r for r in records)
    assert all(r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True).strip() for r in records)
    assert all("frames" not in r for r in records)
    with_frames = transcribe(model, tok, paths[:2], "asr", "de", batch_size=2, max_new_tokens=TOKENS, frames=True)
    assert [r["text"] for r in with_frames] == [r["text"] for r in records[:2]]  # the same hypotheses
    assert all(isinstance(r["frames"], str) for r in with_frames)


def test_beam_search_and_translation(loaded, durations):
    model, tok = loaded
    paths = [AIFF, FLAC, WAV]
    records = transcribe(model, tok, paths, "s2tt", "fr", target="en", beams=2, batch_size=2,
                         max_new_tokens=TOKENS)
    check_records(records, paths, durations, "s2tt", "fr", "en")
    with pytest.raises(ValueError, match="target"):
        transcribe(model, tok, paths, "s2tt", "fr")
    with pytest.raises(ValueError, match="differ"):
        check_task("s2tt", "fr", "fr")
    with pytest.raises(ValueError, match="only for"):
        check_task("asr", "fr", "en")


def test_bad_files_raise_or_are_skipped(loaded, tmp_path, durations):
    model, tok = loaded
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    missing = str(tmp_path / "missing.flac")
    for bad, reason in ((missing, "no such file"), (str(broken), "cannot decode"), (LONG, "30 s window")):
        with pytest.raises(InferError, match=reason) as info:
            transcribe(model, tok, [FLAC, bad], "asr", "en", max_new_tokens=TOKENS)
        assert bad in str(info.value)
    paths = [FLAC, missing, str(broken), LONG, WAV]
    records = transcribe(model, tok, paths, "asr", "en", max_new_tokens=TOKENS, skip_bad=True)
    assert [r["audio"] for r in records] == paths
    assert [r.get("error") is None for r in records] == [True, False, False, False, True]
    assert records[0]["text"] is not None and records[1]["text"] is None
    check_records([records[0], records[4]], [FLAC, WAV], durations, language="en")


def test_list_files(tmp_path):
    (tmp_path / "list.txt").write_text(f"# clips\n{FLAC}\n\n  {OGG}  \n")
    assert read_inputs([WAV, f"@{tmp_path / 'list.txt'}", AIFF]) == [WAV, FLAC, OGG, AIFF]
    with pytest.raises(InferError, match="nope.txt"):
        read_inputs(["@nope.txt"])


# ---------------------------------------------------------------- batching

# Clip A (1.9 s) alone, and batched with clip B (17.9 s): A's mel features are identical on its valid frames
# (checked below), but SpeechLLM.encode_audio runs the Whisper encoder over the padded batch with no attention
# mask, and its convolutions and the adapter's strided conv read padding frames next to A's last valid frame. A's
# embeddings then change (by ~10% of their scale on this model), so greedy decoding may too. The count of A's
# audio embeddings never depends on the batch; with the encoder masked (`masked_encode_audio`, a fix for
# part/model.py) the embeddings and the generated ids are the same alone and batched.


def record_batches(model, monkeypatch) -> list[dict]:
    """Every batch transcribe() hands to model.generate."""
    seen, generate = [], model.generate

    def spy(batch, *args, **kwargs):
        seen.append(batch)
        return generate(batch, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def clip_a_alone_and_batched(model, tok, monkeypatch):
    """(records, batches) of FLAC transcribed alone, then batched with the longer OGG (FLAC is row 1 there)."""
    batches = record_batches(model, monkeypatch)
    alone = transcribe(model, tok, [FLAC], "asr", "en", max_new_tokens=TOKENS)
    both = transcribe(model, tok, [FLAC, OGG], "asr", "en", batch_size=2, max_new_tokens=TOKENS)
    assert len(batches) == 2 and batches[1].input_features.shape[-1] > batches[0].input_features.shape[-1]
    assert [m.key for m in batches[1].meta] == ["1", "0"]  # longest first: FLAC is row 1
    return alone[0], both[0], batches[0], batches[1]


def embeddings(model, batch, row):
    with torch.inference_mode():
        emb, lengths = model.encode_audio(batch.input_features, batch.feature_frames)
    return emb[row, : int(lengths[row])]


def test_batching_keeps_features_and_audio_embedding_count(loaded, monkeypatch):
    model, tok = loaded
    alone, both, b1, b2 = clip_a_alone_and_batched(model, tok, monkeypatch)
    frames = int(b1.feature_frames[0])
    assert int(b2.feature_frames[1]) == frames == b1.input_features.shape[-1]
    assert torch.equal(b1.input_features[0], b2.input_features[1, :, :frames])
    encoder_frames = (frames + 1) // 2  # conv2 has stride 2
    count = -(-encoder_frames // model.cfg.adapter.downsample)  # the adapter keeps a last partial window
    assert embeddings(model, b1, 0).shape[0] == embeddings(model, b2, 1).shape[0] == count
    assert len(alone["token_ids"]) <= TOKENS and len(both["token_ids"]) <= TOKENS


def test_batched_clip_is_encoded_as_alone(loaded, monkeypatch):
    """The encoder masks padding: a clip's embeddings and greedy output do not depend on its batch."""
    model, tok = loaded
    alone, both, b1, b2 = clip_a_alone_and_batched(model, tok, monkeypatch)
    assert torch.allclose(embeddings(model, b1, 0), embeddings(model, b2, 1), atol=1e-4)
    assert alone["token_ids"] == both["token_ids"]
