"""Speech LLM: a speech encoder (Whisper, wav2vec2/HuBERT/WavLM or w2v-BERT 2.0: part/model/encoders.py), a
downsampling adapter and a decoder-only LLM.

The adapter's outputs replace the audio placeholder in the prompt's token embeddings; the loss covers only
the target tokens. Nothing here knows about distribution: ZeRO-3 gathers parameters through module hooks,
so every parameter is reached through a module call, never read directly.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from part.config import EncoderConfig, LoraConfig, ModelConfig, build_config
from part.model.adapter import Adapter
from part.model.encoders import AudioFeatures, EncoderFamily, encoder_family, family_for
from part.model.frame_vocabulary import FILE_NAME as FRAME_VOCABULARY_FILE
from part.model.frame_vocabulary import read_frame_vocabulary, write_frame_vocabulary
from part.model.groups import EncoderLayout
from part.model.tokenizer import load_tokenizer, suppressed_token_ids
from part.model.whisper_align import frame_owners, frame_targets
from part.prompts import AUDIO_TOKEN, PromptFormat

if TYPE_CHECKING:
    from part.data.batching import Batch  # the collator's output is the model's input

IGNORE = -100
WEIGHTS_NAME = "model.safetensors"
# Where decoder-only LLMs in transformers keep the norm before their output head: Llama/Qwen/Mistral/Gemma,
# OPT (and the Whisper-decoder stand-in), GPT-2.
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")
# The vocabulary readout mixes each frame's most likely tokens only: at the readout's low temperature they hold
# nearly all the posterior's mass, and their embeddings come through the embedding module (ZeRO-3 gathers it),
# not as the whole [vocab, width] matrix.
READOUT_TOP_K = 16
WHISPER_SECONDS_PER_FRAME = 0.02  # a Whisper encoder's output frame (the frame targets' teacher reads those)


@dataclasses.dataclass
class EncodedAudio:
    """A batch's clips through the encoder and the adapter."""

    states: torch.Tensor  # [clips, encoder frames, encoder width]: the encoder's outputs
    state_lengths: torch.Tensor  # [clips]
    frames: torch.Tensor  # [clips, frames, LLM width]: the adapter's outputs
    lengths: torch.Tensor  # [clips] valid adapter frames
    logits: torch.Tensor | None  # [clips, frames, vocab]: the frames through the LLM's final norm and head
    audio: torch.Tensor  # what the LLM reads in the audio slot (the frames, or their vocabulary readout)


def build_encoder(cfg: EncoderConfig, weights: bool = True, attn_implementation: str = "sdpa") -> nn.Module:
    """The encoder `cfg` names: its pretrained directory's family and weights (with `weights=False`, its
    architecture only), or a fresh Whisper-style one from the config (part/model/encoders.py)."""
    return family_for(cfg).build(weights=weights and bool(cfg.pretrained), attn_implementation=attn_implementation)


