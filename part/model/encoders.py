"""Speech encoder families: which encoder a directory holds, and everything that depends on it.

The family is chosen from the directory's config.json `model_type`:

| family   | model_type       | features (its `AudioFeatures`)                  | front end                      |
|----------|------------------|-------------------------------------------------|--------------------------------|
| whisper  | whisper          | log-mel, 10 ms hop                              | two convolutions, stride 2     |
| wav2vec2 | wav2vec2, hubert | the raw 16 kHz waveform, normalised per clip    | CNN feature encoder, x320      |
| wavlm    | wavlm            | the raw 16 kHz waveform                         | the same (+ gated rel. bias)   |
| w2v-bert | wav2vec2-bert    | SeamlessM4T fbank (10 ms hop), 2 frames stacked | a linear projection            |

All of them give 50 encoder frames per second.

A family owns, and nothing else knows: building its encoder (`from_pretrained` of the directory, or from the
config alone: a checkpoint's saved architecture, the meta-device skeleton of `train.py --check`), its feature
extractor (an `AudioFeatures` of part/features.py, the one owner of feature computation, which the data pipeline
is handed and calls),
encoding a padded batch, the frame counts its convolutions give, its layers and their parameter names (the
`encoder.top.N` / `encoder.layers.N` groups), per-layer activation checkpointing, and the shapes the FLOP and
memory estimates read.

Padding does not change a clip's encoding: features are computed per clip (wav2vec2's normalisation and the
fbank's per-bin normalisation would otherwise see the batch's padding), padded frames are zeroed before every
operation that mixes frames (convolutions, the first conv layer's GroupNorm, whose statistics are taken over the
valid frames only) and masked out of attention, so a clip encodes to the same frames alone or batched with longer
ones (tests/unit/test_encoders.py). One exception is kept as it always was, so that Whisper's numbers do not
change: its log-mel extractor runs on the padded batch, and a clip's last mel frame, whose centred 25 ms window
reaches past the clip's end when the clip ends less than 40 samples after a 10 ms hop boundary, reads the batch's
zero padding there instead of the clip's own reflection (a difference of ~1e-2 in that one frame).

The encoder's forward is written out here from the transformers modules' own layers, because their model
forwards do things a ZeRO-3 run cannot have or that depend on the batch: SpecAugment (`masked_spec_embed` is
dropped), LayerDrop (a rank skipping a layer would stall the others), a GroupNorm over padding. Every weight is
used through a module call (ZeRO-3 gathers parameters in module hooks): WavLM's attention, which reads its
projections' weights directly, is replaced by the same computation through its projection modules. The models'
own downsampling adapters (`add_adapter`) are not supported: the Speech LLM's adapter does that.
"""

from __future__ import annotations

import copy
import types
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from part.features import (
    MAX_CLIP_SECONDS,
    SAMPLE_RATE,
    AudioFeatures,
    FbankFeatures,
    LogMelFeatures,
    WaveformFeatures,
)
from part.model.groups import EncoderLayout

# (kernel, stride, padding) of Whisper's two convolutions over the log-mel frames
WHISPER_FRAME_CONVS: tuple[tuple[int, int, int], ...] = ((3, 1, 1), (3, 2, 1))


class EncoderError(ValueError):
    """An encoder directory this code cannot use; the message names it and says why."""


def encoder_attention(attn_implementation: str) -> str:
    """The encoder's kernel for the model's `attn_implementation`: its additive padding mask needs sdpa or eager."""
    return "eager" if attn_implementation == "eager" else "sdpa"


def conv_lengths(lengths, convs: Sequence[tuple[int, int, int]]):
    """Valid output steps of a stack of convolutions ((kernel, stride, padding) each) for `lengths` valid input
    steps (ints or an integer tensor): an output step is valid when its whole window is."""
    for kernel, stride, padding in convs:
        lengths = (lengths + 2 * padding - kernel) // stride + 1
    return lengths


