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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from part.config import EncoderConfig, LoraConfig, ModelConfig, build_config
from part.embeddings import embedding_rows
from part.model.adapter import Adapter
from part.model.encoders import AudioFeatures, EncoderFamily, encoder_family, family_for
from part.model.groups import EncoderLayout
from part.model.tokenizer import load_tokenizer, suppressed_token_ids
from part.model.weight_sources import (
    SOURCES_NAME,
    PretrainedPart,
    WeightSource,
    read_sources,
    verify,
    write_sources,
)
from part.packing import ClipPositions, LayoutSpec, with_layouts
from part.prompts import AUDIO_TOKEN, PromptFormat

if TYPE_CHECKING:
    from part.batch import Batch, SequenceLayout  # the collator's output is the model's input

WEIGHTS_NAME = "model.safetensors"
OBJECTIVES_DIR = "objectives"  # a saved model's files of its objectives (Objective.save)
# Where decoder-only LLMs in transformers keep the norm before their output head: Llama/Qwen/Mistral/Gemma,
# OPT (and the Whisper-decoder stand-in), GPT-2.
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")
SUPPRESSED_LOGIT = -1.0e4  # the training logit of the tokens generation never emits


@dataclasses.dataclass
class EncodedAudio:
    """A batch's clips through the encoder and the adapter."""

    states: torch.Tensor  # [clips, encoder frames, encoder width]: the encoder's outputs
    state_lengths: torch.Tensor  # [clips]
    frames: torch.Tensor  # [clips, frames, LLM width]: the adapter's outputs
    lengths: torch.Tensor  # [clips] valid adapter frames
    audio: torch.Tensor  # what the LLM reads in the audio slot (the frames, unless an objective reads them anew)
    # [clips, frames] bool: the slot positions whose `audio` the LLM reads; the others are holes it neither attends
    # to nor counts in its positions (an objective that shortens what the slot says sets it). None: every one.
    kept: torch.Tensor | None = None
    cache: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the objectives' own tensors


