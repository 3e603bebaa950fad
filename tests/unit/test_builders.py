"""Corpus shard builders on fixtures in the published layouts, made of real recorded clips from shared/data/speech."""

from __future__ import annotations

import csv
import inspect
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from conftest import REPO, SHARED

from data_prep import common_voice, covost2, fleurs, manifest, wenetspeech
from data_prep.common import build_shards
from data_prep.manifest import iso639_1, read_manifests, sanitize_id
from part.data.audio import load_audio
from part.features import SAMPLE_RATE

SPEECH = SHARED / "speech"  # the real clips are required: a missing shared/ fails these tests, it does not skip them
CLIPS = SPEECH / "clips"
FLORES_ARCHIVE = SPEECH.parent / "flores200" / "flores200_all_204langs.tar.xz"

# --shard-samples N: a new shard every N samples (where build_shards has it), to see several shards per language
SMALL_SHARDS = ["--shard-samples", "2"] if "max_samples" in inspect.signature(build_shards).parameters else []
CORRUPT = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8  # not decodable as any audio format


# ------------------------------------------------------------------------------------------------------ helpers

def _read_tsv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)}


@pytest.fixture(scope="module")
def clips() -> dict[str, dict[str, str]]:
    """transcripts.tsv rows by clip id, with the FLORES-200 text of the FLEURS clips as `flores_text`."""
    rows = _read_tsv(SPEECH / "transcripts.tsv")
    for clip_id, row in _read_tsv(SPEECH / "fleurs_to_flores200.tsv").items():
        rows[clip_id]["flores_text"] = row["flores_text"]
        rows[clip_id]["flores_line"] = row["flores_line"]  # 1-based line of devtest
    return rows


@pytest.fixture(scope="module")
def flores_devtest() -> dict[str, list[str]]:
    """FLORES-200 devtest lines (eng, deu, jpn), read from the shipped archive in one pass."""
    wanted = {f"flores200_dataset/devtest/{code}.devtest": code for code in ("eng_Latn", "deu_Latn", "jpn_Jpan")}
    lines = {}
    with tarfile.open(FLORES_ARCHIVE) as tar:
        for member in tar:
            if member.name in wanted:
                lines[wanted[member.name]] = tar.extractfile(member).read().decode("utf-8").splitlines()
    assert len(lines) == len(wanted)
    return lines


