"""Speech LLM: a speech encoder (Whisper, wav2vec2/HuBERT/WavLM or w2v-BERT 2.0: part/model/encoders.py), a
downsampling adapter and a decoder-only LLM.

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
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from part.config import EncoderConfig, LoraConfig, ModelConfig, build_config
from part.model.adapter import Adapter
from part.model.encoders import AudioFeatures, EncoderFamily, encoder_family, family_for
from part.model.groups import EncoderLayout
from part.model.tokenizer import load_tokenizer, suppressed_token_ids
from part.prompts import AUDIO_TOKEN, PromptFormat

if TYPE_CHECKING:
    from part.data.batching import Batch  # the collator's output is the model's input

IGNORE = -100
WEIGHTS_NAME = "model.safetensors"
# Where decoder-only LLMs in transformers keep the norm before their output head: Llama/Qwen/Mistral/Gemma,
# OPT (and the Whisper-decoder stand-in), GPT-2.
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")


def build_encoder(cfg: EncoderConfig, weights: bool = True, attn_implementation: str = "sdpa") -> nn.Module:
    """The encoder `cfg` names: its pretrained directory's family and weights (with `weights=False`, its
    architecture only), or a fresh Whisper-style one from the config (part/model/encoders.py)."""
    return family_for(cfg).build(weights=weights and bool(cfg.pretrained), attn_implementation=attn_implementation)


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
        """Variable-length encoding (no padding to Whisper's 30 s), then the adapter.

        features: the batch's padded features as `audio_features` makes them; frames: [B] valid steps of each.
        Returns [B, N, H] and valid lengths [B]. Padding is masked, so a clip encodes to the same embeddings alone
        or batched with longer clips.
        """
        recompute = self.cfg.activation_checkpointing.encoder and self.training and torch.is_grad_enabled()
        x, lengths = self.encoder_family.encode(self.encoder, features, frames, recompute)
        return self.adapter(x, lengths)

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
        if self.cfg.ctc_weight > 0:
            ctc = self.ctc_loss(audio, audio_lengths, batch)
            out["ctc_loss"] = ctc.detach()
            out["loss"] = out["loss"] + self.cfg.ctc_weight * ctc
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

    def ctc_loss(self, audio: torch.Tensor, audio_lengths: torch.Tensor, batch: Batch) -> torch.Tensor:
        """CTC of the adapter's frames, read through the LLM's final norm and output head, against each speech sample's
        transcript tokens; the pad token is the blank. Mean over transcript tokens (0 when there are none).

        The head is called on every batch, speech or not, so all ranks make the same module calls under ZeRO-3.
        """
        # The head reads the LLM's final norm's output, as it does for the LM loss: without it the frames'
        # logits scale with the adapter's output norm (token-embedding scale, ~1), and the adapter has to grow
        # its weights many-fold before any frame can be classified sharply (measured: docs/issue13_stage1_4lang.md).
        log_probs = self.llm.get_output_embeddings()(self.llm_final_norm(audio)).float().log_softmax(-1)
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
        # The architectures (and the encoder's feature extractor), so the directory loads without the pretrained
        # directories it started from.
        self.encoder_family.save(self.encoder, out_dir / "encoder_config")
        self.base_llm.config.save_pretrained(out_dir / "llm_config")

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
