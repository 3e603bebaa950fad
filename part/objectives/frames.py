"""Frame alignment: the adapter's frames read through the LLM's final norm and output head, as the LLM reads its
last hidden state, classified over a frame vocabulary (the corpus' tokens, or the whole vocabulary; the pad token
is the blank). On that reading three optional parts (`model.alignment`):

- `ctc`: CTC against each speech sample's transcript tokens (no teacher);
- `frame_targets`: per-frame targets from word timings (a Whisper checkpoint's alignment heads force-align the
  transcript; the LLM's tokens take the spans of the characters they cover, so any tokenizer works);
- `readout`: the LLM reads each frame as the embeddings of its likely tokens, weighted by the posterior; with
  `compress`, it reads the frames' greedy CTC reading instead of every frame (`compressed_slots`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from part.embeddings import embedding_scale
from part.objectives.base import EncodedAudio, Objective, SpeechLLM
from part.objectives.frame_vocabulary import FILE_NAME as VOCABULARY_FILE
from part.objectives.frame_vocabulary import TokenPieces, read_frame_vocabulary, write_frame_vocabulary

if TYPE_CHECKING:
    from part.batch import Batch
    from part.config import AlignmentConfig, ModelConfig
    from part.objectives.whisper_align import TokenTiming

# The readout mixes each frame's most likely tokens only: at its low temperature they hold nearly all the
# posterior's mass, and their embeddings come through the embedding module (ZeRO-3 gathers it), not as the whole
# [vocab, width] matrix.
READOUT_TOP_K = 16
WHISPER_SECONDS_PER_FRAME = 0.02  # a Whisper encoder's output frame: what the teacher's timings are counted in
LOGITS = "frame_logits"  # the key of the frames' logits in EncodedAudio.cache


def span_frame_loss(log_probs: torch.Tensor, tokens: torch.Tensor, owners: torch.Tensor, blank: int) -> torch.Tensor:
    """The frame loss with token spans (`targets: span`), over N frames: `log_probs` [N, classes]; `owners` [N]:
    the index of the token whose span holds the frame (`whisper_align.frame_owners`, numbered across the batch), -1
    where none does; `tokens` [N]: that token's class (`blank` where none).
    Mean over frames of -log(p(token) + p(blank)) (-log p(blank) outside every span), plus mean over tokens of -log
    of the sum over their frames of p(token): each token emitted in at least one frame of its span and only there,
    blank elsewhere, as a CTC model emits it."""
    lp_token = log_probs.gather(1, tokens[:, None])[:, 0]
    lp_blank = log_probs[:, blank]
    owned = owners >= 0
    frame = torch.where(owned, torch.logaddexp(lp_token, lp_blank), lp_blank).mean()
    if not bool(owned.any()):
        return -frame
    segment, values = owners[owned], lp_token[owned]
    count = int(segment.max()) + 1
    # log-sum-exp per token over its frames, shifted by each token's max for stability
    peak = torch.full((count,), float("-inf"), device=values.device).scatter_reduce(
        0, segment, values.detach(), "amax", include_self=True)
    total = torch.zeros(count, device=values.device, dtype=values.dtype).index_add(
        0, segment, (values - peak[segment]).exp())
    present = torch.isfinite(peak)  # tokens numbered but owning no frame (dropped) have no term
    return -frame - (total[present].log() + peak[present]).mean()


def config_problems(cfg: ModelConfig) -> list[str]:
    """The teacher of `frame_targets` must be a Whisper directory with its decoder and alignment heads."""
    targets = cfg.alignment.frame_targets if cfg.alignment is not None else None
    if targets is None or targets.weight == 0:
        return []
    teacher = targets.teacher or cfg.encoder.pretrained
    if not teacher or not Path(teacher).is_dir():
        return []  # the config's own validation names a missing directory
    from part.objectives.whisper_align import alignment_heads_problem

    problem = alignment_heads_problem(teacher)
    field = "teacher" if targets.teacher else "teacher (default: model.encoder.pretrained)"
    return [f"model.alignment.frame_targets.{field}: the frame targets need {problem}"] if problem else []


def compressed_slots(audio: torch.Tensor, classes: torch.Tensor, lengths: torch.Tensor,
                     blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames as their greedy CTC reading, on the device: `audio` [B, N, H] the frames' readouts, `classes`
    [B, N] their most likely class, `lengths` [B] the valid frames. Blank frames go; each run of frames with the
    same class becomes the mean of their readouts, the runs in order from the slot's start. Returns the runs
    [B, N, H] (zeros after the last) and [B, N] which positions hold one."""
    clips, n, width = audio.shape
    frame = torch.arange(n, device=audio.device)
    spoken = (classes != blank) & (frame < lengths[:, None])
    previous = F.pad(classes[:, :-1], (1, 0), value=blank)
    starts = spoken & (classes != previous)
    run = (starts.long().cumsum(-1) - 1).clamp(min=0)  # the run each spoken frame belongs to
    into = (torch.arange(clips, device=audio.device)[:, None] * n + run).reshape(-1)
    weight = spoken.reshape(-1, 1).to(audio.dtype)
    summed = audio.new_zeros(clips * n, width).index_add(0, into, audio.reshape(-1, width) * weight)
    count = audio.new_zeros(clips * n, 1).index_add(0, into, weight)
    runs = (summed / count.clamp(min=1)).view(clips, n, width)
    return runs, frame < starts.sum(-1, keepdim=True)


