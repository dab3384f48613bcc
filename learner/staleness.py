"""Bounded staleness for asynchronous training (pure functions, no I/O).

Actors sample with weights that lag the learner. Following AReaL (Fu et al. 2025, "AReaL: A Large-Scale
Asynchronous Reinforcement Learning System for Language Reasoning", arXiv:2505.24298) we bound the lag
two ways:

* the *consumer* (``split_by_staleness``) drops samples whose policy lags the learner by more than
  ``max_staleness`` versions, and drops samples that claim a version the learner has not produced yet
  (impossible unless the record is corrupt, or a learner restarted from an older checkpoint);
* the *producer* (the actors' admission, ``actors/actor.py``) stops admitting new generations once
  admitted samples would exceed what the learner can consume before they go stale.

The reason strings are label values of ``opd_learner_dropped_total{reason=...}``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

STALE = "stale"  # learner_version - policy_version > max_staleness
FUTURE_VERSION = "future_version"  # policy_version > learner_version
INVALID_VERSION = "invalid_version"  # policy_version is not an int >= 0

DROP_REASONS: tuple[str, ...] = (STALE, FUTURE_VERSION, INVALID_VERSION)


class HasPolicyVersion(Protocol):
    """Anything carrying the version of the policy that generated it (e.g. ``ScoredPrefix``)."""

    @property
    def policy_version(self) -> int: ...


ItemT = TypeVar("ItemT", bound=HasPolicyVersion)


@dataclass(frozen=True)
class Dropped(Generic[ItemT]):
    """One rejected item, why, and its lag (``learner_version - policy_version``; None if invalid)."""

    item: ItemT
    reason: str
    lag: int | None


class StalenessSplit(NamedTuple, Generic[ItemT]):
    """``kept, dropped = split_by_staleness(...)``; both keep the input order."""

    kept: list[ItemT]
    dropped: list[Dropped[ItemT]]


def _is_version(value: object) -> bool:
    """An int >= 0 (numpy integers included: decoded records may carry them; bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0


def _require_version(name: str, value: object) -> int:
    if not _is_version(value):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def lag(learner_version: int, policy_version: int) -> int:
    """How many versions behind the learner a sample is (negative = from the future)."""
    return learner_version - policy_version


def split_by_staleness(
    items: Iterable[ItemT], *, learner_version: int, max_staleness: int
) -> StalenessSplit[ItemT]:
    """Split ``items`` into those fit to train on at ``learner_version`` and those to drop.

    Kept: ``0 <= learner_version - item.policy_version <= max_staleness``. ``max_staleness = 0`` is
    synchronous (on-policy) training. Dropped items carry a reason from ``DROP_REASONS``.
    """
    learner_version = _require_version("learner_version", learner_version)
    max_staleness = _require_version("max_staleness", max_staleness)
    kept: list[ItemT] = []
    dropped: list[Dropped[ItemT]] = []
    for item in items:
        version = getattr(item, "policy_version", None)
        if not _is_version(version):
            dropped.append(Dropped(item=item, reason=INVALID_VERSION, lag=None))
            continue
        item_lag = lag(learner_version, int(version))  # type: ignore[call-overload]
        if item_lag < 0:
            dropped.append(Dropped(item=item, reason=FUTURE_VERSION, lag=item_lag))
        elif item_lag > max_staleness:
            dropped.append(Dropped(item=item, reason=STALE, lag=item_lag))
        else:
            kept.append(item)
    return StalenessSplit(kept=kept, dropped=dropped)
