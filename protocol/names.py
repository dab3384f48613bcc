"""Stream and key names: one place, so roles, tests and dashboards agree.

A `namespace` prefix lets several pipelines (or tests) share one Redis without colliding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    namespace: str = "opd"

    @property
    def rollouts(self) -> str:
        """Actors -> teachers."""
        return f"{self.namespace}:rollouts"

    @property
    def scored(self) -> str:
        """Teachers -> learner."""
        return f"{self.namespace}:scored"

    @property
    def dead(self) -> str:
        """Dead letters from every stream, each with its reason."""
        return f"{self.namespace}:dead"

    @property
    def weights(self) -> str:
        """Append-only log of weight announcements (trimmed: old announcements are not work)."""
        return f"{self.namespace}:weights"

    @property
    def weights_latest(self) -> str:
        return f"{self.namespace}:weights:latest"

    @property
    def ledger(self) -> str:
        """Hash: message id -> outcome, for conservation accounting across roles."""
        return f"{self.namespace}:ledger"

    @property
    def control(self) -> str:
        """Hash of run-control flags (e.g. `stop_producing`) the launcher sets."""
        return f"{self.namespace}:control"

    @property
    def admission_leases(self) -> str:
        """Hash: actor id -> admission slots it reserved and has not published (protocol/admission.py).

        Not `<ns>:admitted`, the shared counter of earlier versions (a string: a hash read would be WRONGTYPE).
        """
        return f"{self.namespace}:admission:leases"

    @property
    def admission_expiry(self) -> str:
        """Zset: actor id -> Redis-server ms its heartbeat holds its lease (and registration) until."""
        return f"{self.namespace}:admission:expiry"

    @property
    def actors(self) -> str:
        """Set: the actor registry (ids of actors still producing; a draining learner waits for it to empty)."""
        return f"{self.namespace}:actors"

    @property
    def produced_by(self) -> str:
        """Hash: producer id -> entries it published with ledger outcome `produced`, counted by the producer.

        A witness of the conservation books that no consumer writes (tests/integration/roles.py).
        """
        return f"{self.namespace}:produced_by"

    @property
    def learner_state(self) -> str:
        """The learner's `LearnerState` (protocol/state.py), one msgpack blob read by actors and `opd top`.

        Not `<ns>:learner`, where earlier versions kept an untyped hash: a Redis that still holds one
        would answer a GET with WRONGTYPE.
        """
        return f"{self.namespace}:learner:state"

    def counter(self, name: str) -> str:
        return f"{self.namespace}:count:{name}"

    @property
    def dropped(self) -> str:
        """Counter of samples the learner dropped untrained (stale, probes), incremented in the script that acks them.

        The learner's own count, a witness of the conservation books beside the ledger's `dropped` outcome.
        """
        return self.counter("dropped")

    def key(self, suffix: str) -> str:
        return f"{self.namespace}:{suffix}"

    @property
    def groups(self) -> dict[str, str]:
        """Stream -> consumer group that owns its work."""
        return {self.rollouts: "teachers", self.scored: "learners"}
