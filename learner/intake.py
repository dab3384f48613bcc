"""What reaches a learner step: prefetched deliveries, copies refused, stale samples dropped, probes measured,
and (several ranks) one batch agreed across the ranks.

Why a prefetch thread: reading the next deliveries overlaps the current step's compute. Everything read is
tracked in ``InFlight`` and kept claimed until committed (``learner/inflight.py``). The staleness bound is
checked when a sample is taken for a step, at the learner's version then: a sample held over for the next
step is checked again. A fresh probe (a full-length rollout flagged ``probe``) is measured, never trained.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from learner.config import LearnerConfig
from learner.distributed import Distributed, allocate
from learner.inflight import InFlight, LearnerQueue
from learner.journal import StepJournal
from learner.position_kl import PositionKL
from learner.staleness import split_by_staleness
from learner.summary import LearnerSummary
from protocol import admission, ledger
from protocol.messages import ScoredPrefix
from protocol.reconnect import RedisUnavailable
from protocol.runtime import StopFlag
from protocol.streams import Delivery
from protocol.telemetry import LearnerMetrics

log = logging.getLogger(__name__)

_ROUND_S = 0.5  # several ranks: longest a rank waits for data between two agreements on the batch


class Prefetcher:
    """Reads the next deliveries on a thread while the current step trains (I/O overlaps compute).

    The buffer hands out the oldest policy version first: replicas finish out of order, and training
    the oldest samples first keeps them inside the staleness bound. Entries this consumer read before a
    restart come first; everything read is tracked in ``inflight`` and kept claimed until committed.
    ``admit`` filters each read before it is buffered (the journal refuses copies of trained ids).
    """

    def __init__(self, q: LearnerQueue, inflight: InFlight, batch_size: int, stop: StopFlag,
                 admit: Callable[[list[Delivery[ScoredPrefix]]], list[Delivery[ScoredPrefix]]] = lambda ds: ds) -> None:
        self.q = q
        self.inflight = inflight
        self.admit = admit
        self.capacity = 2 * batch_size
        self.buffer: queue.PriorityQueue[tuple[int, int, Delivery[ScoredPrefix]]] = queue.PriorityQueue()
        self._seq = 0
        self.batch_size = batch_size
        self.stop = stop
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._put(q.recover_own())
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _put(self, deliveries: list[Delivery[ScoredPrefix]]) -> None:
        deliveries = self.admit(deliveries)
        self.inflight.add([d.entry_id for d in deliveries])
        for d in deliveries:
            self._seq += 1
            self.buffer.put((d.message.policy_version, self._seq, d))

    def _run(self) -> None:
        try:
            while not self._halt.is_set() and not self.stop.is_set():
                self.inflight.refresh_if_due()  # before any read: this thread is the only one reclaiming
                room = self.capacity - self.buffer.qsize()
                if room <= 0:
                    self._halt.wait(0.005)
                    continue
                self._put(self.q.read(min(room, self.batch_size), block_ms=200))
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc

    def get(self, timeout: float) -> Delivery[ScoredPrefix] | None:
        if isinstance(self.error, RedisUnavailable):  # one clear line (the CLI prints it), not a traceback
            raise RedisUnavailable(f"reading {self.q.stream}: {self.error}")
        if self.error is not None:
            raise RuntimeError(f"reading {self.q.stream} failed: {self.error}") from self.error
        try:
            return self.buffer.get(timeout=timeout)[2]
        except queue.Empty:
            return None

    def close(self) -> None:
        self._halt.set()
        self.thread.join(timeout=5)


class Collected(NamedTuple):
    """This rank's batch for the next step, and what the ranks agreed on while collecting it."""

    batch: list[Delivery[ScoredPrefix]]
    waited: float  # seconds this rank waited for data
    total: int  # samples over all ranks
    stopping: bool  # a rank is stopping
    drained: bool  # draining and nothing left anywhere


