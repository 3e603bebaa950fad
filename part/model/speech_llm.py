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
from part.model.groups import EncoderLayout
from part.model.tokenizer import load_tokenizer, suppressed_token_ids
from part.prompts import AUDIO_TOKEN, PromptFormat

if TYPE_CHECKING:
    from part.batch import Batch  # the collator's output is the model's input

IGNORE = -100
WEIGHTS_NAME = "model.safetensors"
OBJECTIVES_DIR = "objectives"  # a saved model's files of its objectives (Objective.save)
# Where decoder-only LLMs in transformers keep the norm before their output head: Llama/Qwen/Mistral/Gemma,
# OPT (and the Whisper-decoder stand-in), GPT-2.
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")


@dataclasses.dataclass
class EncodedAudio:
    """A batch's clips through the encoder and the adapter."""

    states: torch.Tensor  # [clips, encoder frames, encoder width]: the encoder's outputs
    state_lengths: torch.Tensor  # [clips]
    frames: torch.Tensor  # [clips, frames, LLM width]: the adapter's outputs
    lengths: torch.Tensor  # [clips] valid adapter frames
    audio: torch.Tensor  # what the LLM reads in the audio slot (the frames, unless an objective reads them anew)
    cache: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the objectives' own tensors


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
        # Auxiliary objectives on the adapter's frames (model.alignment), built for this model; none by default.
        self.objectives = nn.ModuleList()
        if cfg.alignment is not None:
            from part.objectives import build_objectives

            saved = saved_configs / OBJECTIVES_DIR if saved_configs is not None else None
            self.objectives.extend(build_objectives(cfg, self, tokenizer, saved))

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
        """Variable-length encoding (no padding to Whisper's 30 s), then the adapter: what the LLM reads.

        features: the batch's padded features as `audio_features` makes them; frames: [B] valid steps of each.
        Returns [B, N, H] and valid lengths [B]. Padding is masked, so a clip encodes to the same embeddings alone
        or batched with longer clips.
        """
        encoded = self.encode(features, frames)
        return encoded.audio, encoded.lengths

    def encode(self, features: torch.Tensor, frames: torch.Tensor) -> EncodedAudio:
        """`encode_audio` with the encoder's outputs and the adapter's frames beside what the LLM reads."""
        recompute = self.cfg.activation_checkpointing.encoder and self.training and torch.is_grad_enabled()
        states, state_lengths = self.encoder_family.encode(self.encoder, features, frames, recompute)
        adapted, lengths = self.adapter(states, state_lengths)
        encoded = EncodedAudio(states, state_lengths, adapted, lengths, audio=adapted)
        for objective in self.objectives:
            encoded.audio = objective.read(self, encoded)
        return encoded

    # ---------------------------------------------------------------- sequence assembly

    def assemble(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Builds inputs_embeds, attention_mask and labels: [prompt with audio spliced in] + [target]."""
        inputs, mask, labels, _ = self._assemble(batch)
        return inputs, mask, labels

    def _assemble(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """`assemble`, plus the encoded audio (for the objectives' losses)."""
        embed = self.llm.get_input_embeddings()
        device = batch.prompt_ids[0].device if batch.prompt_ids else None
        has_audio = batch.audio_index
        encoded = self.encode(batch.input_features, batch.feature_frames)
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

    def forward(self, batch: Batch, lm_loss: bool = True) -> dict[str, torch.Tensor]:
        """The LM loss over the target tokens (mean per token), plus the objectives' weighted losses (each also
        under its own name). `lm_loss=False`: the objectives' losses alone; the LLM does not run (`loss_sum` and
        `tokens` are then 0)."""
        if lm_loss:
            inputs, mask, labels, encoded = self._assemble(batch)
            out = self.lm_loss(inputs, mask, labels)
        else:
            encoded = self.encode(batch.input_features, batch.feature_frames)
            zero = encoded.frames.new_zeros((), dtype=torch.float32)
            out = {"loss": zero, "loss_sum": zero, "tokens": torch.zeros((), dtype=torch.long)}
        for objective in self.objectives:
            for name, (weight, value) in objective.losses(self, encoded, batch).items():
                out[name] = value.detach()
                out["loss"] = out["loss"] + weight * value
        return out

    def lm_loss(self, inputs: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The LLM over the assembled sequences; cross-entropy summed over the target tokens, and its mean."""
        base = self.base_llm
        hidden = base.get_decoder()(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        # The output head only where a target token is predicted: prompts and audio frames (most positions) need
        # no logits, which over a 152k vocabulary would be most of the step's memory.
        shift_labels = labels[:, 1:]
        scored = shift_labels != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][scored]).float()
        loss_sum = F.cross_entropy(logits, shift_labels[scored], reduction="sum")
        tokens = scored.sum()
        return {"loss": loss_sum / tokens.clamp(min=1), "loss_sum": loss_sum, "tokens": tokens}

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The names of the objectives' losses `forward` returns in the current mode (training or not)."""
        return tuple(name for objective in self.objectives for name in objective.loss_names(self.training))

    @property
    def llm_final_norm(self) -> nn.Module:
        """The norm the LLM applies to its last hidden state before the output head."""
        decoder = self.base_llm.get_decoder()
        for name in FINAL_NORM_NAMES:
            norm = getattr(decoder, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise ValueError(f"{type(decoder).__name__}: no final norm among {FINAL_NORM_NAMES} (the frame objectives "
                         "read the frames through it: remove model.alignment, or add the name to FINAL_NORM_NAMES)")

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
        for objective in self.objectives:
            objective.save(out_dir / OBJECTIVES_DIR)

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
