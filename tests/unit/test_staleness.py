"""Tests for learner/staleness.py.

Behaviours pinned:
- items with 0 <= learner_version - policy_version <= max_staleness are kept, in input order;
- a lag above max_staleness is dropped as "stale" with its lag; the boundary lag == max_staleness is kept;
- a policy_version above the learner's is dropped as "future_version" (negative lag);
- a missing, negative, non-integer or bool policy_version is dropped as "invalid_version"; numpy ints count;
- max_staleness = 0 keeps only the current version (synchronous training);
- bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from learner.staleness import (
    DROP_REASONS,
    FUTURE_VERSION,
    INVALID_VERSION,
    STALE,
    split_by_staleness,
)


@dataclass(frozen=True)
class Item:
    name: str
    policy_version: object


def test_split_keeps_fresh_items_in_order_and_explains_drops():
    items = [
        Item("current", 10),
        Item("too-old", 6),
        Item("boundary", 8),
        Item("future", 11),
        Item("one-behind", 9),
        Item("way-too-old", 0),
    ]
    kept, dropped = split_by_staleness(items, learner_version=10, max_staleness=2)
    assert [i.name for i in kept] == ["current", "boundary", "one-behind"]
    assert [(d.item.name, d.reason, d.lag) for d in dropped] == [
        ("too-old", STALE, 4),
        ("future", FUTURE_VERSION, -1),
        ("way-too-old", STALE, 10),
    ]


def test_invalid_versions_are_dropped_not_crashing():
    items = [Item("neg", -1), Item("float", 3.0), Item("bool", True), Item("none", None), Item("np", np.int64(5))]
    kept, dropped = split_by_staleness(items, learner_version=5, max_staleness=1)
    assert [i.name for i in kept] == ["np"]
    assert [(d.item.name, d.reason, d.lag) for d in dropped] == [
        ("neg", INVALID_VERSION, None),
        ("float", INVALID_VERSION, None),
        ("bool", INVALID_VERSION, None),
        ("none", INVALID_VERSION, None),
    ]
    assert {STALE, FUTURE_VERSION, INVALID_VERSION} == set(DROP_REASONS)


def test_zero_staleness_is_synchronous():
    items = [Item("a", 3), Item("b", 2), Item("c", 3)]
    kept, dropped = split_by_staleness(items, learner_version=3, max_staleness=0)
    assert [i.name for i in kept] == ["a", "c"]
    assert [d.reason for d in dropped] == [STALE]


def test_split_accepts_any_iterable_and_empty():
    kept, dropped = split_by_staleness(iter([]), learner_version=0, max_staleness=0)
    assert kept == [] and dropped == []
    generated = (Item(str(v), v) for v in range(5))
    kept, _ = split_by_staleness(generated, learner_version=4, max_staleness=1)
    assert [i.name for i in kept] == ["3", "4"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learner_version": -1, "max_staleness": 1}, "learner_version"),
        ({"learner_version": 1, "max_staleness": -1}, "max_staleness"),
        ({"learner_version": 1.5, "max_staleness": 1}, "learner_version"),
    ],
)
def test_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_by_staleness([], **kwargs)
