"""Conservation accounting: every prefix an actor produces ends exactly once as trained, dropped or dead.

The ledger is a hash `message id -> outcome`, and `outcomes` a hash `outcome -> count` kept equal to
the number of ids in each state by one Lua function (atomic, and usable inside MULTI or inside another
script), so `outcomes["produced"]` is the work in flight and a repeated outcome is never counted twice.

Two more keys serve the at-most-once check of the learner (``learner/journal.py``):
- `holders`: message id -> the scored-stream entry the learner admitted for it, while the id is in
  flight; a second entry carrying the same id (a copy: a retried publish, a forward that raced a
  reclaim) is then refused. Recording a terminal outcome deletes the field, so it holds in-flight ids only.
- `duplicates`: how many such copies were refused (copies, not ids: it is not an outcome, so it is not
  in `counts()`; `produced == trained + dropped + dead` still holds per id).

Bounded memory (`rollup`, run by the learner every `transport.ledger_rollup_every_s`): a terminal field that
can provably never be met again is deleted and counted in `ledger:rolled` (state -> ids), so the hash holds
the ids in flight plus a recent window instead of one field per prefix forever. `outcomes` keeps the
totals; a conservation check reads `audit()`: outcomes == fields + rolled, per state.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from protocol.names import Names

log = logging.getLogger(__name__)

PRODUCED, TRAINED, DROPPED, DEAD = "produced", "trained", "dropped", "dead"
TERMINAL = (TRAINED, DROPPED, DEAD)

# The one definition of an outcome update, for every script that records one (`record` below, the
# fenced settle of protocol/streams.py, the learner's step commit and duplicate check). `lk` = {ledger, outcomes, holders}.
LUA_RECORD = """
local function ledger_record(lk, id, outcome)
  local prev = redis.call('HGET', lk[1], id)
  if prev ~= outcome then
    redis.call('HSET', lk[1], id, outcome)
    redis.call('HINCRBY', lk[2], outcome, 1)
    if prev then redis.call('HINCRBY', lk[2], prev, -1) end
  end
  if outcome ~= '""" + PRODUCED + """' then redis.call('HDEL', lk[3], id) end
end
"""

_RECORD = LUA_RECORD + """
local lk = {KEYS[1], KEYS[2], KEYS[3]}
for i = 1, #ARGV, 2 do ledger_record(lk, ARGV[i], ARGV[i + 1]) end
return 1
"""


def keys(names: Names) -> list[str]:
    """The ledger's keys in the order `LUA_RECORD`'s `lk` expects: ledger, outcomes, holders."""
    return [names.ledger, names.key("outcomes"), names.key("ledger:holders")]


def duplicates_key(names: Names) -> str:
    """Counter of refused copies of an id already trained or in flight (see the module docstring)."""
    return names.counter("duplicates")


def record(pipe: Any, names: Names, outcomes: dict[str, str]) -> None:
    """Queue the outcome update on a client or (transactional) pipeline.

    Sent as EVAL, not EVALSHA: a pipeline loads its scripts once, before MULTI, so a transaction retried
    against a restarted Redis (empty script cache) would fail with NOSCRIPT.
    """
    if not outcomes:
        return
    args: list[str] = []
    for message_id, outcome in outcomes.items():
        args += [message_id, outcome]
    pipe.eval(_RECORD, 3, *keys(names), *args)


def duplicates(client: redis.Redis, names: Names) -> int:
    """Copies the learner refused because their id was already trained or in flight."""
    return int(client.get(duplicates_key(names)) or 0)


def counts(client: redis.Redis, names: Names) -> dict[str, int]:
    raw = client.hgetall(names.key("outcomes"))
    out = {k.decode(): int(v) for k, v in raw.items()}
    for key in (PRODUCED, *TERMINAL):
        out.setdefault(key, 0)
    return out


def outcome_of(client: redis.Redis, names: Names, message_id: str) -> str | None:
    value = client.hget(names.ledger, message_id)
    return value.decode() if value is not None else None


# KEYS: stats hash, applied hash (writer -> the last update of it applied). ARGV: writer, seq, then
# key, increment pairs. Returns 1 when applied; 0 when update `seq` of this writer (or a later one) was
# applied already: a retry of an update whose reply was lost (protocol/reconnect.py), which must not count twice.
_ADD_STATS = """
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def add_stats(client: redis.Redis, names: Names, *, writer: str, seq: int, **increments: float) -> bool:
    """Run-wide totals (tokens generated, scored, trained, FLOPs...) that outlive the processes that made them.

    Prometheus counters die with their process; the end-of-run summary, `opd top`, `learner.max_flops` and
    the experiment's compute marks read these. Because decisions are taken on them, an update is applied
    exactly once: ``(writer, seq)`` names it (`StatsWriter` numbers a process's updates 1, 2, ...), and the
    script applies it only if ``seq`` is above the last one applied for ``writer``, so the retry of an update
    whose reply was lost is refused. Returns whether it was applied (False: a repeat, or nothing to add).
    """
    args: list[str] = []
    for key, value in increments.items():
        if value:
            args += [key, repr(float(value))]
    if not args:
        return False
    return int(client.eval(_ADD_STATS, 2, names.key("stats"), names.key("stats:applied"), writer, seq, *args)) == 1


