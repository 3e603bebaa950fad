"""The parameter groups: the names the config validator accepts (part.config) and the parameters each selects
(part.model.groups; names only, no model needed)."""

import pytest

from part.config import KNOWN_GROUPS, match_group
from part.model.groups import GROUPS, SELECTORS, find_group, select_parameters

NAMES = [
    "adapter.conv.weight", "encoder.layers.0.fc1.weight", "encoder.layers.1.fc1.weight", "encoder.layer_norm.weight",
    "llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
    "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "llm.base_model.model.model.layers.1.mlp.up_proj.weight", "llm.base_model.model.lm_head.weight",
]


def test_every_pattern_resolves():
    assert KNOWN_GROUPS == "adapter, encoder, encoder.top.N, encoder.layers.N, llm, llm.lora, llm.layers.N"
    assert select_parameters("adapter", NAMES, 2) == ["adapter.conv.weight"]
    assert select_parameters("encoder.top.1", NAMES, 2) == ["encoder.layers.1.fc1.weight", "encoder.layer_norm.weight"]
    assert select_parameters("encoder.layers.0", NAMES, 2) == ["encoder.layers.0.fc1.weight"]
    assert select_parameters("llm.lora", NAMES, 2) == [NAMES[5]]
    assert select_parameters("llm", NAMES, 2) == [NAMES[4], NAMES[6], NAMES[7]]
    assert select_parameters("llm.layers.1", NAMES, 2) == [NAMES[6]]
    assert select_parameters("llm.layers.7", NAMES, 2) == []  # a known pattern can still select nothing


@pytest.mark.parametrize("name", ["decoder", "encoder.topp.3", "llm.layers.x", "adapter.1", "encoder.top."])
def test_unknown_names(name):
    assert find_group(name) is None and match_group(name) is None
    with pytest.raises(ValueError, match="unknown parameter group"):
        select_parameters(name, NAMES, 2)


def test_every_configurable_group_has_a_selector():
    from part.config import GROUP_PATTERNS

    assert list(GROUPS) == list(GROUP_PATTERNS) and set(SELECTORS) == set(GROUP_PATTERNS)
    group, match = find_group("encoder.top.3")
    assert group.pattern == "encoder.top.N" and group.select is SELECTORS["encoder.top.N"] and match.group(1) == "3"