def transcode(clip_id: str, clips: dict, dest: Path, fmt: str, subtype: str | None = None) -> float:
    """Writes the real clip as `fmt` (16 kHz mono) to dest; returns its duration in seconds."""
    wave = load_audio(SPEECH / clips[clip_id]["path"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dest, wave, SAMPLE_RATE, format=fmt, subtype=subtype)
    return len(wave) / SAMPLE_RATE


def read_shards(out: Path) -> dict[str, dict]:
    """Samples by id via plain webdataset, decoding nothing but the json (the flac stays bytes)."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    assert urls, f"no shards in {out}"
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        record = json.loads(sample["json"])
        assert sample["__key__"] == record["id"]
        assert isinstance(sample["flac"], bytes)
        samples[record["id"]] = {"record": record, "flac": sample["flac"], "url": sample["__url__"]}
    return samples


def check_tars(out: Path) -> dict[str, int]:
    """Every shard, read with tarfile: one .json and one .flac per key, the shard named after the record language."""
    per_language: dict[str, int] = {}
    assert not list(out.glob("*.partial"))
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            keys = sorted({n.rsplit(".", 1)[0] for n in names})
            assert sorted(names) == sorted([f"{k}.json" for k in keys] + [f"{k}.flac" for k in keys])
            for key in keys:
                record = json.loads(tar.extractfile(f"{key}.json").read())
                assert tar_path.name.startswith(f"{record['language']}-")
                assert set(record) >= {"id", "language", "duration", "transcript", "translations", "source"}
                assert "." not in record["id"] and "/" not in record["id"]
                assert sf.info(io.BytesIO(tar.extractfile(f"{key}.flac").read())).samplerate == SAMPLE_RATE
        lang = tar_path.name.split("-")[0]
        per_language[lang] = per_language.get(lang, 0) + len(keys)
    return per_language


def check_index(out: Path, samples: dict[str, dict], skipped: dict[str, int]) -> dict:
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == len(samples)
    assert sum(s["samples"] for s in index["shards"]) == len(samples)
    assert index["skipped"] == skipped
    seconds: dict[str, float] = {}
    for s in samples.values():
        seconds[s["record"]["language"]] = seconds.get(s["record"]["language"], 0.0) + s["record"]["duration"]
    assert set(index["hours_per_language"]) == set(seconds)
    for lang, sec in seconds.items():
        assert index["hours_per_language"][lang] == pytest.approx(sec / 3600, abs=1e-5)
    return index


def flac_seconds(flac: bytes) -> float:
    return len(load_audio(flac)) / SAMPLE_RATE


# ------------------------------------------------------------------------------------------------- Common Voice

CV_HEADER_NEW = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
                 "gender", "accents", "variant", "locale", "segment"]
CV_HEADER_OLD = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "variant",
                 "locale", "segment"]


def write_cv_tsv(path: Path, header: list[str], rows: list[tuple[str, str]], locale: str) -> None:
    """Common Voice TSV: unquoted, one row per clip; only path and sentence matter here."""
    lines = ["\t".join(header)]
    for i, (clip, sentence) in enumerate(rows):
        values = {"client_id": f"{i:064x}", "path": clip, "sentence_id": f"{i + 7:064x}", "sentence": sentence,
                  "sentence_domain": "", "up_votes": "2", "down_votes": "0", "age": "thirties", "gender": "",
                  "accents": "", "variant": "", "locale": locale, "segment": ""}
        lines.append("\t".join(values[h] for h in header))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_common_voice(tmp_path: Path, clips: dict) -> None:
    root = tmp_path / "cv-corpus-17.0-2024-03-15"
    de_clips = {"common_voice_de_17300001.mp3": "pico_de_2c12c8d", "common_voice_de_17300002.mp3": "pico_de_7127dca",
                "common_voice_de_17300004.mp3": "pico_de_74b2ba3"}
    durations = {}
    for name, clip in de_clips.items():
        durations[name] = transcode(clip, clips, root / "de" / "clips" / name, "MP3")
    (root / "de" / "clips" / "common_voice_de_17300003.mp3").write_bytes(CORRUPT)
    quoted = f'"{clips["pico_de_7127dca"]["transcript"]}"'  # CV TSVs are unquoted: the quotes are text
    de_rows = [("common_voice_de_17300001.mp3", clips["pico_de_2c12c8d"]["transcript"]),
               ("common_voice_de_17300002.mp3", quoted),
               ("common_voice_de_17300003.mp3", "Diese Datei ist kaputt."),
               ("common_voice_de_17300004.mp3", "")]
    write_cv_tsv(root / "de" / "train.tsv", CV_HEADER_NEW, de_rows, "de")
    write_cv_tsv(root / "de" / "validated.tsv", CV_HEADER_NEW, de_rows, "de")
    write_cv_tsv(root / "de" / "dev.tsv", CV_HEADER_NEW, [], "de")
    write_cv_tsv(root / "de" / "test.tsv", CV_HEADER_NEW, [], "de")
    zh_text = clips["fleurs2_zh_01"]["flores_text"]
    durations["common_voice_zh-CN_39000000.mp3"] = transcode(
        "fleurs2_zh_01", clips, root / "zh-CN" / "clips" / "common_voice_zh-CN_39000000.mp3", "MP3")
    write_cv_tsv(root / "zh-CN" / "train.tsv", CV_HEADER_OLD, [("common_voice_zh-CN_39000000.mp3", zh_text)], "zh-CN")
    write_cv_tsv(root / "sv-SE" / "validated.tsv", CV_HEADER_OLD, [], "sv-SE")  # no train.tsv: not picked up

    out = tmp_path / "out"
    assert common_voice.main(["--root", str(root), "--split", "train", "--out", str(out), "--workers", "2"]) == 0

    samples = read_shards(out)
    assert sorted(samples) == ["common_voice_de_17300001", "common_voice_de_17300002", "common_voice_zh-CN_39000000"]
    assert check_tars(out) == {"de": 2, "zh": 1}
    check_index(out, samples, {"unreadable_audio": 1, "empty_transcript": 1})
    expected = {"common_voice_de_17300001": clips["pico_de_2c12c8d"]["transcript"],
                "common_voice_de_17300002": quoted, "common_voice_zh-CN_39000000": zh_text}
    for key, s in samples.items():
        rec = s["record"]
        assert rec["transcript"] == expected[key]
        assert rec["language"] == ("zh" if "zh" in key else "de")
        assert rec["source"] == "common_voice" and rec["translations"] == {}
        assert rec["duration"] == pytest.approx(durations[f"{key}.mp3"], abs=0.05)
        assert flac_seconds(s["flac"]) == pytest.approx(rec["duration"], abs=1e-3)

    # --locales picks one locale; a locale without the split's TSV is an error naming the file
    out2 = tmp_path / "out2"
    assert common_voice.main(["--root", str(root), "--locales", "zh-CN", "--out", str(out2), "--workers", "1"]) == 0
    assert list(read_shards(out2)) == ["common_voice_zh-CN_39000000"]
    assert common_voice.main(["--root", str(root), "--locales", "sv-SE", "--out", str(tmp_path / "o3")]) == 2


# -------------------------------------------------------------------------------------------------------- FLEURS

def write_fleurs_tsv(path: Path, rows: list[tuple[str, str, str, str, float]]) -> None:
    """FLEURS TSV: no header; id, file_name, raw_transcription, transcription, words, num_samples, gender."""
    lines = []
    for sentence_id, file_name, raw, normalized, seconds in rows:
        words = "|".join(normalized.split())
        lines.append("\t".join([sentence_id, file_name, raw, normalized, words, str(round(seconds * 16000)), "FEMALE"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_fleurs(tmp_path: Path, clips: dict) -> None:
    root = tmp_path / "fleurs"
    wanted = {("de_de", "fleurs_de_000"): "10004088536354799741.wav", ("de_de", "fleurs_de_001"): "1000528812.wav",
              ("cmn_hans_cn", "fleurs3_zh_1883"): "12227437394734101587.wav",
              ("cmn_hans_cn", "fleurs2_zh_01"): "1604812374512.wav"}
    rows: dict[str, list] = {"de_de": [], "cmn_hans_cn": []}
    durations = {}
    for (code, clip), name in wanted.items():
        durations[name] = transcode(clip, clips, root / code / "audio" / "test" / name, "WAV", "PCM_16")
        c = clips[clip]
        rows[code].append((c["flores_line"], name, c["flores_text"], c["transcript"], durations[name]))
    (root / "de_de" / "audio" / "test" / "2233445566.wav").write_bytes(b"RIFF" + CORRUPT)
    rows["de_de"].append(("401", "2233445566.wav", "Kaputte Datei.", "kaputte datei", 3.0))
    transcode("fleurs_de_002", clips, root / "de_de" / "audio" / "test" / "998877.wav", "WAV", "PCM_16")
    rows["de_de"].append(("402", "998877.wav", "", "", 12.42))  # empty raw_transcription
    for code, code_rows in rows.items():
        write_fleurs_tsv(root / code / "test.tsv", code_rows)
    c = clips["fleurs_de_003"]
    transcode("fleurs_de_003", clips, root / "de_de" / "audio" / "train" / "55.wav", "WAV", "PCM_16")
    train_row = (c["flores_line"], "55.wav", c["flores_text"], c["transcript"], 10.68)
    write_fleurs_tsv(root / "de_de" / "train.tsv", [train_row])

    out = tmp_path / "out"
    assert fleurs.main(["--root", str(root), "--split", "test", "--out", str(out), "--workers", "2"]) == 0
    samples = read_shards(out)
    by_file = {f"fleurs_{code}_{Path(name).stem}": (code, clip, name) for (code, clip), name in wanted.items()}
    assert sorted(samples) == sorted(by_file)
    assert check_tars(out) == {"de": 2, "zh": 2}
    index = check_index(out, samples, {"unreadable_audio": 1, "empty_transcript": 1})
    assert index["split"] == "test" and index["lang_codes"] == ["cmn_hans_cn", "de_de"]
    for key, s in samples.items():
        code, clip, name = by_file[key]
        rec = s["record"]
        assert rec["language"] == {"de_de": "de", "cmn_hans_cn": "zh"}[code]
        assert rec["transcript"] == clips[clip]["flores_text"]  # raw_transcription, not the normalized one
        assert rec["source"] == "fleurs"
        assert rec["duration"] == pytest.approx(float(clips[clip]["duration_s"]), abs=0.05)

    out2 = tmp_path / "out2"
    args = ["--root", str(root), "--lang-codes", "de_de", "--split", "train", "--text", "normalized"]
    assert fleurs.main([*args, "--out", str(out2), "--workers", "1"]) == 0
    (only,) = read_shards(out2).values()
    assert only["record"]["id"] == "fleurs_de_de_55" and only["record"]["transcript"] == c["transcript"]

    (root / "de_de" / "dev.tsv").write_text("1\tonly-two-columns\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:1: expected 7"):
        fleurs.lang_code_items(root, "de_de", "dev")


# ------------------------------------------------------------------------------------------------------ CoVoST 2

def write_covost_tsv(path: Path, rows: list[tuple[str, str, str]], quoting: int = csv.QUOTE_NONE) -> None:
    """As get_covost_splits.py writes them (pandas to_csv, QUOTE_NONE, '\\' escapes); or fully quoted."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", quoting=quoting, escapechar="\\", lineterminator="\n")
        writer.writerow(["path", "sentence", "translation", "client_id"])
        for i, (clip, sentence, translation) in enumerate(rows):
            writer.writerow([clip, sentence, translation, f"{i:064x}"])


