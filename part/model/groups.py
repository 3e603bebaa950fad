"""The model's trainable parameter groups: one registry, asked by the config validator and by the trainer.

A group is a name pattern (`adapter`, `encoder.top.N`, ...) and a rule that picks parameter names. The rules
read names only (and the encoder's layout: its layer count and where its layers sit, which each encoder family
declares in part/model/encoders.py), so they work as well on a model built on the meta device, which is how
`train.py --check` finds a group that matches no parameter of the configured model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from part.model.speech_llm import SpeechLLM


@dataclass(frozen=True)
class EncoderLayout:
    """Where the encoder's parts sit among the model's parameter names. The defaults are Whisper's (its encoder
    is `encoder`: `encoder.layers.N`, then the final `encoder.layer_norm`); other families say theirs
    (`EncoderFamily.layout`)."""

    layers: int  # transformer layers
    layer_prefix: str = "encoder.layers"  # layer i is `{layer_prefix}.{i}`
    top: tuple[str, ...] = ("encoder.layer_norm",)  # modules above the last layer (trained with `encoder.top.N`)
    front: tuple[str, ...] = ("encoder.conv1", "encoder.conv2")  # the front end below the first layer

    def layer(self, index: int | str) -> str:
        return f"{self.layer_prefix}.{index}."


# (the match of the group's name, every parameter name of the model, the encoder's layout) -> picked names
Selector = Callable[[re.Match[str], Sequence[str], EncoderLayout], list[str]]


@dataclass(frozen=True)
class ParameterGroup:
    pattern: str  # as users write it in `stages[i].trainable`, e.g. "encoder.top.N"
    regex: re.Pattern[str]
    select: Selector


def _adapter(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    return [n for n in names if n.startswith("adapter.")]


def _encoder(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    return [n for n in names if n.startswith("encoder.")]


def _encoder_top(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    """The top N encoder layers and what sits above them (the final norm, in the families that have one)."""
    k, n_layers = int(match.group(1)), encoder.layers
    top = tuple(encoder.layer(i) for i in range(max(0, n_layers - k), n_layers)) + tuple(m + "." for m in encoder.top)
    return [n for n in names if n.startswith(top)]


def _encoder_layer(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    return [n for n in names if n.startswith(encoder.layer(match.group(1)))]


def _llm(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    return [n for n in names if n.startswith("llm.") and "lora_" not in n]


def _llm_lora(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    return [n for n in names if n.startswith("llm.") and "lora_" in n]


def _llm_layer(match: re.Match[str], names: Sequence[str], encoder: EncoderLayout) -> list[str]:
    # The LLM's layers sit at different depths per architecture (and under peft's wrapper): match ".layers.K.".
    k = match.group(1)
    return [n for n in names if n.startswith("llm.") and f".layers.{k}." in n and "lora_" not in n]


GROUPS: tuple[ParameterGroup, ...] = (
    ParameterGroup("adapter", re.compile(r"adapter"), _adapter),
    ParameterGroup("encoder", re.compile(r"encoder"), _encoder),
    ParameterGroup("encoder.top.N", re.compile(r"encoder\.top\.(\d+)"), _encoder_top),
    ParameterGroup("encoder.layers.N", re.compile(r"encoder\.layers\.(\d+)"), _encoder_layer),
    ParameterGroup("llm", re.compile(r"llm"), _llm),
    ParameterGroup("llm.lora", re.compile(r"llm\.lora"), _llm_lora),
    ParameterGroup("llm.layers.N", re.compile(r"llm\.layers\.(\d+)"), _llm_layer),
)
KNOWN_GROUPS = ", ".join(g.pattern for g in GROUPS)  # for error messages


def find_group(name: str) -> tuple[ParameterGroup, re.Match[str]] | None:
    for group in GROUPS:
        if match := group.regex.fullmatch(name):
            return group, match
    return None


def select_parameters(group: str, parameter_names: Sequence[str], encoder: EncoderLayout | int) -> list[str]:
    """The names of `parameter_names` in `group`; ValueError for a name no group pattern matches. `encoder`: the
    encoder's layout, or its layer count for Whisper's names."""
    found = find_group(group)
    if found is None:
        raise ValueError(f"unknown parameter group '{group}' (known: {KNOWN_GROUPS})")
    spec, match = found
    layout = encoder if isinstance(encoder, EncoderLayout) else EncoderLayout(encoder)
    return spec.select(match, parameter_names, layout)


def group_parameters(model: SpeechLLM, group: str) -> list[str]:
    """Parameter names of `model` in `group`."""
    names = [n for n, _ in model.named_parameters()]
    return select_parameters(group, names, model.encoder_layout)


def set_trainable(model: SpeechLLM, groups: Sequence[str]) -> dict[str, int]:
    """Freezes everything, then unfreezes `groups`; returns trainable parameter counts per group."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    counts = {}
    for group in groups:
        selected = group_parameters(model, group)
        if not selected:
            raise ValueError(f"parameter group '{group}' selects no parameters in this model")
        for name in selected:
            params[name].requires_grad_(True)
        counts[group] = sum(params[n].numel() for n in selected)
    return counts
