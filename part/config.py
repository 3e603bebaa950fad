"""One typed configuration tree, loaded from YAML, overridable with `key.sub=value`, validated up front.

Every error names the field (`stages[2].trainable`) so a broken config fails before any process starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TASKS = ("asr", "s2tt", "mt", "text")
FRAME_TARGETS = ("centre", "span")
BATCHINGS = ("sorted", "fill")  # data.batching
SPEECH_TASKS = ("asr", "s2tt")
# What the evaluation reads of each held-out clip: its speech (asr, s2tt), and its transcript as text to translate
# (mt: the LLM's own translation of the same sentences, the figure S2TT can approach).
EVAL_TASKS = ("asr", "s2tt", "mt")
PRECISIONS = ("bf16", "fp32")
ZERO_STAGES = (2, 3)
# The parameter groups `stages[i].trainable` names: the name as users write it, and the regex a name must match
# in full. Which parameters each group selects is part/model/groups.py's (it reads this table).
GROUP_PATTERNS: dict[str, re.Pattern[str]] = {
    "adapter": re.compile(r"adapter"),
    "encoder": re.compile(r"encoder"),
    "encoder.top.N": re.compile(r"encoder\.top\.(\d+)"),
    "encoder.layers.N": re.compile(r"encoder\.layers\.(\d+)"),
    "llm": re.compile(r"llm"),
    "llm.lora": re.compile(r"llm\.lora"),
    "llm.layers.N": re.compile(r"llm\.layers\.(\d+)"),
}
KNOWN_GROUPS = ", ".join(GROUP_PATTERNS)  # for error messages


def match_group(name: str) -> tuple[str, re.Match[str]] | None:
    """(the group's pattern, its match) for a name of `stages[i].trainable`; None when no group has that name."""
    for pattern, regex in GROUP_PATTERNS.items():
        if match := regex.fullmatch(name):
            return pattern, match
    return None


# Text normalisers of WER/CER (part.evaluation.metrics.normalize): the project's own, or Whisper's (docs/evaluation.md)
NORMALIZERS = ("part", "whisper")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the field's dotted path."""


@dataclass
class EncoderConfig:
    pretrained: str | None = None  # an encoder directory: Whisper, wav2vec2, HuBERT, WavLM or w2v-BERT 2.0
    # Used only when `pretrained` is unset: a randomly initialised Whisper-style encoder.
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 512
    num_mel_bins: int = 80


@dataclass
class AdapterConfig:
    downsample: int = 4  # on top of the encoder's own 2x
    kind: str = "transformer"  # transformer | mlp
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    # Start the output projection at the LLM's token-embedding statistics (bias = the embeddings' mean vector,
    # weights scaled to their spread) instead of PyTorch's default, whose outputs are ~20x larger than a token
    # embedding: a frozen LLM then first reads the audio as ordinary (average) tokens. Ignored when loading a
    # trained model.
    init_from_embeddings: bool = True


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LLMConfig:
    pretrained: str | None = None  # an AutoModelForCausalLM directory (e.g. a local Qwen2.5-1.5B); has the tokenizer
    tokenizer: str | None = None  # defaults to `pretrained`
    lora: LoraConfig | None = None  # when set, LoRA adapters are added (zero-initialised) for stages to train


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ActivationCheckpointingConfig:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them: memory for
    about a third more compute. Only where gradients flow through (a frozen encoder below the adapter keeps
    nothing anyway)."""

    encoder: bool = False
    llm: bool = False


@dataclass
class CtcConfig:
    """CTC of the adapter's frames against each speech sample's transcript tokens (no teacher)."""

    weight: float = 1.0


@dataclass
class FrameTargetsConfig:
    """Per-frame targets from word timings: a Whisper checkpoint's alignment heads force-align the transcript, and
    the LLM's tokens take the time spans of the characters they cover (any tokenizer)."""

    weight: float = 1.0
    # `centre`: each token at the frame of its span's centre, the blank elsewhere (cross-entropy per frame);
    # `span`: each token in at least one frame of its span, the blank outside every span (as a CTC model emits it).
    targets: str = "centre"
    teacher: str | None = None  # a Whisper directory with its decoder and alignment heads; default: the encoder's


@dataclass
class ReadoutConfig:
    """The LLM reads each frame as its token embeddings weighted by the frame's posterior over the frame classes,
    sharpened by `temperature`: a frozen LLM reads such frames as the tokens they name."""

    temperature: float = 0.2
    # What the LLM reads for the blank class, most of every slot: the embedding of this text's one token (e.g.
    # " "); None: the blank's own row, the pad token's. A base LLM never trained its pad row (Gemma's lies among
    # its thousands of unused tokens), so it would read most of each slot as a token it has never seen.
    blank_as: str | None = None
    # The slot read as the frames' greedy CTC reading: blank frames dropped, each run of frames whose most likely
    # class repeats merged into one (the mean of its readouts), the runs packed to the front of the slot. The slot
    # keeps its length (no host read of how many runs a clip has): the positions left over are holes the LLM
    # neither attends to nor counts in its positions. Needs the masked attention kernels (sdpa or eager).
    compress: bool = False


@dataclass
class AlignmentConfig:
    """The frames read through the LLM's final norm and output head, as the LLM reads its last hidden state."""

    # A JSON file of the token ids the frames are classified over (the training transcripts' tokens, written by
    # `python -m part frame_vocabulary`); None: the LLM's whole vocabulary. Tokens outside it are spelled with its
    # tokens (part/objectives/frame_vocabulary.py).
    vocabulary: str | None = None
    # What `python -m part frame_vocabulary` keeps: the tokens seen at least this often (1: every transcript token).
    vocabulary_min_count: int = 1
    ctc: CtcConfig | None = None
    frame_targets: FrameTargetsConfig | None = None
    readout: ReadoutConfig | None = None


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # The LLM's attention kernel (transformers' attn_implementation): sdpa | eager | flash_attention_2 (needs the
    # flash_attn package). The encoder runs sdpa (eager when this is eager): its padding mask is an additive one.
    attn_implementation: str = "sdpa"
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    # Auxiliary objectives on the adapter's frames (part/objectives/); None: the LM loss alone.
    alignment: AlignmentConfig | None = None


@dataclass
class DataConfig:
    # Shard patterns; `{lang}` is replaced by each language. Local globs, brace ranges or URLs.
    train_shards: str = ""
    text_shards: str | None = None  # text-only shards for the `mt` and `text` tasks
    eval_shards: str | None = None
    languages: list[str] = field(default_factory=lambda: ["en"])
    num_workers: int = 1
    seed: int = 0
    window: int = 128  # samples read, sorted by length and cut into batches at a time (bucketing window)
    max_batch_seconds: float = 60.0  # total audio per batch (padded length x batch size)
    max_batch_tokens: int = 2048  # total text tokens per batch (padded)
    max_batch_size: int = 16
    max_duration: float = 30.0  # longer clips are skipped and counted
    temperature: float = 1.0  # language sampling p ~ n^(1/T); T=1 follows data sizes, large T flattens
    # The LLM's input: several samples per row, each attending only to itself (false: one sample per row). Rows
    # are padded to few lengths (multiples of `length_multiple` positions, at most 32 per doubling), the audio
    # features to multiples of `audio_multiple` seconds (at most 32 per doubling), so a run sees few shapes.
    # With sdpa/eager attention, packed rows hold at least `row_tokens` positions (0: as long as the longest sample
    # of the batch); longer rows leave less padding and cost more attention. flash_attention_2 takes one row.
    packing: bool = True
    length_multiple: int = 16
    row_tokens: int = 0
    audio_multiple: float = 0.25
    # The encoder's input: the clips packed into rows of this many seconds, each clip read as alone (Whisper
    # encoders; 30, their window, gives every batch the encoder shape [rows, mel bins, 3000]); 0: a row per clip,
    # padded to the batch's longest.
    audio_row_seconds: float = 0.0
    # How a window's samples become batches: `sorted` (by length, cut where a bound would be passed) or `fill`
    # (first-fit decreasing into batches filled up to the bounds, so that most batches have the same shapes;
    # max_batch_tokens then counts the LLM's positions, the clips' frames included, and with audio rows
    # max_batch_seconds counts the rows' seconds).
    batching: str = "sorted"
    # Shards read over the network (http(s)://, pipe:, other URLs): a failed read (connection refused or lost, an
    # HTTP 5xx, a command's non-zero exit, no byte for `shard_timeout` s) is retried `shard_retries` times,
    # `shard_retry_wait` s after the first failure and twice as long after each next one (at most 60 s); then the
    # shard is skipped and counted (`unreadable_shard`).
    shard_retries: int = 5
    shard_retry_wait: float = 2.0
    shard_timeout: float = 60.0


@dataclass
class StageConfig:
    name: str = ""
    steps: int = 0
    tasks: dict[str, float] = field(default_factory=lambda: {"asr": 1.0})
    languages: list[str] | None = None  # default: data.languages
    translation_targets: list[str] = field(default_factory=lambda: ["en"])
    trainable: list[str] = field(default_factory=lambda: ["adapter"])
    lr: float = 1e-3
    # Peak learning rates for some of the stage's trainable groups (keys as in `trainable`); the others train at
    # `lr`. Every group follows the stage's warmup and decay, scaled by its rate / lr.
    group_lr: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    # false: the stage trains on the auxiliary losses alone (model.alignment) and the LLM never runs (a within-language
    # adapter stage at a fraction of the step's cost).
    lm_loss: bool = True
    # The stage's recomputation (default: model.activation_checkpointing); `train.py --check` shows each stage's
    # memory with and without it.
    activation_checkpointing: ActivationCheckpointingConfig | None = None


@dataclass
class OptimConfig:
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (each step skipped) before stopping
    grad_clip: float = 1.0  # global gradient-norm clip; 0: none (DeepSpeed's gradient_clipping)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every: int = 100
    keep: int = 2
    # Never prune the checkpoint written at the end of each stage (beyond `keep`): a later stage can be trained
    # again from it with other settings (copy it into a new checkpoint.dir, change the later stages, --resume).
    keep_stage_ends: bool = False
    # Only the weights the run may have changed, in the training dtype: those read from a pretrained directory
    # that no stage so far has trained are referenced there (with their files' SHA-256) instead of written.
    # false: every weight. Free to change on resume (each checkpoint says what it holds).
    lean: bool = True


@dataclass
class DistributedConfig:
    # Seconds a collective (and a training step, which holds DeepSpeed's collectives) may take before the rank
    # that waits ends the run with exit 7: the process group's timeout, and the rank's own watchdog where the
    # backend's timeout does not fire. Also bounds a peer's solo work that the others wait for at a barrier
    # (rank 0 writing a checkpoint or the final model).
    timeout_s: float = 600.0
    # From losing the launcher to exiting without a checkpoint. None: derived from the run's measured step and
    # checkpoint-write times, at least 25 s (part/train/supervision.py, StopGrace).
    stop_grace_s: float | None = None


WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggingConfig:
    every: int = 10  # the console line, and wandb's records, every this many steps (and at each stage's end)
    # wandb: None, or wandb_mode `disabled`: none. `offline` writes the run to <output_dir>/wandb/offline-run-*
    # and never contacts a server (upload later with `wandb sync`); `online` needs WANDB_API_KEY (without it:
    # offline).
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    run_name: str | None = None
    wandb_samples: int = 5  # utterances per task and language in each evaluation's wandb hypotheses table
    # torch.profiler over global steps profile_start+1 .. profile_start+profile_steps (each rank writes a trace
    # and an operator table to <output_dir>/profile/, see part/train/profiling.py); -1: never
    profile_start: int = -1
    profile_steps: int = 3


@dataclass
class EvalConfig:
    every: int = 0  # 0: only at the end
    per_language: int = 20
    tasks: list[str] = field(default_factory=lambda: ["asr", "s2tt"])  # of EVAL_TASKS
    max_new_tokens: int = 96
    # > 0: a batch generates at most this many tokens per second of its longest clip (twice its longest prompt for
    # text tasks) plus a margin, below max_new_tokens: a hypothesis that runs on stops near its clip's length
    max_new_tokens_per_second: float = 0.0
    num_beams: int = 1
    batch_size: int = 8
    # Under ZeRO-3: each rank decodes with a full copy of the weights, gathered once per evaluation (the whole
    # model must fit a device a second time), instead of the partitioned engine, which gathers every layer again
    # at every generated token. false: the engine decodes, ranks in lockstep.
    replicate: bool = True
    # The normaliser of the results' rows (final.json, the logged scores); final.md shows every one of NORMALIZERS
    normalizer: str = "part"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The DeepSpeed JSON: engine tuning (buckets, offload, ...). What training means (precision, ZeRO stage,
    # optim.grad_clip, optim.grad_accum_steps) is owned here; the JSON must agree (see DEEPSPEED_SETTINGS).
    ds_config: str = "ds_configs/zero3.json"
    precision: str = "bf16"  # bf16 | fp32 (weights, activations and audio features on the device)
    zero_stage: int = 3
    output_dir: str = "runs/default"
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def recompute(self, stage: StageConfig) -> ActivationCheckpointingConfig:
        """What `stage` recomputes: its own setting, else the model's."""
        return stage.activation_checkpointing or self.model.activation_checkpointing


# ---------------------------------------------------------------- building from plain data


def build_config(cls: type, data: object, path: str = "") -> object:
    """Converts plain (YAML or JSON) data into config dataclass `cls`, naming the dotted `path` on any mismatch."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path + '.' if path else ''}{key}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: object, value: object, path: str) -> object:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_override(data: dict, override: str) -> None:
    """Applies `a.b.c=value` (value parsed as YAML) to nested plain data; `stages.1.lr=...` indexes lists."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected key.sub=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node: object = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: no such list index")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
            if node is None:
                raise ConfigError(f"{where}: is null; set it as a whole first")
        else:
            raise ConfigError(f"{where}: cannot index into {type(node).__name__}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no such list index")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Loads YAML, applies overrides, builds the dataclasses and validates. Relative paths stay relative to cwd."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    for override in overrides or []:
        apply_override(data, override)
    try:
        cfg = build_config(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    validate(cfg, path)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ---------------------------------------------------------------- validation


def auxiliary_losses(m: ModelConfig) -> bool:
    """Whether the model has a loss besides the LM loss (a stage may then train without the LLM running)."""
    al = m.alignment
    return al is not None and any(t is not None and t.weight > 0 for t in (al.ctc, al.frame_targets))


def validate(cfg: TrainConfig, source: str | Path = "config") -> None:
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    m = cfg.model
    check(m.adapter.kind in ("transformer", "mlp"), f"model.adapter.kind: '{m.adapter.kind}' is not transformer|mlp")
    check(m.adapter.downsample >= 1, "model.adapter.downsample: must be >= 1")
    check(m.adapter.hidden % max(m.adapter.heads, 1) == 0, "model.adapter.hidden: must be divisible by heads")
    for name, where in ((m.encoder.pretrained, "model.encoder.pretrained"), (m.llm.pretrained, "model.llm.pretrained")):
        check(name is None or Path(name).is_dir(), f"{where}: directory '{name}' does not exist")
        check(name is None or not Path(name).is_dir() or (Path(name) / "config.json").is_file(),
              f"{where}: '{name}' is not a model directory (no config.json)")
    check(m.llm.pretrained is not None, "model.llm.pretrained: a causal LM directory is required")
    if (al := m.alignment) is not None:
        check(al.ctc is None or al.ctc.weight >= 0, "model.alignment.ctc.weight: must be >= 0")
        if al.frame_targets is not None:
            check(al.frame_targets.weight >= 0, "model.alignment.frame_targets.weight: must be >= 0")
            check(al.frame_targets.targets in FRAME_TARGETS, f"model.alignment.frame_targets.targets: "
                  f"'{al.frame_targets.targets}' is not one of {', '.join(FRAME_TARGETS)}")
            check(bool(al.frame_targets.teacher or m.encoder.pretrained), "model.alignment.frame_targets.teacher: "
                  "needed when the encoder is not a pretrained Whisper directory (model.encoder.pretrained)")
        check(al.readout is None or al.readout.temperature > 0, "model.alignment.readout.temperature: must be > 0")
        check(al.readout is None or al.readout.blank_as is None or al.readout.blank_as != "",
              "model.alignment.readout.blank_as: a text of one token (e.g. ' '), or null for the pad token's row")
        check(al.readout is None or not al.readout.compress or m.attn_implementation != "flash_attention_2",
              "model.alignment.readout.compress: the slot's holes need a mask, which flash_attention_2's varlen "
              "packing cannot take: set model.attn_implementation to sdpa or eager")
        check(al.vocabulary_min_count >= 1, "model.alignment.vocabulary_min_count: must be >= 1")
    check(m.attn_implementation in ATTENTION_IMPLEMENTATIONS,
          f"model.attn_implementation: '{m.attn_implementation}' is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if m.attn_implementation == "flash_attention_2":
        import importlib.util

        check(importlib.util.find_spec("flash_attn") is not None,
              "model.attn_implementation: flash_attention_2 needs the flash_attn package, which is not installed "
              "(pip install flash-attn, or use sdpa)")

    d = cfg.data
    check(bool(d.train_shards), "data.train_shards: required")
    check(bool(d.languages), "data.languages: at least one language")
    check(d.num_workers >= 0, "data.num_workers: must be >= 0")
    check(d.temperature > 0, "data.temperature: must be > 0")
    check(d.max_batch_size >= 1, "data.max_batch_size: must be >= 1")
    check(d.length_multiple >= 1, f"data.length_multiple: {d.length_multiple} must be >= 1")
    check(d.row_tokens >= 0, f"data.row_tokens: {d.row_tokens} must be >= 0")
    check(d.audio_multiple >= 0, f"data.audio_multiple: {d.audio_multiple} must be >= 0 (0: no rounding)")
    check(d.audio_row_seconds == 0 or d.audio_row_seconds >= d.max_duration,
          f"data.audio_row_seconds: {d.audio_row_seconds} must be 0 (a row per clip) or hold the longest clip "
          f"(data.max_duration: {d.max_duration})")
    check(d.audio_row_seconds == 0 or m.alignment is None,
          "data.audio_row_seconds: the frame objectives (model.alignment) read a row per clip; set it to 0")
    check(d.batching in BATCHINGS, f"data.batching: '{d.batching}' is not one of {', '.join(BATCHINGS)}")
    check(d.batching != "fill" or d.max_batch_seconds >= d.audio_row_seconds,
          "data.max_batch_seconds: must hold one row of data.audio_row_seconds")
    check(d.window >= max(d.max_batch_size, 1), "data.window: must be >= data.max_batch_size (and >= 1)")
    check(d.max_batch_seconds > 0, "data.max_batch_seconds: must be > 0")
    check(d.max_batch_tokens > 0, "data.max_batch_tokens: must be > 0")
    check(0 < d.max_duration <= 30, "data.max_duration: must be in (0, 30] seconds (the Whisper encoder's window)")
    check(d.shard_retries >= 0, f"data.shard_retries: {d.shard_retries} must be >= 0")
    check(d.shard_retry_wait >= 0, f"data.shard_retry_wait: {d.shard_retry_wait} must be >= 0 seconds")
    check(d.shard_timeout > 0, f"data.shard_timeout: {d.shard_timeout} must be > 0 seconds")

    check(bool(cfg.stages), "stages: at least one stage")
    names = set()
    uses_lora = False
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}]"
        check(bool(s.name), f"{where}.name: required")
        check(s.name not in names, f"{where}.name: duplicate stage name '{s.name}'")
        names.add(s.name)
        check(s.steps > 0, f"{where}.steps: must be > 0")
        check(s.lr > 0, f"{where}.lr: must be > 0")
        check(0 <= s.warmup_steps <= s.steps, f"{where}.warmup_steps: must be between 0 and steps")
        check(0 <= s.min_lr_ratio <= 1, f"{where}.min_lr_ratio: must be in [0, 1] (a fraction of lr)")
        check(s.lm_loss or auxiliary_losses(m),
              f"{where}.lm_loss: false leaves the stage no loss (configure model.alignment.ctc or "
              "model.alignment.frame_targets)")
        check(s.lm_loss or set(s.tasks) <= {"asr"},
              f"{where}.lm_loss: false trains only on transcripts (tasks: {{asr: 1.0}}), not {sorted(s.tasks)}")
        check(s.tasks.get("s2tt", 0) <= 0 and s.tasks.get("mt", 0) <= 0 or bool(s.translation_targets),
              f"{where}.translation_targets: empty, but the stage has translation tasks (s2tt/mt)")
        check(bool(s.tasks) and sum(s.tasks.values()) > 0, f"{where}.tasks: empty mixture")
        for task, weight in s.tasks.items():
            check(task in TASKS, f"{where}.tasks.{task}: unknown task (known: {', '.join(TASKS)})")
            check(weight >= 0, f"{where}.tasks.{task}: weight must be >= 0")
            if task in ("mt", "text") and weight > 0:
                check(bool(d.text_shards), f"{where}.tasks.{task}: needs data.text_shards, which is not set")
        for lang in s.languages or []:
            check(lang in d.languages, f"{where}.languages: '{lang}' is not in data.languages")
        for lang in s.translation_targets:
            check(lang in d.languages, f"{where}.translation_targets: '{lang}' is not in data.languages")
        check(bool(s.trainable), f"{where}.trainable: at least one parameter group")
        for group in s.trainable:
            check(match_group(group) is not None, f"{where}.trainable: unknown group '{group}' ({KNOWN_GROUPS})")
            uses_lora |= group == "llm.lora"
        for group, rate in s.group_lr.items():
            check(group in s.trainable, f"{where}.group_lr: '{group}' is not one of the stage's trainable groups "
                                        f"({', '.join(s.trainable)})")
            check(isinstance(rate, int | float) and rate > 0, f"{where}.group_lr.{group}: must be a number > 0")
    check(not uses_lora or m.llm.lora is not None, "model.llm.lora: a stage trains llm.lora but no LoRA is configured")
    check(cfg.precision in PRECISIONS, f"precision: '{cfg.precision}' is not one of {', '.join(PRECISIONS)}")
    check(cfg.zero_stage in ZERO_STAGES, f"zero_stage: {cfg.zero_stage} is not one of {ZERO_STAGES}")
    check(cfg.optim.grad_clip >= 0, "optim.grad_clip: must be >= 0")
    check(cfg.optim.grad_accum_steps >= 1, "optim.grad_accum_steps: must be >= 1")
    ds = Path(cfg.ds_config)
    check(ds.is_file(), f"ds_config: file '{ds}' does not exist")
    if ds.is_file():
        try:
            ds_json = json.loads(ds.read_text())
        except json.JSONDecodeError as exc:
            errors.append(f"ds_config: '{ds}' is not valid JSON: {exc}")
        else:
            if isinstance(ds_json, dict) and "zero_optimization" in ds_json:
                errors += ds_config_disagreements(cfg, ds_json)
            else:
                errors.append(f"ds_config: '{ds}' is not a DeepSpeed config (a JSON object with zero_optimization)")
    check(cfg.checkpoint.every > 0, "checkpoint.every: must be > 0")
    check(cfg.checkpoint.keep >= 1, "checkpoint.keep: must be >= 1")
    check(cfg.distributed.timeout_s > 0, f"distributed.timeout_s: {cfg.distributed.timeout_s} must be > 0 seconds")
    check(cfg.distributed.stop_grace_s is None or cfg.distributed.stop_grace_s > 0,
          f"distributed.stop_grace_s: {cfg.distributed.stop_grace_s} must be > 0 seconds (or null: derived)")
    check(cfg.logging.wandb_mode in WANDB_MODES,
          f"logging.wandb_mode: '{cfg.logging.wandb_mode}' is not one of {', '.join(WANDB_MODES)}")
    check(cfg.logging.wandb_samples >= 0, "logging.wandb_samples: must be >= 0")
    if cfg.logging.wandb_project and cfg.logging.wandb_mode != "disabled":
        import importlib.util

        check(importlib.util.find_spec("wandb") is not None,
              "logging.wandb_project: wandb is not installed (pip install wandb, or logging.wandb_mode: disabled)")
    check(cfg.logging.every >= 1, "logging.every: must be >= 1")
    check(cfg.logging.profile_start >= -1, "logging.profile_start: must be >= 0 (or -1: no profile)")
    check(cfg.logging.profile_start < cfg.total_steps,
          f"logging.profile_start: {cfg.logging.profile_start} is not before the run's last step ({cfg.total_steps})")
    check(cfg.logging.profile_steps >= 1, "logging.profile_steps: must be >= 1")
    check(cfg.eval.num_beams >= 1, "eval.num_beams: must be >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size: must be >= 1")
    check(cfg.eval.per_language >= 0, "eval.per_language: must be >= 0")
    check(cfg.eval.every >= 0, "eval.every: must be >= 0 (0: only at the end)")
    check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens: must be >= 1")
    check(cfg.eval.max_new_tokens_per_second >= 0, "eval.max_new_tokens_per_second: must be >= 0 (0: no cap)")
    check(cfg.eval.normalizer in NORMALIZERS,
          f"eval.normalizer: '{cfg.eval.normalizer}' is not one of {', '.join(NORMALIZERS)}")
    for task in cfg.eval.tasks:
        check(task in EVAL_TASKS, f"eval.tasks: '{task}' is not one of {EVAL_TASKS}")
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------- the DeepSpeed settings the YAML owns


@dataclass(frozen=True)
class DeepSpeedSetting:
    json_key: tuple[str, ...]  # where DeepSpeed reads it, e.g. ("zero_optimization", "stage")
    yaml_field: str  # the config field that owns it
    json_default: object  # DeepSpeed's value when the JSON leaves the key out
    value: Callable[[TrainConfig], object]  # the owned value, from the config


DEEPSPEED_SETTINGS: tuple[DeepSpeedSetting, ...] = (
    DeepSpeedSetting(("bf16", "enabled"), "precision", False, lambda c: c.precision == "bf16"),
    DeepSpeedSetting(("fp16", "enabled"), "precision", False, lambda c: False),  # fp16 is not offered
    DeepSpeedSetting(("zero_optimization", "stage"), "zero_stage", 0, lambda c: c.zero_stage),
    DeepSpeedSetting(("gradient_accumulation_steps",), "optim.grad_accum_steps", 1, lambda c: c.optim.grad_accum_steps),
    DeepSpeedSetting(("gradient_clipping",), "optim.grad_clip", 0.0, lambda c: c.optim.grad_clip),
)


def _json_value(ds: dict, key: tuple[str, ...], default: object) -> object:
    node: object = ds
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def ds_config_disagreements(cfg: TrainConfig, ds: dict) -> list[str]:
    """Errors for every training setting on which the DeepSpeed JSON says something other than the YAML."""
    errors = []
    for setting in DEEPSPEED_SETTINGS:
        found, wanted = _json_value(ds, setting.json_key, setting.json_default), setting.value(cfg)
        if found != wanted:
            yaml_value = _field_value(cfg, setting.yaml_field)
            errors.append(
                f"ds_config: '{cfg.ds_config}' has {'.'.join(setting.json_key)}={json.dumps(found)}, but "
                f"{setting.yaml_field} is {yaml_value} (which needs {json.dumps(wanted)}); the YAML owns this "
                "setting: make the file agree or pick another one"
            )
    return errors


def _field_value(cfg: TrainConfig, dotted: str) -> object:
    node: object = cfg
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def deepspeed_config(cfg: TrainConfig) -> dict:
    """What deepspeed.initialize gets: the ds_config file (engine tuning) with the YAML's settings written over
    it. The file is never the source of those settings (validation made it agree with them)."""
    ds = json.loads(Path(cfg.ds_config).read_text())
    for setting in DEEPSPEED_SETTINGS:
        node = ds
        for part in setting.json_key[:-1]:
            node = node.setdefault(part, {})
        node[setting.json_key[-1]] = setting.value(cfg)
    return ds
