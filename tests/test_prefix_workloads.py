"""The workloads whose prompts share prefixes: shared_prefix (system prompts) and multiturn
(conversations resending their history)."""

from __future__ import annotations

import pytest

from modgen import registry


def build(node: dict):
    return registry.build("workload", node).requests(1000)


def test_shared_prefix_prompts_start_with_one_of_k_prefixes():
    specs = build({"name": "shared_prefix", "num_requests": 40, "num_prefixes": 3,
                   "prefix_len": 50, "suffix_len": [5, 9], "output_len": [2, 4]})  # fmt: skip
    prefixes = {tuple(s.prompt[:50]) for s in specs}
    assert len(prefixes) == 3 and len(specs) == 40
    assert all(55 <= len(s.prompt) <= 59 and 2 <= s.output_len <= 4 for s in specs)
    assert len({tuple(s.prompt[50:]) for s in specs}) == 40  # the suffixes are unique
    again = build({"name": "shared_prefix", "num_requests": 40, "num_prefixes": 3,
                   "prefix_len": 50, "suffix_len": [5, 9], "output_len": [2, 4]})  # fmt: skip
    assert [s.prompt for s in again] == [s.prompt for s in specs]


def test_multiturn_turns_resend_the_history_turn_by_turn():
    specs = build({"name": "multiturn", "num_requests": 10, "turns": 3, "system_len": 7,
                   "message_len": [3, 6], "output_len": [2, 5]})  # fmt: skip
    convs = 4  # ceil(10 / 3); the last round stops at 10 requests
    assert len(specs) == 10
    system = specs[0].prompt[:7]
    assert all(s.prompt[:7] == system for s in specs)
    for i in range(convs, len(specs)):  # turn t of a conversation extends turn t - 1
        prev, cur = specs[i - convs], specs[i]
        grown = len(cur.prompt) - len(prev.prompt)
        assert cur.prompt[: len(prev.prompt)] == prev.prompt
        assert prev.output_len + 3 <= grown <= prev.output_len + 6  # its answer, a new message
    assert len({tuple(s.prompt[7:10]) for s in specs[:convs]}) == convs


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"name": "shared_prefix", "num_prefixes": 0}, "num_prefixes"),
        ({"name": "shared_prefix", "suffix_len": [9, 5]}, "suffix_len"),
        ({"name": "multiturn", "turns": 0}, "turns"),
        ({"name": "multiturn", "message_len": [0, 5]}, "message_len"),
    ],
)
def test_bad_settings_are_named(node, match):
    with pytest.raises(ValueError, match=match):
        registry.to_config("workload", node)