class FrameAlignment(Objective):
    def __init__(self, cfg: AlignmentConfig, model_cfg: ModelConfig, model: SpeechLLM, tokenizer,
                 saved_dir: Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.downsample = model_cfg.adapter.downsample
        self.blank_token = model.pad_token_id
        self.tokenizer = tokenizer
        self.teacher_dir = None
        if cfg.frame_targets is not None and cfg.frame_targets.weight > 0:
            self.teacher_dir = cfg.frame_targets.teacher or model_cfg.encoder.pretrained
        self._teacher = None  # loaded at the first frame loss: a frozen Whisper, outside the module tree
        embeddings = model.llm.get_input_embeddings()
        self.readout_blank = self._readout_blank(tokenizer)
        file = cfg.vocabulary if saved_dir is None else saved_dir / VOCABULARY_FILE
        if cfg.vocabulary is None:
            self.register_buffer("token_ids", None, persistent=False)  # class -> token id: the identity
            self.register_buffer("class_of_token", None, persistent=False)
            self.blank = self.blank_token
            self.register_buffer("readout_token_ids", None, persistent=False)
            self.rows_from_embeddings = False
            self._pieces = None
            self.vocabulary_ids = None
            return
        ids = read_frame_vocabulary(file, embeddings.num_embeddings, blank=self.blank_token)
        self._pieces = (tokenizer, ids)  # made into TokenPieces when a token outside the vocabulary first comes
        self.vocabulary_ids = frozenset(ids)  # on the host: the targets are checked against it without a device read
        token_ids = torch.tensor(ids, dtype=torch.long)
        class_of_token = torch.full((embeddings.num_embeddings,), -1, dtype=torch.long)
        class_of_token[token_ids] = torch.arange(len(ids))
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("class_of_token", class_of_token, persistent=False)
        self.blank = ids.index(self.blank_token)
        readout_ids = token_ids.clone()  # what the readout mixes for each class: its token, the blank's stand-in
        readout_ids[self.blank] = self.readout_blank
        self.register_buffer("readout_token_ids", readout_ids, persistent=False)
        # The rows of a tied head are the embedding module's (ZeRO-3 gathers them through its call), its output
        # divided by the factor a scaled embedding (Gemma's) multiplies it by; any other head runs whole, its
        # logits then cut to the classes (correct, not faster).
        head = model.base_llm.get_output_embeddings()
        self.rows_from_embeddings = (isinstance(embeddings, nn.Embedding) and head.weight is embeddings.weight
                                     and getattr(head, "bias", None) is None)
        self.embedding_scale = embedding_scale(embeddings) if self.rows_from_embeddings else 1.0

    def _readout_blank(self, tokenizer) -> int:
        """The token whose embedding the readout gives the blank class (`readout.blank_as`; the blank itself when
        unset)."""
        text = self.cfg.readout.blank_as if self.cfg.readout is not None else None
        if text is None:
            return self.blank_token
        if tokenizer is None:
            raise ValueError("model.alignment.readout.blank_as: the LLM's tokenizer is needed to read it")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"model.alignment.readout.blank_as: {text!r} is {len(ids)} tokens of the LLM's "
                             "tokenizer, not one")
        return ids[0]

    # ---------------------------------------------------------------- the frame classes

    def classes(self, vocab_size: int) -> int:
        """How many classes each frame is scored over."""
        return vocab_size if self.token_ids is None else len(self.token_ids)

    def classes_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The class of each token id; a ValueError naming the tokens outside the frame vocabulary."""
        if self.class_of_token is None:
            return token_ids
        classes = self.class_of_token[token_ids]
        if (classes < 0).any():
            missing = token_ids[classes < 0].unique().tolist()
            raise ValueError(f"model.alignment.vocabulary ({self.cfg.vocabulary}): transcript tokens {missing[:8]} "
                             "are not in it (built from other transcripts or another tokenizer?): write it again "
                             "with `python -m part frame_vocabulary --config CONFIG`")
        return classes

    @property
    def pieces(self) -> TokenPieces | None:
        """Transcript tokens outside the vocabulary spelled with its tokens (None: no vocabulary or no tokenizer,
        whose token texts the spelling needs)."""
        if isinstance(self._pieces, tuple):
            tokenizer, ids = self._pieces
            self._pieces = TokenPieces(tokenizer, ids) if tokenizer is not None else None
        return self._pieces

    def transcript_classes(self, transcripts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """The frame classes of these transcripts' token ids, concatenated, and each one's length in classes: a
        token outside the frame vocabulary spelled with its tokens (`pieces`; one that has no spelling is named by
        `classes_of`'s error). The ids are read on the host only when a token is outside: one device read finds
        it, as `classes_of` makes one."""
        ids, lengths = torch.cat(transcripts), [len(t) for t in transcripts]
        if self.class_of_token is None:
            return ids, lengths
        classes = self.class_of_token[ids]
        if not bool((classes < 0).any()):
            return classes, lengths
        if self.pieces is not None:
            spelled = [[p for t in transcript.tolist() for p in (self.pieces(t) or [t])] for transcript in transcripts]
            ids, lengths = torch.tensor([p for s in spelled for p in s], device=ids.device), [len(s) for s in spelled]
        return self.classes_of(ids), lengths

    def spelled_timings(self, timings: list[TokenTiming]) -> list[TokenTiming]:
        """`timings` with each token outside the frame vocabulary replaced by its pieces, the token's time span
        shared among them in proportion to their length in characters."""
        if self.vocabulary_ids is None or self.vocabulary_ids.issuperset(t.token_id for t in timings) \
                or self.pieces is None:
            return timings
        out = []
        for timing in timings:
            pieces = self.pieces(timing.token_id)
            if pieces is None or len(pieces) == 1:
                out.append(timing)
                continue
            lengths = [len(self.pieces.text[p]) for p in pieces]
            total, done = sum(lengths), 0
            for piece, length in zip(pieces, lengths):
                start = timing.start + (timing.end - timing.start) * done / total
                done += length
                end = timing.start + (timing.end - timing.start) * done / total
                out.append(dataclasses.replace(timing, token_id=piece, text=self.pieces.text[piece], start=start,
                                               end=end))
        return out

    def tokens_of(self, classes: torch.Tensor) -> torch.Tensor:
        """The token id of each class."""
        return classes if self.token_ids is None else self.token_ids[classes]

    def readout_tokens_of(self, classes: torch.Tensor) -> torch.Tensor:
        """The token whose embedding the readout mixes for each class: its own, the blank's stand-in for the
        blank."""
        if self.readout_token_ids is not None:
            return self.readout_token_ids[classes]
        if self.readout_blank == self.blank_token:
            return classes
        return classes.masked_fill(classes == self.blank_token, self.readout_blank)

    def logits(self, model: SpeechLLM, frames: torch.Tensor) -> torch.Tensor:
        """The frames through the LLM's final norm and output head, over the frame classes."""
        # Without the norm the logits scale with the adapter's output norm (token-embedding scale, ~1), and the
        # adapter would have to grow its weights many-fold before any frame is classified sharply.
        hidden = model.llm_final_norm(frames)
        if self.token_ids is None:
            return model.llm.get_output_embeddings()(hidden).float()
        if self.rows_from_embeddings:
            rows = model.llm.get_input_embeddings()(self.token_ids)  # [classes, width]
            if self.embedding_scale != 1.0:
                rows = rows / self.embedding_scale
            return (hidden @ rows.T).float()
        return model.llm.get_output_embeddings()(hidden)[..., self.token_ids].float()

    def _losses_due(self, training: bool) -> bool:
        ctc = self.cfg.ctc is not None and self.cfg.ctc.weight > 0
        return ctc or (self.teacher_dir is not None and training)

    # ---------------------------------------------------------------- the plug-in

    def read(self, model: SpeechLLM, encoded: EncodedAudio) -> torch.Tensor:
        if self.cfg.readout is None and not self._losses_due(model.training):
            return encoded.audio
        logits = encoded.cache[LOGITS] = self.logits(model, encoded.frames)
        if self.cfg.readout is None:
            return encoded.audio
        top, classes = logits.topk(min(READOUT_TOP_K, logits.shape[-1]), dim=-1)
        weights = (top / self.cfg.readout.temperature).softmax(-1)
        embeddings = model.llm.get_input_embeddings()(self.readout_tokens_of(classes))  # [B, N, k, H]
        audio = (weights.to(embeddings.dtype).unsqueeze(-1) * embeddings).sum(-2)
        if not self.cfg.readout.compress:
            return audio
        audio, encoded.kept = compressed_slots(audio, classes[..., 0], encoded.lengths, self.blank)
        return audio

    def losses(self, model: SpeechLLM, encoded: EncodedAudio, batch: Batch) -> dict[str, tuple[float, torch.Tensor]]:
        out = {}
        if self.cfg.ctc is not None and self.cfg.ctc.weight > 0:
            out["ctc_loss"] = (self.cfg.ctc.weight, self.ctc_loss(encoded, batch))
        if self.teacher_dir is not None and model.training:
            out["frame_loss"] = (self.cfg.frame_targets.weight, self.frame_loss(encoded, batch))
        return out

    def loss_names(self, training: bool) -> tuple[str, ...]:
        ctc = self.cfg.ctc is not None and self.cfg.ctc.weight > 0
        return ("ctc_loss",) * ctc + ("frame_loss",) * (self.teacher_dir is not None and training)

    def head_rows(self, vocab_size: int) -> int:
        return self.classes(vocab_size)

    def save(self, out_dir: Path) -> None:
        if self.token_ids is not None:
            write_frame_vocabulary(out_dir / VOCABULARY_FILE, self.token_ids.tolist(),
                                   about={"source": self.cfg.vocabulary})

    @property
    def files(self) -> tuple[str, ...]:
        return (VOCABULARY_FILE,) if self.token_ids is not None else ()

    # ---------------------------------------------------------------- the losses

    @staticmethod
    def _transcribed_clips(batch: Batch) -> list[tuple[int, int]]:
        """(sample, clip row) of the batch's speech samples that have transcript tokens."""
        return [(i, j) for i, j in enumerate(batch.audio_index.tolist())
                if j >= 0 and batch.transcript_ids and len(batch.transcript_ids[i]) > 0]

    def ctc_loss(self, encoded: EncodedAudio, batch: Batch) -> torch.Tensor:
        """CTC of the frames' classes against each speech sample's transcript tokens, the blank the pad token. Mean
        over transcript tokens (0 when there are none)."""
        log_probs = encoded.cache[LOGITS].log_softmax(-1)
        clips = self._transcribed_clips(batch)
        rows = [j for _, j in clips]
        if not rows:
            return log_probs.sum() * 0.0
        classes, lengths = self.transcript_classes([batch.transcript_ids[i].to(log_probs.device) for i, _ in clips])
        index = torch.tensor(rows, device=log_probs.device)
        loss = F.ctc_loss(
            log_probs[index].transpose(0, 1),
            classes,
            encoded.lengths[index],
            torch.tensor(lengths, device=log_probs.device),
            blank=self.blank,
            reduction="sum",
            zero_infinity=True,  # a transcript longer than its frames cannot be aligned: no gradient, not inf
        )
        return loss / sum(lengths)

    @property
    def teacher(self):
        if self._teacher is None:
            from part.objectives.whisper_align import FrameTargetTeacher

            self._teacher = FrameTargetTeacher(self.teacher_dir, self.tokenizer)
        return self._teacher

    def frame_loss(self, encoded: EncodedAudio, batch: Batch) -> torch.Tensor:
        """The frames against the teacher's token timings, over the valid frames of the clips with a transcript
        (0 when there are none): `centre`, cross-entropy against `whisper_align.frame_targets`; `span`,
        `span_frame_loss` over `whisper_align.frame_owners`."""
        from part.objectives.whisper_align import frame_owners, frame_targets

        logits_all = encoded.cache[LOGITS]
        clips = self._transcribed_clips(batch)
        if not clips:
            return logits_all.sum() * 0.0
        rows = [j for _, j in clips]
        lengths = encoded.lengths[rows].tolist()
        timings = self.teacher.timings(
            encoded.states[rows], encoded.state_lengths[rows].tolist(),
            [batch.transcript_ids[i].tolist() for i, _ in clips], [batch.meta[i].language for i, _ in clips])
        timings = [self.spelled_timings(clip) for clip in timings]
        seconds_per_frame = WHISPER_SECONDS_PER_FRAME * self.downsample
        device = logits_all.device
        logits = torch.cat([logits_all[j, :n] for j, n in zip(rows, lengths)])
        blank = self.blank_token
        if self.cfg.frame_targets.targets == "centre":
            target = [t for clip, n in zip(timings, lengths) for t in frame_targets(clip, n, seconds_per_frame, blank)]
            return F.cross_entropy(logits, self.classes_of(torch.tensor(target, device=device)))
        tokens, owners, numbered = [], [], 0
        for clip, n in zip(timings, lengths):
            for owner in frame_owners(clip, n, seconds_per_frame):
                tokens.append(clip[owner].token_id if owner >= 0 else blank)
                owners.append(owner + numbered if owner >= 0 else -1)
            numbered += len(clip)
        return span_frame_loss(logits.log_softmax(-1), self.classes_of(torch.tensor(tokens, device=device)),
                               torch.tensor(owners, device=device), self.blank)

    # ---------------------------------------------------------------- diagnostics

    @torch.no_grad()
    def greedy_reading(self, model: SpeechLLM, batch: Batch, blank_penalty: float = 0.0,
                       encoded: EncodedAudio | None = None) -> list[list[int]]:
        """What each clip's frames say on their own, read as greedy CTC: every frame's most likely token, repeats
        merged, the blank dropped. A word missing here was lost on the speech side (encoder, adapter); one present
        here but not in the hypothesis, by the LLM. `blank_penalty` is subtracted from the blank's logit first (a CTC
        decoding knob against deletions). One list of ids per clip, in `batch.input_features` order."""
        if encoded is None:
            encoded = model.encode(batch.input_features, batch.feature_frames)
        logits = encoded.cache.get(LOGITS)
        if logits is None:
            logits = self.logits(model, encoded.frames)
        if blank_penalty:
            logits = logits.clone()
            logits[..., self.blank] -= blank_penalty
        readouts = []
        for row, n in zip(self.tokens_of(logits.argmax(-1)).tolist(), encoded.lengths.tolist()):
            ids, previous = [], None
            for token in row[:n]:
                if token != previous and token != self.blank_token:
                    ids.append(token)
                previous = token
            readouts.append(ids)
        return readouts


def frame_alignment(model: SpeechLLM) -> FrameAlignment:
    """The model's frame alignment objective, or, for a model without one, a reading of its frames over the LLM's
    whole vocabulary (for the diagnostics that read the frames on their own)."""
    for objective in model.objectives:
        if isinstance(objective, FrameAlignment):
            return objective
    from part.config import AlignmentConfig

    device = next(model.llm_final_norm.parameters()).device
    return FrameAlignment(AlignmentConfig(), model.cfg, model, tokenizer=None).to(device)
