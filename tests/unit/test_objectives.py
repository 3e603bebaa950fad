"""The frame alignment objective (part/objectives/frames.py) on the tiny models: CTC, frame targets and the
vocabulary readout read the adapter's frames through the LLM's final norm and head; the model calls the plug-in
and knows nothing of it; a model without `model.alignment` never imports part.objectives."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from test_model import make_batch, tiny_speech_llm

from part.batch import SampleMeta
from part.config import (
    AlignmentConfig,
    CtcConfig,
    FrameTargetsConfig,
    ReadoutConfig,
)
from part.model.speech_llm import EncodedAudio, SpeechLLM
from part.objectives.frame_vocabulary import write_frame_vocabulary
from part.objectives.frames import LOGITS, FrameAlignment, compressed_slots, span_frame_loss
from part.objectives.whisper_align import TokenTiming
from part.packing import with_layouts


@pytest.fixture
def aligned(model_and_tokenizer):
    """The module's model with a frame alignment plug-in set up by the test (`use`); removed afterwards."""
    model, tok = model_and_tokenizer

    def use(**parts) -> FrameAlignment:
        objective = FrameAlignment(AlignmentConfig(**parts), model.cfg, model, tok)
        model.objectives = torch.nn.ModuleList([objective])
        return objective

    yield model, tok, use
    model.objectives = torch.nn.ModuleList()
    model.eval()


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_models):
    return tiny_speech_llm(tiny_models)


def _transcribed(tok, batch):
    ids = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    return ids, dataclasses.replace(batch, transcript_ids=[torch.tensor(ids), torch.tensor(ids),
                                                           torch.tensor([], dtype=torch.long)])


def test_ctc_loss_reads_the_adapter_through_the_llm_head(aligned):
    """CTC: finite, reaches the adapter's weights, counts only speech samples, and is what `forward` adds to the
    LM loss at its weight, logged by name."""
    model, tok, use = aligned
    ids, batch = _transcribed(tok, make_batch(tok, text_only=True))
    plain = model(batch)
    objective = use(ctc=CtcConfig(weight=0.5))
    encoded = model.encode(batch.input_features, batch.feature_frames)
    ctc = objective.ctc_loss(encoded, batch)
    assert torch.isfinite(ctc) and ctc.item() > 0
    # By hand: the same CTC over the two speech rows, normalised by their transcript tokens.
    audio, lengths = encoded.frames, encoded.lengths
    log_probs = model.llm.get_output_embeddings()(model.llm_final_norm(audio)).float().log_softmax(-1)
    expected = torch.nn.functional.ctc_loss(log_probs[:2].transpose(0, 1), torch.tensor(ids + ids), lengths[:2],
                                            torch.tensor([len(ids)] * 2), blank=model.pad_token_id,
                                            reduction="sum") / (2 * len(ids))
    assert torch.allclose(ctc, expected)
    # Through the final norm, the frames' scale does not decide how sharp their logits are.
    scaled = dataclasses.replace(encoded, cache={LOGITS: objective.logits(model, audio * 10)})
    assert torch.allclose(objective.ctc_loss(scaled, batch), ctc, rtol=1e-3)
    assert model.llm_final_norm is model.llm.get_decoder().norm  # the tiny Qwen2's

    model.zero_grad()
    ctc.backward()
    assert model.adapter.proj.weight.grad.abs().sum() > 0

    weighted = model(batch)
    assert "ctc_loss" not in plain and model.loss_names == ("ctc_loss",)
    assert torch.allclose(weighted["loss"], plain["loss"] + 0.5 * weighted["ctc_loss"])

    # A batch without speech: zero, yet still a graph through the head (every rank makes the same calls).
    text_only = dataclasses.replace(batch, audio_index=torch.tensor([-1, -1, -1]))
    zero = objective.ctc_loss(encoded, text_only)
    assert zero.item() == 0.0 and zero.requires_grad


