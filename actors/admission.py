"""Producer-side staleness control (as in AReaL), on per-actor leases: never start work that would arrive stale.

The learner publishes its `LearnerState` (protocol/state.py: version, batch size, max_staleness, retired); an
actor reserves slots against `(max_staleness + 1) x batch_size + retired` in one script that also counts
every other actor's unpublished slots and every id already published (protocol/admission.py). Its slots are
a lease kept alive by a heartbeat thread (`Heartbeat`): an actor that dies without giving them back (SIGKILL,
OOM kill) is reclaimed once its lease runs out, so crashes cannot shrink the budget for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from protocol import admission
from protocol.names import Names
from protocol.runtime import StopFlag
from protocol.state import LearnerState, StateUnavailable, read_state

log = logging.getLogger(__name__)


class Admission:
    """One actor's side of admission control: read the learner's state, reserve slots, give them back."""

    def __init__(self, client: redis.Redis, names: Names, actor_id: str, *, lease_s: float = 30.0) -> None:
        self.client = client
        self.names = names
        self.actor_id = actor_id
        self.lease_ms = max(1, int(lease_s * 1000))
        self.state: LearnerState | StateUnavailable = StateUnavailable("not read yet")
        self._reported = ""

    def refresh(self) -> LearnerState | StateUnavailable:
        """Read the learner's newest state into `state`. A malformed one is logged (once per reason), not raised."""
        self.state = read_state(self.client, self.names)
        if isinstance(self.state, StateUnavailable) and self.state.malformed and self.state.reason != self._reported:
            log.error("%s; not admitting work until the learner publishes a valid state", self.state.reason)
            self._reported = self.state.reason
        return self.state

    def limit(self) -> int | None:
        """Most prefixes that may be published or reserved so far: (max_staleness + 1) x batch + retired.

        AReaL writes the bound as (max_staleness + version + 1) x batch_size - admitted; counting the
        work already retired (trained, dropped or dead) instead of assuming version x batch_size keeps
        it right after a learner restart from a checkpoint and when samples are dropped. `retired` is the
        learner's own count, taken after it published the weights of its version (not the live ledger):
        a slot its last step freed must go to work sampled with that step's weights.
        """
        state = self.refresh()
        if not isinstance(state, LearnerState):
            return None  # no (valid) learner state yet: wait rather than flood the queue with soon-stale work
        return (state.max_staleness + 1) * state.batch_size + state.retired

    def acquire(self, want: int, stop: StopFlag, should_stop: Callable[[], bool]) -> int:
        """Block until slots are free; returns how many were reserved (0 when stopping).

        One script checks the bound and reserves (protocol/admission.py), so two actors racing for the last
        slots cannot both get them; it also reclaims the slots of actors whose lease expired.
        """
        delay = 0.02
        while not stop.is_set() and not should_stop():
            limit = self.limit()
            if limit is not None:
                got = admission.acquire(self.client, self.names, self.actor_id, want=want, limit=limit,
                                        lease_ms=self.lease_ms)
                if got > 0:
                    return got
            stop.wait(delay)
            delay = min(delay * 2, 0.5)
        return 0

    def release(self, n: int | None = None) -> None:
        """Give back `n` reserved slots that will produce nothing (None: every slot this actor still holds)."""
        if n is None or n > 0:
            admission.release(self.client, self.names, self.actor_id, n)

    def held(self) -> int:
        """Slots this actor holds (reserved, not published)."""
        return admission.leases(self.client, self.names).get(self.actor_id, 0)


class Heartbeat:
    """Keeps an actor's lease and registration alive: `admission.beat` every `lease_s / 3` on a daemon thread.

    Why a thread and not the loop: one batch may take longer than a lease (a large model, a slow SGLang
    server), and a lease must only lapse when the process is gone or frozen. `close` stops it and, under the
    same lock, lets the actor leave (a beat after the leave would register the departed actor again).
    """

    def __init__(self, client: redis.Redis, names: Names, actor_id: str, *, lease_s: float) -> None:
        self.client, self.names, self.actor_id = client, names, actor_id
        self.lease_ms = max(1, int(lease_s * 1000))
        self.every_s = lease_s / 3
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        """A fresh start under this id holds nothing (a previous life's lease is dropped), then beat at once."""
        admission.leave(self.client, self.names, self.actor_id)
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.actor_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        with self._lock:
            if not self._closed.is_set():
                admission.beat(self.client, self.names, self.actor_id, lease_ms=self.lease_ms)

    def _run(self) -> None:
        while not self._closed.wait(self.every_s):
            try:
                self._beat()
            except Exception as exc:  # a missed beat is retried at the next; the lease outlasts two of them
                log.warning("%s: heartbeat failed (%s: %s); retrying in %.1fs", self.actor_id, type(exc).__name__,
                            exc, self.every_s)

    def close(self) -> None:
        """Stop beating and leave: slots given back, out of the registry. Idempotent."""
        with self._lock:
            self._closed.set()
            admission.leave(self.client, self.names, self.actor_id)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
