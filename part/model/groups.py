"""The model's trainable parameter groups: which parameters each group the config names selects.

A group is a name pattern (`adapter`, `encoder.top.N`, ...; the config owns the names: part.config.GROUP_PATTERNS)
and a rule that picks parameter names. The rules
read names only (and the encoder's layout: its layer count and where its layers sit, which each encoder family
declares in part/model/encoders.py), so they work as well on a model built on the meta device, which is how
`train.py --check` finds a group that matches no parameter of the configured model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from part.config import GROUP_PATTERNS, KNOWN_GROUPS, match_group

if TYPE_CHECKING:
    import torch


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


SELECTORS: dict[str, Selector] = {
    "adapter": _adapter,
    "encoder": _encoder,
    "encoder.top.N": _encoder_top,
    "encoder.layers.N": _encoder_layer,
    "llm": _llm,
    "llm.lora": _llm_lora,
    "llm.layers.N": _llm_layer,
}
# every group the config knows, with its rule (a group without one is a KeyError here, at import)
GROUPS: dict[str, ParameterGroup] = {p: ParameterGroup(p, regex, SELECTORS[p]) for p, regex in GROUP_PATTERNS.items()}


def find_group(name: str) -> tuple[ParameterGroup, re.Match[str]] | None:
    found = match_group(name)
    return None if found is None else (GROUPS[found[0]], found[1])


def select_parameters(group: str, parameter_names: Sequence[str], encoder: EncoderLayout | int) -> list[str]:
    """The names of `parameter_names` in `group`; ValueError for a name no group pattern matches. `encoder`: the
    encoder's layout, or its layer count for Whisper's names."""
    found = find_group(group)
    if found is None:
        raise ValueError(f"unknown parameter group '{group}' (known: {KNOWN_GROUPS})")
    spec, match = found
    layout = encoder if isinstance(encoder, EncoderLayout) else EncoderLayout(encoder)
    return spec.select(match, parameter_names, layout)


class GroupedModel(Protocol):
    """What the groups read of a model (part.model.speech_llm.SpeechLLM): its parameters and its encoder's layout."""

    @property
    def encoder_layout(self) -> EncoderLayout: ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def run_lora(self, active: bool) -> None: ...


def group_parameters(model: GroupedModel, group: str) -> list[str]:
    """Parameter names of `model` in `group`."""
    names = [n for n, _ in model.named_parameters()]
    return select_parameters(group, names, model.encoder_layout)


def set_trainable(model: GroupedModel, groups: Sequence[str]) -> dict[str, int]:
    """Freezes everything, then unfreezes `groups`; returns trainable parameter counts per group. LoRA that
    trains runs from now on (while it has never trained it is zero and left out: SpeechLLM.run_lora)."""
    if any(group.startswith("llm.lora") for group in groups):
        model.run_lora(True)
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