def test_covost2(tmp_path: Path, clips: dict, flores_devtest: dict) -> None:
    cv_root, tsv_dir = tmp_path / "cv4", tmp_path / "covost"
    tsv_dir.mkdir()

    def line(code: str, clip: str) -> str:
        return flores_devtest[code][int(clips[clip]["flores_line"]) - 1]

    names = {"fleurs_de_000": "common_voice_de_19000000.mp3", "fleurs_de_001": "common_voice_de_19000001.mp3",
             "fleurs_en_000": "common_voice_en_18000000.mp3", "fleurs_en_001": "common_voice_en_18000001.mp3"}
    durations = {}
    for clip, name in names.items():
        durations[Path(name).stem] = transcode(clip, clips, cv_root / clip.split("_")[1] / "clips" / name, "MP3")
    transcode("fleurs_de_002", clips, cv_root / "de" / "clips" / "common_voice_de_19000002.mp3", "MP3")
    assert line("deu_Latn", "fleurs_de_000") == clips["fleurs_de_000"]["flores_text"]
    # a translation with quotes and a backslash, to see the escaping undone
    quoted_en = line("eng_Latn", "fleurs_de_000").replace("Hong Kong Island", '"Hong Kong Island" \\ HK')
    write_covost_tsv(tsv_dir / "covost_v2.de_en.train.tsv", [
        ("common_voice_de_19000000.mp3", line("deu_Latn", "fleurs_de_000"), quoted_en),
        ("common_voice_de_19000001.mp3", line("deu_Latn", "fleurs_de_001"), line("eng_Latn", "fleurs_de_001")),
        ("common_voice_de_19999999.mp3", "Dieser Clip fehlt.", "This clip is missing."),  # not in the clips dir
        ("common_voice_de_19000002.mp3", "", line("eng_Latn", "fleurs_de_002")),  # empty sentence
    ])
    write_covost_tsv(tsv_dir / "covost_v2.de_en.dev.tsv", [
        ("common_voice_de_19000002.mp3", line("deu_Latn", "fleurs_de_002"), line("eng_Latn", "fleurs_de_002"))])
    write_covost_tsv(tsv_dir / "covost_v2.en_de.train.tsv", [
        ("common_voice_en_18000000.mp3", line("eng_Latn", "fleurs_en_000"), line("deu_Latn", "fleurs_en_000")),
        ("common_voice_en_18000001.mp3", line("eng_Latn", "fleurs_en_001"), line("deu_Latn", "fleurs_en_001"))])
    write_covost_tsv(tsv_dir / "covost_v2.en_ja.train.tsv", [
        ("common_voice_en_18000000.mp3", line("eng_Latn", "fleurs_en_000"), line("jpn_Jpan", "fleurs_en_000"))],
        quoting=csv.QUOTE_ALL)

    out = tmp_path / "out"
    argv = ["--tsv-dir", str(tsv_dir), "--cv-root", str(cv_root), "--pairs", "de_en,en_de,en_ja", "--split", "train"]
    assert covost2.main([*argv, "--out", str(out), "--workers", "2"]) == 0
    samples = read_shards(out)
    assert sorted(samples) == sorted(durations)
    assert check_tars(out) == {"de": 2, "en": 2}
    check_index(out, samples, {"unreadable_audio": 1, "empty_transcript": 1})
    expected = {
        "common_voice_de_19000000": (line("deu_Latn", "fleurs_de_000"), {"en": quoted_en}),
        "common_voice_de_19000001": (line("deu_Latn", "fleurs_de_001"), {"en": line("eng_Latn", "fleurs_de_001")}),
        "common_voice_en_18000000": (
            line("eng_Latn", "fleurs_en_000"),
            {"de": line("deu_Latn", "fleurs_en_000"), "ja": line("jpn_Jpan", "fleurs_en_000")},
        ),
        "common_voice_en_18000001": (line("eng_Latn", "fleurs_en_001"), {"de": line("deu_Latn", "fleurs_en_001")}),
    }
    for key, s in samples.items():
        rec = s["record"]
        assert (rec["transcript"], rec["translations"]) == expected[key]
        assert rec["language"] == key.split("_")[2] and rec["source"] == "covost2"
        assert rec["duration"] == pytest.approx(durations[key], abs=0.05)

    # default: every pair of the split found in the TSV directory
    assert covost2.find_pairs(tsv_dir, "train") == ["de_en", "en_de", "en_ja"]
    assert covost2.find_pairs(tsv_dir, "dev") == ["de_en"]
    assert covost2.split_pair("zh-CN_en") == ("zh-CN", "en")


