"""A PART Speech LLM for transformers: speech encoder -> adapter -> (vocabulary readout) -> the frames spliced into
the prompt at the audio placeholder -> decoder-only LLM.

Written by `python -m part export` next to the weights; plain torch/transformers code, loaded with
`AutoModel.from_pretrained(directory, trust_remote_code=True)`. It computes what the training code computes at
inference: every encoder masks the batch's padding (features, convolutions, the first GroupNorm's statistics,
attention), so a clip's frames do not depend on the clips batched with it, and `generate` decodes with the
training code's settings (generation_config.json: greedy, no_repeat_ngram_size, repetition_penalty, the
suppressed control tokens, stopping at the chat format's end-of-turn token), the prompt given as embeddings.
"""

from __future__ import annotations

import copy
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .configuration_part import PartSpeechLLMConfig

# (kernel, stride, padding) of Whisper's two convolutions over the log-mel frames
WHISPER_FRAME_CONVS = ((3, 1, 1), (3, 2, 1))
# Where decoder-only LLMs keep the norm before their output head (Llama/Qwen/Mistral/Gemma, OPT, GPT-2).
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")


# ---------------------------------------------------------------------------------------------------- adapter


class AdapterBlock(nn.Module):
    """Pre-norm transformer block over the downsampled frames; padded frames are masked out as keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.norm2(x))


class Adapter(nn.Module):
    """Strided-conv downsampling, then a small transformer (or MLP), projected to the LLM's width."""

    def __init__(self, settings: dict, in_dim: int, out_dim: int):
        super().__init__()
        self.downsample = settings["downsample"]
        hidden = settings["hidden"]
        self.conv = nn.Conv1d(in_dim, hidden, kernel_size=self.downsample, stride=self.downsample)
        if settings["kind"] == "transformer":
            self.body = nn.ModuleList(AdapterBlock(hidden, settings["heads"]) for _ in range(settings["layers"]))
        elif settings["kind"] == "mlp":
            self.body = nn.Sequential(nn.Linear(hidden, hidden * 2), nn.GELU(), nn.Linear(hidden * 2, hidden))
        else:
            raise ValueError(f"adapter.kind: transformer or mlp, not '{settings['kind']}'")
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        # ceil: a clip's last partial window counts
        return torch.div(lengths + self.downsample - 1, self.downsample, rounding_mode="floor").clamp(min=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(x, (0, 0, 0, (-x.shape[1]) % self.downsample))  # no frame dropped at the end
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        out_lengths = self.output_lengths(lengths)
        if isinstance(self.body, nn.ModuleList):
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]
            for block in self.body:
                x = block(x, valid)
        else:
            x = self.body(x)
        return self.proj(self.norm(x)), out_lengths


# ---------------------------------------------------------------------------------------------------- encoders


def conv_lengths(lengths: torch.Tensor, convs) -> torch.Tensor:
    """Valid output steps of a stack of convolutions ((kernel, stride, padding) each)."""
    for kernel, stride, padding in convs:
        lengths = (lengths + 2 * padding - kernel) // stride + 1
    return lengths


