"""The interface between the Speech LLM and its auxiliary objectives. The objectives sit below the model: they see
it through the two Protocols here (what they read of it), and the model calls them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from part.batch import Batch
    from part.config import ModelConfig


class EncodedAudio(Protocol):
    """A batch's clips through the encoder and the adapter (part/model/speech_llm.py makes it)."""

    states: torch.Tensor  # [clips, encoder frames, encoder width]
    state_lengths: torch.Tensor
    frames: torch.Tensor  # [clips, frames, LLM width]: the adapter's outputs
    lengths: torch.Tensor
    audio: torch.Tensor  # what the LLM reads in the audio slot
    cache: dict[str, torch.Tensor]


class SpeechLLM(Protocol):
    """What an objective reads of the Speech LLM."""

    training: bool
    cfg: ModelConfig
    pad_token_id: int
    llm: nn.Module  # the LLM (under its LoRA wrapper when it has one)

    @property
    def base_llm(self) -> nn.Module: ...

    @property
    def llm_final_norm(self) -> nn.Module: ...

    @property
    def objectives(self) -> nn.ModuleList: ...

    def encode(self, features: torch.Tensor, frames: torch.Tensor) -> EncodedAudio: ...


class Objective(nn.Module):
    """A plug-in on the adapter's frames. It never holds the model (that would make the model its own submodule):
    every call gets it. Buffers it registers are non-persistent (a saved model keeps `files` instead)."""

    def read(self, model: SpeechLLM, encoded: EncodedAudio) -> torch.Tensor:
        """What the LLM reads in the audio slot, given what it would read so far (`encoded.audio`)."""
        return encoded.audio

    def losses(self, model: SpeechLLM, encoded: EncodedAudio, batch: Batch) -> dict[str, tuple[float, torch.Tensor]]:
        """name -> (weight, loss): added to the model's loss as weight x loss, logged as `name`. Called on every
        batch of every rank alike (under ZeRO-3 all ranks must make the same module calls)."""
        return {}

    def loss_names(self, training: bool) -> tuple[str, ...]:
        """The names `losses` returns, in training or evaluation mode."""
        return ()

    def head_rows(self, vocab_size: int) -> int:
        """The rows of the LLM's output head this runs on every adapter frame (0: none), for the FLOP and memory
        estimates."""
        return 0

    def save(self, out_dir: Path) -> None:
        """Writes the files a saved model needs to build this plug-in again (`build_objectives`' `saved_dir`)."""

    @property
    def files(self) -> tuple[str, ...]:
        """The names `save` writes."""
        return ()