class Intake:
    """Turns deliveries into batches; acks (as dropped) what will never be trained, with its reason."""

    def __init__(self, cfg: LearnerConfig, q: LearnerQueue, inflight: InFlight, journal: StepJournal,
                 dist: Distributed, stop: StopFlag, metrics: LearnerMetrics, summary: LearnerSummary,
                 position_kl: PositionKL) -> None:
        self.cfg = cfg
        self.queue = q
        self.inflight = inflight
        self.journal = journal
        self.dist = dist
        self.stop = stop
        self.metrics = metrics
        self.summary = summary
        self.position_kl = position_kl
        self.stats = ledger.StatsWriter(q.client, q.names, f"learner-probes-rank{dist.rank}")  # each probe counted once
        self.local_batch = dist.share(cfg.batch_size)
        self._held: list[Delivery[ScoredPrefix]] = []  # several ranks: fresh samples held over for the next step
        # Called while waiting for data after samples were retired untrained (dropped stale, probes): the loop
        # republishes its state. WHY: actors admit work against the state's `retired`; without this, a learner
        # that dropped what it had (e.g. stale work taken back after a restart) waits for data that no actor
        # may produce until the learner's next step, which never comes: a deadlock until read_timeout_s.
        self.on_idle_after_drops: Callable[[], None] | None = None
        self._retired_unannounced = False

    def prefetcher(self) -> Prefetcher:
        """Start reading (this rank's deliveries, duplicates refused as they arrive)."""
        return Prefetcher(self.queue, self.inflight, self.local_batch, self.stop, admit=self.admit)

    def admit(self, deliveries: list[Delivery[ScoredPrefix]]) -> list[Delivery[ScoredPrefix]]:
        """The deliveries that may be trained: copies of ids already trained or in flight are refused."""
        admitted, refused = self.journal.refuse_duplicates(deliveries)
        if refused:
            self.metrics.duplicates.inc(len(refused))
            self.summary.duplicates += len(refused)
        return admitted

    def next_batch(self, prefetch: Prefetcher, want: int, *, version: int, deadline_s: float) -> tuple[list[Delivery[ScoredPrefix]], float]:
        """`want` fresh samples (fewer only when draining ends); stale ones are acked as dropped."""
        kept: list[Delivery[ScoredPrefix]] = []
        waited = 0.0
        start = time.monotonic()
        while len(kept) < want:
            t0 = time.perf_counter()
            d = prefetch.get(timeout=0.2)
            waited += time.perf_counter() - t0
            if d is None:
                if self._retired_unannounced and self.on_idle_after_drops is not None:
                    self._retired_unannounced = False
                    self.on_idle_after_drops()
                if self.stop.is_set() or time.monotonic() - start > deadline_s:
                    break
                continue
            if self.fresh(d, version):
                kept.append(d)
        return kept, waited

    def fresh(self, d: Delivery[ScoredPrefix], version: int) -> bool:
        """Within the staleness bound at `version`; otherwise acked as dropped, with its reason."""
        split = split_by_staleness([d.message], learner_version=version, max_staleness=self.cfg.max_staleness)
        lag = version - d.message.policy_version
        self.metrics.staleness.observe(max(lag, 0))
        if split.kept and getattr(d.message, "probe", False):
            self._measure_probe(d)
            self._retired_unannounced = True
            return False
        if split.kept:
            return True
        reason = split.dropped[0].reason
        log.debug("dropped %s: v%d at learner v%d (%s)", d.message.id, d.message.policy_version, version, reason)
        self.queue.ack([d.entry_id], ledger={d.message.id: ledger.DROPPED}, count_as=self.queue.names.dropped)
        self.inflight.discard([d.entry_id])
        self.metrics.dropped.labels(reason=reason).inc()
        self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1
        self._retired_unannounced = True
        return False

    def _measure_probe(self, d: Delivery[ScoredPrefix]) -> None:
        """A fresh probe: its KL by position goes into the open window; acked untrained (ledger `dropped`).

        Why never trained: a probe is an honest on-policy full rollout, but training on it would change what
        a schedule trains on (at a 0.1 horizon, 5% of full-length probes would be about a third of the trained
        tokens), and the experiment compares schedules. Measuring costs no forward pass.
        """
        self.position_kl.add_probe(d.message)
        self.queue.ack([d.entry_id], ledger={d.message.id: ledger.DROPPED}, count_as=self.queue.names.dropped)
        self.inflight.discard([d.entry_id])
        self.metrics.probes.inc()
        self.summary.probes += 1
        self.stats.add(learner_probes=1)

    def collect(self, prefetch: Prefetcher, *, version: int, deadline_s: float, draining: bool) -> Collected:
        """This rank's batch for the next step.

        One process: wait for ``batch_size`` fresh samples or the deadline. Several ranks: rounds of at most
        `_ROUND_S` in which each rank waits for its share and takes whatever else is already buffered, then
        the ranks gather their counts and step as soon as they hold a global batch together (or a rank's
        deadline passed, or one is stopping); `allocate` splits the batch, and surplus samples stay held
        (still claimed) for the next step.
        """
        if not self.dist.enabled:
            batch, waited = self.next_batch(prefetch, self.cfg.batch_size, version=version, deadline_s=deadline_s)
            return Collected(batch, waited, len(batch), self.stop.is_set(), draining and not batch and self.drained())
        target = self.cfg.batch_size
        held = [d for d in self._held if self.fresh(d, version)]  # one version later: re-check the bound
        waited, start = 0.0, time.monotonic()
        while True:
            if len(held) < self.local_batch:
                got, w = self.next_batch(prefetch, self.local_batch - len(held), version=version, deadline_s=_ROUND_S)
                held += got
                waited += w
            while len(held) < target and (d := prefetch.get(timeout=0)) is not None:
                if self.fresh(d, version):
                    held.append(d)
            late = time.monotonic() - start > deadline_s
            drained = draining and not held and self.drained()
            counts = self.dist.gather(len(held))
            stop_any, late_any, undrained_any = self.dist.max([float(self.stop.is_set()), float(late), float(not drained)])
            total = sum(counts)
            if stop_any or total >= target or late_any or (draining and not undrained_any):
                take = allocate(counts, target, self.dist.shares(target))[self.dist.rank]
                self._held = held[take:]
                return Collected(held[:take], waited, min(total, target), bool(stop_any), not bool(undrained_any))

    def drained(self) -> bool:
        """Nothing in flight and no actor still producing: the run's books are closed.

        Actors whose heartbeat lease expired (SIGKILLed, OOM-killed) are reclaimed first, so they leave the
        registry: once every live actor has stopped, nobody else would (protocol/admission.py).
        """
        client, names = self.queue.client, self.queue.names
        admission.reclaim(client, names)
        return int(client.scard(names.actors)) == 0 and ledger.counts(client, names)[ledger.PRODUCED] == 0

    def drain_report(self) -> str:
        client, names = self.queue.client, self.queue.names
        actors = sorted(a.decode() for a in client.smembers(names.actors))
        produced = ledger.counts(client, names)[ledger.PRODUCED]
        return (f"draining: no scored prefix for {self.cfg.read_timeout_s:g}s while {produced} prefixes are still "
                f"in flight (ledger 'produced') and actors {actors or 'none'} are registered; trained steps are "
                "checkpointed and published, the rest was not accounted for")