# --------------------------------------------------------------------------------------------------- WenetSpeech

def test_wenetspeech(tmp_path: Path, clips: dict) -> None:
    root = tmp_path / "wenetspeech"
    parts = ["fleurs2_zh_01", "aishell_BAC009S0724W0121", "fleurs3_zh_1883", "fleurs2_zh_02"]
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    waves, spans, t = [], [], 0.0
    for clip in parts:
        wave = load_audio(SPEECH / clips[clip]["path"])
        spans.append((round(t, 3), round(t + len(wave) / SAMPLE_RATE, 3)))
        waves += [wave, gap]
        t += (len(wave) + len(gap)) / SAMPLE_RATE
    long_path = root / "audio" / "train" / "youtube" / "B00000" / "X0000.opus"
    long_path.parent.mkdir(parents=True)
    sf.write(long_path, np.concatenate(waves), SAMPLE_RATE, format="OGG", subtype="OPUS")
    bad_path = root / "audio" / "train" / "podcast" / "B00001" / "X0001.opus"
    bad_path.parent.mkdir(parents=True)
    bad_path.write_bytes(b"OggS" + CORRUPT)

    text = {clip: clips[clip].get("flores_text") or clips[clip]["transcript"] for clip in parts}
    subsets = [["L", "M", "S"], ["L", "M", "S"], ["L"], ["L", "M", "S", "W"]]
    segments = [
        {"sid": f"Y0000000000_--5llN02F84_S{i:05d}", "confidence": 1.0, "begin_time": b, "end_time": e,
         "subsets": subsets[i], "text": text[clip]}
        for i, (clip, (b, e)) in enumerate(zip(parts, spans))
    ]
    segments.append({"sid": "Y0000000000_--5llN02F84_S00004", "confidence": 1.0, "begin_time": spans[-1][1],
                     "end_time": spans[-1][1] + 0.4, "subsets": ["L", "M", "S"], "text": ""})
    meta = {"dataset": "WenetSpeech", "language": "Chinese", "version": "v1.0", "audios": [
        {"aid": "Y0000000000_--5llN02F84", "title": "test", "path": "audio/train/youtube/B00000/X0000.opus",
         "duration": t, "source": "youtube", "tags": ["test"], "url": "", "segments": segments[::-1]},
        {"aid": "P0000000001", "title": "broken", "path": "audio/train/podcast/B00001/X0001.opus", "duration": 5.0,
         "source": "podcast", "tags": [], "url": "", "segments": [
             {"sid": "P0000000001_S00000", "confidence": 1.0, "begin_time": 0.0, "end_time": 2.0,
              "subsets": ["L", "M", "S"], "text": "坏的文件"}]},
    ]}
    (root / "WenetSpeech.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    out = tmp_path / "out"
    assert wenetspeech.main(["--root", str(root), "--subset", "s", "--out", str(out), "--workers", "2"]) == 0
    samples = read_shards(out)
    kept = [0, 1, 3]  # segment 2 is only in L
    assert sorted(samples) == [segments[i]["sid"] for i in kept]
    assert check_tars(out) == {"zh": 3}
    index = check_index(out, samples, {"unreadable_audio": 1, "empty_transcript": 1})
    assert index["subset"] == "S"
    for i in kept:
        rec = samples[segments[i]["sid"]]["record"]
        assert rec["language"] == "zh" and rec["source"] == "wenetspeech"
        assert rec["transcript"] == text[parts[i]]
        assert rec["duration"] == pytest.approx(float(clips[parts[i]]["duration_s"]), abs=0.05)
        # the cut is the right stretch of the recording: it matches the clip it was made from
        cut, original = load_audio(samples[segments[i]["sid"]]["flac"]), load_audio(SPEECH / clips[parts[i]]["path"])
        n = min(len(cut), len(original))
        assert np.corrcoef(cut[:n], original[:n])[0, 1] > 0.9

    # subset L, in one process: segment 2 is in, the others still are
    out_l = tmp_path / "out_l"
    argv = ["--root", str(root), "--subset", "L", "--no-shuffle", "--out", str(out_l), "--workers", "1"]
    assert wenetspeech.main(argv) == 0
    samples_l = read_shards(out_l)
    assert sorted(samples_l) == [segments[i]["sid"] for i in range(4)]
    check_index(out_l, samples_l, {"unreadable_audio": 1, "empty_transcript": 1})
    assert samples_l[segments[2]["sid"]]["record"]["duration"] == pytest.approx(13.86, abs=0.05)

    # seeking cuts agree with cutting the fully decoded file
    full = load_audio(long_path)
    blobs, error = wenetspeech.cut_segments(str(long_path), [spans[2], (1.0, 2.5)])
    assert error is None
    for (b, e), blob in zip([spans[2], (1.0, 2.5)], blobs):
        cut = load_audio(blob)
        ref = full[round(b * SAMPLE_RATE) : round(e * SAMPLE_RATE)]
        assert len(cut) == len(ref)
        assert np.abs(cut - ref).max() < 0.05
    assert wenetspeech.cut_segments(str(bad_path), [(0.0, 1.0)])[1] is not None


# ------------------------------------------------------------------------------------------------------ manifest

# real clips in several containers, codecs, sample rates and channel counts
ROUND_TRIP = {
    "fleurs_en_000": "ogg/opus 16 kHz",
    "ljspeech_LJ001-0002": "flac 22.05 kHz",
    "jfk_inaugural": "flac 44.1 kHz stereo",
    "sr_chinese_zha_ziji_de_jiao": "flac 48 kHz",
    "sr_french_dictee": "aiff 44.1 kHz",
    "ljspeech_LJ050-0131": "wav 22.05 kHz",
    "deepspeech_ru": "wav 16 kHz",
    "fleurs2_ja_01": "wav 16 kHz",
}


def test_manifest_round_trip(tmp_path: Path, clips: dict) -> None:
    (tmp_path / "clips").symlink_to(CLIPS)  # relative paths resolve against the manifest's directory
    header = ["id", "audio", "text", "language", "start", "end", "translation_de"]
    rows = []
    for n, clip in enumerate(ROUND_TRIP):
        c = clips[clip]
        audio = c["path"] if n % 2 == 0 else str(SPEECH / c["path"])
        rows.append([clip if n % 3 else "", audio, c["transcript"], c["lang"], "", "", ""])
    rows[0][-1] = "Stile im Westen konnten wegen langsamer Kommunikationswege 25 bis 30 Jahre hinterherhinken."
    earnings = clips["earnings22_4482311_3_62"]  # 60 s, 24 kHz: a 10 s segment of it
    rows.append(["earnings.seg/10", str(SPEECH / earnings["path"]), "segment of a long file", "en-US", "10", "20", ""])
    rows.append(["voxpopuli", "clips/voxpopuli_en_000_longform.ogg", "too long", "en", "", "", ""])
    with open(tmp_path / "train.tsv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerows([header, *rows])
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"audio": "clips/fleurs_de_004.ogg", "text": clips["fleurs_de_004"]["transcript"],
                                 "language": "de", "translations": {"en": "The cave is at the top of a mountain."}},
                                ensure_ascii=False) + "\n\n"
                     + json.dumps({"id": "earnings_head", "audio": str(SPEECH / earnings["path"]), "end": 4.5,
                                   "text": "only an end: the first 4.5 s", "language": "en"}) + "\n", encoding="utf-8")

    out = tmp_path / "out"
    argv = ["--manifest", str(tmp_path / "train.tsv"), str(jsonl), "--source", "mixed", "--out", str(out)]
    assert manifest.main([*argv, "--workers", "2", *SMALL_SHARDS]) == 0
    samples = read_shards(out)
    if SMALL_SHARDS:
        assert len(list(out.glob("en-*.tar"))) == 3
    check_index(out, samples, {"too_long": 1})
    assert check_tars(out) == {"en": 6, "zh": 1, "fr": 1, "ru": 1, "ja": 1, "de": 1}
    # without an id column value: made from the relative path, or from the file name of an absolute path
    ids = {clip: clip if n % 3 else sanitize_id(clips[clip]["path"].rsplit(".", 1)[0] if n % 2 == 0 else clip)
           for n, clip in enumerate(ROUND_TRIP)}
    assert sorted(samples) == sorted([*ids.values(), "earnings_seg_10", "earnings_head", "clips_fleurs_de_004"])
    for clip, key in ids.items():
        s = samples[key]
        info = sf.info(io.BytesIO(s["flac"]))
        assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "FLAC")
        assert flac_seconds(s["flac"]) == pytest.approx(float(clips[clip]["duration_s"]), abs=0.05), ROUND_TRIP[clip]
        assert s["record"]["duration"] == pytest.approx(float(clips[clip]["duration_s"]), abs=0.05)
        assert s["record"]["transcript"] == clips[clip]["transcript"] and s["record"]["language"] == clips[clip]["lang"]
        assert s["record"]["source"] == "mixed"
    assert samples[ids["fleurs_en_000"]]["record"]["translations"] == {"de": rows[0][-1]}
    seg = samples["earnings_seg_10"]
    assert seg["record"]["language"] == "en" and flac_seconds(seg["flac"]) == pytest.approx(10.0, abs=0.05)
    full = load_audio(SPEECH / earnings["path"])
    assert np.corrcoef(load_audio(seg["flac"]), full[10 * SAMPLE_RATE : 20 * SAMPLE_RATE])[0, 1] > 0.99
    head = samples["earnings_head"]
    assert np.corrcoef(load_audio(head["flac"]), full[: round(4.5 * SAMPLE_RATE)])[0, 1] > 0.99
    assert samples["clips_fleurs_de_004"]["record"]["translations"] == {"en": "The cave is at the top of a mountain."}