class ScriptedTeacher:
    """A frame teacher with known answers: token k of each transcript spans adapter frame 2k + 1 (80 ms frames)
    alone, nothing else has a span. Records what it was asked (the real teacher, Whisper's alignment heads, is
    tested in test_whisper_align.py)."""

    def __init__(self, seconds_per_frame: float):
        self.seconds_per_frame, self.calls = seconds_per_frame, []

    def timings(self, states, state_lengths, transcripts, languages):
        self.calls.append((states.shape, state_lengths, transcripts, languages))
        step = self.seconds_per_frame
        return [[TokenTiming(t, "", (2 * k + 1) * step, (2 * k + 2) * step) for k, t in enumerate(ids)]
                for ids in transcripts]


def test_frame_loss_is_the_frames_cross_entropy_against_the_teachers_targets(aligned):
    """The frame loss: CE of every valid adapter frame of the transcribed clips through the LLM's final norm and
    head against the teacher's targets; `forward` adds it at its weight in training; with `lm_loss=False` it is the
    whole loss and the LLM's decoder never runs."""
    model, tok, use = aligned
    ids, batch = _transcribed(tok, make_batch(tok, text_only=True))
    batch = dataclasses.replace(batch, meta=[SampleMeta(key=f"k{i}", task="asr", language="de", target_language=None,
                                                        reference="Guten Tag", duration=1.0) for i in range(3)])
    objective = use(frame_targets=FrameTargetsConfig(weight=0.5, targets="centre", teacher="unused"))
    teacher = objective._teacher = ScriptedTeacher(0.02 * model.cfg.adapter.downsample)
    calls = []
    hook = model.llm.get_base_model().get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        model.train()
        encoded = model.encode(batch.input_features, batch.feature_frames)
        loss = objective.frame_loss(encoded, batch)
        # by hand, from the teacher's rows: both speech clips, their valid frames only
        lengths = encoded.lengths.tolist()
        expected_logits, expected_targets = [], []
        for j, n in enumerate(lengths):
            row = [model.pad_token_id] * n
            for k, t in enumerate(ids):
                row[2 * k + 1] = t
            expected_logits.append(encoded.cache[LOGITS][j, :n])
            expected_targets += row
        expected = torch.nn.functional.cross_entropy(torch.cat(expected_logits), torch.tensor(expected_targets))
        assert torch.allclose(loss, expected)
        shape, state_lengths, transcripts, languages = teacher.calls[-1]
        assert transcripts == [ids, ids] and languages == ["de", "de"] and shape[0] == 2
        # spans one frame wide: `span` is the same targets without the per-frame cross-entropy
        objective.cfg = dataclasses.replace(objective.cfg, frame_targets=FrameTargetsConfig(0.5, "span"))
        owners, tokens, base = [], [], 0
        for n in lengths:
            row = [-1] * n
            for k in range(len(ids)):
                row[2 * k + 1] = base + k
            owners += row
            tokens += [ids[o - base] if o >= 0 else model.pad_token_id for o in row]
            base += len(ids)
        expected_span = span_frame_loss(torch.cat(expected_logits).log_softmax(-1), torch.tensor(tokens),
                                        torch.tensor(owners), model.pad_token_id)
        assert torch.allclose(objective.frame_loss(encoded, batch), expected_span)
        objective.cfg = dataclasses.replace(objective.cfg, frame_targets=FrameTargetsConfig(0.5, "centre"))

        calls.clear()
        out = model(batch)
        assert calls and torch.allclose(out["loss"], out["loss_sum"] / out["tokens"] + 0.5 * out["frame_loss"])
        calls.clear()
        only = model(batch, lm_loss=False)
        assert not calls  # the LLM did not run
        assert int(only["tokens"]) == 0 and torch.allclose(only["loss"], 0.5 * only["frame_loss"])
        assert torch.allclose(only["frame_loss"], loss)
        model.zero_grad()
        only["loss"].backward()
        assert model.adapter.proj.weight.grad.abs().sum() > 0
        model.eval()
        assert "frame_loss" not in model(batch) and model.loss_names == ()  # evaluation: no teacher needed
    finally:
        hook.remove()


