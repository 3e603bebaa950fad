"""What `train.py --check` (and every rank, before its first step) verifies beyond the config's own validation:
the data of every stage for the world size, and the trainable groups against the configured model's real
parameter names (the model built on the meta device from its configs: no weights read, no memory used)."""

from __future__ import annotations

from pathlib import Path

from part.config import ConfigError, TrainConfig
from part.data.shards import DataError
from part.data.sources import stage_shards


def check_stage_data(cfg: TrainConfig, world_size: int) -> None:
    """Every stage's sources have shards, at least ranks x loader workers of them; raises DataError."""
    for stage in cfg.stages:
        stage_shards(cfg.data, stage, world_size)


def skeleton(cfg: TrainConfig):
    """The configured model on the meta device (its real parameter names; no weights read, no memory used)."""
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer

    return SpeechLLM.skeleton(cfg.model, load_tokenizer(cfg.model.llm.tokenizer or cfg.model.llm.pretrained))


def empty_group_errors(cfg: TrainConfig, model) -> list[str]:
    """A message for every trainable group that selects no parameter of `model` (the skeleton)."""
    from part.model.groups import group_parameters

    errors = []
    for i, stage in enumerate(cfg.stages):
        for group in stage.trainable:
            if not group_parameters(model, group):
                errors.append(f"stages[{i}].trainable: group '{group}' matches no parameter of the configured model "
                              f"({model.encoder_layout.layers} encoder layers, LoRA "
                              f"{'on' if cfg.model.llm.lora is not None else 'off'})")
    return errors


def preflight(cfg: TrainConfig, world_size: int, source: str | Path = "config"):
    """Raises ConfigError, naming `source` and the problem, when the run could not go through. Returns the
    skeleton it checked the groups against (for `--check`'s memory estimate)."""
    try:  # every stage's data, before any process starts or any step is spent
        check_stage_data(cfg, world_size)
    except DataError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    from part.model.encoders import EncoderError

    if cfg.model.alignment is not None:
        from part.objectives import config_problems
        from part.objectives.frame_vocabulary import FrameVocabularyError

        if problems := config_problems(cfg.model):
            raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))
    else:
        FrameVocabularyError = ()  # noqa: N806 (nothing to catch: no objective reads a file)
    try:
        model = skeleton(cfg)
    except EncoderError as exc:
        raise ConfigError(f"{source}: model.encoder.pretrained: {exc}") from None
    except FrameVocabularyError as exc:
        raise ConfigError(f"{source}: model.alignment.vocabulary: {exc}") from None
    if cfg.data.audio_row_seconds:
        family = model.encoder_family
        if not family.reads_rows:
            raise ConfigError(f"{source}: data.audio_row_seconds: the {family.name} encoder reads a row per clip "
                              "(only Whisper encoders read clips packed into rows); set it to 0")
        if cfg.data.audio_row_seconds > family.max_seconds:
            raise ConfigError(f"{source}: data.audio_row_seconds: {cfg.data.audio_row_seconds} s is longer than the "
                              f"encoder's window ({family.max_seconds:g} s)")
    if errors := empty_group_errors(cfg, model):
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))
    return model
