"""`model.alignment.vocabulary`: the adapter's frames classified over the training transcripts' tokens only. The same
numbers as the whole head at those tokens, the losses and readouts in token ids, the file written from shards,
kept with a saved model, and refused with errors that name it."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from conftest import write_config
from test_model import make_batch

from part.config import (
    AdapterConfig,
    AlignmentConfig,
    ConfigError,
    CtcConfig,
    EncoderConfig,
    LLMConfig,
    LoraConfig,
    ModelConfig,
    ReadoutConfig,
    load_config,
)
from part.data.vocabulary import transcript_token_counts
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.objectives.frame_vocabulary import FrameVocabularyError, read_frame_vocabulary, write_frame_vocabulary


def _config(tiny_models, vocabulary=None) -> ModelConfig:
    return ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                       adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                       llm=LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8)),
                       alignment=AlignmentConfig(vocabulary=None if vocabulary is None else str(vocabulary),
                                                 ctc=CtcConfig(weight=1.0)))


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """The same weights twice: over the whole vocabulary, and over a frame vocabulary of 40 tokens that holds
    "Guten Tag" (the test batches' transcript)."""
    tok = load_tokenizer(str(tiny_models / "llm"))
    guten_tag = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    ids = sorted(set(guten_tag) | set(range(100, 137)))
    file = tmp_path_factory.mktemp("vocab") / "frame_vocabulary.json"
    write_frame_vocabulary(file, ids, about={"made_by": "test"})
    torch.manual_seed(0)
    whole = SpeechLLM(_config(tiny_models), tok).eval()
    torch.manual_seed(0)
    subset = SpeechLLM(_config(tiny_models, file), tok).eval()
    subset.load_state_dict(whole.state_dict())
    return whole, subset, tok, ids, file


def _batch(tok, ids):
    batch = make_batch(tok, text_only=True)
    return dataclasses.replace(batch, transcript_ids=[torch.tensor(ids), torch.tensor(ids),
                                                      torch.tensor([], dtype=torch.long)])


def test_frame_logits_are_the_whole_heads_at_the_vocabulary(models):
    whole, subset, tok, ids, _ = models
    classes = sorted(set(ids) | {tok.pad_token_id})
    w, s = whole.objectives[0], subset.objectives[0]
    assert s.token_ids.tolist() == classes and s.classes(len(tok)) == len(classes)
    assert s.blank == classes.index(tok.pad_token_id)
    assert s.rows_from_embeddings  # the tiny LLM's head is tied: the embedding rows are used
    batch = make_batch(tok)
    with torch.no_grad():
        frames = whole.encode(batch.input_features, batch.feature_frames).frames
        full = w.logits(whole, frames)
        cut = s.logits(subset, frames)
        assert cut.shape[-1] == len(classes) and full.shape[-1] == w.classes(len(tok))
        assert torch.allclose(cut, full[..., classes], atol=1e-5)
        s.rows_from_embeddings = False  # an untied head: the whole head, then cut
        try:
            assert torch.allclose(s.logits(subset, frames), full[..., classes], atol=1e-5)
        finally:
            s.rows_from_embeddings = True
    # classes <-> token ids, both ways
    some = torch.tensor([classes[3], tok.pad_token_id, classes[0]])
    assert s.tokens_of(s.classes_of(some)).tolist() == some.tolist()
    assert w.classes_of(some) is some and w.tokens_of(some) is some


def test_losses_and_readouts_speak_token_ids(models):
    whole, subset, tok, ids, file = models
    guten_tag = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    batch = _batch(tok, guten_tag)
    s = subset.objectives[0]
    encoded = subset.encode(batch.input_features, batch.feature_frames)
    # CTC over the vocabulary's classes, the transcript mapped to them, the pad token's class the blank
    logits = s.logits(subset, encoded.frames)
    targets = s.classes_of(torch.tensor(guten_tag + guten_tag))
    expected = torch.nn.functional.ctc_loss(
        logits.log_softmax(-1)[:2].transpose(0, 1), targets, encoded.lengths[:2], torch.tensor([len(guten_tag)] * 2),
        blank=s.blank, reduction="sum") / (2 * len(guten_tag))
    assert torch.allclose(s.ctc_loss(encoded, batch), expected)
    # the vocabulary readout embeds token ids, not class numbers
    top = logits.topk(16, dim=-1)
    embeddings = subset.llm.get_input_embeddings().weight
    readout = ((top.values / 0.2).softmax(-1)[..., None] * embeddings[s.token_ids[top.indices]]).sum(-2)
    s.cfg = dataclasses.replace(s.cfg, readout=ReadoutConfig(temperature=0.2))
    try:
        assert torch.allclose(subset.encode(batch.input_features, batch.feature_frames).audio, readout, atol=1e-6)
    finally:
        s.cfg = dataclasses.replace(s.cfg, readout=None)
    # the frames' own reading: every id a token of the vocabulary, never the blank
    for row in s.greedy_reading(subset, batch):
        assert set(row) <= set(ids)
    # a transcript token outside the vocabulary that its tokens cannot spell: an error naming it and the file
    outside = next(t for t in range(len(tok)) if t not in set(ids) | {tok.pad_token_id} and s.pieces(t) is None)
    with pytest.raises(ValueError, match=rf"model.alignment.vocabulary \({file}\): transcript tokens \[{outside}\]"):
        s.ctc_loss(encoded, _batch(tok, [outside, guten_tag[0]]))


def test_a_saved_model_keeps_its_frame_vocabulary(models, tmp_path):
    _, subset, tok, ids, file = models
    moved = tmp_path / "vocabulary.json"
    moved.write_text(file.read_text())
    model = SpeechLLM(dataclasses.replace(subset.cfg, alignment=AlignmentConfig(vocabulary=str(moved))), tok)
    model.save_pretrained(tmp_path / "saved", tok)
    moved.unlink()  # the saved directory is self-contained
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.objectives[0].token_ids, model.objectives[0].token_ids)
    assert not any("token_ids" in k for k in loaded.state_dict())  # the file is the saved form, not the weights
    (tmp_path / "saved" / "objectives" / "frame_vocabulary.json").unlink()
    with pytest.raises(FrameVocabularyError, match="frame_vocabulary.json: no such file"):
        SpeechLLM.from_pretrained(tmp_path / "saved")