def test_manifest_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_language = tmp_path / "no_language.tsv"
    no_language.write_text("audio\ttext\nclips/a.wav\thello\n")
    with pytest.raises(ValueError, match=r"no_language\.tsv:1: header has no column 'language'"):
        read_manifests([no_language])
    assert manifest.main(["--manifest", str(no_language), "--out", str(tmp_path / "o")]) == 2
    assert "no_language.tsv:1" in capsys.readouterr().err

    named = tmp_path / "named.tsv"  # a language name, not a code: it would write english-000000.tar
    named.write_text("audio\ttext\tlanguage\na.wav\thi\tEnglish\n")
    with pytest.raises(ValueError, match=r"named\.tsv:2: language 'English' is not an ISO 639 code"):
        read_manifests([named])
    # every row bad (missing audio): the summary and an error, exit 2, no traceback, no index of nothing
    all_bad = tmp_path / "all_bad.tsv"
    all_bad.write_text("audio\ttext\tlanguage\nmissing1.wav\thi\ten\nmissing2.wav\tho\ten\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        manifest.main(["--manifest", str(all_bad), "--out", str(tmp_path / "nothing"), "--workers", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no sample of 2 survived" in err and "unreadable_audio=2" in err
    assert not (tmp_path / "nothing" / "index.json").exists()

    empty_audio = tmp_path / "empty_audio.tsv"
    empty_audio.write_text("audio\ttext\tlanguage\na.wav\thi\ten\n\thello\ten\n")
    with pytest.raises(ValueError, match=r"empty_audio\.tsv:3: missing field 'audio'"):
        read_manifests([empty_audio])
    short_row = tmp_path / "short_row.tsv"
    short_row.write_text("audio\ttext\tlanguage\na.wav\thi\n")
    with pytest.raises(ValueError, match=r"short_row\.tsv:2: expected 3 tab-separated columns, found 2"):
        read_manifests([short_row])

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"audio": "a.wav", "text": "hi", "language": "en"}\n{"audio": "b.wav", "language": "en"}\n')
    with pytest.raises(ValueError, match=r"no_text\.jsonl:2: missing field 'text'"):
        read_manifests([no_text])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"audio": "a.wav", "text": "hi", "language": "en"}\n{"audio": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_manifests([bad_json])
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"audio": "a.wav", "text": "hi", "language": "en"}\n["a.wav", "hi"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object"):
        read_manifests([not_object])
    bad_end = tmp_path / "bad_end.jsonl"
    bad_end.write_text('{"audio": "a.wav", "text": "hi", "language": "en", "start": 3, "end": 2}\n')
    with pytest.raises(ValueError, match=r"bad_end\.jsonl:1: 'end'"):
        read_manifests([bad_end])
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"audio": "a.wav", "text": "hi", "language": "en", "id": "x.1"}\n'
                   '{"audio": "b.wav", "text": "ho", "language": "en", "id": "x/1"}\n')
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id 'x_1' \(first at .*dup\.jsonl:1\)"):
        read_manifests([dup])


