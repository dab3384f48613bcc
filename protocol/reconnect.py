"""Riding out a Redis outage: every call of a role's client waits for Redis to come back, then goes on.

Why: a Redis restart (a crash, an upgrade, a container move) used to kill every actor and teacher with a
``redis.exceptions.ConnectionError`` traceback; under ``opd up`` that ended the run, under compose it
became a restart storm. Now a call that cannot reach Redis is retried with bounded exponential back-off
(equal jitter, so replicas do not reconnect in lock-step, capped at ``transport.reconnect_cap_s``) until
Redis answers, for at most ``transport.reconnect_give_up_s``; then the role stops with an error that says
so (`RedisUnavailable`, a plain ``ConnectionError``: one line, no traceback).

Why in the client (redis-py's ``Retry`` hook) and not around each role's loop: an iteration abandoned
half-way leaves state behind (an admitted slot never used, a trained step never committed, a scored batch
never forwarded); a call that waits and then completes leaves none. Every role, the launcher's monitoring
and ``opd top``'s live view get the behaviour from one place, `protocol.streams.connect_role`.

What is retried, and why that is safe (docs/reliability.md has the full table): a retry may repeat a
command whose first attempt went through before the connection dropped. Reads are idempotent. The
writes that matter are made idempotent where they are issued: a publish with a ledger outcome is skipped
when the ledger knows the id, a settle (forward, ack, dead letter) is fenced on ownership so its repeat is
refused, a journal commit finds its step already at the journal's tail, a run-wide stats update
(``add_stats``) carries its writer and number and is applied once. What may still repeat is
harmless or bounded: an ``XREADGROUP`` or
``XAUTOCLAIM`` whose reply was lost leaves entries pending until ``claim_idle_ms`` (one extra delivery),
an admission ``INCRBY`` keeps at most one batch of slots reserved.

A Redis that cannot persist is an outage too: when its append-only (or RDB) file cannot be written (a full
disk under its ``dir``) Redis answers every write with ``MISCONF`` and executes none of it, reads still work,
and it takes writes again by itself once a write to the file succeeds. Such a refusal is waited out like an
unreachable Redis (`refuses_writes`), so freeing the disk lets the run go on where it was; before, the first
refused write killed the role. Retrying it is safe for the same reason: the refused command did nothing (a
script is refused at its first write, which, the state being Redis-wide, is before it wrote anything).

A wrong or missing password is not an outage: retrying cannot cure it. The call fails at once with
`RedisAuthFailed`, one line that names the URL with its password redacted (`redact_url`) and says which
key to fix; the CLI prints it as ``opd ROLE: error: ...`` and exits 1, without a traceback.

Logging: one WARNING line when this process first finds Redis unreachable, one when it is back (with the
outage's duration), however many calls and threads failed in between. A single failure that an immediate
reconnect cures (a pooled connection the server closed) is not an outage. Counters:
``opd_redis_outages_total`` and ``opd_redis_outage_seconds_total`` on every role's /metrics.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from prometheus_client.core import CounterMetricFamily, Metric
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

if TYPE_CHECKING:
    from protocol.config import TransportConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, socket.timeout)
"""Errors of an unreachable or restarting Redis (``BusyLoadingError``, "LOADING", is a ConnectionError)."""
NEVER_RETRIED: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError)
"""A wrong password is not an outage: fail at once, with the server's message."""
CONFIRM = 3
"""Successful calls in a row that end an outage: a connect that succeeds while Redis is still loading its
AOF is followed by a LOADING error, which must not count as a second outage."""


def refuses_writes(error: BaseException) -> bool:
    """Redis's ``MISCONF``: it cannot write its persistence file and refuses writes until it can again."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("MISCONF")


def _state(error: BaseException) -> str:
    return "refuses writes (it cannot write its data file: a full disk under its dir?)" if refuses_writes(error) \
        else "unreachable"


class RedisUnavailable(ConnectionError):
    """Redis stayed unreachable, or refusing writes (`refuses_writes`), past `transport.reconnect_give_up_s` (or the
    process was told to stop)."""


class RedisAuthFailed(AuthenticationError, PermissionError):
    """Redis refused this client's credentials (WRONGPASS, NOAUTH): fixed only by the right password.

    Both a redis-py ``AuthenticationError`` (what callers of the client already expect) and a
    ``PermissionError``, the ``OSError`` the CLI turns into one ``error:`` line and exit code 1.
    """


def auth_failed(error: BaseException, url: str) -> RedisAuthFailed:
    """The one line a refused password becomes: the problem, the server's reason, the key to fix."""
    return RedisAuthFailed(
        f"Redis authentication failed at {redact_url(url)} ({describe(error)}): give the right password in "
        "transport.redis_url as redis://:PASSWORD@host:port/db (or in OPD_REDIS_URL)")