def test_vocabulary_readout_is_the_embeddings_of_the_frames_likely_tokens(aligned):
    """readout: each frame becomes its top tokens' embeddings weighted by the posterior at the readout
    temperature; a cold temperature gives the embedding of the frame's most likely token."""
    model, tok, use = aligned
    batch = make_batch(tok)
    with torch.no_grad():
        plain = model.encode(batch.input_features, batch.feature_frames)
        objective = use(readout=ReadoutConfig(temperature=1e-4))
        logits = objective.logits(model, plain.frames)
        embeddings = model.llm.get_input_embeddings().weight
        cold, lengths = model.encode_audio(batch.input_features, batch.feature_frames)
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-2  # frames without a near-tie for their first token
        assert clear.sum() > 10
        assert torch.allclose(cold[clear], embeddings[logits.argmax(-1)][clear], atol=1e-5)
        use(readout=ReadoutConfig(temperature=1.0))
        warm, _ = model.encode_audio(batch.input_features, batch.feature_frames)
        top, ids = logits.topk(16, dim=-1)
        expected = (top.softmax(-1)[..., None] * embeddings[ids]).sum(-2)
        assert torch.allclose(warm, expected, atol=1e-5)
        assert torch.equal(lengths, plain.lengths)
        assert torch.allclose(plain.audio, plain.frames)  # without the plug-in the LLM reads the frames


def test_readout_reads_the_blank_as_the_token_blank_as_names(aligned, tmp_path):
    """readout.blank_as: where a frame's posterior is on the blank, the LLM reads the named token's embedding in
    the blank's place (the frame classes and their scores are unchanged); over the whole vocabulary and over a
    frame vocabulary alike. A text of more than one token is refused, naming the field."""
    model, tok, use = aligned
    batch = make_batch(tok)
    blank = model.pad_token_id
    stand_in = tok(" ", add_special_tokens=False)["input_ids"]
    assert len(stand_in) == 1 and stand_in[0] != blank
    embeddings = model.llm.get_input_embeddings().weight

    def read(objective, logits):  # the readout of these frame scores
        objective.logits = lambda *_: logits
        return model.encode_audio(batch.input_features, batch.feature_frames)[0]

    with torch.no_grad():
        plain = use(readout=ReadoutConfig(temperature=1.0))
        logits = plain.logits(model, model.encode(batch.input_features, batch.feature_frames).frames).clone()
        peak = logits.max(-1).values
        logits[:, ::2, blank] = peak[:, ::2] + 30.0  # every other frame a blank one, the blank second on the rest
        logits[:, 1::2, stand_in[0] + 1] = peak[:, 1::2] + 2.0
        logits[:, 1::2, blank] = peak[:, 1::2] + 1.0
        top, ids = logits.topk(16, dim=-1)
        weights = top.softmax(-1)[..., None]
        assert (ids[..., :2] == blank).any(-1).all()
        before = read(plain, logits)
        after = read(use(readout=ReadoutConfig(temperature=1.0, blank_as=" ")), logits)
        assert torch.allclose(before, (weights * embeddings[ids]).sum(-2), atol=1e-5)
        swapped = ids.masked_fill(ids == blank, stand_in[0])
        assert torch.allclose(after, (weights * embeddings[swapped]).sum(-2), atol=1e-5)
        assert not torch.allclose(after, before)
        # a frame vocabulary: the same stand-in, through the class -> token table
        vocabulary = tmp_path / "vocabulary.json"
        write_frame_vocabulary(vocabulary, sorted(set(ids.flatten().tolist()) | {blank}))
        limited = use(vocabulary=str(vocabulary), readout=ReadoutConfig(temperature=1e-4, blank_as=" "))
        classes = logits[..., limited.token_ids]
        cold = read(limited, classes)
        winner = limited.tokens_of(classes.argmax(-1))
        assert (winner[:, ::2] == blank).all() and (winner[:, 1::2] != blank).all()
        assert torch.allclose(cold[:, ::2], embeddings[stand_in[0]].expand_as(cold[:, ::2]), atol=1e-4)
        assert torch.allclose(cold[:, 1::2], embeddings[winner[:, 1::2]], atol=1e-4)
    with pytest.raises(ValueError, match=r"model\.alignment\.readout\.blank_as: 'Guten Tag' is \d+ tokens"):
        use(readout=ReadoutConfig(blank_as="Guten Tag"))