def test_ids_and_languages() -> None:
    assert sanitize_id("common_voice_de_1.mp3") == "common_voice_de_1_mp3"
    assert sanitize_id("spk1/utt 2.wav") == "spk1_utt_2_wav"
    long_a, long_b = sanitize_id("x" * 200 + "a"), sanitize_id("x" * 200 + "b")
    assert long_a != long_b and len(long_a.encode()) <= 80 and len(sanitize_id("漢" * 100).encode()) <= 80
    with pytest.raises(ValueError):
        sanitize_id("./")
    cases = {"zh-CN": "zh", "zh-TW": "zh", "zh-HK": "yue", "sv-SE": "sv", "pt": "pt", "es": "es", "en_us": "en",
             "de_de": "de", "cmn_hans_cn": "zh", "yue_hant_hk": "yue", "fil_ph": "tl", "ast_es": "ast", "EN": "en"}
    assert {tag: iso639_1(tag) for tag in cases} == cases


@pytest.mark.parametrize("module", [common_voice, fleurs, covost2, wenetspeech, manifest])
def test_help(module, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_cli_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "data_prep.covost2", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "--pairs" in proc.stdout


@pytest.mark.parametrize("seed", range(3))
def test_synthetic_mandarin_is_spoken_as_mandarin(seed: int) -> None:
    """The corpus builder's Mandarin voice reads hanzi as Mandarin syllables with their tones. With espeak-ng's
    `cmn` voice every syllable came out on one tone followed by its tone digit in English ("ta one mei two you
    three ..."): Whisper heard digits, and zh stayed at chance in every run trained on that corpus."""
    import random

    from data_prep.synthetic import tts_args

    args = tts_args("zh", random.Random(seed))  # a voice variant and a rate, as the builder draws them
    text = "他没有设定削减数额"  # tā méi yǒu shè dìng xuē jiǎn shù é
    phonemes = subprocess.run(["espeak-ng", *args, "-q", "-x", text], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    assert "(en)" not in phonemes, phonemes  # no switch to English (the tone digits read as numbers)
    syllables = [s for s in phonemes.replace("\n", " ").split("_|") if s.strip()]
    assert len(syllables) == len(text), phonemes
    # espeak-ng's tone numbers: 55 (first tone), 35 (second), 21 (third), 51 (fourth)
    assert {"55", "35", "21", "51"} <= {tone for tone in ("55", "35", "21", "51") if tone in phonemes}, phonemes
