"""The compute accounting's formula (protocol/compute.py): parts, their sum, the run-stat keys the roles write."""

from __future__ import annotations

import pytest

from protocol.compute import (
    FLOPS_GENERATION,
    FLOPS_LEARNER,
    FLOPS_TEACHER,
    ComputeTally,
    format_flops,
    forward_flops,
    train_flops,
)


def test_formula_per_token() -> None:
    assert forward_flops(1_000, 7) == 14_000  # 2 N per token
    assert train_flops(1_000, 7) == 42_000  # 6 N per token: forward + backward
    assert forward_flops(10, 0) == 0


def test_parts_add_up_to_the_total() -> None:
    stats = {FLOPS_GENERATION: 2e9, FLOPS_TEACHER: 5e9, FLOPS_LEARNER: 3e9, "actor_tokens_generated": 123.0}
    tally = ComputeTally.from_stats(stats)
    assert (tally.generation, tally.teacher, tally.learner) == (2e9, 5e9, 3e9)
    assert tally.total == pytest.approx(1e10)
    assert tally.as_dict() == {"generation": 2e9, "teacher": 5e9, "learner": 3e9, "total": 1e10}
    assert (tally + tally).total == pytest.approx(2e10)
    assert ComputeTally.from_stats({}).total == 0  # a run before any role reported


def test_format_flops() -> None:
    assert format_flops(1.5e12) == "1.5 TFLOP"
    assert format_flops(2.5e11) == "250 GFLOP"
    assert format_flops(12.0) == "12 FLOP"