class StatsWriter:
    """One component's updates of the run stats, numbered so that each is applied once (`add_stats`).

    The writer name is the role's id plus this process's pid and a random token: a restarted process (same
    role id) starts its numbering again at 1 and must not be taken for the retries of its predecessor. The
    lock keeps the numbering in the order the updates reach Redis, which the script's "above the last"
    check relies on. Redis keeps one small field per writer (`<ns>:stats:applied`), one per process started.
    """

    def __init__(self, client: redis.Redis, names: Names, role_id: str) -> None:
        self.client, self.names = client, names
        self.writer = f"{role_id}:{os.getpid()}:{secrets.token_hex(4)}"
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, **increments: float) -> bool:
        """`add_stats` with this writer's next number; see there."""
        with self._lock:
            self._seq += 1
            return add_stats(self.client, self.names, writer=self.writer, seq=self._seq, **increments)


def set_stats(client: redis.Redis, names: Names, **values: float) -> None:
    """Run-wide levels (the held-out accuracy at the last evaluation...) in the same hash as the totals.

    Why a second writer: a measurement is not a sum, so it is overwritten rather than incremented; keeping it
    next to the totals lets the summary and `opd top` read one hash.
    """
    if values:
        client.hset(names.key("stats"), mapping={k: float(v) for k, v in values.items()})


def stats(client: redis.Redis, names: Names) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(names.key("stats")).items()}


# -- rollup: terminal fields folded into per-state counters, so the ledger stays bounded ------------------
#
# Why it is safe (docs/reliability.md, "Load and bounded memory", has the argument in full): an id M can
# only reach the learner again through a stream entry that carries M. Every terminal outcome is recorded in
# the same script that deletes the entry it settles, and the entry M was forwarded from was deleted when
# it was forwarded (fenced settle, protocol/streams.py), so after M is terminal no new entry carries M,
# except a publish of M retried after a lost reply, which is bounded in time (transport.reconnect_*).
# A field is therefore folded only when (1) it has been seen terminal for at least `keep_s`, longer than
# any publish retry, and (2) every entry that existed in the rollouts stream when it was seen terminal
# is gone and, after that, every entry that existed in the scored stream is gone too: entry ids are
# Redis server milliseconds and monotonic, and acknowledged entries are deleted, so "the oldest entry
# still in the stream is newer than T" means nothing from before T is undelivered or pending.

ROLLED = "ledger:rolled"  # hash: state -> ids folded out of the ledger in that state
RETIRED = "ledger:retired"  # zset: terminal id -> server ms it was first seen terminal (fold candidates)
MARKS = "ledger:rollup:marks"  # zset: "<ms>:<oldest rollouts ms>" scored by ms, one per rollup run

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function terminal(v) return v == '""" + TRAINED + "' or v == '" + DROPPED + "' or v == '" + DEAD + """' end
"""

# KEYS: ledger, retired. ARGV: HSCAN cursor, count. Returns {next cursor, ids newly seen terminal}.
_OBSERVE = _NOW_MS + """
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local kv, added = res[2], 0
for i = 1, #kv, 2 do
  if terminal(kv[i + 1]) then added = added + redis.call('ZADD', KEYS[2], 'NX', now, kv[i]) end
end
return {res[1], added}
"""

# KEYS: ledger, retired, rolled, marks, rollouts stream, scored stream. ARGV: keep ms, limit.
# Returns {ids folded, candidates looked at, the safe bound (ms; -1: none yet)}.
_FOLD = _NOW_MS + """
local function oldest(stream)
  local e = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #e == 0 then return now end
  return math.min(tonumber(string.match(e[1][1], '^(%d+)')), now)
end
local r_old, s_old = oldest(KEYS[5]), oldest(KEYS[6])
redis.call('ZADD', KEYS[4], now, now .. ':' .. r_old)
local best = redis.call('ZREVRANGEBYSCORE', KEYS[4], '(' .. s_old, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #best == 0 then return {0, 0, -1} end
local bound = tonumber(string.match(best[1], ':(%d+)$'))
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. best[2])
local cut = math.min(bound, now - tonumber(ARGV[1]) + 1)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. cut, 'LIMIT', 0, tonumber(ARGV[2]))
local folded = 0
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[1], id)
  if terminal(v) then
    redis.call('HDEL', KEYS[1], id)
    redis.call('HINCRBY', KEYS[3], v, 1)
    folded = folded + 1
  end
  redis.call('ZREM', KEYS[2], id)
