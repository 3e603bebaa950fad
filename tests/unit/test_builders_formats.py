"""Builders for the formats users already hold (chat JSONL, Hugging Face datasets, Lhotse cuts), each run on a
fixture written in that format from the real clips of shared/data/speech, its shards read back."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import call_main
from test_builders import CLIPS, CORRUPT, SPEECH, _read_tsv, check_index, check_tars, read_shards

from data_prep import chat_jsonl, hf_datasets, lhotse_cuts
from data_prep.chat_jsonl import infer_task
from part.data.audio import SAMPLE_RATE, load_audio

QUANTISATION = 1e-3  # the shards hold 16-bit FLAC: a clip decoded the same way comes back within this


@pytest.fixture(scope="module")
def clips() -> dict[str, dict[str, str]]:
    """transcripts.tsv rows by clip id."""
    return _read_tsv(SPEECH / "transcripts.tsv")


@functools.cache
def _decoded(path: str) -> np.ndarray:
    return load_audio(path)


def clip_wave(clips: dict, clip: str) -> np.ndarray:
    """The clip at 16 kHz mono, decoded once per test session."""
    return _decoded(str(SPEECH / clips[clip]["path"]))


def assert_audio(flac: bytes, expected: np.ndarray, tolerance: float = QUANTISATION) -> None:
    """The shard's audio is `expected` (16 kHz): the same length within a sample, the same samples within
    `tolerance`."""
    got = load_audio(flac)
    assert abs(len(got) - len(expected)) <= 1, (len(got), len(expected))
    n = min(len(got), len(expected))
    assert np.abs(got[:n] - expected[:n]).max() < tolerance


def check_clip(sample: dict, clips: dict, clip: str, language: str, source: str) -> None:
    """A sample that is a whole real clip: its transcript, language, duration and audio."""
    rec = sample["record"]
    assert (rec["transcript"], rec["language"], rec["source"]) == (clips[clip]["transcript"].strip(), language, source)
    assert rec["duration"] == pytest.approx(float(clips[clip]["duration_s"]), abs=0.05)
    assert_audio(sample["flac"], clip_wave(clips, clip))


# ---------------------------------------------------------------------------------------------------- chat JSONL

def chat(user: object, reply: str, system: bool = False) -> list[dict]:
    head = [{"role": "system", "content": "You are a helpful assistant."}] if system else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_chat_jsonl(tmp_path: Path, clips: dict, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "clips").symlink_to(CLIPS)  # relative paths start at the JSONL's folder
    t = {c: clips[c]["transcript"] for c in clips}
    de_en = "The cave is at the top of one of the mountains north of Mecca."
    zh_en = "Calcium and potassium are considered metals."
    lines = [
        # 1-2 ms-swift: task and languages from the instruction; the two turns of one file become one sample
        {"messages": chat("<audio>Transcribe the German audio.", t["fleurs_de_004"], system=True),
         "audios": ["clips/fleurs_de_004.ogg"]},
        {"messages": chat("<audio>Translate the German audio into English.", de_en),
         "audios": ["clips/fleurs_de_004.ogg"]},
        # 3 Fun-ASR-Nano: the audio inline, an absolute path; `key` is the id
        {"key": "zh_utt1", "messages": chat(
            f"语音转写成中文：<|startofspeech|>!{CLIPS / 'fleurs2_zh_01.wav'}<|endofspeech|>", t["fleurs2_zh_01"])},
        # 4 WEST content parts; an instruction that names no task, so an explicit one
        {"task": "asr", "language": "en-US", "messages": chat(
            [{"type": "audio", "audio": "clips/ljspeech_LJ001-0002.flac"},
             {"type": "text", "text": "What does the speaker say?"}], t["ljspeech_LJ001-0002"])},
        # 5 LLaMA-Factory ShareGPT; the language as an English name
        {"conversations": [{"from": "human", "value": "<audio>Please transcribe this recording."},
                           {"from": "gpt", "value": t["sr_french_dictee"]}],
         "audios": ["clips/sr_french_dictee.aiff"], "language": "French"},
        # 6 two audio turns in one object, in the order of `audios`
        {"messages": [*chat("<audio>Transcribe the English audio.", t["ljspeech_LJ002-0020"]),
                      *chat("Now this one: <audio> transcribe the English audio.", t["sr_english_one_two_three"])],
         "audios": ["clips/ljspeech_LJ002-0020.wav", "clips/sr_english_one_two_three.wav"]},
        # 7 a translation with the clip's transcript given on the object
        {"messages": chat("<audio>请把这段中文语音翻译成英文", zh_en), "audios": ["clips/fleurs2_zh_02.wav"],
         "transcript": t["fleurs2_zh_02"]},
        # bad lines
        '{"messages": [{"role": "user", "content": "<audio>Transcribe',  # 8: invalid JSON
        {"messages": chat("<audio>Transcribe the German audio.", "x"), "audios": []},  # 9: no audio for the tag
        {"messages": chat("<audio>Transcribe the German audio.", "x"), "audios": ["clips/gone.wav"]},  # 10
        {"messages": chat("<audio>How does the speaker feel?", "calm"), "audios": ["clips/fleurs_de_005.ogg"],
         "language": "de"},  # 11: the task cannot be told
        {"task": "s2tt", "language": "de", "target_language": "en",  # 12: a translation, no transcript anywhere
         "messages": chat("<audio>", "This sediment was needed."), "audios": ["clips/fleurs_de_005.ogg"]},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                     encoding="utf-8")

    out = tmp_path / "out"
    code, _, err = call_main(chat_jsonl.main, ["--jsonl", str(jsonl), "--out", str(out), "--workers", "2"], capsys)
    assert code == 0, err
    for line, field in [(8, "invalid JSON"), (9, "field 'audios'"), (10, "field 'audios[0]': no such file"),
                        (11, "field 'task'"), (12, "field 'transcript'")]:
        assert f"{jsonl}:{line}: {field}" in err, (line, err)
    samples = read_shards(out)
    assert check_tars(out) == {"de": 1, "zh": 2, "en": 3, "fr": 1}
    check_index(out, samples, {"bad_row": 3, "unknown_task": 1, "no_transcript": 1})
    assert "skipped: bad_row=3, no_transcript=1, unknown_task=1" in err
    expected = {"clips_fleurs_de_004": ("fleurs_de_004", "de", {"en": de_en}), "zh_utt1": ("fleurs2_zh_01", "zh", {}),
                "clips_ljspeech_LJ001-0002": ("ljspeech_LJ001-0002", "en", {}),
                "clips_sr_french_dictee": ("sr_french_dictee", "fr", {}),
                "clips_ljspeech_LJ002-0020": ("ljspeech_LJ002-0020", "en", {}),
                "clips_sr_english_one_two_three": ("sr_english_one_two_three", "en", {}),
                "clips_fleurs2_zh_02": ("fleurs2_zh_02", "zh", {"en": zh_en})}
    assert sorted(samples) == sorted(expected)
    for key, (clip, language, translations) in expected.items():
        check_clip(samples[key], clips, clip, language, "chat_jsonl")
        assert samples[key]["record"]["translations"] == translations

    # --language and --task are defaults for objects without the fields; every line bad: exit 2, no index
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": chat("<audio>语音转文本", t["fleurs2_zh_01"]),
                                 "audios": ["clips/fleurs2_zh_01.wav"]}) + "\n", encoding="utf-8")
    code, _, err = call_main(chat_jsonl.main, ["--jsonl", str(plain), "--out", str(tmp_path / "o2"), "--workers", "1",
                                               "--language", "zh"], capsys)
    assert code == 0, err
    (only,) = read_shards(tmp_path / "o2").values()
    check_clip(only, clips, "fleurs2_zh_01", "zh", "chat_jsonl")
    code, _, err = call_main(chat_jsonl.main, ["--jsonl", str(plain), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and f"{plain}:1: field 'language'" in err and "no sample of 1 survived" in err
    assert not (tmp_path / "o3" / "index.json").exists()


@pytest.mark.parametrize("instruction, said", [
    ("Transcribe the German audio.", ("asr", "de", None)),
    ("Translate the German audio into English.", ("s2tt", "de", "en")),
    ("Listen to English audio and translate it into German", ("s2tt", "en", "de")),
    ("Translate from French to Spanish", ("s2tt", "fr", "es")),
    ("语音转写成中文：", ("asr", "zh", None)),
    ("语音转文本", ("asr", None, None)),
    ("请把这段中文语音翻译成英文", ("s2tt", "zh", "en")),
    ("Translate the audio to text", ("s2tt", None, None)),  # no target language: not guessed
    ("Transcribe it and translate it into French", (None, None, None)),  # both: not guessed
    ("What is the speaker's mood?", (None, None, None)),
])
def test_chat_instruction_rule(instruction: str, said: tuple) -> None:
    assert infer_task(instruction) == said


# ------------------------------------------------------------------------------------------ Hugging Face datasets

ENCODED = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DECODED = pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.int64())])


def hf_dataset(columns: dict, audio_type: pa.DataType, as_audio: bool = True):
    """A `datasets.Dataset` from plain columns, the audio cast to the Audio feature the way hub datasets store it."""
    import datasets

    table = pa.table({k: pa.array(v, type=audio_type if k == "audio" else None) for k, v in columns.items()})
    dataset = datasets.Dataset(table)
    return dataset.cast_column("audio", datasets.Audio()) if as_audio else dataset


def write_parquet(dataset, path: Path) -> None:
    """The dataset's Arrow table as a hub parquet file: its features in the schema's `huggingface` metadata.
    (Dataset.to_parquet would measure every path-only file first, from the current directory.)"""
    assert b"huggingface" in dataset.data.table.schema.metadata
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(dataset.data.table, path)


def test_hf_datasets(tmp_path: Path, clips: dict, capsys: pytest.CaptureFixture) -> None:
    import datasets

    t = {c: clips[c]["transcript"] for c in clips}
    read = lambda c: (SPEECH / clips[c]["path"]).read_bytes()  # noqa: E731
    # save_to_disk, a DatasetDict: encoded bytes with hub-style file names, and a path the library embeds
    train = hf_dataset({"audio": [{"bytes": read("fleurs_de_004"), "path": "fleurs_de_004.ogg"},
                                  {"bytes": None, "path": str(SPEECH / clips["ljspeech_LJ002-0020"]["path"])},
                                  {"bytes": CORRUPT, "path": "broken.mp3"}],
                        "sentence": [t["fleurs_de_004"], t["ljspeech_LJ002-0020"], "kaputt"],
                        "locale": ["de", "English", "de"]}, ENCODED)
    test = hf_dataset({"audio": [{"bytes": read("fleurs2_zh_01"), "path": "fleurs2_zh_01.wav"}],
                       "sentence": [t["fleurs2_zh_01"]], "locale": ["zh-CN"]}, ENCODED)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    # parquet: relative paths (from the file's folder), an id column, translations; and bad rows
    (tmp_path / "pq" / "data").mkdir(parents=True)
    (tmp_path / "pq" / "data" / "clips").symlink_to(CLIPS)
    write_parquet(hf_dataset({"audio": [{"bytes": None, "path": "clips/ljspeech_LJ001-0002.flac"},
                          {"bytes": None, "path": "clips/sr_french_dictee.aiff"},
                          {"bytes": None, "path": None},
                          {"bytes": None, "path": "clips/fleurs_en_003.ogg"},
                          {"bytes": read("fleurs_en_004"), "path": "fleurs_en_004.ogg"}],
                "text": [t["ljspeech_LJ001-0002"], t["sr_french_dictee"], "no audio", t["fleurs_en_003"], " "],
                "language": ["en", "fr", "en", "Klingon", "en"],
                "utt": ["lj1", "fr1", "none", "kl1", "blank"],
                "translation_de": ["Darin, vergleichsweise modern zu sein.", "C'est la dictée numéro un, auf Deutsch.",
                                   None, None, None]}, ENCODED), tmp_path / "pq" / "data" / "x.parquet")
    # decoded arrays (a 44.1 kHz clip), saved without the Audio feature
    wave44, sr44 = sf.read(SPEECH / clips["sr_english_one_two_three"]["path"], dtype="float32")
    hf_dataset({"audio": [{"array": wave44.tolist(), "sampling_rate": sr44}], "transcription": [t[
        "sr_english_one_two_three"]], "language": ["en"]}, DECODED, as_audio=False).save_to_disk(str(tmp_path / "arr"))

    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "saved"), str(tmp_path / "pq"), str(tmp_path / "arr"), "--out", str(out),
            "--workers", "2", "--id-column", "utt"]
    code, _, err = call_main(hf_datasets.main, argv, capsys)
    assert code == 2 and "saved/train: no id column 'utt'" in err  # a named column must exist in every input
    code, _, err = call_main(hf_datasets.main, argv[:-2], capsys)
    assert code == 0, err
    parquet = tmp_path / "pq" / "data" / "x.parquet"
    for row, field in [(2, "field 'audio': no audio"), (3, "field 'language': language 'Klingon'"),
                       (4, "field 'text': no transcript")]:
        assert f"{parquet}:row {row}: {field}" in err, (row, err)
    samples = read_shards(out)
    check_index(out, samples, {"bad_row": 2, "empty_transcript": 1, "unreadable_audio": 1})
    assert check_tars(out) == {"de": 1, "en": 3, "zh": 1, "fr": 1}
    expected = {"fleurs_de_004": ("fleurs_de_004", "de"), "ljspeech_LJ002-0020": ("ljspeech_LJ002-0020", "en"),
                "fleurs2_zh_01": ("fleurs2_zh_01", "zh"), "clips_ljspeech_LJ001-0002": ("ljspeech_LJ001-0002", "en"),
                "clips_sr_french_dictee": ("sr_french_dictee", "fr"),
                "arr_0000000": ("sr_english_one_two_three", "en")}
    assert sorted(samples) == sorted(expected)
    for key, (clip, language) in expected.items():
        check_clip(samples[key], clips, clip, language, "hf_datasets")
    assert samples["clips_ljspeech_LJ001-0002"]["record"]["translations"] == {
        "de": "Darin, vergleichsweise modern zu sein."}

    # one split, the parquet's ids from a column; every row bad: exit 2 and no index
    out2 = tmp_path / "out2"
    code, _, err = call_main(hf_datasets.main, ["--input", str(tmp_path / "saved"), "--split", "test", "--out",
                                                str(out2), "--workers", "1"], capsys)
    assert code == 0 and list(read_shards(out2)) == ["fleurs2_zh_01"]
    out3 = tmp_path / "out3"
    code, _, err = call_main(hf_datasets.main, ["--input", str(parquet), "--out", str(out3), "--language",
                                                "Klingon"], capsys)
    assert code == 2 and "language 'Klingon' is not an ISO 639 code" in err  # refused before reading a row
    code, _, err = call_main(hf_datasets.main, ["--input", str(parquet), "--id-column", "utt", "--out", str(out3),
                                                "--language-column", "", "--language", "en",
                                                "--text-column", "translation_de"], capsys)
    assert code == 0, err
    assert sorted(read_shards(out3)) == ["fr1", "lj1"]  # rows without a translation_de text are skipped
    bad_only = tmp_path / "bad_only"
    write_parquet(hf_dataset({"audio": [{"bytes": None, "path": "gone.wav"}], "text": ["hello"], "language": ["en"]},
                             ENCODED), bad_only / "b.parquet")
    code, _, err = call_main(hf_datasets.main, ["--input", str(bad_only), "--out", str(tmp_path / "o4")], capsys)
    assert code == 2 and f"{bad_only / 'b.parquet'}:row 0: field 'audio': no such file" in err
    assert "no sample of 1 survived" in err and not (tmp_path / "o4" / "index.json").exists()


# ----------------------------------------------------------------------------------------------------- Lhotse cuts

def recording(rec_id: str, path: Path, channels: int, sampling_rate: int, frames: int, with_duration: bool = True):
    rec = {"id": rec_id, "sources": [{"type": "file", "channels": list(range(channels)), "source": str(path)}],
           "sampling_rate": sampling_rate, "num_samples": frames}
    if with_duration:
        rec["duration"] = frames / sampling_rate
    return rec


def cut(cut_id: str, rec: dict, start: float, duration: float, sups: list[dict], channel: int | None = 0) -> dict:
    out = {"id": cut_id, "start": start, "duration": duration, "type": "MonoCut", "recording": rec,
           "supervisions": [{"recording_id": rec["id"], "channel": channel, **s} for s in sups]}
    if channel is not None:
        out["channel"] = channel
    return out


def test_lhotse_cuts(tmp_path: Path, clips: dict, capsys: pytest.CaptureFixture) -> None:
    t = {c: clips[c]["transcript"] for c in clips}
    # a two-channel recording made of real clips: channel 0 two German clips with a gap, channel 1 an English one
    de4, de5, en3 = (clip_wave(clips, c) for c in ("fleurs_de_004", "fleurs_de_005", "fleurs_en_003"))
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    left = np.concatenate([de4, gap, de5])
    right = np.concatenate([en3, np.zeros(len(left) - len(en3), dtype=np.float32)])
    long_path = tmp_path / "audio" / "meeting.flac"
    long_path.parent.mkdir()
    sf.write(long_path, np.stack([left, right], axis=1), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    stored = sf.read(long_path, dtype="float32")[0]  # what the file holds (16-bit)
    meeting = recording("meeting", Path("audio/meeting.flac"), 2, SAMPLE_RATE, len(left))
    s5 = (len(de4) + len(gap)) / SAMPLE_RATE  # where the second clip starts, s
    d4, d5 = len(de4) / SAMPLE_RATE, len(de5) / SAMPLE_RATE
    second = stored[round(s5 * SAMPLE_RATE) : round(s5 * SAMPLE_RATE) + len(de5), 0]
    jfk = SPEECH / clips["jfk_inaugural"]["path"]  # 44.1 kHz stereo: a span of it, resampled and mixed
    jfk_rec = recording("jfk", jfk, 2, 44100, sf.info(jfk).frames, with_duration=False)
    lj = SPEECH / clips["ljspeech_LJ001-0002"]["path"]
    lj_rec = recording("lj", lj, 1, 22050, sf.info(lj).frames)
    sup = lambda i, start, duration, text, lang, **kw: {"id": i, "start": start, "duration": duration,  # noqa: E731
                                                        "text": text, "language": lang, **kw}
    both = [sup("b-s2", s5, d5, t["fleurs_de_005"], "German", custom={"translation_en": "This sediment."}),
            sup("b-s1", 0.0, d4, t["fleurs_de_004"], "de", custom={"translations": {"en": "The cave."}})]
    cuts = [
        cut("m-de4", meeting, 0.0, d4, [sup("m-s1", 0.0, d4, t["fleurs_de_004"], "de")]),
        cut("m-de5", meeting, s5, d5, [sup("m-s2", 0.0, d5, t["fleurs_de_005"], "German")]),
        cut("m-en3", meeting, 0.0, len(en3) / SAMPLE_RATE, [sup("m-s3", 0.0, 5.76, t["fleurs_en_003"], "en")],
            channel=1),
        cut("m-both", meeting, 0.0, len(left) / SAMPLE_RATE, both),  # two supervisions (listed out of order)
        cut("jfk-2-6", jfk_rec, 2.0, 4.0, [sup("jfk-s", 0.0, 4.0, "ask not", "en")], channel=None),
        cut("lj", lj_rec, 0.0, lj_rec["duration"], [sup("lj-s", 0.0, 1.9, t["ljspeech_LJ001-0002"], "English")]),
        # bad lines
        {"id": "mix", "type": "MixedCut", "tracks": []},  # 7
        cut("late", meeting, 15.0, 5.0, [sup("late-s", 0.0, 5.0, "past the end", "de")]),  # 8
        cut("gone", recording("gone", Path("audio/gone.flac"), 1, 16000, 16000), 0.0, 1.0,
            [sup("gone-s", 0.0, 1.0, "no file", "de")]),  # 9
        cut("m-nolang", meeting, 0.0, d4, [{"id": "x", "start": 0.0, "duration": d4, "text": "x"}]),  # 10
    ]
    manifest = tmp_path / "cuts.jsonl.gz"
    with gzip.open(manifest, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in cuts)

    out = tmp_path / "out"
    code, _, err = call_main(lhotse_cuts.main, ["--cuts", str(manifest), "--out", str(out), "--workers", "2"], capsys)
    assert code == 0, err
    for line, field in [(7, "field 'type': MixedCut"), (8, "field 'duration': the cut ends at 20.000 s"),
                        (9, "field 'recording.sources[0].source': no such file"),
                        (10, "field 'supervisions[0].language'")]:
        assert f"{manifest}:{line}: {field}" in err, (line, err)
    samples = read_shards(out)
    check_index(out, samples, {"bad_row": 4})
    assert check_tars(out) == {"de": 3, "en": 3}

    def check(key: str, text: str, language: str, duration: float, audio: np.ndarray, tol: float = QUANTISATION):
        rec = samples[key]["record"]
        assert (rec["transcript"], rec["language"], rec["source"]) == (text, language, "lhotse")
        assert abs(rec["duration"] - duration) <= 1e-3  # within a sample, as the record rounds it to ms
        assert_audio(samples[key]["flac"], audio, tol)

    check("m-de4", t["fleurs_de_004"], "de", d4, stored[: len(de4), 0])
    check("m-de5", t["fleurs_de_005"], "de", d5, second)
    check("m-en3", t["fleurs_en_003"], "en", len(en3) / SAMPLE_RATE, stored[: len(en3), 1])  # channel 1 only
    check("m-both", f"{t['fleurs_de_004']} {t['fleurs_de_005']}", "de", len(left) / SAMPLE_RATE, stored[:, 0])
    assert samples["m-both"]["record"]["translations"] == {"en": "The cave. This sediment."}
    # a span resampled on its own is the span of the whole file resampled (read_span reads context around it)
    check("jfk-2-6", "ask not", "en", 4.0, _decoded(str(jfk))[2 * SAMPLE_RATE : 6 * SAMPLE_RATE])
    check("lj", t["ljspeech_LJ001-0002"], "en", lj_rec["duration"], _decoded(str(lj)))
    # the segment is the real clip again (the file's 16-bit copy of it)
    assert_audio(samples["m-de5"]["flac"], de5, 2 * QUANTISATION)

    # one sample per supervision: the two-supervision cut becomes its two clips; --language fills in a missing one
    out_sup = tmp_path / "out_sup"
    code, _, err = call_main(lhotse_cuts.main, ["--cuts", str(manifest), "--out", str(out_sup), "--workers", "1",
                                                "--per-supervision", "--language", "de"], capsys)
    assert code == 0, err
    samples = read_shards(out_sup)
    assert sorted(samples) == ["b-s1", "b-s2", "jfk-s", "lj-s", "m-s1", "m-s2", "m-s3", "x"]
    check("b-s1", t["fleurs_de_004"], "de", d4, stored[: len(de4), 0])
    check("b-s2", t["fleurs_de_005"], "de", d5, second)
    assert samples["b-s2"]["record"]["translations"] == {"en": "This sediment."}

    # every line bad: exit 2, the summary, no index
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text(json.dumps(cuts[7]) + "\n" + "{not json\n")
    code, _, err = call_main(lhotse_cuts.main, ["--cuts", str(all_bad), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and f"{all_bad}:2: invalid JSON" in err and "no sample of 2 survived" in err
    assert not (tmp_path / "o3" / "index.json").exists()


@pytest.mark.parametrize("module", [chat_jsonl, hf_datasets, lhotse_cuts])
def test_help(module, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = call_main(module.main, ["--help"], capsys)
    assert code == 0 and "--out" in out and f"python -m data_prep.{module.__name__.split('.')[-1]}" in out