# ---------------------------------------------------------------------------------------------------- modules


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics, given `valid` ([batch, time] bool), cover each clip's valid time steps only.
    wav2vec2-style feature encoders (`feat_extract_norm: group`) normalise their first convolution's output over
    the whole clip, so without the mask a clip's features would change with the padding after it. The parameters
    are GroupNorm's own (same names, same checkpoints)."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            return super().forward(x)
        b, c, t = x.shape
        grouped = x.float().view(b, self.num_groups, c // self.num_groups, t)  # statistics in fp32, as GroupNorm's
        m = valid[:, None, None, :].float()
        count = m.sum(-1, keepdim=True) * (c // self.num_groups)
        mean = (grouped * m).sum((2, 3), keepdim=True) / count
        var = (((grouped - mean) * m) ** 2).sum((2, 3), keepdim=True) / count
        y = ((grouped - mean) / torch.sqrt(var + self.eps)).view(b, c, t).to(x.dtype)
        if self.affine:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        return y


def _wavlm_self_attention(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                          gated_position_bias: torch.Tensor) -> tuple[torch.Tensor, None]:
    """WavLMAttention's attention (transformers passes its projection weights to F.multi_head_attention_forward,
    which ZeRO-3's hooks miss), through the projection modules: the same products, scaling, bias and mask."""
    b, t, d = hidden_states.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    q, k, v = (heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
    bias = gated_position_bias.view(b, self.num_heads, t, t)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), None


def _additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive attention mask: 0 on valid keys, the dtype's minimum on padded ones."""
    mask = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=dtype, device=valid.device)
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min).expand(-1, -1, valid.shape[1], -1)


def _run_layer(layer: nn.Module, recompute: bool, *args):
    """One encoder layer; with `recompute`, its activations are recomputed in backward (activation checkpointing)."""
    return checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)