end
return {folded, #ids, bound}
"""


@dataclass
class RollupResult:
    """One rollup: ids newly seen terminal, ids folded into `ledger:rolled`, and the ledger's fields after it."""

    observed: int = 0
    folded: int = 0
    fields: int = 0


def rolled(client: redis.Redis, names: Names) -> dict[str, int]:
    """Ids folded out of the ledger, per terminal state (they are still counted in `counts()`)."""
    out = {k.decode(): int(v) for k, v in client.hgetall(names.key(ROLLED)).items()}
    return {state: out.get(state, 0) for state in TERMINAL}


def rollup(client: redis.Redis, names: Names, *, keep_s: float, batch: int = 1000) -> RollupResult:
    """Fold terminal fields that can no longer be met again into per-state counters (see above).

    Each script is atomic and the Python loop keeps no state, so two rollups at once, or one killed
    half-way, fold every id exactly once. Two passes (runs) at least are needed before anything folds:
    the first only records when it saw the streams.
    """
    result = RollupResult()
    cursor = "0"
    while True:  # pass 1: note when each terminal id was first seen (one full HSCAN of the ledger)
        cursor, added = client.eval(_OBSERVE, 2, names.ledger, names.key(RETIRED), cursor, batch)
        result.observed += int(added)
        if cursor in (b"0", "0", 0):
            break
    keys = [names.ledger, names.key(RETIRED), names.key(ROLLED), names.key(MARKS), names.rollouts, names.scored]
    while True:  # pass 2: fold what is old enough, `batch` at a time (short scripts: Redis stays responsive)
        folded, looked, _bound = client.eval(_FOLD, len(keys), *keys, int(keep_s * 1000), batch)
        result.folded += int(folded)
        if int(looked) < batch:
            break
    result.fields = int(client.hlen(names.ledger))
    return result


@dataclass
class Audit:
    """The ledger's books: `outcomes` (totals per state) must equal the fields in each state plus the ids rolled up."""

    outcomes: dict[str, int]
    fields: dict[str, int]
    rolled: dict[str, int]

    @property
    def conserved(self) -> bool:
        return all(self.outcomes[s] == self.fields.get(s, 0) + self.rolled.get(s, 0) for s in (PRODUCED, *TERMINAL))

    @property
    def total(self) -> int:
        """Distinct ids ever recorded: fields plus rolled-up ids."""
        return sum(self.fields.values()) + sum(self.rolled.values())


def audit(client: redis.Redis, names: Names) -> Audit:
    """Read the books for a conservation check (tests, operators): counters and fields, never fields alone."""
    fields: dict[str, int] = {}
    for _id, value in client.hscan_iter(names.ledger, count=1000):
        state = value.decode()
        fields[state] = fields.get(state, 0) + 1
    return Audit(outcomes=counts(client, names), fields=fields, rolled=rolled(client, names))


RETRY_MARGIN_S = 75.0
"""Beyond `reconnect_give_up_s + reconnect_cap_s`, how late a publish retried after a lost reply can still land:
the socket timeout that detects the loss (30 s, protocol/streams.py `connect`), an immediate reconnect (10 s
connect timeout), the retry's own round trip (30 s), and slack. `ledger_keep_s` must cover it all."""


def min_keep_s(give_up_s: float, cap_s: float) -> float:
    """The shortest `transport.ledger_keep_s` that outlasts every publish retry (see `RETRY_MARGIN_S`)."""
    return give_up_s + cap_s + RETRY_MARGIN_S


class PeriodicRollup:
    """`rollup` at most every `every_s` seconds (0: never); the learner calls `maybe_run` after each step.

    Why the learner: it is the one role that is always running while the ledger grows, and it already
    writes most terminal outcomes. Why on a thread (`background`): a pass scans the whole ledger (about
    20 us a field on a loaded 2-core machine: 2 s for 100k fields), which must not stall training; Redis
    itself is blocked only for one short script at a time. Several learners (ranks) at once are harmless
    (atomic scripts), and so is a learner killed mid-pass.
    """

    def __init__(self, client: redis.Redis, names: Names, *, every_s: float, keep_s: float,
                 on_result: Callable[[RollupResult], None] | None = None, background: bool = True) -> None:
        self.client, self.names = client, names
        self.every_s, self.keep_s = every_s, keep_s
        self.on_result = on_result
        self.background = background
        self._next = 0.0
        self._thread: threading.Thread | None = None

    def maybe_run(self) -> bool:
        """Start a rollup if one is due and none is still running; True when one started."""
        now = time.monotonic()
        if self.every_s <= 0 or now < self._next or (self._thread is not None and self._thread.is_alive()):
            return False
        self._next = now + self.every_s
        if not self.background:
            self._run()
            return True
        self._thread = threading.Thread(target=self._run, name="ledger-rollup", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            result = rollup(self.client, self.names, keep_s=self.keep_s)
        except Exception as exc:  # housekeeping: a failed pass is retried at the next, training goes on
            log.warning("ledger rollup failed (next try in %gs): %s", self.every_s, exc)
            return
        if self.on_result is not None:
            self.on_result(result)
