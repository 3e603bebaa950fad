"""`python -m part whisper_reference`: Whisper-base (converted from its wheels) reads the recipe's held-out espeak
clips with its own decoder and the rows are scored as a training run's final table is."""

from __future__ import annotations

import json

from conftest import write_config

from part.cli import whisper_reference

STAGES = "  - {name: s1, steps: 1, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 0}\n"


def test_whisper_transcribes_and_translates_the_held_out_clips(corpus, tiny_models, converted, tmp_path, capsys):
    whisper_dir, _ = converted
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGES)
    out = tmp_path / "ref"
    assert whisper_reference.main(["--config", str(config), "--whisper", str(whisper_dir), "--per-language", "3",
                                   "--out", str(out), "data.languages=[en,de]",
                                   "eval.tasks=[asr,s2tt,mt]"]) == 0  # mt (text in) is not Whisper's to read
    records = [json.loads(line) for line in (out / "reference_hypotheses.jsonl").read_text().splitlines()]
    kinds = sorted((r["task"], r["language"], r["target_language"]) for r in records)
    assert kinds == [("asr", "de", None)] * 3 + [("asr", "en", None)] * 3 + [("s2tt", "de", "en")] * 3
    assert all(r["hypothesis"] for r in records)
    table = (out / "reference.md").read_text()
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out
    wer = {line.split("|")[3].strip(): float(line.split("|")[4]) for line in table.splitlines()
           if line.startswith("| asr | wer |")}
    # Whisper-base reads espeak English at about 34% WER (100 FLORES devtest clips); a wrong feature path
    # (sample rate, padding, language) reads it at about 100%
    assert wer["en"] < 65, table
    assert set(wer) == {"de", "en", "average"}


def test_refuses_a_directory_without_whispers_decoder(corpus, tiny_models, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models, STAGES)
    # the tiny recipe's encoder directory holds an encoder only
    assert whisper_reference.main(["--config", str(config), "--out", str(tmp_path / "ref")]) == 2
    assert "not a transformers Whisper directory with its decoder" in capsys.readouterr().err
    assert whisper_reference.main(["--config", str(config), "--whisper", str(tmp_path), "--tasks", "mt"]) == 2


def test_unreadable_samples_are_left_out_and_counted(tmp_path):
    import io
    import tarfile
    from collections import Counter

    import numpy as np
    import soundfile as sf

    from part.config import DataConfig
    from part.evaluation.reference import held_out_utterances

    wav = io.BytesIO()
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    good = json.dumps({"language": "en", "transcript": "hello", "translations": {"de": "hallo"}}).encode()
    members = {"a.json": good, "a.wav": wav.getvalue(),
               "b.json": b"{not json", "b.wav": wav.getvalue(),
               "c.json": good, "c.wav": b"RIFF but not audio",
               "d.json": json.dumps({"language": "de", "transcript": "x"}).encode(), "d.wav": wav.getvalue(),
               "e.json": good, "e.wav": wav.getvalue()}
    (tmp_path / "eval").mkdir()
    with tarfile.open(tmp_path / "eval" / "en-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skipped: Counter = Counter()
    data = DataConfig(eval_shards=str(tmp_path / "eval" / "{lang}-*.tar"), languages=["en"])
    found = held_out_utterances(data, ["en"], 5, skipped)
    assert [u.key for u in found] == ["a", "e"]  # d is another language's clip: not counted as bad
    assert found[0].translations == {"de": "hallo"} and len(found[0].audio) == 16000
    assert skipped == Counter({"unreadable_json": 1, "undecodable_audio": 1})
    assert [u.key for u in held_out_utterances(data, ["en"], 1)] == ["a"]
