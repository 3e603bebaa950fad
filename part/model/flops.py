"""The floating-point operations of one training micro-batch, written out per component, for MFU.

Counted: every matrix product and convolution, and attention's two products (QK^T and AV), on the padded shapes
the model really runs (padding is work the chip does; the padded fraction is reported separately). A product of
M x K by K x N is 2 M K N operations. Backward is counted only where it happens: the gradient with respect to a
product's input when that input needs one (gradients flow through it towards something trainable), and with
respect to its weight when the weight trains. So a frozen encoder under the adapter costs its forward only, a
frozen LLM costs its forward plus the input gradients that reach the adapter, and LoRA adds its own small
products. The output head runs only at the positions the loss scores (the target
tokens). Activation checkpointing's recomputation is not model work and is not counted (MFU, not HFU).
Elementwise work (norms, softmax, activations, the loss) is not counted either: it is a few percent at most.

The encoder is counted exactly for Whisper (its two convolutions and its layers). For the other families
(part/model/encoders.py, `cost_shapes`) it is approximate: their front end (wav2vec2's CNN feature encoder and
position convolution, w2v-BERT's projection) as a per-frame constant whose backward counts both gradients when it
trains, their layers as Whisper-like layers plus, for w2v-BERT's Conformer layers, a per-frame constant for the
second feed-forward and the convolution module and one more product of attention's size (its relative-key position
scores); WavLM's position-bias gates are left out. On the tiny encoders of tests/unit/test_encoders.py the
encoder's count is within 15% of FlopCounterMode's.

`tests/unit/test_flops.py` checks the count against `torch.utils.flop_counter.FlopCounterMode` on the tiny
model, forward and backward, for each kind of stage.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from part.model.encoders import WHISPER_FRAME_CONVS, conv_lengths
from part.packing import ClipPositions, LayoutSpec, layout_batch

if TYPE_CHECKING:
    from part.batch import Batch
    from part.model.speech_llm import SpeechLLM


@dataclass(frozen=True)
class Trainable:
    """Which parts train (read off `requires_grad`; ZeRO-3 keeps the flags on its partitioned parameters)."""

    encoder_convs: bool = False  # the encoder's front end below its layers (Whisper: its two convolutions)
    encoder_layers: frozenset[int] = frozenset()
    adapter: bool = False
    llm_layers: frozenset[int] = frozenset()  # layers whose own (non-LoRA) weights train
    lora: bool = False
    llm_head: bool = False  # the output head / tied embeddings

    @classmethod
    def from_model(cls, model: SpeechLLM) -> Trainable:
        enc, llm = set(), set()
        convs = adapter = lora = head = False
        layout = model.encoder_layout
        layer = re.compile(re.escape(layout.layer_prefix) + r"\.(\d+)\.")
        front = tuple(m + "." for m in layout.front)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("encoder."):
                if m := layer.match(name):
                    enc.add(int(m.group(1)))
                elif name.startswith(front):
                    convs = True
            elif name.startswith("adapter."):
                adapter = True
            elif "lora_" in name:
                lora = True
            elif m := re.search(r"\.layers\.(\d+)\.", name):
                llm.add(int(m.group(1)))
            elif "embed_tokens" in name or "lm_head" in name:
                head = True
        return cls(convs, frozenset(enc), adapter, frozenset(llm), lora, head)


@dataclass(frozen=True)
class Shapes:
    """The dimensions of the model the count needs (read from its configs; the encoder's from its family)."""

    n_mels: int  # Whisper's mel bins (0 for the other families)
    enc_dim: int
    enc_layers: int
    enc_ffn: int
    downsample: int
    adapter_kind: str
    adapter_hidden: int
    adapter_layers: int
    llm_dim: int
    llm_layers: int
    llm_q_dim: int  # heads x head_dim
    llm_kv_dim: int  # key/value heads x head_dim
    llm_ffn: int
    vocab: int
    lora_rank: int  # 0: no LoRA
    lora_targets: tuple[str, ...]
    frame_head: bool  # the output head also runs on every adapter frame (the objectives of part/objectives)
    frame_classes: int = 0  # the rows of that head (the objectives' frame classes); 0: the whole vocabulary
    # The encoder beyond Whisper's shapes (part/model/encoders.py, `EncoderFamily.cost_shapes`; the defaults are
    # Whisper's): its front end's forward operations per encoder frame (None: Whisper's two convolutions over
    # n_mels), each layer's operations per frame beyond attention and a two-product feed-forward, its products of
    # attention's size (frames x frames x width) beyond QK^T and AV, the elements a layer keeps per frame beyond
    # those, the elements the front end keeps per frame when it trains (0: not counted, as for Whisper's), the
    # convolutions from feature steps to encoder frames (kernel, stride, padding) and the encoder frames per second.
    enc_front_flops: float | None = None
    enc_layer_flops: float = 0.0
    enc_layer_attention_products: int = 0
    enc_layer_elements: int = 0
    enc_front_elements: int = 0
    enc_convs: tuple[tuple[int, int, int], ...] = WHISPER_FRAME_CONVS
    enc_frames_per_second: float = 50.0
    # The LLM's feed-forward: gated (SwiGLU: gate_proj, up_proj, down_proj; Qwen2, Llama) or two products (fc1,
    # fc2: OPT, the Whisper-decoder stand-in), and the name of its attention output projection (for LoRA).
    llm_gated: bool = True
    llm_out_proj: str = "o_proj"

    @classmethod
    def from_model(cls, model: SpeechLLM) -> Shapes:
        base = model.base_llm
        c = base.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        a, lora = model.cfg.adapter, model.cfg.llm.lora
        names = [n for n, _ in base.named_parameters()]  # names only: under ZeRO-3 the tensors may be empty
        gated = any(".gate_proj." in n for n in names)
        out_proj = "o_proj" if any(".o_proj." in n for n in names) else "out_proj"
        ffn = c.intermediate_size if gated else getattr(c, "ffn_dim", None) or c.intermediate_size
        return cls(
            **model.encoder_family.cost_shapes(),
            downsample=a.downsample, adapter_kind=a.kind, adapter_hidden=a.hidden, adapter_layers=a.layers,
            llm_dim=c.hidden_size, llm_layers=c.num_hidden_layers, llm_q_dim=c.num_attention_heads * head_dim,
            llm_kv_dim=kv_heads * head_dim, llm_ffn=ffn, llm_gated=gated, llm_out_proj=out_proj,
            vocab=c.vocab_size,  # the config, not the weight: ZeRO-3 partitions leave it empty
            lora_rank=lora.rank if lora and model.lora_runs else 0,  # LoRA that does not run costs nothing
            lora_targets=tuple(lora.target_modules) if lora else (),
            frame_head=any(o.head_rows(c.vocab_size) for o in model.objectives),
            frame_classes=sum(o.head_rows(c.vocab_size) for o in model.objectives),
        )


@dataclass(frozen=True)
class BatchShapes:
    """The padded shapes one micro-batch runs at, and how much of them is real."""

    audio_clips: int  # rows of the encoder's input
    mel_frames: int  # its padded length (in feature steps: mel frames for Whisper)
    encoder_frames: int  # the encoder's padded length
    sequences: int  # rows of the LLM's input
    sequence_length: int  # its padded length
    sequence_tokens: int  # its positions without padding
    target_tokens: int  # positions the output head scores (the loss covers only these)
    audio_steps: int = 0  # the clips' valid feature steps, summed (the real part of clips x mel_frames)

    @classmethod
    def from_batch(cls, batch: Batch, shapes: Shapes, audio_token_id: int) -> BatchShapes:
        """From the batch's host tensors and its sequence layout (one sample per row when it has none)."""
        clips = batch.input_features.shape[0]
        steps = batch.feature_frames.tolist()
        # the padded length: the features' time axis (the last, but w2v-BERT's stacked fbank [clips, frames, 160])
        features = batch.input_features
        mel = features.shape[-1] if shapes.n_mels or features.ndim == 2 else features.shape[1]
        layout = batch.layout
        if layout is None:
            spec = LayoutSpec(audio_token_id, 0, ClipPositions(tuple(shapes.enc_convs), shapes.downsample),
                              packed=False, length_multiple=1)
            layout = layout_batch(batch.prompt_ids, batch.target_ids, batch.audio_index, batch.feature_frames, spec)
        rows, length = layout.shape
        return cls(clips, mel, conv_lengths(mel, shapes.enc_convs), rows, length, layout.real_tokens,
                   layout.target_tokens, sum(steps) if batch.audio_index.tolist().count(-1) < len(batch) else 0)

    @property
    def sequence_positions(self) -> int:
        return self.sequences * self.sequence_length

    @property
    def padded_audio_steps(self) -> int:
        return self.audio_clips * self.mel_frames


@dataclass
class Count:
    """Forward and backward operations of one component."""

    forward: float = 0.0
    backward: float = 0.0

    def add(self, ops: float, input_grad: bool, weight_grad: bool) -> None:
        """A product of `ops` forward operations; its backward repeats it once per gradient it needs."""
        self.forward += ops
        self.backward += ops * (int(input_grad) + int(weight_grad))

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass
class StepFlops:
    encoder: Count = field(default_factory=Count)
    adapter: Count = field(default_factory=Count)
    llm: Count = field(default_factory=Count)
    head: Count = field(default_factory=Count)  # the LLM's output head (and the CTC head on the adapter frames)

    @property
    def total(self) -> float:
        return sum(c.total for c in (self.encoder, self.adapter, self.llm, self.head))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"forward": c.forward, "backward": c.backward}
                for k, c in (("encoder", self.encoder), ("adapter", self.adapter), ("llm", self.llm),
                             ("head", self.head))}


