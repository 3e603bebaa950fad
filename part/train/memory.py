"""Per-rank device memory of each stage, estimated before anything starts (`train.py --check` prints it).

Model states follow DeepSpeed's own estimators (deepspeed.runtime.zero.stage3 / stage_1_and_2
`estimate_zero*_model_states_mem_needs`), made aware of what a stage trains: a frozen parameter costs only its
16-bit copy, a trainable one also its gradients, fp32 master copy and Adam's two moments (18 bytes in all). Under
ZeRO-3 all of it is partitioned over the ranks, plus the largest layer gathered whole; under ZeRO-1/2 the
16-bit parameters stay whole on every rank. Offloaded optimizer states (the `*offload*` DeepSpeed configs) leave
the device.

Activations are estimated for the largest micro-batch the data settings allow (`data.max_batch_seconds` of audio
and `data.max_batch_tokens` of text): per layer that gradients pass through, the tensors autograd keeps
(normed inputs, q/k/v, attention output, the feed-forward's inner activations; memory-efficient attention keeps no
score matrix), or only each layer's input with activation checkpointing; plus the logits (16 and 32 bit) at the
target positions, which the text tokens bound.
It is an estimate: the allocator's fragmentation and temporary buffers come on top (the warning leaves 10%).
The encoder's layers are counted as Whisper's; for the other families (part/model/encoders.py) that is
approximate: every family gives 50 frames per second, w2v-BERT's Conformer layers add their second feed-forward
and convolution module (`Shapes.enc_layer_elements`), and a trained wav2vec2-style CNN front end adds its outputs
over the waveform (`Shapes.enc_front_elements`; Whisper's two small convolutions are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

from part.config import ActivationCheckpointingConfig, TrainConfig
from part.model.flops import Shapes, Trainable

GIB = 1024**3


@dataclass(frozen=True)
class StageMemory:
    stage: str
    params: float  # bytes per rank
    grads: float
    optimizer: float  # fp32 master weights and Adam's moments
    activations: float
    activations_kept: float | None = None  # activations without any recomputation (None: the same)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def model_state_bytes(total_params: int, trainable_params: int, largest_layer_params: int, zero_stage: int,
                      world_size: int, precision: str, offload_optimizer: bool = False) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) in bytes per rank."""
    width = 2 if precision == "bf16" else 4
    # fp32 gradient partitions (+ 16-bit ones under ZeRO-1/2, as DeepSpeed's zero2 estimator counts them)
    grad_bytes = 4 + (2 if precision == "bf16" and zero_stage < 3 else 0)
    optim_bytes = 12 if precision == "bf16" else 8  # fp32 master (bf16 only) + Adam's m and v
    n = world_size
    if zero_stage == 3:
        params = width * total_params / n + 2 * width * largest_layer_params  # the gathered layer, prefetched
        grads = grad_bytes * trainable_params / n
    elif zero_stage == 2:
        params = width * total_params
        grads = grad_bytes * trainable_params / n
    else:  # 0 and 1: gradients whole on every rank
        params = width * total_params
        grads = grad_bytes * trainable_params
    optimizer = 0.0 if offload_optimizer else optim_bytes * trainable_params / (n if zero_stage >= 1 else 1)
    return params, grads, optimizer


def _layer_elements(dim: int, kv_dim: int, ffn: int, gated: bool) -> int:
    """Elements autograd keeps per token for one pre-norm transformer layer (memory-efficient attention)."""
    return 6 * dim + 2 * kv_dim + (3 if gated else 2) * ffn


def activation_bytes(s: Shapes, t: Trainable, cfg: TrainConfig,
                     ckpt: ActivationCheckpointingConfig | None = None) -> float:
    """Activations of the largest micro-batch the data settings allow, for trainable set `t`, recomputing what
    `ckpt` says (default: model.activation_checkpointing)."""
    width = 2 if cfg.precision == "bf16" else 4
    ckpt = ckpt or cfg.model.activation_checkpointing
    clips_frames = cfg.data.max_batch_seconds * s.enc_frames_per_second // 1  # encoder frames in the batch
    adapter_frames = clips_frames / s.downsample
    llm_tokens = cfg.data.max_batch_tokens + adapter_frames

    def stack(tokens: float, layers: int, elements: int, dim: int, checkpointed: bool) -> float:
        if layers == 0:
            return 0.0
        if checkpointed:  # each layer's input, plus one layer recomputed whole in backward
            return width * tokens * (layers * dim + elements)
        return width * tokens * layers * elements

    total = 0.0
    trained_encoder = sorted(t.encoder_layers)
    if trained_encoder or t.encoder_convs:  # gradients pass from the lowest trained layer up
        layers = s.enc_layers - (0 if t.encoder_convs else trained_encoder[0])
        elements = _layer_elements(s.enc_dim, s.enc_dim, s.enc_ffn, False) + s.enc_layer_elements
        total += stack(clips_frames, layers, elements, s.enc_dim, ckpt.encoder)
        if t.encoder_convs:  # the front end's own activations (not recomputed: checkpointing covers the layers)
            total += width * clips_frames * s.enc_front_elements
    if t.adapter or trained_encoder or t.encoder_convs:
        h = s.adapter_hidden
        total += width * adapter_frames * s.adapter_layers * _layer_elements(h, h, 4 * h, False)
    # the LLM: gradients pass through all of it whenever anything trains (the adapter sits below it)
    llm_layer = _layer_elements(s.llm_dim, s.llm_kv_dim, s.llm_ffn, s.llm_gated)
    total += stack(llm_tokens, s.llm_layers, llm_layer, s.llm_dim, ckpt.llm)
    # logits (16 bit), their fp32 copy for the loss and its gradient: at the target positions only (at most the
    # batch's text tokens), and at every adapter frame for a frame-level loss or readout
    frame_tokens = adapter_frames if s.frame_head else 0
    total += (cfg.data.max_batch_tokens * s.vocab + frame_tokens * (s.frame_classes or s.vocab)) * (width + 4 + 4)
    return total


