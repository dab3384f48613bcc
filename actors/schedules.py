"""Truncation schedules: how many tokens an actor may sample for one rollout prefix.

WHY truncate: on-policy distillation gets a dense per-token signal from the teacher, so a prefix
of a rollout is already a useful training example, and early in training (when the student is far
from the teacher) long rollouts mostly cost compute. A schedule maps the learner's policy version to
a horizon in [1, max_new_tokens]:

- `full`: always `max_new_tokens` (the untruncated baseline);
- `fixed`: a constant, as a fraction of `max_new_tokens` or an absolute token count;
- `progressive`: grows from `start` to `max_new_tokens` over `ramp_versions` policy versions,
  either linearly or through a list of `stages`;
- `random`: uniform in [min_tokens, max_tokens] from the caller's seeded rng.

Specs are plain frozen dataclasses (the composed config wraps them); `TruncationSchedule` validates
a spec against `max_new_tokens` once, so a bad config fails at start-up with the field named.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal


@dataclass(frozen=True)
class FullSpec:
    """Never truncate."""

    kind: Literal["full"] = "full"


@dataclass(frozen=True)
class FixedSpec:
    """A constant horizon: exactly one of `fraction` (of max_new_tokens) or `tokens`."""

    kind: Literal["fixed"] = "fixed"
    fraction: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class ProgressiveSpec:
    """A horizon that grows with the learner's policy version.

    `linear`: from `start` tokens at version 0 to max_new_tokens at `ramp_versions`.
    `staged`: the ramp is split into len(stages) equal windows; window j uses `stages[j]` tokens;
    from `ramp_versions` on, max_new_tokens.
    """

    kind: Literal["progressive"] = "progressive"
    ramp_versions: int = 100
    shape: Literal["linear", "staged"] = "linear"
    start: int = 1
    stages: tuple[int, ...] = ()


@dataclass(frozen=True)
class RandomSpec:
    """A horizon drawn uniformly from [min_tokens, max_tokens] (max defaults to max_new_tokens)."""

    kind: Literal["random"] = "random"
    min_tokens: int = 1
    max_tokens: int | None = None


ScheduleSpec = FullSpec | FixedSpec | ProgressiveSpec | RandomSpec
SPEC_TYPES: dict[str, type[FullSpec | FixedSpec | ProgressiveSpec | RandomSpec]] = {
    "full": FullSpec,
    "fixed": FixedSpec,
    "progressive": ProgressiveSpec,
    "random": RandomSpec,
}


def spec_from_dict(data: Mapping[str, object]) -> ScheduleSpec:
    """Build a spec from a config mapping such as `{"kind": "fixed", "fraction": 0.25}`."""
    kind = data.get("kind")
    if kind not in SPEC_TYPES:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(SPEC_TYPES)}")
    cls = SPEC_TYPES[str(kind)]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a field of a {kind!r} schedule (fields: {sorted(allowed)})")
    values = dict(data)
    if "stages" in values and isinstance(values["stages"], list):
        values["stages"] = tuple(values["stages"])
    return cls(**values)  # type: ignore[arg-type]


def _require_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")
    return value


class TruncationSchedule:
    """A validated spec bound to a `max_new_tokens` budget."""

    def __init__(self, spec: ScheduleSpec, max_new_tokens: int) -> None:
        self.max_new_tokens = _require_int("max_new_tokens", max_new_tokens, 1, 2**31 - 1)
        self.spec = spec
        self._validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, object], max_new_tokens: int) -> TruncationSchedule:
        """Shorthand for `TruncationSchedule(spec_from_dict(data), max_new_tokens)`."""
        return cls(spec_from_dict(data), max_new_tokens)

    def horizon(self, policy_version: int, rng: random.Random) -> int:
        """Tokens the actor may sample now; always in [1, max_new_tokens].

        Only `random` draws from `rng`, so other kinds leave the caller's random stream untouched.
        """
        if isinstance(policy_version, bool) or not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"policy_version: must be an integer >= 0, got {policy_version!r}")
        spec, top = self.spec, self.max_new_tokens
        if isinstance(spec, FullSpec):
            return top
        if isinstance(spec, FixedSpec):
            if spec.tokens is not None:
                return spec.tokens
            return max(1, min(top, math.floor(float(spec.fraction or 0) * top + 0.5)))
        if isinstance(spec, ProgressiveSpec):
            if policy_version >= spec.ramp_versions:
                return top
            if spec.shape == "staged":
                return spec.stages[policy_version * len(spec.stages) // spec.ramp_versions]
            grown = spec.start + (top - spec.start) * policy_version / spec.ramp_versions
            return max(1, min(top, math.floor(grown)))
        return rng.randint(spec.min_tokens, top if spec.max_tokens is None else spec.max_tokens)

    def _validate(self) -> None:
        spec, top = self.spec, self.max_new_tokens
        if isinstance(spec, FullSpec):
            return
        if isinstance(spec, FixedSpec):
            if (spec.fraction is None) == (spec.tokens is None):
                raise ValueError("fraction/tokens: a fixed schedule needs exactly one of them")
            if spec.tokens is not None:
                _require_int("tokens", spec.tokens, 1, top)
            elif isinstance(spec.fraction, bool) or not isinstance(spec.fraction, int | float):
                raise ValueError(f"fraction: must be a number, got {spec.fraction!r}")
            elif not 0 < spec.fraction <= 1:
                raise ValueError(f"fraction: must be in (0, 1], got {spec.fraction}")
            return
        if isinstance(spec, ProgressiveSpec):
            _require_int("ramp_versions", spec.ramp_versions, 1, 2**31 - 1)
            if spec.shape == "linear":
                _require_int("start", spec.start, 1, top)
                if spec.stages:
                    raise ValueError("stages: only used with shape='staged'")
            elif spec.shape == "staged":
                if not spec.stages:
                    raise ValueError("stages: shape='staged' needs a non-empty list of token horizons")
                if len(spec.stages) > spec.ramp_versions:
                    raise ValueError(
                        f"stages: {len(spec.stages)} stages do not fit in ramp_versions={spec.ramp_versions}"
                    )
                for j, stage in enumerate(spec.stages):
                    _require_int(f"stages[{j}]", stage, 1, top)
                if any(b < a for a, b in zip(spec.stages, spec.stages[1:], strict=False)):
                    raise ValueError(f"stages: must be non-decreasing, got {list(spec.stages)}")
            else:
                raise ValueError(f"shape: must be 'linear' or 'staged', got {spec.shape!r}")
            return
        if isinstance(spec, RandomSpec):
            low = _require_int("min_tokens", spec.min_tokens, 1, top)
            if spec.max_tokens is not None:
                _require_int("max_tokens", spec.max_tokens, low, top)
            return
        raise ValueError(f"kind: unsupported schedule spec {spec!r}")