def _valid(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.arange(steps, device=lengths.device)[None] < lengths[:, None]


def _additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T]: 0 on valid keys, the dtype's minimum on padded ones."""
    mask = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=dtype, device=valid.device)
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min).expand(-1, -1, valid.shape[1], -1)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics, given `valid` ([batch, time]), cover each clip's valid steps only (the first
    convolution's norm of wav2vec2-style front ends); GroupNorm's own parameters."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            return super().forward(x)
        b, c, t = x.shape
        grouped = x.float().view(b, self.num_groups, c // self.num_groups, t)
        m = valid[:, None, None, :].float()
        count = m.sum(-1, keepdim=True) * (c // self.num_groups)
        mean = (grouped * m).sum((2, 3), keepdim=True) / count
        var = (((grouped - mean) * m) ** 2).sum((2, 3), keepdim=True) / count
        y = ((grouped - mean) / torch.sqrt(var + self.eps)).view(b, c, t).to(x.dtype)
        if self.affine:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        return y


def _wavlm_self_attention(self, hidden_states, attention_mask, gated_position_bias):
    """WavLM's attention through its projection modules: the same products, scaling, bias and key mask."""
    b, t, d = hidden_states.shape

    def heads(x):
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
    bias = gated_position_bias.view(b, self.num_heads, t, t)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), None


def build_encoder(config, attn_implementation: str) -> nn.Module:
    """The speech encoder of `config` (architecture only; weights come from the checkpoint)."""
    config = copy.deepcopy(config)
    kind = config.model_type
    config._attn_implementation = "eager" if kind == "wavlm" or attn_implementation == "eager" else "sdpa"
    if kind == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)
    model = MODEL_MAPPING[type(config)](config)
    if hasattr(model, "masked_spec_embed"):  # SpecAugment's mask embedding: not used
        del model.masked_spec_embed
    if kind in ("wav2vec2", "hubert", "wavlm"):
        for conv_layer in model.feature_extractor.conv_layers:
            if type(getattr(conv_layer, "layer_norm", None)) is nn.GroupNorm:
                conv_layer.layer_norm.__class__ = MaskedGroupNorm
    if kind == "wavlm":
        for layer in model.encoder.layers:
            layer.attention.torch_multi_head_self_attention = types.MethodType(_wavlm_self_attention,
                                                                               layer.attention)
    return model


def encoder_frame_lengths(config, lengths: torch.Tensor) -> torch.Tensor:
    """Encoder frames for `lengths` valid feature steps (mel frames, samples or stacked fbank frames)."""
    if config.model_type == "whisper":
        return conv_lengths(lengths, WHISPER_FRAME_CONVS)
    if config.model_type == "wav2vec2-bert":
        return lengths
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        lengths = conv_lengths(lengths, ((kernel, stride, 0),)).clamp(min=1)
    return lengths


def encode_whisper(enc, features, frames):
    """features: [B, mel bins, T] log-mel; frames: [B] valid mel frames."""
    valid_mel = _valid(frames, features.shape[-1])[:, None]
    x = F.gelu(enc.conv1(features * valid_mel)) * valid_mel
    x = F.gelu(enc.conv2(x)).transpose(1, 2)
    if x.shape[1] > enc.config.max_source_positions:
        raise ValueError(f"audio of {features.shape[-1]} mel frames exceeds the encoder's window")
    lengths = conv_lengths(frames, WHISPER_FRAME_CONVS)
    valid = _valid(lengths, x.shape[1])
    x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))
    mask = _additive_mask(valid, x.dtype)
    for layer in enc.layers:
        x = layer(x, mask)
    return enc.layer_norm(x) * valid[..., None], lengths


def encode_wav2vec2(model, wave, lengths):
    """wav2vec2, HuBERT, WavLM. wave: [B, samples]; lengths: [B] valid samples."""
    config = model.config
    x = (wave * _valid(lengths, wave.shape[-1]))[:, None]
    n = lengths
    for conv_layer, kernel, stride in zip(model.feature_extractor.conv_layers, config.conv_kernel,
                                          config.conv_stride):
        n = conv_lengths(n, ((kernel, stride, 0),)).clamp(min=1)
        if isinstance(getattr(conv_layer, "layer_norm", None), MaskedGroupNorm):
            x = conv_layer.conv(x)
            x = conv_layer.activation(conv_layer.layer_norm(x, _valid(n, x.shape[-1])))
        else:
            x = conv_layer(x)
    x = x.transpose(1, 2)
    valid = _valid(n, x.shape[1])
    x = model.feature_projection(x)
    x = x[0] if isinstance(x, tuple) else x
    x = x * valid[..., None]
    enc = model.encoder
    stable = config.do_stable_layer_norm
    x = x + enc.pos_conv_embed(x)
    if not stable:
        x = enc.layer_norm(x)
    x = enc.dropout(x)
    if config.model_type == "wavlm":
        mask, position_bias = valid.long(), None
        for layer in enc.layers:
            x, position_bias = layer(x, mask, position_bias)
    else:
        mask = _additive_mask(valid, x.dtype)
        for layer in enc.layers:
            x = layer(x, mask)
    if stable:
        x = enc.layer_norm(x)
    return x * valid[..., None], n