def _attention_layer(count: Count, tokens: float, rows: int, length: int, q_dim: int, kv_dim: int, out_dim: int,
                     ffn: list[tuple[int, int]], grad_in: bool, attn_weights: bool, ffn_weights: bool,
                     lora: tuple[int, tuple[str, ...], bool] = (0, (), False), dim: int = 0,
                     out_proj: str = "o_proj") -> bool:
    """One pre-norm transformer layer; returns whether its output needs a gradient.

    `ffn`: the feed-forward products as (in, out) pairs, applied to the same normed input except the last one
    (whose input is their product). `lora`: (rank, target module names, trains)."""
    rank, targets, lora_trains = lora
    lora_on = rank > 0 and lora_trains

    def linear(name: str, n_in: int, n_out: int, input_grad: bool, weight_grad: bool) -> None:
        count.add(2 * tokens * n_in * n_out, input_grad, weight_grad)
        if rank > 0 and name in targets:  # x A (n_in x r), then (x A) B (r x n_out)
            count.add(2 * tokens * n_in * rank, input_grad, lora_on)
            count.add(2 * tokens * rank * n_out, lora_on or input_grad, lora_on)

    def lora_reaches(names: tuple[str, ...]) -> bool:
        return lora_on and any(n in targets for n in names)

    for name, n_out in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
        linear(name, dim, n_out, grad_in, attn_weights)
    qkv_grad = grad_in or attn_weights or lora_reaches(("q_proj", "k_proj", "v_proj"))
    # QK^T and AV: rows x heads x length^2 x head_dim, twice; the backward needs both operands' gradients
    count.add(2 * 2 * rows * length * length * q_dim, qkv_grad, qkv_grad)
    linear(out_proj, q_dim, out_dim, qkv_grad, attn_weights)
    hidden_grad = qkv_grad or attn_weights or lora_reaches((out_proj,))
    names = ("gate_proj", "up_proj", "down_proj") if len(ffn) == 3 else ("fc1", "fc2")
    for (n_in, n_out), name in zip(ffn[:-1], names):
        linear(name, n_in, n_out, hidden_grad, ffn_weights)
    inner_grad = hidden_grad or ffn_weights or lora_reaches(names[:-1])
    linear(names[-1], ffn[-1][0], ffn[-1][1], inner_grad, ffn_weights)
    return inner_grad or ffn_weights or lora_reaches(names[-1:])