def span_frame_loss(log_probs: torch.Tensor, tokens: torch.Tensor, owners: torch.Tensor, blank: int) -> torch.Tensor:
    """The frame loss with token spans (`model.frame_targets: span`), over N frames: `log_probs` [N, vocab];
    `owners` [N]: the index of the token whose span holds the frame (`whisper_align.frame_owners`, numbered across
    the batch), -1 where none does; `tokens` [N]: that token's class in `log_probs` (`blank` where none).
    Mean over frames of -log(p(token) + p(blank)) (-log p(blank) outside every span), plus mean over tokens of
    -log of the sum over their frames of p(token): each token emitted in at least one frame of its span and only
    there, blank elsewhere, as a CTC model emits it. A long word is not told to be blank on all but its centre
    frame (`centre`), nor to fill its span (measured: repeats everywhere, not the CTC-style slot the LLM reads)."""
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


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, saved_configs: Path | None = None,
                 *, weights: bool = True):
        """Loads the pretrained encoder and LLM named in `cfg`. With `saved_configs` (a directory written by
        `save_pretrained`) they are built from their saved configs instead, for weights loaded afterwards; with
        `weights=False`, from the pretrained directories' configs, without reading any weights."""
        super().__init__()
        self.cfg = cfg
        attn = cfg.attn_implementation
        # The encoder's family (from its config.json's model_type) builds it, computes its features and encodes.
        if saved_configs is not None:
            self.encoder_family: EncoderFamily = encoder_family(saved_configs / "encoder_config")
            self.encoder = self.encoder_family.build(weights=False, attn_implementation=attn)
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved_configs / "llm_config"),
                                                   attn_implementation=attn)
        elif weights:
            self.encoder_family = family_for(cfg.encoder)
            self.encoder = self.encoder_family.build(weights=bool(cfg.encoder.pretrained), attn_implementation=attn)
            llm = AutoModelForCausalLM.from_pretrained(cfg.llm.pretrained, dtype=torch.float32,
                                                       attn_implementation=attn)
        else:
            self.encoder_family = family_for(cfg.encoder)
            self.encoder = self.encoder_family.build(weights=False, attn_implementation=attn)
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.llm.pretrained),
                                                   attn_implementation=attn)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        if cfg.activation_checkpointing.llm:  # non-reentrant: the LLM's own inputs (embeddings) may need no grad
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.llm.lora is not None:
            llm = add_lora(llm, cfg.llm.lora)
        self.llm = llm
        self.adapter = Adapter(cfg.adapter, self.encoder_family.width, llm.config.hidden_size)
        if cfg.adapter.init_from_embeddings and weights and saved_configs is None:
            self.adapter.init_from_embeddings(llm.get_input_embeddings().weight[: len(tokenizer)])
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        # The LLM's chat template (ChatML without one): how prompts are written and the token that ends a turn.
        self.prompt_format = PromptFormat.from_tokenizer(tokenizer)
        self.end_token_id = tokenizer.convert_tokens_to_ids(self.prompt_format.end_token)
        self.pad_token_id = tokenizer.pad_token_id
        self.suppressed_token_ids = suppressed_token_ids(tokenizer, self.prompt_format)
        self._init_frame_vocabulary(saved_configs)
        # Set by the trainer when model.frame_weight > 0 (part/model/whisper_align.py FrameTargetTeacher): a frozen
        # Whisper decoder, outside the module tree so that ZeRO and checkpoints never see it.
        self.frame_teacher = None

    def _init_frame_vocabulary(self, saved_configs: Path | None) -> None:
        """The classes of `frame_logits`: the tokens of `model.frame_vocabulary` (a saved model's own copy when
        built from one), or the whole vocabulary. Buffers, not weights: they follow the model to its device and stay
        out of its state dict (the file is the saved form)."""
        file = self.cfg.frame_vocabulary
        if file is None:
            self.register_buffer("frame_token_ids", None, persistent=False)  # class -> token id: the identity
            self.register_buffer("frame_class_of_token", None, persistent=False)
            self.frame_blank = self.pad_token_id
            return
        if saved_configs is not None:
            file = saved_configs / FRAME_VOCABULARY_FILE
        embeddings = self.llm.get_input_embeddings()
        ids = read_frame_vocabulary(file, embeddings.num_embeddings, blank=self.pad_token_id)
        token_ids = torch.tensor(ids, dtype=torch.long)
        class_of_token = torch.full((embeddings.num_embeddings,), -1, dtype=torch.long)
        class_of_token[token_ids] = torch.arange(len(ids))
        self.register_buffer("frame_token_ids", token_ids, persistent=False)
        self.register_buffer("frame_class_of_token", class_of_token, persistent=False)
        self.frame_blank = ids.index(self.pad_token_id)
        # The rows of a tied head are the embedding module's (ZeRO-3 gathers them through its call); any other head
        # runs whole, its logits then cut to the classes (correct, not faster).
        head = self.base_llm.get_output_embeddings()
        self._frame_rows_from_embeddings = (type(embeddings) is nn.Embedding and head.weight is embeddings.weight
                                            and getattr(head, "bias", None) is None)

    @property
    def frame_classes(self) -> int:
        """How many classes `frame_logits` scores each frame over."""
        if self.frame_token_ids is None:
            return self.llm.get_input_embeddings().num_embeddings
        return len(self.frame_token_ids)

    def frame_classes_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`frame_logits`' class of each token id; a ValueError naming the tokens outside the frame vocabulary."""
        if self.frame_class_of_token is None:
            return token_ids
        classes = self.frame_class_of_token[token_ids]
        if (classes < 0).any():
            missing = token_ids[classes < 0].unique().tolist()
            raise ValueError(f"model.frame_vocabulary ({self.cfg.frame_vocabulary}): transcript tokens {missing[:8]} "
                             "are not in it (built from other transcripts or another tokenizer?): write it again "
                             "with `python -m part.frame_vocabulary --config CONFIG`")
        return classes

    def frame_tokens_of(self, classes: torch.Tensor) -> torch.Tensor:
        """The token id of each of `frame_logits`' classes."""
        return classes if self.frame_token_ids is None else self.frame_token_ids[classes]

    @classmethod
    def skeleton(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> SpeechLLM:
        """The architecture alone, on the meta device (no memory, no weights read). Its parameter names are the
        real model's, so `train.py --check` resolves the stages' trainable groups against it."""
        with torch.device("meta"):
            return cls(cfg, tokenizer, weights=False)

    @property
    def base_llm(self) -> nn.Module:
        """The causal LM under its LoRA wrapper (the LM itself without LoRA): its config, decoder and head."""
        return self.llm.get_base_model() if self.cfg.llm.lora is not None else self.llm

    # ---------------------------------------------------------------- audio path

    @property
    def audio_features(self) -> AudioFeatures:
        """The encoder family's feature extractor: what the data pipeline computes this model's input with."""
        return self.encoder_family.features

    @property
    def encoder_layout(self) -> EncoderLayout:
        """The encoder's layers among the parameter names (for the parameter groups)."""
        return self.encoder_family.layout()

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder_family.layers(self.encoder)

    def encode_audio(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Variable-length encoding (no padding to Whisper's 30 s), then the adapter (and the vocabulary readout
        when configured): what the LLM reads.

        features: the batch's padded features as `audio_features` makes them; frames: [B] valid steps of each.
        Returns [B, N, H] and valid lengths [B]. Padding is masked, so a clip encodes to the same embeddings alone
        or batched with longer clips.
        """
        encoded = self._encode(features, frames)
        return encoded.audio, encoded.lengths

    def _encode(self, features: torch.Tensor, frames: torch.Tensor, need_logits: bool = False) -> EncodedAudio:
        recompute = self.cfg.activation_checkpointing.encoder and self.training and torch.is_grad_enabled()
        states, state_lengths = self.encoder_family.encode(self.encoder, features, frames, recompute)
        adapted, lengths = self.adapter(states, state_lengths)
        vocabulary = self.cfg.adapter.readout == "vocabulary"
        logits = self.frame_logits(adapted) if need_logits or vocabulary else None
        audio = self.vocabulary_readout(logits) if vocabulary else adapted
        return EncodedAudio(states, state_lengths, adapted, lengths, logits, audio)

    def frame_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """The adapter's frames read as the LLM reads its last hidden state: final norm, then the output head,
        over the frame vocabulary's classes (`frame_tokens_of` maps them to token ids)."""
        # Without the norm the frames' logits scale with the adapter's output norm (token-embedding scale, ~1), and
        # the adapter has to grow its weights many-fold before any frame is classified sharply (measured:
        # docs/issue13_stage1_4lang.md).
        hidden = self.llm_final_norm(frames)
        if self.frame_token_ids is None:
            return self.llm.get_output_embeddings()(hidden).float()
        if self._frame_rows_from_embeddings:
            rows = self.llm.get_input_embeddings()(self.frame_token_ids)  # [classes, width]
            return (hidden @ rows.T).float()
        return self.llm.get_output_embeddings()(hidden)[..., self.frame_token_ids].float()

    def vocabulary_readout(self, logits: torch.Tensor) -> torch.Tensor:
        """Each frame as the LLM's token embeddings weighted by the frame's sharpened posterior (its top tokens)."""
        top, classes = logits.topk(min(READOUT_TOP_K, logits.shape[-1]), dim=-1)
        weights = (top / self.cfg.adapter.readout_temperature).softmax(-1)
        embeddings = self.llm.get_input_embeddings()(self.frame_tokens_of(classes))  # [B, N, k, H]
        return (weights.to(embeddings.dtype).unsqueeze(-1) * embeddings).sum(-2)

    @torch.no_grad()
    def frame_readout(self, batch: Batch, blank_penalty: float = 0.0) -> list[list[int]]:
        """What each clip's adapter frames say on their own, read as greedy CTC: every frame's most likely token
        through the LLM's final norm and head, repeats merged, the blank (the pad token) dropped. A word missing
        here was lost on the speech side (encoder, adapter); one present here but not in the hypothesis, by the
        LLM. `blank_penalty` is subtracted from the blank's logit first (a CTC decoding knob against deletions).
        One list of ids per clip, in `batch.input_features` order."""
        encoded = self._encode(batch.input_features, batch.feature_frames, need_logits=True)
        logits = encoded.logits
        if blank_penalty:
            logits = logits.clone()
            logits[..., self.frame_blank] -= blank_penalty
        readouts = []
        for row, n in zip(self.frame_tokens_of(logits.argmax(-1)).tolist(), encoded.lengths.tolist()):
            ids, previous = [], None
            for token in row[:n]:
                if token != previous and token != self.pad_token_id:
                    ids.append(token)
                previous = token
            readouts.append(ids)
        return readouts

    # ---------------------------------------------------------------- sequence assembly

    def assemble(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Builds inputs_embeds, attention_mask and labels: [prompt with audio spliced in] + [target]."""
        inputs, mask, labels, _ = self._assemble(batch)
        return inputs, mask, labels

    def _assemble(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """`assemble`, plus the encoded audio (for the auxiliary frame-level losses)."""
        embed = self.llm.get_input_embeddings()
        device = batch.prompt_ids[0].device if batch.prompt_ids else None
        has_audio = batch.audio_index
        encoded = self._encode(batch.input_features, batch.feature_frames, need_logits=self._frame_losses_due)
        audio, audio_lengths = encoded.audio, encoded.lengths
        # One embedding call for the whole batch: under ZeRO-3 every rank must run the same sequence of module
        # calls (parameter prefetching follows it), whatever its batch size.
        sequences = [torch.cat([p, t]) for p, t in zip(batch.prompt_ids, batch.target_ids)]
        all_embeds = embed(torch.cat(sequences)).split([len(s) for s in sequences])
        pieces, label_pieces = [], []
        for i, (prompt, target) in enumerate(zip(batch.prompt_ids, batch.target_ids)):
            emb = all_embeds[i]
            labels = torch.cat([torch.full_like(prompt, IGNORE), target])
            j = int(has_audio[i])
            if j >= 0:
                pos = (prompt == self.audio_token_id).nonzero()
                if len(pos) != 1:
                    raise ValueError(f"sample {i}: speech prompt must contain exactly one {AUDIO_TOKEN}")
                p = int(pos[0, 0])
                a = audio[j, : int(audio_lengths[j])]
                emb = torch.cat([emb[:p], a, emb[p + 1 :]])
                labels = torch.cat([labels[:p], torch.full((len(a),), IGNORE, device=labels.device), labels[p + 1 :]])
            pieces.append(emb)
            label_pieces.append(labels)
        width = max(len(p) for p in pieces)
        hidden = pieces[0].shape[-1]
        inputs = pieces[0].new_zeros(len(pieces), width, hidden)
        mask = torch.zeros(len(pieces), width, dtype=torch.long, device=device)
        labels = torch.full((len(pieces), width), IGNORE, dtype=torch.long, device=device)
        for i, (emb, lab) in enumerate(zip(pieces, label_pieces)):
            inputs[i, : len(emb)] = emb
            mask[i, : len(emb)] = 1
            labels[i, : len(lab)] = lab
        # Keeps every encoder/adapter parameter in the graph even when no sample in the batch has audio, so
        # all ranks reduce the same gradients under ZeRO (a rank skipping a module would hang the others).
        inputs = inputs + 0.0 * audio.sum()
        return inputs, mask, labels, encoded

    @property
    def _frame_losses_due(self) -> bool:
        return self.cfg.ctc_weight > 0 or (self.cfg.frame_weight > 0 and self.training)

    def forward(self, batch: Batch, lm_loss: bool = True) -> dict[str, torch.Tensor]:
        """The LM loss over the target tokens (mean per token), plus the configured frame-level losses.
        `lm_loss=False`: the frame loss alone; the LLM does not run (`loss_sum` and `tokens` are then 0)."""
        if not lm_loss:
            encoded = self._encode(batch.input_features, batch.feature_frames, need_logits=True)
            zero = encoded.logits.new_zeros(())
            out = {"loss": zero, "loss_sum": zero, "tokens": torch.zeros((), dtype=torch.long)}
            return self._add_frame_losses(out, encoded, batch)
        inputs, mask, labels, encoded = self._assemble(batch)
        base = self.base_llm
        hidden = base.get_decoder()(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        # The output head only where a target token is predicted: prompts and audio frames (most positions) need
        # no logits, which over a 152k vocabulary would be most of the step's memory.
        shift_labels = labels[:, 1:]
        scored = shift_labels != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][scored]).float()
        loss_sum = F.cross_entropy(logits, shift_labels[scored], reduction="sum")
        tokens = scored.sum()
        out = {"loss": loss_sum / tokens.clamp(min=1), "loss_sum": loss_sum, "tokens": tokens}
        return self._add_frame_losses(out, encoded, batch)

    def _add_frame_losses(self, out: dict[str, torch.Tensor], encoded: EncodedAudio,
                          batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.ctc_weight > 0:
            ctc = self.ctc_loss(encoded.frames, encoded.lengths, batch, logits=encoded.logits)
            out["ctc_loss"] = ctc.detach()
            out["loss"] = out["loss"] + self.cfg.ctc_weight * ctc
        if self.cfg.frame_weight > 0 and self.training:
            frame = self.frame_loss(encoded, batch)
            out["frame_loss"] = frame.detach()
            out["loss"] = out["loss"] + self.cfg.frame_weight * frame
        return out

    @property
    def llm_final_norm(self) -> nn.Module:
        """The norm the LLM applies to its last hidden state before the output head."""
        decoder = self.base_llm.get_decoder()
        for name in FINAL_NORM_NAMES:
            norm = getattr(decoder, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise ValueError(f"{type(decoder).__name__}: no final norm among {FINAL_NORM_NAMES} (needed by the CTC "
                         "loss: set model.ctc_weight: 0, or add the name to FINAL_NORM_NAMES)")

    def _transcribed_clips(self, batch: Batch) -> list[tuple[int, int]]:
        """(sample, clip row) of the batch's speech samples that have transcript tokens."""
        return [(i, j) for i, j in enumerate(batch.audio_index.tolist())
                if j >= 0 and batch.transcript_ids and len(batch.transcript_ids[i]) > 0]

    def ctc_loss(self, frames: torch.Tensor, lengths: torch.Tensor, batch: Batch,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
        """CTC of the adapter's frames, read through the LLM's final norm and output head (`frame_logits`, or
        `logits` when already computed), against each speech sample's transcript tokens; the pad token is the
        blank. Mean over transcript tokens (0 when there are none).

        The head is called on every batch, speech or not, so all ranks make the same module calls under ZeRO-3.
        """
        log_probs = (self.frame_logits(frames) if logits is None else logits).log_softmax(-1)
        clips = self._transcribed_clips(batch)
        rows = [j for _, j in clips]
        targets = [batch.transcript_ids[i] for i, _ in clips]
        if not rows:
            return log_probs.sum() * 0.0
        index = torch.tensor(rows, device=log_probs.device)
        loss = F.ctc_loss(
            log_probs[index].transpose(0, 1),
            self.frame_classes_of(torch.cat(targets).to(log_probs.device)),
            lengths[index],
            torch.tensor([len(t) for t in targets], device=log_probs.device),
            blank=self.frame_blank,
            reduction="sum",
            zero_infinity=True,  # a transcript longer than its frames cannot be aligned: no gradient, not inf
        )
        return loss / sum(len(t) for t in targets)

    def frame_loss(self, encoded: EncodedAudio, batch: Batch) -> torch.Tensor:
        """The adapter's frames (through the LLM's final norm and head) against the token timings of
        `frame_teacher`, over the valid frames of the clips with a transcript (0 when there are none).
        `model.frame_targets`: `centre` is the cross-entropy against one target per frame (each token at the frame
        of its span's centre, the pad token elsewhere: `whisper_align.frame_targets`); `span` lets each token
        appear anywhere in its span (`span_frame_loss` over `whisper_align.frame_owners`)."""
        if self.frame_teacher is None:
            raise RuntimeError("model.frame_weight > 0, but no frame_teacher is set (the trainer sets it)")
        assert encoded.logits is not None
        clips = self._transcribed_clips(batch)
        if not clips:
            return encoded.logits.sum() * 0.0
        rows = [j for _, j in clips]
        lengths = encoded.lengths[rows].tolist()
        timings = self.frame_teacher.timings(
            encoded.states[rows], encoded.state_lengths[rows].tolist(),
            [batch.transcript_ids[i].tolist() for i, _ in clips], [batch.meta[i].language for i, _ in clips])
        seconds_per_frame = WHISPER_SECONDS_PER_FRAME * self.cfg.adapter.downsample
        device = encoded.logits.device
        logits = torch.cat([encoded.logits[j, :n] for j, n in zip(rows, lengths)])
        blank = self.pad_token_id
        if self.cfg.frame_targets == "centre":
            target = [t for clip, n in zip(timings, lengths) for t in frame_targets(clip, n, seconds_per_frame, blank)]
            return F.cross_entropy(logits, self.frame_classes_of(torch.tensor(target, device=device)))
        tokens, owners, numbered = [], [], 0
        for clip, n in zip(timings, lengths):
            for owner in frame_owners(clip, n, seconds_per_frame):
                tokens.append(clip[owner].token_id if owner >= 0 else blank)
                owners.append(owner + numbered if owner >= 0 else -1)
            numbered += len(clip)
        return span_frame_loss(logits.log_softmax(-1), self.frame_classes_of(torch.tensor(tokens, device=device)),
                               torch.tensor(owners, device=device), self.frame_blank)

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self, batch: Batch, max_new_tokens: int = 96, num_beams: int = 1, synced_gpus: bool = False
    ) -> list[list[int]]:
        """Greedy or beam decoding of the prompts in `batch` (targets ignored); returns new token ids per sample.

        `synced_gpus` keeps ranks stepping together (needed under ZeRO-3, where each step gathers parameters).
        """
        prompt_only = dataclasses.replace(batch, target_ids=[t[:0] for t in batch.target_ids])
        inputs, mask, _ = self.assemble(prompt_only)
        # Left-pad: generation appends after the last position of every row.
        lengths = mask.sum(1)
        left = torch.zeros_like(inputs)
        left_mask = torch.zeros_like(mask)
        for i, n in enumerate(lengths.tolist()):
            left[i, inputs.shape[1] - n :] = inputs[i, :n]
            left_mask[i, inputs.shape[1] - n :] = 1
        with warnings.catch_warnings():
            # transformers warns on every call that these two penalties see only the new tokens when the prompt
            # comes as embeddings; that is what we want (counting the slot's tokens would forbid copying them).
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                    r"`inputs_embeds`")
            out = self.llm.generate(
                inputs_embeds=left,
                attention_mask=left_mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                synced_gpus=synced_gpus,
                **self.generation_settings(),
            )
        results = []
        for row in out.tolist():
            ids = []
            for t in row:
                if t == self.end_token_id:
                    break
                ids.append(t)
            results.append(ids)
        return results

    def generation_settings(self) -> dict:
        """What `generate` decodes with besides its inputs, beams and length (an exported model's
        generation_config.json holds the same: part/hf_export)."""
        return dict(
            do_sample=False,
            eos_token_id=[self.end_token_id],
            pad_token_id=self.pad_token_id,
            no_repeat_ngram_size=4,
            repetition_penalty=1.1,
            # A static -inf mask (SuppressTokensLogitsProcessor): the same on every step, beam and rank, so it
            # needs nothing special for beam search or synced_gpus.
            suppress_tokens=self.suppressed_token_ids,
        )

    # ---------------------------------------------------------------- save / load

    def save_pretrained(
        self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, state: dict | None = None
    ) -> None:
        """Writes model.safetensors (all weights, or `state` when given, e.g. gathered from ZeRO-3 partitions),
        part_model.json and the tokenizer: a directory `from_pretrained` loads."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:  # clones: tied weights (embeddings / lm_head) must not share memory in safetensors
            state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME))
        (out_dir / "part_model.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        tokenizer.save_pretrained(out_dir / "tokenizer")
        # The architectures (and the encoder's feature extractor), so the directory loads without the pretrained
        # directories it started from.
        self.encoder_family.save(self.encoder, out_dir / "encoder_config")
        self.base_llm.config.save_pretrained(out_dir / "llm_config")
        if self.frame_token_ids is not None:
            write_frame_vocabulary(out_dir / FRAME_VOCABULARY_FILE, self.frame_token_ids.tolist(),
                                   about={"source": self.cfg.frame_vocabulary})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> tuple[SpeechLLM, PreTrainedTokenizerBase]:
        path = Path(path)
        cfg = build_config(ModelConfig, json.loads((path / "part_model.json").read_text()), "model")
        tokenizer = load_tokenizer(str(path / "tokenizer"))
        model = cls(cfg, tokenizer, saved_configs=path)
        model.load_weights(path / WEIGHTS_NAME)
        return model, tokenizer

    def load_weights(self, file: str | Path) -> None:
        state = load_file(str(file))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{file}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )


def add_lora(llm: nn.Module, cfg: LoraConfig) -> nn.Module:
    """LoRA through peft. B starts at zero, so adding it does not change the LLM until a stage trains it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules
    )
    return get_peft_model(llm, peft_cfg)