def _valid(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.arange(steps, device=lengths.device)[None] < lengths[:, None]


# ---------------------------------------------------------------------------------------------------- families


class EncoderFamily(ABC):
    """One encoder architecture family, bound to an encoder's config (and the directory it came from, if any)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    frames_per_second: ClassVar[float] = 50.0  # encoder frames per second of audio (every family here)

    def __init__(self, config, directory: str | Path | None = None):
        self.config = config
        self.directory = directory
        self.check()

    def check(self) -> None:  # noqa: B027 (most families accept every config of theirs)
        """Raises EncoderError for a config of this family that the code cannot run."""

    # ---- building

    def build(self, weights: bool = True, attn_implementation: str = "sdpa") -> nn.Module:
        """The encoder: the directory's pretrained weights (`from_pretrained`), or with `weights=False` its
        architecture only (random init; on the meta device when built under `torch.device("meta")`)."""
        attn = self.attention(attn_implementation)
        if weights:
            if self.directory is None:
                raise EncoderError("a pretrained encoder needs its directory")
            encoder = self._from_pretrained(attn)
        else:
            config = copy.deepcopy(self.config)
            config._attn_implementation = attn
            encoder = self._from_config(config)
        return self._prepare(encoder)

    def attention(self, attn_implementation: str) -> str:
        return encoder_attention(attn_implementation)

    @abstractmethod
    def _from_pretrained(self, attn: str) -> nn.Module: ...

    @abstractmethod
    def _from_config(self, config) -> nn.Module: ...

    def _prepare(self, encoder: nn.Module) -> nn.Module:
        return encoder

    @cached_property
    def features(self) -> AudioFeatures:
        """The family's feature extractor: the directory's preprocessor_config.json when it has one, else the
        extractor's defaults for this config."""
        return self._features()

    @abstractmethod
    def _features(self) -> AudioFeatures: ...

    def _saved_extractor(self, extractor_class):
        if self.directory is not None and (Path(self.directory) / "preprocessor_config.json").is_file():
            return extractor_class.from_pretrained(str(self.directory))
        return None

    def save(self, encoder: nn.Module, directory: str | Path) -> None:
        """The encoder's config (and, where it has settings, the feature extractor's) for `encoder_family`."""
        encoder.config.save_pretrained(directory)
        self.features.save(directory)

    # ---- shapes

    @property
    @abstractmethod
    def width(self) -> int:
        """The encoder's output width."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def layers(self, encoder: nn.Module) -> nn.ModuleList: ...

    @abstractmethod
    def layout(self) -> EncoderLayout:
        """Its parts' parameter names inside the Speech LLM (whose encoder attribute is `encoder`)."""

    @property
    @abstractmethod
    def frame_convs(self) -> tuple[tuple[int, int, int], ...]:
        """(kernel, stride, padding) of the convolutions between the features' time steps and encoder frames."""

    def output_lengths(self, lengths):
        """Encoder frames for `lengths` valid feature steps (ints or a tensor)."""
        return conv_lengths(lengths, self.frame_convs)

    @property
    def max_seconds(self) -> float:
        """The longest clip it encodes."""
        return MAX_CLIP_SECONDS

    def cost_shapes(self) -> dict:
        """The encoder's part of `part.model.flops.Shapes`."""
        c = self.config
        return dict(n_mels=0, enc_dim=self.width, enc_layers=self.num_layers, enc_ffn=c.intermediate_size,
                    enc_convs=self.frame_convs, enc_frames_per_second=self.frames_per_second)

    # ---- encoding

    reads_rows: ClassVar[bool] = False  # encode_rows: clips packed into rows

    def encode_rows(self, encoder: nn.Module, features: torch.Tensor, segments: torch.Tensor,
                    recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips packed into rows (Batch.audio_segments): the frames per row and each frame's clip."""
        raise ValueError(f"the {self.name} encoder cannot read clips packed into rows (data.audio_row_seconds): "
                         "only Whisper encoders can")

    @abstractmethod
    def encode(self, encoder: nn.Module, features: torch.Tensor, lengths: torch.Tensor,
               recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, frames, width] with padded frames zeroed, valid frames [B]) of a padded batch of features with
        `lengths` valid steps each. `recompute`: activation checkpointing, layer by layer."""


class WhisperFamily(EncoderFamily):
    name = "whisper"
    model_types = ("whisper",)
    reads_rows = True

    @classmethod
    def fresh(cls, cfg) -> WhisperFamily:
        """A randomly initialised Whisper-style encoder described by `model.encoder` (EncoderConfig)."""
        from transformers import WhisperConfig

        return cls(WhisperConfig(
            d_model=cfg.d_model, encoder_layers=cfg.layers, encoder_attention_heads=cfg.heads,
            encoder_ffn_dim=cfg.ffn_dim, num_mel_bins=cfg.num_mel_bins, decoder_layers=1,
            decoder_attention_heads=cfg.heads, decoder_ffn_dim=cfg.ffn_dim, max_source_positions=1500, dropout=0.0,
            encoder_layerdrop=0.0,
        ))

    def _from_pretrained(self, attn):
        from transformers import WhisperModel

        whisper = WhisperModel.from_pretrained(self.directory, dtype=torch.float32, attn_implementation=attn)
        encoder = whisper.get_encoder()
        del whisper  # the decoder is not needed
        return encoder

    def _from_config(self, config):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)

    def _features(self):
        from transformers import WhisperFeatureExtractor

        return LogMelFeatures(WhisperFeatureExtractor(feature_size=self.config.num_mel_bins))

    def save(self, encoder, directory):
        encoder.config.save_pretrained(directory)  # the extractor follows from num_mel_bins

    @property
    def width(self):
        return self.config.d_model

    @property
    def num_layers(self):
        return self.config.encoder_layers

    def layers(self, encoder):
        return encoder.layers

    def layout(self):
        return EncoderLayout(self.num_layers)

    @property
    def frame_convs(self):
        return WHISPER_FRAME_CONVS

    @property
    def max_seconds(self):
        """Its positional window: max_source_positions frames of 2 mel frames (30 s)."""
        return 2 * self.config.max_source_positions * LogMelFeatures.HOP / SAMPLE_RATE

    def cost_shapes(self):
        c = self.config
        return dict(n_mels=c.num_mel_bins, enc_dim=c.d_model, enc_layers=c.encoder_layers, enc_ffn=c.encoder_ffn_dim)

    def encode(self, enc, features, frames, recompute=False):
        """Variable-length Whisper encoding (no padding to 30 s). features: [B, n_mels, T] log-mel; frames: [B]."""
        # Padding is masked everywhere (features, conv outputs, attention keys, outputs), so a clip encodes to
        # the same embeddings alone or batched with longer clips.
        valid_mel = (torch.arange(features.shape[-1], device=features.device)[None] < frames[:, None])[:, None]
        x = F.gelu(enc.conv1(features * valid_mel)) * valid_mel
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        if x.shape[1] > enc.config.max_source_positions:
            raise ValueError(f"audio of {features.shape[-1]} mel frames exceeds the encoder's 30 s window")
        enc_lengths = self.output_lengths(frames)  # conv2 has stride 2
        valid = _valid(enc_lengths, x.shape[1])
        x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))
        mask = _additive_mask(valid, x.dtype)
        for layer in enc.layers:
            x = _run_layer(layer, recompute, x, mask)
        return enc.layer_norm(x) * valid[..., None], enc_lengths

    def encode_rows(self, enc, features, segments, recompute=False):
        """Whisper encoding of clips packed into rows (`clip_rows` places them), each clip's frames as it encodes
        alone. features: [R, n_mels, T] log-mel; segments: [R, T] the clip index of each feature step (-1: none).
        Returns the frames [R, T/2, width] and each frame's clip index [R, T/2] (-1: none)."""
        # A clip starts at an even step with an empty step after it, so the convolutions read zeros at its edges
        # and the stride-2 conv's frames fall on the clip's own grid; positions restart at every clip, and
        # attention stays within it.
        valid_mel = (segments >= 0)[:, None]
        x = F.gelu(enc.conv1(features * valid_mel)) * valid_mel
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        clip_of = segments[:, ::2][:, : x.shape[1]]  # frame j reads steps 2j-1..2j+1; it belongs to step 2j's clip
        index = torch.arange(clip_of.shape[1], device=clip_of.device).expand_as(clip_of)
        starts = torch.ones_like(clip_of, dtype=torch.bool)
        starts[:, 1:] = clip_of[:, 1:] != clip_of[:, :-1]
        positions = index - torch.where(starts, index, 0).cummax(1).values
        x = x + enc.embed_positions.weight[positions.clamp(max=enc.config.max_source_positions - 1)]
        same = clip_of[:, :, None] == clip_of[:, None, :]
        mask = torch.zeros(same.shape, dtype=x.dtype, device=x.device).masked_fill(~same, torch.finfo(x.dtype).min)
        mask = mask[:, None]
        for layer in enc.layers:
            x = _run_layer(layer, recompute, x, mask)
        return enc.layer_norm(x) * (clip_of >= 0)[..., None], clip_of


class HiddenStatesFamily(EncoderFamily):
    """What the wav2vec2-style transformers encoders (wav2vec2, HuBERT, WavLM, w2v-BERT 2.0) share: their width and
    depth config names, their layers under `encoder.layers`, and SpecAugment's mask embedding, unused here."""

    @property
    def width(self):
        return self.config.hidden_size

    @property
    def num_layers(self):
        return self.config.num_hidden_layers

    def layers(self, model):
        return model.encoder.layers

    def _prepare(self, model):
        if hasattr(model, "masked_spec_embed"):  # SpecAugment's mask embedding: not used here
            del model.masked_spec_embed
        return model


class Wav2Vec2Family(HiddenStatesFamily):
    """wav2vec2 and HuBERT: CNN feature encoder over the waveform, convolutional position embedding, transformer
    layers (post-norm, or pre-norm with a final norm: `do_stable_layer_norm`)."""

    name = "wav2vec2"
    model_types = ("wav2vec2", "hubert")

    def check(self):
        c = self.config
        if getattr(c, "add_adapter", False):
            raise EncoderError(f"{self.model_type} with its own adapter (add_adapter: true) is not supported: the "
                               "Speech LLM's adapter downsamples; use the checkpoint without it")
        if getattr(c, "conv_pos_batch_norm", False):
            raise EncoderError("HuBERT with a batch-normalised position convolution (conv_pos_batch_norm) is not "
                               "supported: its training-mode statistics would mix clips and padding")

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def _model_class(self):
        from transformers import HubertModel, Wav2Vec2Model, WavLMModel

        return {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "wavlm": WavLMModel}[self.model_type]

    def _from_pretrained(self, attn):
        return self._model_class().from_pretrained(self.directory, dtype=torch.float32, attn_implementation=attn)

    def _from_config(self, config):
        return self._model_class()(config)

    def _prepare(self, model):
        model = super()._prepare(model)
        for conv_layer in model.feature_extractor.conv_layers:
            norm = getattr(conv_layer, "layer_norm", None)
            if type(norm) is nn.GroupNorm:
                norm.__class__ = MaskedGroupNorm
        return model

    def _features(self):
        from transformers import Wav2Vec2FeatureExtractor

        extractor = self._saved_extractor(Wav2Vec2FeatureExtractor) or Wav2Vec2FeatureExtractor()
        if extractor.feature_size != 1 or extractor.sampling_rate != SAMPLE_RATE:
            raise EncoderError(f"{self.directory}: the feature extractor must read 16 kHz mono waveforms "
                               f"(feature_size {extractor.feature_size}, sampling_rate {extractor.sampling_rate})")
        return WaveformFeatures(extractor)

    def layout(self):
        stable = self.config.do_stable_layer_norm  # pre-norm layers, the encoder's layer_norm on top of them
        norm = ("encoder.encoder.layer_norm",)
        return EncoderLayout(self.num_layers, "encoder.encoder.layers", top=norm if stable else (),
                             front=("encoder.feature_extractor", "encoder.feature_projection",
                                    "encoder.encoder.pos_conv_embed") + (() if stable else norm))

    @property
    def frame_convs(self):
        c = self.config
        return tuple((k, s, 0) for k, s in zip(c.conv_kernel, c.conv_stride))

    def cost_shapes(self):
        """Approximate: the CNN's convolutions, the projection and the position convolution per encoder frame
        (norms and activations left out, as everywhere in part.model.flops); for memory, the CNN's outputs (its
        convolution, norm and activation outputs: about 3 per step and channel) per encoder frame."""
        c = self.config
        front, elements, steps = 0.0, 0, 1
        dims = [1, *c.conv_dim]
        for i in reversed(range(len(c.conv_kernel))):  # layer i runs `steps` times per encoder frame
            front += 2 * steps * dims[i] * c.conv_kernel[i] * dims[i + 1]
            elements += 3 * steps * dims[i + 1]
            steps *= c.conv_stride[i]
        front += 2 * c.conv_dim[-1] * c.hidden_size
        front += 2 * c.hidden_size * (c.hidden_size // c.num_conv_pos_embedding_groups) * c.num_conv_pos_embeddings
        return super().cost_shapes() | dict(enc_front_flops=front, enc_front_elements=elements)

    def encode(self, model, wave, lengths, recompute=False):
        """wave: [B, samples] (padded); lengths: [B] valid samples."""
        x = (wave * _valid(lengths, wave.shape[-1]))[:, None]
        n = lengths
        for conv_layer, conv in zip(model.feature_extractor.conv_layers, self.frame_convs):
            n = conv_lengths(n, (conv,)).clamp(min=1)
            if isinstance(getattr(conv_layer, "layer_norm", None), MaskedGroupNorm):
                x = conv_layer.conv(x)  # normalised over the valid steps only
                x = conv_layer.activation(conv_layer.layer_norm(x, _valid(n, x.shape[-1])))
            else:  # per-step norms (or none): valid outputs read valid inputs only
                x = conv_layer(x)
        x = x.transpose(1, 2)
        valid = _valid(n, x.shape[1])
        x = model.feature_projection(x)
        x = x[0] if isinstance(x, tuple) else x  # wav2vec2/WavLM also return the normed input
        x = x * valid[..., None]  # the position convolution must read zeros beyond the clip, as alone
        enc = model.encoder
        stable = self.config.do_stable_layer_norm
        x = x + enc.pos_conv_embed(x)
        if not stable:
            x = enc.layer_norm(x)
        x = self._layers(enc.layers, enc.dropout(x), valid, recompute)
        if stable:
            x = enc.layer_norm(x)
        return x * valid[..., None], n

    def _layers(self, layers: nn.ModuleList, x: torch.Tensor, valid: torch.Tensor, recompute: bool) -> torch.Tensor:
        mask = _additive_mask(valid, x.dtype)
        for layer in layers:
            x = _run_layer(layer, recompute, x, mask)
        return x


class WavLMFamily(Wav2Vec2Family):
    """WavLM: wav2vec2's front end and layers, with a gated relative position bias (made by layer 0, passed up)."""

    name = "wavlm"
    model_types = ("wavlm",)

    def attention(self, attn_implementation):
        return "eager"  # transformers runs WavLM's attention itself (no sdpa option); here: _wavlm_self_attention

    def _prepare(self, model):
        model = super()._prepare(model)
        for layer in model.encoder.layers:
            layer.attention.torch_multi_head_self_attention = types.MethodType(_wavlm_self_attention, layer.attention)
        return model

    def _layers(self, layers, x, valid, recompute):
        mask, position_bias = valid.long(), None
        for layer in layers:
            x, position_bias = _run_layer(layer, recompute, x, mask, position_bias)
        return x


class W2vBertFamily(HiddenStatesFamily):
    """w2v-BERT 2.0 (`wav2vec2-bert`): stacked fbank frames, a linear projection, Conformer layers (relative
    position attention, a causal depthwise convolution module)."""

    name = "w2v-bert"
    model_types = ("wav2vec2-bert",)

    def check(self):
        c = self.config
        if c.add_adapter or c.use_intermediate_ffn_before_adapter:
            raise EncoderError("wav2vec2-bert with its own adapter (add_adapter / use_intermediate_ffn_before_adapter)"
                               " is not supported: the Speech LLM's adapter downsamples; use the base checkpoint")

    def _from_pretrained(self, attn):
        from transformers import Wav2Vec2BertModel

        return Wav2Vec2BertModel.from_pretrained(self.directory, dtype=torch.float32, attn_implementation=attn)

    def _from_config(self, config):
        from transformers import Wav2Vec2BertModel

        return Wav2Vec2BertModel(config)

    def _features(self):
        from transformers import SeamlessM4TFeatureExtractor

        dim = self.config.feature_projection_input_dim
        extractor = self._saved_extractor(SeamlessM4TFeatureExtractor) or SeamlessM4TFeatureExtractor(
            feature_size=dim // 2, num_mel_bins=dim // 2, stride=2)
        if extractor.num_mel_bins * extractor.stride != dim or extractor.sampling_rate != SAMPLE_RATE:
            raise EncoderError(f"{self.directory}: the feature extractor makes {extractor.num_mel_bins} x "
                               f"{extractor.stride} features at {extractor.sampling_rate} Hz; the encoder reads {dim} "
                               f"at {SAMPLE_RATE} Hz")
        if extractor.stride != 2:
            raise EncoderError(f"{self.directory}: fbank frames stacked by {extractor.stride}; 2 (50 frames/s) "
                               "is what w2v-BERT 2.0 uses")
        return FbankFeatures(extractor)

    def layout(self):  # no norm above the last layer (each Conformer layer ends with its own)
        return EncoderLayout(self.num_layers, "encoder.encoder.layers", top=(), front=("encoder.feature_projection",))

    @property
    def frame_convs(self):
        return ()  # the stacked fbank frames are the encoder's frames

    def cost_shapes(self):
        """Approximate: the projection as the front end; per layer beyond attention and one feed-forward, the
        second feed-forward, the convolution module (pointwise, depthwise, pointwise) and the relative-key
        position scores (one more product of attention's size)."""
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        extra = 2 * 2 * d * f + 2 * d * 2 * d + 2 * d * c.conv_depthwise_kernel_size + 2 * d * d
        positions = 1 if c.position_embeddings_type in ("relative_key", "relative") else 0
        return super().cost_shapes() | dict(enc_front_flops=2 * c.feature_projection_input_dim * d,
                                            enc_layer_flops=extra, enc_layer_attention_products=positions,
                                            enc_layer_elements=2 * f + 8 * d)

    def encode(self, model, features, lengths, recompute=False):
        """features: [B, frames, 160] stacked fbank (padded); lengths: [B] valid frames."""
        valid = _valid(lengths, features.shape[1])
        x = model.feature_projection(features)[0] * valid[..., None]
        enc = model.encoder
        mask = _additive_mask(valid, x.dtype)
        x = enc.dropout(x)
        positions = enc.embed_positions(x) if enc.embed_positions is not None else None
        for layer in enc.layers:  # the convolution module zeroes padded frames itself (conv_attention_mask)
            x = _run_layer(layer, recompute, x, mask, positions, valid)
        return x * valid[..., None], lengths


FAMILIES: tuple[type[EncoderFamily], ...] = (WhisperFamily, Wav2Vec2Family, WavLMFamily, W2vBertFamily)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def encoder_family(directory: str | Path) -> EncoderFamily:
    """The family of the encoder in `directory` (a model directory, or a saved model's encoder_config/), from its
    config.json's `model_type`."""
    import json

    from transformers import AutoConfig

    config_file = Path(directory) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{config_file}: cannot read the encoder's config ({exc})") from None
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(AutoConfig.from_pretrained(str(directory)), directory)
    raise EncoderError(f"{directory}: encoder model_type '{model_type}' is not supported (supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)})")


def family_for(cfg) -> EncoderFamily:
    """The family `model.encoder` (EncoderConfig) describes: its pretrained directory's, or a fresh Whisper."""
    return encoder_family(cfg.pretrained) if cfg.pretrained else WhisperFamily.fresh(cfg)