def test_unusable_files_are_refused_with_their_name(tmp_path):
    file = tmp_path / "v.json"
    assert read_frame_vocabulary(_write(file, {"token_ids": [7, 3, 7]}), vocab_size=10, blank=0) == [0, 3, 7]
    for content, message in [("{", "cannot read the frame vocabulary"),
                             (json.dumps({"ids": [1]}), "'token_ids' must be a non-empty list"),
                             (json.dumps({"token_ids": []}), "'token_ids' must be a non-empty list"),
                             (json.dumps({"token_ids": [1, 10, "a", True]}), "3 entries that are not token ids")]:
        file.write_text(content)
        with pytest.raises(FrameVocabularyError, match=f"{file}: .*{message}"):
            read_frame_vocabulary(file, vocab_size=10, blank=0)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _shard(path, records):
    with tarfile.open(path, "w") as tar:
        for key, data in records:
            for ext, payload in (("json", data), ("flac", b"not read")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_the_command_writes_the_training_transcripts_tokens(tiny_models, corpus, tmp_path, capsys):
    """`python -m part frame_vocabulary`: every token of the configured languages' training transcripts, as the
    stream tokenises them; bad records and other languages' clips counted, not read; --check refuses a config whose
    file is missing, naming the field."""
    from part.cli.frame_vocabulary import main
    from part.train.preflight import preflight

    tok = load_tokenizer(str(tiny_models / "llm"))
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "de-0.tar", [("a", json.dumps({"language": "de", "transcript": " Guten Tag "}).encode()),
                                 ("b", b"{not json"),
                                 ("c", json.dumps({"language": "en", "transcript": "Hello"}).encode())])
    _shard(shards / "en-0.tar", [("d", json.dumps({"language": "en", "transcript": "Good morning"}).encode())])
    _shard(shards / "zh-0.tar", [("e", json.dumps({"language": "zh", "transcript": "你好"}).encode())])
    counters: Counter = Counter()
    counts = transcript_token_counts(str(shards / "{lang}-*.tar"), ["de", "en"],
                                     lambda text: tok(text, add_special_tokens=False)["input_ids"], counters,
                                     progress=False)
    expected = Counter(tok("Guten Tag", add_special_tokens=False)["input_ids"]
                       + tok("Good morning", add_special_tokens=False)["input_ids"])
    assert counts == expected
    assert counters == Counter(clips=2, bad_record=1, other_language=1)

    out = tmp_path / "frame_vocabulary.json"
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models,
                          "  - {name: s1, steps: 2, tasks: {asr: 1.0}, trainable: [adapter], warmup_steps: 0}")
    overrides = [f"data.train_shards={shards}/{{lang}}-*.tar", "data.languages=[de,en]",
                 f"model.alignment.vocabulary={out}"]
    assert main(["--config", str(config), *overrides]) == 0
    written = json.loads(out.read_text())
    assert written["token_ids"] == sorted(expected) and written["transcripts"] == 2
    assert f"wrote {out}: {len(expected)} tokens of {len(tok)} for {len(expected)} distinct" in capsys.readouterr().out

    cfg = load_config(config, [f"model.alignment.vocabulary={out}"])  # the fixture corpus' other transcripts
    preflight(cfg, world_size=1, source=config)  # a readable file passes
    out.unlink()
    with pytest.raises(ConfigError, match=rf"{config}: model.alignment.vocabulary: {out}: no such file .*part"
                                          r".frame_vocabulary"):
        preflight(cfg, world_size=1, source=config)
    assert main(["--config", str(config)]) != 0  # nowhere to write it
    assert "model.alignment.vocabulary is not set" in capsys.readouterr().err