def estimate_stages(cfg: TrainConfig, world_size: int, model) -> list[StageMemory]:
    """Every stage's per-rank estimate; `model`: the skeleton (meta device) the config describes
    (part.train.preflight.skeleton). Its trainable flags are changed."""
    import json
    from pathlib import Path

    from part.model.groups import set_trainable

    ds = json.loads(Path(cfg.ds_config).read_text())
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none"
    shapes = Shapes.from_model(model)
    total_params = sum(p.numel() for p in model.parameters())
    layers = list(model.encoder_layers) + [m for name, m in model.llm.named_modules()
                                           if name.endswith(tuple(f"layers.{i}" for i in range(shapes.llm_layers)))]
    largest = max([sum(p.numel() for p in layer.parameters()) for layer in layers]
                  + [model.llm.get_input_embeddings().weight.numel()])
    out = []
    for stage in cfg.stages:
        set_trainable(model, stage.trainable)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params, grads, optimizer = model_state_bytes(total_params, trainable, largest, cfg.zero_stage, world_size,
                                                     cfg.precision, offload)
        acts = activation_bytes(shapes, Trainable.from_model(model), cfg, cfg.recompute(stage))
        kept = activation_bytes(shapes, Trainable.from_model(model), cfg, ActivationCheckpointingConfig())
        out.append(StageMemory(stage.name, params, grads, optimizer, acts, kept))
    return out


def evaluation_estimate(estimates: list[StageMemory], cfg: TrainConfig, total_params: int) -> StageMemory | None:
    """An evaluation's peak when it decodes with replicas (ZeRO-3 with `eval.replicate`): the stages' largest model
    states, which stay allocated, plus a whole copy of every weight in the compute precision on each rank.
    Generation's own activations (a few clips' key/value cache) are left out. None when there is no replica."""
    if cfg.zero_stage != 3 or not cfg.eval.replicate or not cfg.eval.per_language or not estimates:
        return None
    largest = max(estimates, key=lambda e: e.params + e.grads + e.optimizer)
    width = 2 if cfg.precision == "bf16" else 4
    return StageMemory("evaluation (eval.replicate)", largest.params + width * total_params, largest.grads,
                       largest.optimizer, 0.0)


def memory_table(estimates: list[StageMemory], device_bytes: float | None) -> tuple[str, list[str]]:
    """A markdown table in GiB, and a warning for every stage over 90% of `device_bytes`."""
    lines = ["| stage | params | grads | optimizer | activations | total (GiB per rank) | total without recompute |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    warnings = []
    for e in estimates:
        kept = e.total - e.activations + (e.activations if e.activations_kept is None else e.activations_kept)
        lines.append(f"| {e.stage} | {e.params / GIB:.1f} | {e.grads / GIB:.1f} | {e.optimizer / GIB:.1f} | "
                     f"{e.activations / GIB:.1f} | {e.total / GIB:.1f} | {kept / GIB:.1f} |")
        if device_bytes and kept < e.total and kept <= 0.9 * device_bytes:
            warnings.append(f"note: stage '{e.stage}' fits without recomputation ({kept / GIB:.0f} GiB per rank): "
                            f"set its activation_checkpointing to {{encoder: false, llm: false}} for a faster step")
        if device_bytes and e.total > 0.9 * device_bytes:
            warnings.append(f"warning: stage '{e.stage}' needs about {e.total / GIB:.0f} GiB per rank, more than "
                            f"90% of the device's {device_bytes / GIB:.0f} GiB: lower data.max_batch_seconds / "
                            "data.max_batch_tokens, turn on model.activation_checkpointing, or use more ranks")
    return "\n".join(lines), warnings


def memory_report(cfg: TrainConfig, model, world_size: int, device_bytes: float) -> tuple[str, list[StageMemory],
                                                                                       list[str]]:
    """What `train.py --check` prints: a heading and the table (the stages, and an evaluation with replicas where
    there is one), the estimates behind it, and its warnings. `model`: the skeleton (part.train.preflight)."""
    estimates = estimate_stages(cfg, world_size, model)
    replica = evaluation_estimate(estimates, cfg, sum(p.numel() for p in model.parameters()))
    rows = estimates + ([replica] if replica else [])
    table, warnings = memory_table(rows, device_bytes)
    heading = (f"estimated memory per rank ({world_size} ranks, ZeRO-{cfg.zero_stage}, {cfg.precision}, "
               f"device {device_bytes / GIB:.0f} GiB):")
    return f"{heading}\n{table}", rows, warnings


def device_memory_bytes(device_memory_gb: float | None) -> float:
    """One device's memory for the estimate: `device_memory_gb` when given, else this machine's first GPU's, else
    80 GiB."""
    if device_memory_gb is not None:
        return device_memory_gb * GIB
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GIB