@dataclass(frozen=True)
class ReconnectPolicy:
    """Back-off between attempts to reach Redis (see `TransportConfig` for the meaning of each field)."""

    base_s: float = 0.1
    cap_s: float = 5.0
    give_up_s: float = 600.0

    @classmethod
    def from_transport(cls, transport: TransportConfig) -> ReconnectPolicy:
        return cls(base_s=transport.reconnect_base_s, cap_s=transport.reconnect_cap_s,
                   give_up_s=transport.reconnect_give_up_s)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds before attempt ``attempt + 1``: half of the capped exponential step fixed, half random."""
        step = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        return step / 2 + rng.uniform(0.0, step / 2)


class Outages:
    """This process's view of Redis: reachable, or unreachable since when; counts for the metrics.

    Process-wide on purpose: a learner's prefetch thread and main thread fail together, and the operator
    wants one line per outage, not one per thread or per call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None  # monotonic time the current outage began
        self.count = 0
        self.seconds = 0.0
        self._streak = 0  # successful calls since the outage's first success
        self._first_ok = 0.0
        self.should_stop: Callable[[], bool] = lambda: False

    def failed(self, error: BaseException, policy: ReconnectPolicy, where: str) -> None:
        """Record a failed attempt; raise `RedisUnavailable` when the outage has lasted too long."""
        now = time.monotonic()
        with self._lock:
            self._streak = 0
            if self.since is None:
                self.since = now
                self.count += 1
                log.warning("Redis at %s %s (%s): retrying with back-off (at most %.1fs apart), giving up "
                            "after %.0fs (transport.reconnect_give_up_s)", where, _state(error), describe(error),
                            policy.cap_s, policy.give_up_s)
            elapsed = now - self.since
        if elapsed > policy.give_up_s:
            raise RedisUnavailable(f"Redis at {where} {_state(error)} for {elapsed:.0f}s, longer than "
                                   f"transport.reconnect_give_up_s ({policy.give_up_s:g}s): {describe(error)}")
        if self.should_stop():
            raise RedisUnavailable(f"stopping while Redis at {where} {_state(error)} ({describe(error)})")

    def succeeded(self, where: str) -> None:
        """Record a successful call; the `CONFIRM`-th in a row ends the outage (timed at the first)."""
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.since is None:
                return
            now = time.monotonic()
            if self._streak == 0:
                self._first_ok = now
            self._streak += 1
            if self._streak < CONFIRM:
                return
            duration = self._first_ok - self.since
            self.seconds += duration
            self.since = None
            self._streak = 0
        log.warning("Redis at %s reachable again after a %.1fs outage", where, duration)

    def total_seconds(self) -> float:
        """Seconds spent in outages, the current one included."""
        with self._lock:
            return self.seconds + (time.monotonic() - self.since if self.since is not None else 0.0)


OUTAGES = Outages()


class RideOutRetry(Retry):
    """redis-py's retry hook, retrying (`RETRYABLE`) until Redis answers or `Outages.failed` gives up.

    One instance is shared by every connection of a client (``__deepcopy__`` returns it: redis-py copies
    the retry object into each connection, and the outage state must be the process's, not a connection's).
    """

    def __init__(self, policy: ReconnectPolicy, where: str, outages: Outages = OUTAGES, *, url: str = "") -> None:
        super().__init__(NoBackoff(), -1, RETRYABLE)  # type: ignore[arg-type]
        self.policy = policy
        self.where = where
        self.url = url or where  # what a refused password names (redacted when shown)
        self.outages = outages
        self._rng = random.Random()

    def __deepcopy__(self, memo: dict[int, Any]) -> RideOutRetry:
        return self

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        failures = 0
        while True:
            try:
                result = do()
            except self._supported_errors as error:
                if isinstance(error, NEVER_RETRIED) and not isinstance(error, RedisAuthFailed):
                    raise auth_failed(error, self.url) from None
                if isinstance(error, NEVER_RETRIED) or (is_retryable is not None and not is_retryable(error)):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if failures == 1:
                    continue  # a stale pooled connection: reconnecting at once is enough, not an outage yet
                self.outages.failed(error, self.policy, self.where)
                time.sleep(self.policy.delay(failures - 1, self._rng))
            except redis.ResponseError as error:
                if not refuses_writes(error):
                    raise
                failures += 1  # the connection is sound: no disconnect (`fail`), no immediate second try
                self.outages.failed(error, self.policy, self.where)
                time.sleep(self.policy.delay(failures, self._rng))
            else:
                self.outages.succeeded(self.where)
                return result


def server_name(url: str) -> str:
    """``host:port/db`` of a Redis URL: what the outage lines name (never the password)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: what logs, errors and terminals may show."""
    try:
        parts = urllib.parse.urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:
        return "<unparseable URL>"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)  # redis-py also reads ?password=
    if any(key == "password" for key, _ in query):
        parts = parts._replace(query="&".join(f"{k}={'***' if k == 'password' else v}" for k, v in query))
    if password is not None:
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class OutageCollector:
    """Exports `OUTAGES` on a role's registry (`protocol.telemetry.common_metrics` registers it)."""

    def __init__(self, outages: Outages = OUTAGES) -> None:
        self.outages = outages

    def collect(self) -> Iterator[Metric]:
        count = CounterMetricFamily("opd_redis_outages", "Times this process found Redis unreachable (one per "
                                    "outage, however many calls failed); each logged once when it began and ended")
        count.add_metric([], float(self.outages.count))
        yield count
        seconds = CounterMetricFamily("opd_redis_outage_seconds", "Seconds this process waited for an "
                                      "unreachable Redis to come back (the current outage included)")
        seconds.add_metric([], self.outages.total_seconds())
        yield seconds
