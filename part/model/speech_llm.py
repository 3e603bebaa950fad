"""Speech LLM: a Whisper-style encoder, a downsampling adapter and a decoder-only LLM.

The adapter's outputs replace the audio placeholder in the prompt's token embeddings; the loss covers only
the target tokens. Nothing here knows about distribution: ZeRO-3 gathers parameters through module hooks,
so every parameter is reached through a module call, never read directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from part.config import EncoderConfig, LoraConfig, ModelConfig, build_config
from part.model.adapter import Adapter
from part.model.tokenizer import load_tokenizer, suppressed_token_ids
from part.prompts import AUDIO_TOKEN, PromptFormat

if TYPE_CHECKING:
    from part.data.batching import Batch  # the collator's output is the model's input

IGNORE = -100
WEIGHTS_NAME = "model.safetensors"


def encoder_attention(attn_implementation: str) -> str:
    """The encoder's kernel for the model's `attn_implementation`: its additive padding mask needs sdpa or eager."""
    return "eager" if attn_implementation == "eager" else "sdpa"


def _encoder_from_config(config: WhisperConfig, attn_implementation: str) -> WhisperEncoder:
    config._attn_implementation = encoder_attention(attn_implementation)
    return WhisperEncoder(config)


def build_encoder(cfg: EncoderConfig, weights: bool = True, attn_implementation: str = "sdpa") -> WhisperEncoder:
    """A pretrained Whisper encoder (`from_pretrained` of a local directory; with `weights=False`, its architecture
    only) or a fresh one from the config."""
    if cfg.pretrained and not weights:
        return _encoder_from_config(WhisperConfig.from_pretrained(cfg.pretrained), attn_implementation)
    if cfg.pretrained:
        whisper = WhisperModel.from_pretrained(cfg.pretrained, dtype=torch.float32,
                                               attn_implementation=encoder_attention(attn_implementation))
        encoder = whisper.get_encoder()
        del whisper  # the decoder is not needed
        return encoder
    config = WhisperConfig(
        d_model=cfg.d_model,
        encoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim,
        num_mel_bins=cfg.num_mel_bins,
        decoder_layers=1,
        decoder_attention_heads=cfg.heads,
        decoder_ffn_dim=cfg.ffn_dim,
        max_source_positions=1500,
        dropout=0.0,
        encoder_layerdrop=0.0,
    )
    return _encoder_from_config(config, attn_implementation)


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, saved_configs: Path | None = None,
                 *, weights: bool = True):
        """Loads the pretrained encoder and LLM named in `cfg`. With `saved_configs` (a directory written by
        `save_pretrained`) they are built from their saved configs instead, for weights loaded afterwards; with
        `weights=False`, from the pretrained directories' configs, without reading any weights."""
        super().__init__()
        self.cfg = cfg
        attn = cfg.attn_implementation
        if saved_configs is not None:
            self.encoder = _encoder_from_config(WhisperConfig.from_pretrained(saved_configs / "encoder_config"), attn)
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved_configs / "llm_config"),
                                                   attn_implementation=attn)
        elif weights:
            self.encoder = build_encoder(cfg.encoder, attn_implementation=attn)
            llm = AutoModelForCausalLM.from_pretrained(cfg.llm.pretrained, dtype=torch.float32,
                                                       attn_implementation=attn)
        else:
            self.encoder = build_encoder(cfg.encoder, weights=False, attn_implementation=attn)
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.llm.pretrained),
                                                   attn_implementation=attn)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        if cfg.activation_checkpointing.llm:  # non-reentrant: the LLM's own inputs (embeddings) may need no grad
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.llm.lora is not None:
            llm = add_lora(llm, cfg.llm.lora)
        self.llm = llm
        self.adapter = Adapter(cfg.adapter, self.encoder.config.d_model, llm.config.hidden_size)
        if cfg.adapter.init_from_embeddings and weights and saved_configs is None:
            self.adapter.init_from_embeddings(llm.get_input_embeddings().weight[: len(tokenizer)])
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        # The LLM's chat template (ChatML without one): how prompts are written and the token that ends a turn.
        self.prompt_format = PromptFormat.from_tokenizer(tokenizer)
        self.end_token_id = tokenizer.convert_tokens_to_ids(self.prompt_format.end_token)
        self.pad_token_id = tokenizer.pad_token_id
        self.suppressed_token_ids = suppressed_token_ids(tokenizer, self.prompt_format)

    @classmethod
    def skeleton(cls, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> SpeechLLM:
        """The architecture alone, on the meta device (no memory, no weights read). Its parameter names are the
        real model's, so `train.py --check` resolves the stages' trainable groups against it."""
        with torch.device("meta"):
            return cls(cfg, tokenizer, weights=False)

    # ---------------------------------------------------------------- audio path

    def encode_audio(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Variable-length Whisper encoding (no padding to 30 s), then the adapter.

        features: [B, n_mels, T] log-mel; frames: [B] valid mel frames. Returns [B, N, H] and valid lengths [B].
        """
        enc = self.encoder
        # Padding is masked everywhere (features, conv outputs, attention keys, outputs), so a clip encodes to
        # the same embeddings alone or batched with longer clips.
        valid_mel = (torch.arange(features.shape[-1], device=features.device)[None] < frames[:, None])[:, None]
        x = F.gelu(enc.conv1(features * valid_mel)) * valid_mel
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        if x.shape[1] > enc.config.max_source_positions:
            raise ValueError(f"audio of {features.shape[-1]} mel frames exceeds the encoder's 30 s window")
        enc_lengths = torch.div(frames + 1, 2, rounding_mode="floor")  # conv2 has stride 2
        valid = torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]
        x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))
        mask = torch.zeros(x.shape[0], 1, 1, x.shape[1], dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(x.dtype).min).expand(-1, -1, x.shape[1], -1)
        recompute = self.cfg.activation_checkpointing.encoder and self.training and torch.is_grad_enabled()
        for layer in enc.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False) if recompute else layer(x, mask)
        x = enc.layer_norm(x) * valid[..., None]
        return self.adapter(x, enc_lengths)

    # ---------------------------------------------------------------- sequence assembly

    def assemble(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Builds inputs_embeds, attention_mask and labels: [prompt with audio spliced in] + [target]."""
        inputs, mask, labels, _, _ = self._assemble(batch)
        return inputs, mask, labels

    def _assemble(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """`assemble`, plus the adapter's outputs and their lengths (for the auxiliary CTC loss)."""
        embed = self.llm.get_input_embeddings()
        device = batch.prompt_ids[0].device if batch.prompt_ids else None
        has_audio = batch.audio_index
        audio, audio_lengths = self.encode_audio(batch.input_features, batch.feature_frames)
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
        return inputs, mask, labels, audio, audio_lengths

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs, mask, labels, audio, audio_lengths = self._assemble(batch)
        base = self.llm.get_base_model() if self.cfg.llm.lora is not None else self.llm
        hidden = base.get_decoder()(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        # The output head only where a target token is predicted: prompts and audio frames (most positions) need
        # no logits, which over a 152k vocabulary would be most of the step's memory.
        shift_labels = labels[:, 1:]
        scored = shift_labels != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][scored]).float()
        loss_sum = F.cross_entropy(logits, shift_labels[scored], reduction="sum")
        tokens = scored.sum()
        out = {"loss": loss_sum / tokens.clamp(min=1), "loss_sum": loss_sum, "tokens": tokens}
        if self.cfg.ctc_weight > 0:
            ctc = self.ctc_loss(audio, audio_lengths, batch)
            out["ctc_loss"] = ctc.detach()
            out["loss"] = out["loss"] + self.cfg.ctc_weight * ctc
        return out

    def ctc_loss(self, audio: torch.Tensor, audio_lengths: torch.Tensor, batch: Batch) -> torch.Tensor:
        """CTC of the adapter's frames, read through the LLM's output head, against each speech sample's
        transcript tokens; the pad token is the blank. Mean over transcript tokens (0 when there are none).

        The head is called on every batch, speech or not, so all ranks make the same module calls under ZeRO-3.
        """
        log_probs = self.llm.get_output_embeddings()(audio).float().log_softmax(-1)
        rows, targets = [], []
        for i, j in enumerate(batch.audio_index.tolist()):
            ids = batch.transcript_ids[i] if batch.transcript_ids else None
            if j >= 0 and ids is not None and len(ids) > 0:
                rows.append(j)
                targets.append(ids)
        if not rows:
            return log_probs.sum() * 0.0
        index = torch.tensor(rows, device=log_probs.device)
        loss = F.ctc_loss(
            log_probs[index].transpose(0, 1),
            torch.cat(targets),
            audio_lengths[index],
            torch.tensor([len(t) for t in targets], device=log_probs.device),
            blank=self.pad_token_id,
            reduction="sum",
            zero_infinity=True,  # a transcript longer than its frames cannot be aligned: no gradient, not inf
        )
        return loss / sum(len(t) for t in targets)

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
        out = self.llm.generate(
            inputs_embeds=left,
            attention_mask=left_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=[self.end_token_id],
            pad_token_id=self.pad_token_id,
            no_repeat_ngram_size=4,
            repetition_penalty=1.1,
            # A static -inf mask (SuppressTokensLogitsProcessor): the same on every step, beam and rank, so it
            # needs nothing special for beam search or synced_gpus.
            suppress_tokens=self.suppressed_token_ids,
            synced_gpus=synced_gpus,
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
        # The architectures, so the directory loads without the pretrained directories it started from.
        self.encoder.config.save_pretrained(out_dir / "encoder_config")
        base = self.llm.get_base_model() if self.cfg.llm.lora is not None else self.llm
        base.config.save_pretrained(out_dir / "llm_config")

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
