"""Inference end to end on real clips (Opus .ogg, 22.05 kHz .flac, 44.1 kHz .wav and .aiff, a stereo .flac) with a
model directory saved from the tiny models: `transcribe()` and the `python -m part.infer` command, batching,
beam search, s2tt, and the errors for bad files and bad model directories.

The tiny model is untrained, so its text is garbage: these tests check the pipeline, not the words.
"""

import csv
import json

import pytest
import torch
from conftest import SHARED, run

from part.config import AdapterConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
from part.infer import InferError, check_task, read_inputs, transcribe
from part.model import SpeechLLM, load_tokenizer

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
pytestmark = pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning")


@pytest.fixture(scope="module")
def durations() -> dict[str, float]:
    with open(SHARED / "speech" / "transcripts.tsv", encoding="utf-8") as fh:
        return {str(SHARED / "speech" / r["path"]): float(r["duration_s"]) for r in csv.DictReader(fh, delimiter="\t")}


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    """A directory as training writes it (model.safetensors, part_model.json, tokenizer/)."""
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8)))
    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("infer") / "final"
    SpeechLLM(cfg, tok).save_pretrained(out, tok)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = SpeechLLM.from_pretrained(model_dir)
    return model.eval(), tok


def check_records(records, paths, durations, task="asr", language="de", target=None):
    assert [r["audio"] for r in records] == paths  # one per input, in input order
    for r in records:
        assert all(k in r for k in FIELDS)
        assert (r["task"], r["language"], r["target"]) == (task, language, target)
        assert isinstance(r["text"], str)
        assert abs(r["duration"] - durations[r["audio"]]) <= 0.05, r


# ---------------------------------------------------------------- transcribe()


def test_transcribe_real_clips_of_every_format(loaded, durations):
    model, tok = loaded
    paths = [FLAC, OGG, AIFF, STEREO, WAV]  # not length-sorted: the batches are, the output must not be
    records = transcribe(model, tok, paths, "asr", "de", batch_size=2, max_new_tokens=TOKENS)
    check_records(records, paths, durations)
    assert all(len(r["token_ids"]) <= TOKENS and "error" not in r for r in records)
    assert all(r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True).strip() for r in records)


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
    assert len(batches) == 2 and batches[1]["input_features"].shape[-1] > batches[0]["input_features"].shape[-1]
    assert [m["key"] for m in batches[1]["meta"]] == ["1", "0"]  # longest first: FLAC is row 1
    return alone[0], both[0], batches[0], batches[1]


def embeddings(model, batch, row):
    with torch.inference_mode():
        emb, lengths = model.encode_audio(batch["input_features"], batch["feature_frames"])
    return emb[row, : int(lengths[row])]


def test_batching_keeps_features_and_audio_embedding_count(loaded, monkeypatch):
    model, tok = loaded
    alone, both, b1, b2 = clip_a_alone_and_batched(model, tok, monkeypatch)
    frames = int(b1["feature_frames"][0])
    assert int(b2["feature_frames"][1]) == frames == b1["input_features"].shape[-1]
    assert torch.equal(b1["input_features"][0], b2["input_features"][1, :, :frames])
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


def cli(*args: str):
    return run(["python", "-m", "part.infer", *args])


def test_cli_jsonl_matches_transcribe(model_dir, loaded, tmp_path, durations):
    model, tok = loaded
    (tmp_path / "list.txt").write_text(f"{OGG}\n{AIFF}\n")
    proc = cli("--model", str(model_dir), "--language", "de", "--max-new-tokens", str(TOKENS), "--batch-size", "2",
               "--device", "cpu", "--jsonl", FLAC, f"@{tmp_path / 'list.txt'}", WAV)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    paths = [FLAC, OGG, AIFF, WAV]
    check_records(lines, paths, durations)
    assert all(set(r) == set(FIELDS) for r in lines)
    expected = transcribe(model, tok, paths, "asr", "de", batch_size=2, max_new_tokens=TOKENS)
    assert [r["text"] for r in lines] == [r["text"] for r in expected]


def test_cli_tsv_with_skip_bad(model_dir, tmp_path):
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"OggS" + bytes(200))
    missing = str(tmp_path / "missing.wav")
    proc = cli("--model", str(model_dir), "--task", "s2tt", "--language", "en", "--target", "de", "--beams", "2",
               "--max-new-tokens", str(TOKENS), "--device", "cpu", "--skip-bad", WAV, missing, str(broken), LONG,
               FLAC)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [WAV, FLAC] and all(len(r) == 2 for r in rows)
    for name in (missing, str(broken), LONG):
        assert name in proc.stderr
    assert "skipped 3 of 5" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing", "broken", "too_long", "no_target", "same_target", "not_a_model"])
def test_cli_errors_exit_2_and_name_the_problem(case, model_dir, tmp_path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC" + bytes(100))
    args = {
        "missing": (["--language", "en", FLAC, str(tmp_path / "gone.wav")], str(tmp_path / "gone.wav")),
        "broken": (["--language", "en", str(broken), FLAC], str(broken)),
        "too_long": (["--language", "en", FLAC, LONG], LONG),
        "no_target": (["--task", "s2tt", "--language", "en", FLAC], "--target"),
        "same_target": (["--task", "s2tt", "--language", "en", "--target", "en", FLAC], "must differ"),
        "not_a_model": (["--language", "en", FLAC], "part_model.json"),
    }[case]
    model = tmp_path if case == "not_a_model" else model_dir
    proc = cli("--model", str(model), "--device", "cpu", "--max-new-tokens", "2", *args[0])
    assert proc.returncode == 2, proc.stderr
    assert args[1] in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