def step_flops(s: Shapes, b: BatchShapes, t: Trainable) -> StepFlops:
    """The operations of one micro-batch of shapes `b` through a model of shapes `s` with `t` training."""
    out = StepFlops()
    # ---- encoder: its front end (Whisper: two convolutions, kernel 3, the second with stride 2), then its layers
    clips, mel = b.audio_clips, b.mel_frames
    enc_frames = b.encoder_frames
    d = s.enc_dim
    below_trains = t.encoder_convs
    if s.enc_front_flops is None:
        out.encoder.add(2 * clips * mel * s.n_mels * 3 * d, False, t.encoder_convs)
        # conv2's input needs a gradient when conv1 trains
        out.encoder.add(2 * clips * enc_frames * d * 3 * d, t.encoder_convs, t.encoder_convs)
    else:  # approximate (module docstring)
        out.encoder.add(s.enc_front_flops * clips * enc_frames, t.encoder_convs, t.encoder_convs)
    grad = below_trains
    for i in range(s.enc_layers):
        trains = i in t.encoder_layers
        grad_in = grad
        grad = _attention_layer(out.encoder, clips * enc_frames, clips, enc_frames, d, d, d,
                                [(d, s.enc_ffn), (s.enc_ffn, d)], grad, trains, trains, dim=d)
        if s.enc_layer_flops:  # approximate: the rest of a Conformer layer
            out.encoder.add(s.enc_layer_flops * clips * enc_frames, grad_in or trains, trains)
        if s.enc_layer_attention_products:  # approximate: position scores, their backward like QK^T's
            out.encoder.add(2 * clips * enc_frames * enc_frames * d * s.enc_layer_attention_products,
                            grad_in or trains, grad_in or trains)
    # ---- adapter: strided conv (kernel = stride = downsample), blocks, projection to the LLM's width
    frames = math.ceil(enc_frames / s.downsample)
    h = s.adapter_hidden
    tokens = clips * frames
    a = t.adapter
    out.adapter.add(2 * tokens * d * s.downsample * h, grad, a)
    grad = grad or a
    if s.adapter_kind == "transformer":
        for _ in range(s.adapter_layers):  # one fused qkv product; counted as q, k, v of width h each
            grad = _attention_layer(out.adapter, tokens, clips, frames, h, h, h, [(h, 4 * h), (4 * h, h)],
                                    grad, a, a, dim=h)
    else:
        out.adapter.add(2 * tokens * h * 2 * h, grad, a)
        out.adapter.add(2 * tokens * 2 * h * h, grad, a)
    out.adapter.add(2 * tokens * h * s.llm_dim, grad, a)
    audio_grad = grad or a
    if s.frame_head:  # the LLM's output head on every adapter frame
        out.head.add(2 * tokens * s.llm_dim * (s.frame_classes or s.vocab), audio_grad, t.llm_head)
    # ---- LLM
    rows, length = b.sequences, b.sequence_length
    tokens = rows * length
    grad = audio_grad or t.llm_head
    lora = (s.lora_rank, s.lora_targets, t.lora)
    for i in range(s.llm_layers):
        trains = i in t.llm_layers
        ffn = [(s.llm_dim, s.llm_ffn)] * (2 if s.llm_gated else 1) + [(s.llm_ffn, s.llm_dim)]
        grad = _attention_layer(out.llm, tokens, rows, length, s.llm_q_dim, s.llm_kv_dim, s.llm_dim, ffn,
                                grad, trains, trains, lora=lora, dim=s.llm_dim, out_proj=s.llm_out_proj)
    out.head.add(2 * b.target_tokens * s.llm_dim * s.vocab, grad, t.llm_head)  # target positions only
    return out