def test_the_flop_count_scores_frames_over_the_vocabulary(models):
    """What the smaller head saves, written out (part/model/flops.py) and measured by FlopCounterMode: the
    difference between the two models' steps (an adapter stage with the CTC term, so the head runs on every frame
    and passes gradients to the adapter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from part.model.flops import batch_flops
    from part.model.groups import set_trainable

    whole, subset, tok, ids, _ = models
    guten_tag = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    batch = _batch(tok, guten_tag)
    counted, measured = [], []
    for model in (whole, subset):
        set_trainable(model, ["adapter"])
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            model(batch)["loss"].backward()
        measured.append(counter.get_total_flops())
        counted.append(batch_flops(model, batch).total)
    saved = counted[0] - counted[1]
    assert saved > 0.03 * counted[0]
    assert saved == pytest.approx(measured[0] - measured[1], rel=0.02)


def test_rare_tokens_are_spelled_with_frequent_ones(models, tiny_models, corpus, tmp_path, capsys):
    """`model.alignment.vocabulary_min_count`: the command keeps the tokens seen that often and the characters that
    spell the rarer ones; the frame losses read a token outside the vocabulary as its pieces (same text, its time
    span shared by their lengths); the frames' reading decodes to the same text."""
    from part.cli.frame_vocabulary import main
    from part.objectives.frame_vocabulary import TokenPieces, choose_frame_vocabulary
    from part.objectives.whisper_align import TokenTiming

    _, _, tok, _, _ = models
    texts = ["Guten Tag"] * 3 + ["Guten Morgen", "Tagesschau"]
    counts = Counter(t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"])
    ids, about = choose_frame_vocabulary(counts, tok, min_count=3)
    frequent = {t for t, n in counts.items() if n >= 3}
    assert frequent < set(ids) and about["spelled_tokens"] == len(set(counts) - set(ids))
    spell = TokenPieces(tok, ids)
    for token in counts:
        pieces = spell(token)
        assert pieces is not None and set(pieces) <= set(ids)
        assert tok.decode(pieces) == tok.decode([token])
        if token not in frequent:  # the rest: frequent tokens and single characters
            assert all(p in frequent or len(tok.decode([p])) == 1 for p in pieces)
    rare = next(t for t in counts if len(spell(t)) > 1)

    # the command writes the same set from shards
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "de-0.tar", [(f"k{i}", json.dumps({"language": "de", "transcript": text}).encode())
                                 for i, text in enumerate(texts)])
    out = tmp_path / "frame_vocabulary.json"
    config = write_config(tmp_path / "c.yaml", corpus, tiny_models,
                          "  - {name: s1, steps: 2, tasks: {asr: 1.0}, trainable: [adapter], warmup_steps: 0}")
    assert main(["--config", str(config), f"data.train_shards={shards}/{{lang}}-*.tar", "data.languages=[de,en]",
                 f"model.alignment.vocabulary={out}", "model.alignment.vocabulary_min_count=3"]) == 0
    written = json.loads(out.read_text())
    assert written["token_ids"] == ids and written["min_count"] == 3
    assert f"{about['spelled_tokens']} tokens seen fewer than 3 times spelled" in capsys.readouterr().out

    # the objective over that vocabulary: spelled timings and CTC targets
    torch.manual_seed(0)
    model = SpeechLLM(_config(tiny_models, out), tok).eval()
    objective = model.objectives[0]
    pieces = spell(rare)
    timing = TokenTiming(token_id=rare, text=tok.decode([rare]), start=1.0, end=2.0)
    frequent_one = next(iter(frequent))
    spelled = objective.spelled_timings([TokenTiming(frequent_one, "x", 0.0, 1.0), timing])
    assert [t.token_id for t in spelled] == [frequent_one, *pieces]
    lengths = [len(spell.text[p]) for p in pieces]
    assert spelled[1].start == 1.0 and spelled[-1].end == pytest.approx(2.0)
    for piece, length in zip(spelled[1:], lengths):
        assert piece.end - piece.start == pytest.approx(length / sum(lengths))
    batch = _batch(tok, [frequent_one, rare])
    encoded = model.encode(batch.input_features, batch.feature_frames)
    explicit = objective.ctc_loss(encoded, _batch(tok, [frequent_one, *pieces]))
    assert torch.allclose(objective.ctc_loss(encoded, batch), explicit)
