"""Auxiliary objectives on the adapter's frames, beside the LM loss: plug-ins the model builds from its config
(`model.alignment`). A model without one never imports this package.

A plug-in is an `Objective` (base.py): the model calls `read` while encoding (what the LLM reads in the audio slot)
and `losses` after its forward (weighted terms added to the loss, each logged by name); the FLOP and memory
estimates ask it for the head rows it runs on every frame, and a saved model keeps its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from part.config import ModelConfig
    from part.objectives.base import Objective


def build_objectives(cfg: ModelConfig, model, tokenizer, saved_dir: Path | None = None) -> list[Objective]:
    """The plug-ins `cfg` names, for `model` (a SpeechLLM being built: its LLM exists); `saved_dir`: a saved
    model's directory, whose copies of their files they read instead of the configured ones."""
    if cfg.alignment is None:
        return []
    from part.objectives.frames import FrameAlignment

    return [FrameAlignment(cfg.alignment, cfg, model, tokenizer, saved_dir)]


def config_problems(cfg: ModelConfig) -> list[str]:
    """What in `cfg`'s plug-in blocks cannot work with the directories it names (checked before any process
    starts), each message starting with the field's path."""
    if cfg.alignment is None:
        return []
    from part.objectives.frames import config_problems as frame_problems

    return frame_problems(cfg)