def useful_flops(count: StepFlops, b: BatchShapes) -> float:
    """The part of `count` spent on real positions: the audio side scaled by the share of valid feature steps, the
    LLM by the share of positions that hold a sample (the head scores real targets only)."""
    audio = b.audio_steps / b.padded_audio_steps if b.padded_audio_steps else 0.0
    text = b.sequence_tokens / b.sequence_positions if b.sequence_positions else 0.0
    return (count.encoder.total + count.adapter.total) * audio + count.llm.total * text + count.head.total


@dataclass
class FlopTally:
    """A training step's work over its micro-batches: operations that ran and the useful ones, positions."""

    flops: float = 0.0  # useful: padding excluded
    padded_flops: float = 0.0  # what ran
    sequence_tokens: int = 0
    sequence_positions: int = 0
    audio_steps: int = 0
    padded_audio_steps: int = 0

    def add(self, batch: Batch, shapes: Shapes, trainable: Trainable, audio_token_id: int, llm_runs: bool) -> None:
        b = BatchShapes.from_batch(batch, shapes, audio_token_id)
        if not llm_runs:
            b = dataclasses.replace(b, sequences=0, sequence_length=0, sequence_tokens=0, target_tokens=0)
        count = step_flops(shapes, b, trainable)
        self.flops += useful_flops(count, b)
        self.padded_flops += count.total
        self.sequence_tokens += b.sequence_tokens
        self.sequence_positions += b.sequence_positions
        self.audio_steps += b.audio_steps
        self.padded_audio_steps += b.padded_audio_steps

    def record_fields(self) -> dict:
        return dataclasses.asdict(self)


def batch_flops(model: SpeechLLM, batch: Batch) -> StepFlops:
    """The count for `batch` through `model` as it is set to train now."""
    shapes = Shapes.from_model(model)
    return step_flops(shapes, BatchShapes.from_batch(batch, shapes, model.audio_token_id), Trainable.from_model(model))


# Dense bf16 matrix throughput per GPU (vendor datasheets, without sparsity), for MFU; the first name contained in
# the device's name wins, so variants come before their family.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12))


def peak_bf16_flops(device_name: str | None) -> float | None:
    for key, value in PEAK_BF16_FLOPS:
        if device_name and key.lower() in device_name.lower():
            return value
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The chip's peak for the run's precision; None where unknown (CPUs, unlisted GPUs): MFU is then not given."""
    if device.type != "cuda" or precision != "bf16":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))