def encode_w2v_bert(model, features, lengths):
    """w2v-BERT 2.0. features: [B, frames, 160] stacked fbank; lengths: [B] valid frames."""
    valid = _valid(lengths, features.shape[1])
    x = model.feature_projection(features)[0] * valid[..., None]
    enc = model.encoder
    mask = _additive_mask(valid, x.dtype)
    x = enc.dropout(x)
    positions = enc.embed_positions(x) if enc.embed_positions is not None else None
    for layer in enc.layers:
        x = layer(x, mask, positions, valid)
    return x * valid[..., None], lengths


ENCODE = {"whisper": encode_whisper, "wav2vec2": encode_wav2vec2, "hubert": encode_wav2vec2,
          "wavlm": encode_wav2vec2, "wav2vec2-bert": encode_w2v_bert}


# ---------------------------------------------------------------------------------------------------- the model


class PartSpeechLLMPreTrainedModel(PreTrainedModel):
    config_class = PartSpeechLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True


class PartSpeechLLMForConditionalGeneration(PartSpeechLLMPreTrainedModel, GenerationMixin):
    """`encoder`, `adapter` and `llm` (the causal LM, LoRA merged) under the training code's parameter names.

    Inputs (what the processor makes): `input_ids` and `attention_mask` of the prompts, each holding the audio
    placeholder once (either padding side); `input_features` and `feature_lengths` of the clips, one per prompt,
    in the same order."""

    def __init__(self, config: PartSpeechLLMConfig):
        super().__init__(config)
        attn = config._attn_implementation or "sdpa"
        self.encoder = build_encoder(config.encoder_config, attn)
        self.llm = AutoModelForCausalLM.from_config(config.llm_config)
        width = config.encoder_config.d_model if config.encoder_config.model_type == "whisper" \
            else config.encoder_config.hidden_size
        self.adapter = Adapter(config.adapter, width, config.llm_config.hidden_size)
        if config.frame_vocabulary_size:  # class -> token id of the vocabulary readout
            self.register_buffer("frame_token_ids", torch.zeros(config.frame_vocabulary_size, dtype=torch.long))
        else:
            self.frame_token_ids = None
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint
        pass

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    # ---------------------------------------------------------------- audio

    def audio_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """How many frames the LLM reads for clips of `feature_lengths` valid feature steps: the number of
        positions the audio placeholder expands to."""
        return self.adapter.output_lengths(encoder_frame_lengths(self.config.encoder_config, feature_lengths))

    def encode_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor):
        """What the LLM reads in the audio slot, [B, N, LLM width], and the valid frames of each clip [B]."""
        features = input_features.to(self.dtype)
        states, state_lengths = ENCODE[self.config.encoder_config.model_type](self.encoder, features,
                                                                               feature_lengths)
        frames, lengths = self.adapter(states, state_lengths)
        if self.config.adapter["readout"] == "vocabulary":
            frames = self.vocabulary_readout(self.frame_logits(frames))
        return frames, lengths

    def _final_norm(self) -> nn.Module:
        decoder = self.llm.get_decoder()
        for name in FINAL_NORM_NAMES:
            norm = getattr(decoder, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise ValueError(f"{type(decoder).__name__}: no final norm among {FINAL_NORM_NAMES}")

    def frame_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames read as the LLM reads its last hidden state (final norm, output head), over the frame
        vocabulary's classes (the whole vocabulary without one)."""
        hidden = self._final_norm()(frames)
        embeddings, head = self.llm.get_input_embeddings(), self.llm.get_output_embeddings()
        if self.frame_token_ids is None:
            return head(hidden).float()
        if type(embeddings) is nn.Embedding and head.weight is embeddings.weight and getattr(head, "bias",
                                                                                             None) is None:
            return (hidden @ embeddings(self.frame_token_ids).T).float()
        return head(hidden)[..., self.frame_token_ids].float()

    def vocabulary_readout(self, logits: torch.Tensor) -> torch.Tensor:
        """Each frame as the LLM's token embeddings weighted by its sharpened posterior over its top tokens."""
        settings = self.config.adapter
        top, classes = logits.topk(min(settings["readout_top_k"], logits.shape[-1]), dim=-1)
        weights = (top / settings["readout_temperature"]).softmax(-1)
        tokens = classes if self.frame_token_ids is None else self.frame_token_ids[classes]
        embeddings = self.llm.get_input_embeddings()(tokens)
        return (weights.to(embeddings.dtype).unsqueeze(-1) * embeddings).sum(-2)

    # ---------------------------------------------------------------- prompts

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     input_features: torch.Tensor | None = None,
                     feature_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' token embeddings with each clip's frames in place of its placeholder, left-padded:
        (inputs_embeds [B, T, H], attention_mask [B, T])."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        audio = lengths = None
        if input_features is not None:
            if feature_lengths is None:
                raise ValueError("input_features need feature_lengths (the processor gives both)")
            audio, lengths = self.encode_audio(input_features, feature_lengths)
            if len(audio) != len(input_ids):
                raise ValueError(f"{len(audio)} clips for {len(input_ids)} prompts: one clip per prompt")
        embed = self.llm.get_input_embeddings()
        rows = []
        for i in range(len(input_ids)):
            ids = input_ids[i][attention_mask[i].bool()]
            emb = embed(ids)
            at = (ids == self.config.audio_token_id).nonzero()
            if audio is not None:
                if len(at) != 1:
                    raise ValueError(f"prompt {i}: a prompt with audio holds the audio placeholder exactly once "
                                     f"(found {len(at)})")
                p = int(at[0, 0])
                emb = torch.cat([emb[:p], audio[i, : int(lengths[i])].to(emb.dtype), emb[p + 1 :]])
            elif len(at):
                raise ValueError(f"prompt {i} holds the audio placeholder, but no input_features were given")
            rows.append(emb)
        width = max(len(r) for r in rows)
        inputs = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
        for i, row in enumerate(rows):
            inputs[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
        return inputs, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, feature_lengths: torch.Tensor | None = None, **kwargs):
        """The LLM over the assembled (left-padded) sequences: its output, logits for every position."""
        inputs, mask = self.embed_inputs(input_ids, attention_mask, input_features, feature_lengths)
        return self.llm(inputs_embeds=inputs, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 input_features: torch.Tensor | None = None, feature_lengths: torch.Tensor | None = None,
                 generation_config=None, **kwargs) -> torch.Tensor:
        """The new tokens of each prompt, [B, new tokens]: generation_config.json's settings (greedy, the
        training code's penalties and suppressed tokens, eos at the end-of-turn token), overridable by keyword
        (e.g. max_new_tokens, num_beams). Rows that stop early are padded with the pad token after their eos.
        The penalties see the generated tokens only (the prompt is given as embeddings)."""
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)  # what is not a generation setting goes to the LLM
        penalty = generation_config.repetition_penalty
        if penalty is not None and penalty != 1.0:
            # transformers' own penalty, given the prompt as embeddings, skips as many generated tokens of a row as
            # the row has left padding: applied here to every generated token instead
            generation_config.repetition_penalty = 1.0
            processors = model_kwargs.pop("logits_processor", None) or LogitsProcessorList()
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
            model_kwargs["logits_processor"] = processors
        inputs, mask = self.embed_inputs(input_ids, attention_mask, input_features, feature_lengths)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                    r"`inputs_embeds`")
            return self.llm.generate(inputs_embeds=inputs, attention_mask=mask, generation_config=generation_config,
                                     **model_kwargs)