def build_encoder(cfg: EncoderConfig, weights: bool = True, attn_implementation: str = "sdpa") -> nn.Module:
    """The encoder `cfg` names: its pretrained directory's family and weights (with `weights=False`, its
    architecture only), or a fresh Whisper-style one from the config (part/model/encoders.py)."""
    return family_for(cfg).build(weights=weights and bool(cfg.pretrained), attn_implementation=attn_implementation)


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, saved_configs: Path | None = None,
                 *, weights: bool = True):
        """Loads the pretrained encoder and LLM named in `cfg`. With `saved_configs` (a directory written by
        `save_pretrained`) they are built from their saved configs instead, for weights loaded afterwards
        (`load_weights`), except a module whose weights the directory references (part/model/weight_sources.py):
        that one is read from its pretrained directory, once its files' digests are checked (SourceError
        otherwise). With `weights=False`, from the pretrained directories' configs, without reading any weights."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer_size = len(tokenizer)
        attn = cfg.attn_implementation
        # The weights the saved model references instead of holding: load_weights expects exactly these missing.
        self.weight_sources: list[WeightSource] = []
        # The encoder's family (from its config.json's model_type) builds it, computes its features and encodes.
        if saved_configs is not None:
            self.weight_sources = read_sources(saved_configs)
            for source in self.weight_sources:
                verify(source)
            sources = {source.module: source.directory for source in self.weight_sources}
            self.encoder_family: EncoderFamily = encoder_family(saved_configs / "encoder_config")
            if "encoder" in sources:
                self.encoder = encoder_family(sources["encoder"]).build(weights=True, attn_implementation=attn)
            else:
                self.encoder = self.encoder_family.build(weights=False, attn_implementation=attn)
            if "llm" in sources:
                llm = AutoModelForCausalLM.from_pretrained(sources["llm"], dtype=torch.float32,
                                                           attn_implementation=attn)
            else:
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
        self.lora_runs = False
        self.run_lora(False)  # B starts at zero: LoRA adds nothing until a stage trains it
        self.adapter = Adapter(cfg.adapter, self.encoder_family.width, llm.config.hidden_size)
        if cfg.adapter.init_from_embeddings and weights and saved_configs is None:
            # what the LLM reads for a token: the module's output, which a scaled embedding (Gemma) multiplies
            self.adapter.init_from_embeddings(embedding_rows(llm.get_input_embeddings(), len(tokenizer)))
        self.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        # The LLM's chat template (ChatML without one): how prompts are written and the token that ends a turn.
        self.prompt_format = PromptFormat.from_tokenizer(tokenizer)
        self.end_token_id = tokenizer.convert_tokens_to_ids(self.prompt_format.end_token)
        self.pad_token_id = tokenizer.pad_token_id
        self.suppressed_token_ids = suppressed_token_ids(tokenizer, self.prompt_format)
        # The loss scores over the tokens generation may emit: a pretrained vocabulary's unused special tokens can
        # lie next to the end token (Gemma's thousands of <unused*> rows), and a softmax over all of them could not
        # single it out, while generation, which never emits them, needs it first among the rest.
        self.register_buffer("suppressed_ids", torch.tensor(self.suppressed_token_ids, dtype=torch.long),
                             persistent=False)
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

    def run_lora(self, active: bool) -> None:
        """Whether the LLM's LoRA adapters run. While they are zero (never trained) they add exactly nothing, so
        leaving them out changes no number and saves two products per adapted projection. Enabling them marks
        their weights trainable (peft's rule): set the stage's trainable groups afterwards."""
        if self.cfg.llm.lora is None:
            return
        if active:
            self.llm.base_model.enable_adapter_layers()
        else:
            self.llm.base_model.disable_adapter_layers()
        self.lora_runs = active

    def lora_is_zero(self) -> bool:
        """Whether every LoRA up-projection (B) is zero, so the adapters add nothing. Reads the weights: call it on
        host weights, not on a ZeRO-3 partitioned model."""
        return all(not p.any() for n, p in self.llm.named_parameters() if "lora_B" in n)

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

    def encode(self, features: torch.Tensor, frames: torch.Tensor,
               segments: torch.Tensor | None = None) -> EncodedAudio:
        """`encode_audio` with the encoder's outputs and the adapter's frames beside what the LLM reads. With
        `segments` (Batch.audio_segments), the features hold clips packed into rows, and so do the outputs."""
        recompute = self.cfg.activation_checkpointing.encoder and self.training and torch.is_grad_enabled()
        if segments is not None:
            if self.objectives:
                raise ValueError("clips packed into rows (data.audio_row_seconds) reach the LLM only: the frame "
                                 "objectives (model.alignment) read a row per clip")
            states, clip_of = self.encoder_family.encode_rows(self.encoder, features, segments, recompute)
            adapted, _ = self.adapter.forward_rows(states, clip_of)
            state_lengths = self.encoder_family.output_lengths(frames)
            return EncodedAudio(states, state_lengths, adapted, self.adapter.output_lengths(state_lengths),
                                audio=adapted)
        states, state_lengths = self.encoder_family.encode(self.encoder, features, frames, recompute)
        adapted, lengths = self.adapter(states, state_lengths)
        encoded = EncodedAudio(states, state_lengths, adapted, lengths, audio=adapted)
        for objective in self.objectives:
            encoded.audio = objective.read(self, encoded)
        return encoded

    # ---------------------------------------------------------------- sequence assembly

    def layout_spec(self, packed: bool = True, length_multiple: int = 16, row_tokens: int = 0) -> LayoutSpec:
        """How this model's input is laid out (part/packing.py): what the collator needs to know of it. Varlen
        flash attention takes a whole packed batch as one row; the masked kernels get rows of at least
        `row_tokens` positions (0: as long as the batch's longest sample), whose attention grows with their
        length."""
        one_row = self.cfg.attn_implementation == "flash_attention_2"
        positions = ClipPositions(tuple(self.encoder_family.frame_convs), self.cfg.adapter.downsample)
        return LayoutSpec(self.audio_token_id, self.pad_token_id if self.pad_token_id is not None else 0, positions,
                          packed=packed, length_multiple=length_multiple,
                          row_tokens=(1 << 40) if one_row else row_tokens)

    def layout_of(self, batch: Batch, prompts: bool = False) -> SequenceLayout:
        """The batch's training layout (or its prompts' generation layout), as the collator computed it; a batch
        still on the host without one (built by hand) gets it here."""
        layout = batch.prompt_layout if prompts else batch.layout
        if layout is not None:
            return layout
        if batch.audio_index.device.type != "cpu":  # reading the ids back from the device would stall it
            raise ValueError(f"a batch on {batch.audio_index.device} has no sequence layout: collate it with the "
                             "model's layout_spec (part/packing.py), which lays it out on the host")
        built = with_layouts(batch, self.layout_spec())
        return built.prompt_layout if prompts else built.layout

    def embed(self, layout: SequenceLayout, encoded: EncodedAudio) -> torch.Tensor:
        """[rows, length, width] input embeddings: the layout's tokens, with the clips' frames scattered into their
        slots. One embedding call for the whole batch: under ZeRO-3 every rank must run the same sequence of
        module calls (parameter prefetching follows it), whatever its batch."""
        embeds = self.llm.get_input_embeddings()(layout.token_ids)
        rows, length, width = embeds.shape
        audio = encoded.audio
        frames = audio.reshape(-1, width).index_select(0, layout.audio_clips * audio.shape[1] + layout.audio_frames)
        embeds = embeds.reshape(rows * length, width).index_copy(0, layout.audio_slots, frames.to(embeds.dtype))
        # Keeps every encoder/adapter parameter in the graph even when no sample in the batch has audio, so
        # all ranks reduce the same gradients under ZeRO (a rank skipping a module would hang the others).
        return embeds.view(rows, length, width) + 0.0 * audio.sum()

    def attended(self, layout: SequenceLayout, encoded: EncodedAudio) -> torch.Tensor | None:
        """[rows, length] bool: False at the slot positions the LLM skips (`EncodedAudio.kept`); None when it reads
        every position. Built on the device."""
        if encoded.kept is None:
            return None
        kept = encoded.kept.reshape(-1).index_select(0, layout.audio_clips * encoded.kept.shape[1]
                                                    + layout.audio_frames)
        rows, length = layout.segments.shape
        attended = torch.ones(rows * length, dtype=torch.bool, device=kept.device)
        return attended.index_copy(0, layout.audio_slots, kept).view(rows, length)

    def attention_inputs(self, layout: SequenceLayout, attended: torch.Tensor | None = None) -> dict:
        """What the LLM's decoder needs besides the embeddings so that each sample attends only to itself, from
        position 0: nothing where each row is one sample from its first column (causal attention alone is exact
        for right padding, and takes the kernels' fast path), varlen lengths for flash attention, else a
        block-causal mask built on the device. `attended` (see `attended`): the holes are masked as keys and each
        sample's positions count only the rest."""
        if not layout.shared_rows and attended is None:
            return {}
        if self.cfg.attn_implementation == "flash_attention_2":
            if attended is not None:
                raise ValueError("flash_attention_2's varlen packing cannot skip slot positions: use sdpa or eager")
            return dict(position_ids=layout.position_ids, cu_seq_lens_q=layout.cu_seqlens,
                        cu_seq_lens_k=layout.cu_seqlens, max_length_q=layout.max_seqlen,
                        max_length_k=layout.max_seqlen)
        segments = layout.segments
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
        mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # padding attends to padding
        positions = layout.position_ids
        if attended is not None:
            mask = mask & attended[:, None, None, :]
            positions = positions_skipping(positions, attended)
        masks = {"full_attention": mask}
        if window := self.sliding_window:  # those layers see only the last `window` positions (Gemma 2/3)
            masks["sliding_attention"] = mask & torch.ones_like(causal).triu(1 - window)
        if self.cfg.attn_implementation == "eager":  # additive masks
            dtype = self.llm.get_input_embeddings().weight.dtype
            masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                     for kind, m in masks.items()}
        # A model with sliding-window layers takes a mask per kind of layer (given one, it applies it to all)
        return dict(attention_mask=masks if len(masks) > 1 else masks["full_attention"], position_ids=positions)

    @property
    def sliding_window(self) -> int | None:
        """The window of the LLM's sliding-window attention layers; None when it has none."""
        config = self.base_llm.config
        if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
            return None
        return getattr(config, "sliding_window", None)

    def assemble(self, batch: Batch) -> tuple[torch.Tensor, SequenceLayout]:
        """The input embeddings of the batch's training layout, and the layout."""
        layout = self.layout_of(batch)
        return self.embed(layout, self.encode(batch.input_features, batch.feature_frames, batch.audio_segments)), layout

    def forward(self, batch: Batch, lm_loss: bool = True) -> dict[str, torch.Tensor]:
        """The LM loss over the target tokens (mean per token), plus the objectives' weighted losses (each also
        under its own name); `tokens` (an int) counts the target tokens. `lm_loss=False`: the objectives' losses
        alone; the LLM does not run (`loss_sum` and `tokens` are then 0)."""
        encoded = self.encode(batch.input_features, batch.feature_frames, batch.audio_segments)
        if lm_loss:
            layout = self.layout_of(batch)
            out = self.lm_loss(self.embed(layout, encoded), layout, self.attended(layout, encoded))
        else:
            zero = encoded.frames.new_zeros((), dtype=torch.float32)
            out = {"loss": zero, "loss_sum": zero, "tokens": 0}
        for objective in self.objectives:
            for name, (weight, value) in objective.losses(self, encoded, batch).items():
                out[name] = value.detach()
                out["loss"] = out["loss"] + weight * value
        return out

    def lm_loss(self, inputs: torch.Tensor, layout: SequenceLayout,
                attended: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The LLM over the laid-out sequences (skipping the slot positions `attended` leaves out); cross-entropy
        summed over the target tokens, and its mean."""
        loss_sum = F.cross_entropy(self.target_logits(inputs, layout, attended), layout.targets, reduction="sum")
        tokens = layout.target_tokens
        return {"loss": loss_sum / max(tokens, 1), "loss_sum": loss_sum, "tokens": tokens}

    def target_logits(self, inputs: torch.Tensor, layout: SequenceLayout,
                      attended: torch.Tensor | None = None) -> torch.Tensor:
        """[target tokens, vocabulary] fp32: the LLM's scores for each target token of the laid-out sequences, the
        tokens generation never emits at SUPPRESSED_LOGIT."""
        base = self.base_llm
        hidden = base.get_decoder()(inputs_embeds=inputs, use_cache=False,
                                    **self.attention_inputs(layout, attended)).last_hidden_state
        # The output head only where a target token is predicted: prompts and audio frames (most positions) need
        # no logits, which over a 152k vocabulary would be most of the step's memory.
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.scored)
        logits = base.get_output_embeddings()(scored).float()
        # finite: a target among them (a special token's text in a transcript) costs much, but the step stays finite
        return logits.index_fill(1, self.suppressed_ids, SUPPRESSED_LOGIT)

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
        layout = self.layout_of(batch, prompts=True)  # left-aligned: generation appends after every row's end
        encoded = self.encode(batch.input_features, batch.feature_frames, batch.audio_segments)
        inputs = self.embed(layout, encoded)
        mask = layout.segments >= 0
        if (attended := self.attended(layout, encoded)) is not None:
            mask = mask & attended  # generate counts positions over the mask: the holes take none
        mask = mask.long()
        settings = self.generation_settings()
        with warnings.catch_warnings():
            # transformers warns on every call that these two penalties see only the new tokens when the prompt
            # comes as embeddings; that is what we want (counting the slot's tokens would forbid copying them).
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                    r"`inputs_embeds`")
            out = self.llm.generate(
                inputs_embeds=inputs,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                synced_gpus=synced_gpus,
                logits_processor=new_token_penalty(settings.pop("repetition_penalty")),
                **settings,
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

    def pretrained_parts(self) -> list[PretrainedPart]:
        """The state-dict keys a fresh build reads from the pretrained directories named in the config: the whole
        encoder (when it has one), the LLM but its LoRA adapters and, when the tokenizer made them grow, its
        embeddings and output head (their new rows are not the directory's). A directory that is not there now
        counts as no source: its weights are then saved."""
        keys = list(self.state_dict().keys())
        parts = []
        encoder_dir = self.cfg.encoder.pretrained
        if encoder_dir and (Path(encoder_dir) / "config.json").is_file():
            parts.append(PretrainedPart("encoder", encoder_dir, frozenset(k for k in keys if k.startswith("encoder."))))
        llm_dir = self.cfg.llm.pretrained
        if llm_dir and (Path(llm_dir) / "config.json").is_file():
            grown = set()
            if self.tokenizer_size > AutoConfig.from_pretrained(llm_dir).vocab_size:
                heads = {id(m.weight) for m in (self.llm.get_input_embeddings(), self.llm.get_output_embeddings())
                         if m is not None}
                grown = {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in heads}
            parts.append(PretrainedPart("llm", llm_dir, frozenset(
                k for k in keys if k.startswith("llm.") and "lora_" not in k and k not in grown)))
        return parts

    def save_pretrained(
        self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, state: dict | None = None,
        sources: Sequence[WeightSource] = (),
    ) -> None:
        """Writes model.safetensors (all weights, or `state` when given, e.g. gathered from ZeRO-3 partitions),
        part_model.json and the tokenizer: a directory `from_pretrained` loads. `sources`: the weights `state`
        leaves out, referenced in their pretrained directories (weight_sources.json)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:  # clones: tied weights (embeddings / lm_head) must not share memory in safetensors
            state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME))
        if sources:
            write_sources(out_dir, sources)
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
        """A directory `save_pretrained` wrote; the weights it references are read from their pretrained
        directories, whose digests are checked first (SourceError)."""
        path = Path(path)
        cfg = build_config(ModelConfig, json.loads((path / "part_model.json").read_text()), "model")
        tokenizer = load_tokenizer(str(path / "tokenizer"))
        model = cls(cfg, tokenizer, saved_configs=path)
        model.load_weights(path / WEIGHTS_NAME)
        return model, tokenizer

    def load_weights(self, file: str | Path) -> None:
        """The saved weights over the model; the keys the file lacks must be exactly those its directory
        references (already read from their sources when the model was built)."""
        state = load_file(str(file))
        missing, unexpected = self.load_state_dict(state, strict=False)
        referenced = {key for source in self.weight_sources for key in source.keys}
        absent = sorted(set(missing) - referenced)  # neither in the file nor in a source
        doubled = sorted(referenced - set(missing))  # in the file and referenced: the directory contradicts itself
        if absent or unexpected or doubled:
            raise ValueError(
                f"{file}: weights do not match the model (missing {absent[:5]}, unexpected {unexpected[:5]}, "
                f"in the file although {SOURCES_NAME} references them {doubled[:5]})"
            )
        self.run_lora(not self.lora_is_zero())


def new_token_penalty(penalty: float):
    """The repetition penalty over the generated tokens, as a logits processor. transformers' own, given the prompt
    as embeddings, skips as many generated tokens of a row as the row has padding positions before its prompt (it
    takes them for the prompt's), so a left-padded row would go unpenalised for its first tokens."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else [])


def positions_skipping(positions: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Each position within its sample counted over the attended positions only: `positions` [rows, length] from 0
    at each sample's start (SequenceLayout.position_ids), `attended` [rows, length] bool."""
    holes = (~attended).long()
    before = holes.cumsum(-1) - holes  # holes before each position in its row
    column = torch.arange(positions.shape[1], device=positions.device)
    start = (column - positions).clamp(min=0)  # the column where the position's sample starts
    return positions - (before - before.gather(1, start))


def add_lora(llm: nn.Module, cfg: LoraConfig) -> nn.Module:
    """LoRA through peft. B starts at zero, so adding it does not change the LLM until a stage trains it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules
    )
    return get_peft_model(llm, peft_cfg)