def test_compressed_slots_are_the_frames_greedy_ctc_reading():
    """readout.compress: blank frames go, each run of a repeated class becomes the mean of its frames' readouts,
    the runs from the slot's start; frames past a clip's length count for nothing."""
    blank = 0
    classes = torch.tensor([[5, 5, blank, 5, 7, 7, blank, 7], [blank, blank, 9, 9, 3, 3, 3, 4]])
    audio = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 2)
    runs, kept = compressed_slots(audio, classes, torch.tensor([8, 6]), blank)
    a, b = audio[0], audio[1]
    expected = [[(a[0] + a[1]) / 2, a[3], (a[4] + a[5]) / 2, a[7]], [(b[2] + b[3]) / 2, (b[4] + b[5]) / 2]]
    assert kept.tolist() == [[True] * 4 + [False] * 4, [True] * 2 + [False] * 6]
    for clip, want in enumerate(expected):
        torch.testing.assert_close(runs[clip, :len(want)], torch.stack(want))
        assert not runs[clip, len(want):].any()
    runs, kept = compressed_slots(audio, torch.full_like(classes, blank), torch.tensor([8, 6]), blank)
    assert not kept.any() and not runs.any()  # a clip of blanks says nothing


def _slot_pattern(logits: torch.Tensor, blank: int) -> torch.Tensor:
    """Frame scores where every third frame is blank and the two between share their winner (10, 11, ...)."""
    logits = logits.clone()
    peak = logits.max(-1).values
    frames = torch.arange(logits.shape[1])
    winners = torch.where(frames % 3 == 0, blank, 10 + frames // 3)
    logits[:, frames, winners] = peak[:, frames] + 30.0
    return logits


def _compact_reference(model, inputs, layout, attended):
    """What the LLM computes on each sample's positions with the holes taken out (one sample per row): the
    hidden states of the sample's attended positions, and the map from the row's columns to them."""
    out = []
    for row in range(layout.shape[0]):
        keep = attended[row] & (layout.segments[row] >= 0)
        hidden = model.base_llm.get_decoder()(inputs_embeds=inputs[row][keep][None]).last_hidden_state[0]
        out.append((hidden, keep.long().cumsum(0) - 1))
    return out


def test_a_compressed_slot_reads_as_a_slot_holding_its_runs_alone(aligned):
    """The holes a compressed slot leaves change nothing the LLM computes: the loss of packed and unpacked rows,
    and generation's next token, equal those of the same samples with the hole positions taken out."""
    model, tok, use = aligned
    batch = make_batch(tok, text_only=True)
    blank = model.pad_token_id
    with torch.no_grad():
        objective = use(readout=ReadoutConfig(temperature=1.0, compress=True))
        logits = _slot_pattern(objective.logits(model, model.encode(batch.input_features,
                                                                    batch.feature_frames).frames), blank)
        objective.logits = lambda *_: logits
        encoded = model.encode(batch.input_features, batch.feature_frames)
        assert encoded.kept is not None
        assert encoded.kept.sum(-1).tolist() == ((encoded.lengths + 1) // 3).tolist()  # one run per 3 frames
        suppressed = model.suppressed_ids
        unpacked = with_layouts(batch, model.layout_spec(packed=False, length_multiple=1))
        layout = unpacked.layout
        inputs = model.embed(layout, encoded)
        attended = model.attended(layout, encoded)
        assert int((~attended).sum()) == int((encoded.lengths - encoded.kept.sum(-1)).sum())
        expected = 0.0
        for row, (hidden, column) in enumerate(_compact_reference(model, inputs, layout, attended)):
            at = layout.scored[(layout.scored // layout.shape[1]) == row] % layout.shape[1]
            scores = model.base_llm.get_output_embeddings()(hidden[column[at]]).float()
            targets = layout.targets[(layout.scored // layout.shape[1]) == row]
            expected += torch.nn.functional.cross_entropy(scores.index_fill(1, suppressed, -1.0e4), targets,
                                                          reduction="sum")
        for spec in (model.layout_spec(packed=False, length_multiple=1), model.layout_spec(row_tokens=4096)):
            laid = with_layouts(batch, spec)
            torch.testing.assert_close(model(laid)["loss_sum"], expected, rtol=1e-5, atol=1e-4)
        assert laid.layout.shape[0] == 1  # the second: every sample in one row
        # generation: the first new token of each prompt is the one its compact prompt predicts
        prompts = model.layout_of(batch, prompts=True)
        inputs = model.embed(prompts, encoded)
        reference = _compact_reference(model, inputs, prompts, model.attended(prompts, encoded))
        first = [int(model.base_llm.get_output_embeddings()(hidden[-1]).index_fill(0, suppressed, -1.0e4).argmax())
                 for hidden, _ in reference]
        generated = model.generate(batch, max_new_tokens=1)
        assert generated == [[] if t == model.end_token_id else [t] for t in first]


def test_greedy_reading_merges_repeats_drops_blanks_and_stops_at_each_clips_length(aligned, monkeypatch):
    model, tok, use = aligned
    objective = use()
    blank = model.pad_token_id
    frames = torch.tensor([[5, 5, blank, 5, 7, 7, blank], [9, blank, 9, 9, 3, 3, 3]])
    logits = torch.nn.functional.one_hot(frames, num_classes=max(blank, 9) + 1).float()
    encoded = EncodedAudio(states=None, state_lengths=None, frames=None, lengths=torch.tensor([7, 4]), audio=None,
                           cache={LOGITS: logits})
    monkeypatch.setattr(model, "encode", lambda *args, **kwargs: encoded)
    assert objective.greedy_reading(model, make_batch(tok)) == [[5, 5, 7], [9, 9]]
    # every frame the blank won has token 3 as its runner-up, 0.5 below: a penalty of 0.4 leaves the blank, 0.6 not
    logits[..., 3] += 0.5 * (frames == blank)
    assert objective.greedy_reading(model, make_batch(tok), blank_penalty=0.4) == [[5, 5, 7], [9, 9]]
    assert objective.greedy_reading(model, make_batch(tok), blank_penalty=0.6) == [[5, 3, 5, 7, 3], [9, 3, 9]]


def test_a_model_without_alignment_never_imports_the_objectives(tiny_models):
    """The large recipe's model names no objective: building it (its skeleton, from configs/part_large.yaml's
    model block on the tiny directories) imports nothing of part.objectives."""
    code = f"""
import sys, yaml
from part.config import ModelConfig, build_config
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
block = yaml.safe_load(open("configs/part_large.yaml"))["model"]
assert "alignment" not in block, block
block["encoder"]["pretrained"] = "{tiny_models / 'whisper'}"
block["llm"] = dict(block["llm"], pretrained="{tiny_models / 'llm'}", tokenizer=None)
cfg = build_config(ModelConfig, block, "model")
model = SpeechLLM.skeleton(cfg, load_tokenizer("{tiny_models / 'llm'}"))
assert len(model.objectives) == 0
loaded = sorted(m for m in sys.modules if m.startswith("part.objectives"))
assert not loaded, loaded
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_saved_model_keeps_its_objectives_files(aligned, tmp_path):
    """A model over a frame vocabulary saves it under objectives/ and loads it back from there (not from the
    configured path, which may be gone)."""
    model, tok, use = aligned
    from part.objectives.frame_vocabulary import write_frame_vocabulary

    ids = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    file = tmp_path / "vocab.json"
    write_frame_vocabulary(file, ids)
    cfg = dataclasses.replace(model.cfg, alignment=AlignmentConfig(vocabulary=str(file)))
    saved = SpeechLLM(cfg, tok)
    saved.save_pretrained(tmp_path / "saved", tok)
    file.unlink()
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "objectives" / "frame_vocabulary.json").is_file()
    assert torch.equal(loaded.objectives[0].token_ids, saved.objectives[0].token_ids)
    assert "objectives.0.token_ids" not in loaded.state_dict()
