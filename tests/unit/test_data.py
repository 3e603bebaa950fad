"""The streaming loader on real shards: mixture, bucketing, bad data, pickle refusal, exact resume."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from part.config import DataConfig, StageConfig
from part.data.audio import encode_flac, load_audio
from part.data.batching import batch_audio_stats, bucket
from part.data.eval_sets import eval_batches, first_per_language
from part.data.samples import Sample
from part.data.shards import DataError, ShardWriter, expand_shards, iter_tar_samples
from part.data.sources import stage_mixture
from part.data.stream import MixtureStream, StreamTracker, make_loader, regroup_positions
from part.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(str(tiny_models / "llm"))


def data_cfg(corpus: Path, **kw) -> DataConfig:
    base = dict(train_shards=f"{corpus}/train/{{lang}}-*.tar", text_shards=f"{corpus}/text/{{lang}}-*.tar",
                eval_shards=f"{corpus}/eval/{{lang}}-*.tar", languages=["en", "de", "zh"], num_workers=0,
                window=16, max_batch_seconds=40.0, max_batch_size=4, max_duration=15.0)
    base.update(kw)
    return DataConfig(**base)


def take(stream, n):
    it = iter(make_loader(stream))
    return [next(it) for _ in range(n)]


def test_expand_shards(corpus):
    de = expand_shards(f"{corpus}/train/{{lang}}-*.tar", "de")
    assert de and all(Path(p).name.startswith("de-") for p in de)
    braces = expand_shards(f"{corpus}/train/de-{{000000..000001}}.tar")
    assert [Path(p).name for p in braces] == ["de-000000.tar", "de-000001.tar"]
    assert expand_shards("https://example.org/s-{0..2}.tar") == [f"https://example.org/s-{i}.tar" for i in range(3)]


def test_temperature_mixture_weights(corpus):
    """p(lang) ~ n^(1/T) with n the hours in index.json; task weights split first."""
    cfg = data_cfg(corpus, temperature=2.0)
    stage = StageConfig(name="s", steps=1, tasks={"asr": 3.0, "s2tt": 1.0}, translation_targets=["en"])
    mixture = {src.key: p for src, p in stage_mixture(cfg, stage)}
    index = json.loads((corpus / "train" / "index.json").read_text())["hours_per_language"]
    scaled = {lang: index[lang] ** 0.5 for lang in ("en", "de", "zh")}
    norm = sum(scaled.values())
    for lang in ("en", "de", "zh"):
        assert mixture[f"asr/{lang}"] == pytest.approx(0.75 * scaled[lang] / norm, rel=1e-4)  # index rounds hours
    # s2tt into en: en itself has no other target, so only de and zh
    assert "s2tt/en" not in mixture
    s2tt_norm = scaled["de"] + scaled["zh"]
    assert mixture["s2tt/de"] == pytest.approx(0.25 * scaled["de"] / s2tt_norm, rel=1e-4)
    assert sum(mixture.values()) == pytest.approx(1.0)


def test_sampled_mixture_matches_targets(corpus, tokenizer):
    cfg = data_cfg(corpus, temperature=1.0, window=32)
    stage = StageConfig(name="mix", steps=1, tasks={"asr": 0.5, "s2tt": 0.3, "mt": 0.2}, translation_targets=["en"])
    stream = MixtureStream(cfg, stage, tokenizer, 80, rank=0, world_size=1)
    counts = Counter()
    for batch in take(stream, 120):
        counts.update(m.task for m in batch.meta)
    total = sum(counts.values())
    assert total > 300
    # mt: `en` text records translate into de/zh, not into the target en: those draws are skipped and counted,
    # so compare the speech tasks, whose every draw is usable.
    speech = counts["asr"] + counts["s2tt"]
    assert counts["asr"] / speech == pytest.approx(0.5 / 0.8, abs=0.05)
    assert counts["mt"] > 0
    mixed = batch.position.mixed
    assert sum(mixed.values()) == total  # the reported mixture is what was sampled


def test_bucketing_bounds_and_padding(corpus, tokenizer):
    cfg = data_cfg(corpus, window=48, max_batch_seconds=30.0, max_batch_size=8, max_batch_tokens=100000)
    stage = StageConfig(name="b", steps=1, tasks={"asr": 1.0})
    stream = MixtureStream(cfg, stage, tokenizer, 80, rank=0, world_size=1)
    batches = take(stream, 20)
    real = padded = 0.0
    for b in batches:
        durations = [m.duration for m in b.meta]
        assert len(durations) <= 8
        assert max(durations) * len(durations) <= 30.0 + 1e-6
        r, p = batch_audio_stats(b)
        real, padded = real + r, padded + p
        # features: 100 frames per second of the longest clip (Whisper hop 160 at 16 kHz), rounded up to a
        # multiple of data.audio_multiple (0.25 s) and of 1/32 of the power of two below
        longest = max(durations) * 100
        assert -2 <= b.input_features.shape[-1] - longest <= max(25, longest / 32) + 2
    bucketed_padding = 1 - real / padded
    # the same samples in arrival order (no sorting) pad much more
    samples = [m.duration for b in batches for m in b.meta]
    rng = np.random.default_rng(0)
    rng.shuffle(samples)
    unsorted_padded = sum(max(samples[i : i + 4]) * len(samples[i : i + 4]) for i in range(0, len(samples), 4))
    assert bucketed_padding < 1 - sum(samples) / unsorted_padded
    assert bucketed_padding < 0.10


def test_bucket_respects_token_bound(corpus, tokenizer):
    cfg = data_cfg(corpus, max_batch_tokens=120)
    stream = MixtureStream(cfg, StageConfig(name="t", steps=1, tasks={"asr": 1.0}), tokenizer, 80, 0, 1)
    for b in take(stream, 10):
        longest = max(len(p) + len(t) for p, t in zip(b.prompt_ids, b.target_ids))
        assert longest * len(b.meta) <= 120 or len(b.meta) == 1


def test_too_few_shards_fails_up_front(corpus, tokenizer):
    cfg = data_cfg(corpus, num_workers=64)
    with pytest.raises(DataError, match="fewer than ranks x workers = 2 x 64"):
        MixtureStream(cfg, StageConfig(name="x", steps=1), tokenizer, 80, rank=0, world_size=2)


def write_tar(path: Path, members: list[tuple[str, bytes]], truncate_at: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw[:truncate_at] if truncate_at else raw)


def record(key: str, transcript: str, duration: float = 1.0) -> bytes:
    return json.dumps({"id": key, "language": "en", "duration": duration, "transcript": transcript,
                       "translations": {}}).encode()


def test_pickle_member_refused(tmp_path):
    shard = tmp_path / "en-000000.tar"
    write_tar(shard, [("a.json", record("a", "hi")), ("a.pyd", b"\x80\x04K\x01.")])
    with pytest.raises(DataError, match=r"en-000000.tar: member 'a.pyd' has a pickle extension"):
        list(iter_tar_samples(str(shard), Counter()))


def test_bad_data_is_skipped_and_counted(tmp_path, tokenizer):
    """Unreadable clip, empty transcript, over-long clip, truncated tar: each skipped, counted, the run goes on."""
    wave = load_audio(SHARED / "speech" / "clips" / "fleurs_en_000.ogg")
    good = encode_flac(wave[:16000])
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "en-000000.tar", [
        ("ok1.json", record("ok1", "hello there")), ("ok1.flac", good),
        ("broken.json", record("broken", "noise")), ("broken.flac", b"not audio at all" * 10),
        ("empty.json", record("empty", "   ")), ("empty.flac", good),
        ("long.json", record("long", "too long", duration=99.0)), ("long.flac", good),
        ("badjson.json", b"{not json"), ("badjson.flac", good),
    ])
    members = [(f"t{i}.json", record(f"t{i}", f"sample {i}")) for i in range(6)]
    members = [m for i in range(6) for m in (members[i], (f"t{i}.flac", good))]
    write_tar(shards / "en-000001.tar", members, truncate_at=6000)  # cut in the middle of a member
    cfg = DataConfig(train_shards=f"{shards}/{{lang}}-*.tar", languages=["en"], num_workers=0, window=8,
                     max_batch_size=8, max_batch_seconds=100, max_duration=30)
    stream = MixtureStream(cfg, StageConfig(name="bad", steps=1, tasks={"asr": 1.0}), tokenizer, 80, 0, 1)
    batches = take(stream, 4)
    skipped = batches[-1].position.skipped
    assert skipped["unreadable_audio"] >= 1
    assert skipped["empty_transcript"] >= 1
    assert skipped["too_long"] >= 1
    assert skipped["bad_record"] >= 1
    assert skipped["truncated_shard"] >= 1
    keys = {m.key for b in batches for m in b.meta}
    assert "ok1" in keys and "broken" not in keys and "empty" not in keys and "long" not in keys


def test_poison_samples_are_skipped_counted_and_named(tmp_path, tokenizer, capsys):
    """Records that lie or are malformed: each is a counted skip naming shard and key, never a crash (an exact
    resume would replay a crash forever)."""
    wave = load_audio(SHARED / "speech" / "clips" / "fleurs_en_000.ogg")
    good, long_clip = encode_flac(wave[:16000]), encode_flac(np.tile(wave, 8)[: 16000 * 45])
    shards = tmp_path / "shards"
    shards.mkdir()
    poison = [
        ("liar", record("liar", "says five seconds", duration=5.0), long_clip),  # 45 s labelled 5 s
        ("tiny", record("tiny", "a blip"), encode_flac(wave[:40])),  # 2.5 ms: too short for the frontend
        ("strdur", json.dumps({"id": "strdur", "language": "en", "duration": "2.0s", "transcript": "x"}).encode(),
         good),
        ("nulldur", json.dumps({"id": "nulldur", "language": "en", "duration": None, "transcript": "x"}).encode(),
         good),
        ("nandur", b'{"id": "nandur", "language": "en", "duration": NaN, "transcript": "x"}', good),
        ("negdur", record("negdur", "negative", duration=-1.0), good),
        ("alist", b'["not", "an", "object"]', good),
        ("huge", record("huge", "word " * 20000), good),  # one sample over the batch token budget
        ("french", json.dumps({"id": "french", "language": "fr", "duration": 1.0, "transcript": "bonjour"}).encode(),
         good),
    ]
    members = []
    for key, rec, audio in poison + [(f"ok{i}", record(f"ok{i}", f"fine sample {i}"), good) for i in range(4)]:
        members += [(f"{key}.json", rec), (f"{key}.flac", audio)]
    write_tar(shards / "en-000000.tar", members)
    cfg = DataConfig(train_shards=f"{shards}/{{lang}}-*.tar", languages=["en"], num_workers=0, window=13,
                     max_batch_size=4, max_batch_seconds=200, max_batch_tokens=2048, max_duration=30)
    stream = MixtureStream(cfg, StageConfig(name="poison", steps=1, tasks={"asr": 1.0}), tokenizer, 80, 0, 1)
    batches = take(stream, 3)
    skipped = batches[-1].position.skipped
    for reason, n in (("too_long", 1), ("too_short", 1), ("bad_duration", 4), ("bad_record", 1),
                      ("too_many_tokens", 1), ("other_language", 1)):
        assert skipped[reason] >= n, (reason, skipped)
    keys = {m.key for b in batches for m in b.meta}
    assert keys and keys <= {f"ok{i}" for i in range(4)}
    assert all(abs(m.duration - 1.0) < 0.01 for b in batches for m in b.meta)  # measured, not the label
    assert "en-000000.tar:liar: the clip is 45.00 s long (its record says 5 s)" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_stream(corpus, tokenizer, workers):
    """Batches after a resume are exactly the batches an uninterrupted stream yields next."""
    cfg = data_cfg(corpus, num_workers=workers, window=12)
    stage = StageConfig(name="r", steps=1, tasks={"asr": 0.6, "s2tt": 0.2, "text": 0.2}, translation_targets=["en"])
    full = take(MixtureStream(cfg, stage, tokenizer, 80, 0, 1), 14)
    tracker = StreamTracker()
    for b in full[:9]:
        tracker.update(b.position)
    state = json.loads(json.dumps(tracker.state()))  # through JSON, as in a checkpoint
    resumed = take(MixtureStream(cfg, stage, tokenizer, 80, 0, 1, resume=state), 5)
    for a, b in zip(full[9:], resumed):
        assert [m.key for m in a.meta] == [m.key for m in b.meta]
        assert [m.task for m in a.meta] == [m.task for m in b.meta]
        assert np.array_equal(a.input_features.numpy(), b.input_features.numpy())


def test_positions_regrouped_onto_another_number_of_ranks_continue_every_worker(corpus, tokenizer):
    """2 ranks x 1 loader worker, checkpointed, resumed as 1 rank x 2 loader workers (the same 2 data workers):
    the new rank's batches alternate between the two old ranks' streams, each continuing exactly after its last
    consumed batch. Under another number of data workers in all, positions do not carry over."""
    cfg = data_cfg(corpus, window=8)
    stage = StageConfig(name="g", steps=1, tasks={"asr": 0.7, "text": 0.3})
    saved, expected = [], []
    for rank, consumed in ((0, 5), (1, 3)):
        full = take(MixtureStream(cfg, stage, tokenizer, 80, rank, 2), consumed + 3)
        tracker = StreamTracker()
        for b in full[:consumed]:
            tracker.update(b.position)
        saved.append(json.loads(json.dumps(dict(tracker.state(), stage="g", world_size=2, num_workers=0))))
        expected.append(full[consumed:])
    resume = regroup_positions(saved, rank=0, world_size=1, num_workers=2)
    assert sorted(resume["workers"]) == ["0", "1"]
    resumed = take(MixtureStream(data_cfg(corpus, window=8, num_workers=2), stage, tokenizer, 80, 0, 1,
                                 resume=resume), 6)
    for i, batch in enumerate(resumed):  # loader workers 0, 1, 0, 1, ...: old rank 0's stream, then rank 1's
        want = expected[i % 2][i // 2]
        assert batch.position.worker == i % 2
        assert [m.key for m in batch.meta] == [m.key for m in want.meta]
        assert np.array_equal(batch.input_features.numpy(), want.input_features.numpy())
    # and back: 1 rank x 2 workers onto 2 ranks x 1 worker, each rank taking its worker's position
    tracker = StreamTracker(resume)
    for b in resumed:
        tracker.update(b.position)
    one = dict(tracker.state(), stage="g", world_size=1, num_workers=2)
    for rank in (0, 1):
        again = regroup_positions([one], rank=rank, world_size=2, num_workers=1)
        assert list(again["workers"]) == [str(rank)]
        assert again["workers"][str(rank)] == one["workers"][str(rank)]
    assert regroup_positions(saved, rank=0, world_size=1, num_workers=1) is None  # 1 data worker, not 2
    assert regroup_positions(saved, rank=0, world_size=4, num_workers=1) is None


def test_ranks_read_disjoint_shards(corpus, tokenizer):
    cfg = data_cfg(corpus, window=8)
    stage = StageConfig(name="d", steps=1, tasks={"asr": 1.0})
    shards = [{m.key for b in take(MixtureStream(cfg, stage, tokenizer, 80, r, 2), 8) for m in b.meta}
              for r in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_real_clip_round_trip_through_shard_and_loader(tmp_path, tokenizer):
    """A real FLEURS clip (ogg/opus, 16 kHz) and a real LJSpeech clip (flac, 22.05 kHz) through a shard and
    the evaluation loader: features of the right length, transcript intact."""
    rows = [line.split("\t") for line in (SHARED / "speech" / "transcripts.tsv").read_text().splitlines()[1:]]
    chosen = [r for r in rows if r[0] in ("fleurs_de_000", "fleurs_en_001")]
    assert len(chosen) == 2
    out = tmp_path / "eval"
    with ShardWriter(out, "xx") as writer:
        for r in chosen:
            wave = load_audio(SHARED / "speech" / r[2])
            writer.write({"id": r[0], "language": r[1], "duration": len(wave) / 16000, "transcript": r[6],
                          "translations": {}}, encode_flac(wave))
    for r in chosen:
        cfg = DataConfig(train_shards="unused", eval_shards=f"{out}/xx-*.tar", languages=[r[1]])
        batches = eval_batches(cfg, [r[1]], ["asr"], ["en"], 5, 4, tokenizer, 80, 0, 1)
        assert len(batches) == 1
        batch = batches[0]
        assert [m.key for m in batch.meta] == [r[0]]  # the other language's clip is not in this set
        assert batch.meta[0].reference == r[6]
        assert int(batch.feature_frames[0]) == pytest.approx(float(r[3]) * 100, abs=3)


def test_eval_batches_equal_count_per_rank(corpus, tokenizer):
    cfg = data_cfg(corpus)
    per_rank = [eval_batches(cfg, ["en", "de", "zh"], ["asr", "s2tt", "mt"], ["en"], 3, 4, tokenizer, 80, r, 2)
                for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    real = [m.key + m.task for batches in per_rank for b in batches if not b.is_padding for m in b.meta]
    index = json.loads((corpus / "eval" / "index.json").read_text())
    available = {e["name"][:2]: e["samples"] for e in index["shards"]}
    asr = sum(min(3, n) for n in available.values())
    s2tt = asr - min(3, available["en"])  # into en: every language but en
    assert len(real) == len(set(real)) == asr + 2 * s2tt  # mt: the same clips' transcripts, as text
    speech = {(m.key, m.reference) for batches in per_rank for b in batches for m in b.meta if m.task == "s2tt"}
    text = [(b, i) for batches in per_rank for b in batches for i, m in enumerate(b.meta) if m.task == "mt"]
    assert {(b.meta[i].key, b.meta[i].reference) for b, i in text} == speech  # the same references
    assert all(b.audio_index[i] < 0 for b, i in text)  # no audio


def test_first_per_language_takes_accepted_samples_in_shard_order_and_stops_reading(tmp_path):
    """The held-out rule shared by the evaluation and `python -m part whisper_reference`: per language, the first N
    samples accepted, in shard order; once a language has its N, its later shards are not even opened."""
    write_tar(tmp_path / "en-000000.tar", [(f"{k}.json", record(k, t)) for k, t in
                                           [("a", "one"), ("b", ""), ("c", "three"), ("d", "four")]])
    (tmp_path / "en-000001.tar").write_bytes(b"not a tar")  # would fail or be counted if it were read
    write_tar(tmp_path / "de-000000.tar", [("e.json", record("e", "fünf"))])

    def accept(lang, url, key, members):
        transcript = json.loads(members["json"])["transcript"]
        return (lang, Path(url).name, key, transcript) if transcript else None

    counters = Counter()
    taken = list(first_per_language(str(tmp_path / "{lang}-*.tar"), ["en", "de"], 2, accept, counters))
    assert taken == [("en", "en-000000.tar", "a", "one"), ("en", "en-000000.tar", "c", "three"),
                     ("de", "de-000000.tar", "e", "fünf")]
    assert not counters


def test_bucket_function_sorts_by_length():
    samples = [Sample("asr", "en", None, str(i), "s", "p", "t", d, None, [1] * 5, [1] * 5)
               for i, d in enumerate([5.0, 1.0, 4.0, 2.0])]
    cfg = DataConfig(train_shards="x", max_batch_seconds=8.0, max_batch_size=4, window=4)
    batches = bucket(samples, cfg)
    assert [[s.duration for s in b] for b in batches] == [[1.0, 2.0], [4.0], [5.0]]
