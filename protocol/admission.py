"""Admission slots as per-actor leases: the wire contract (keys, Lua scripts) actors and tools share.

Why leases: producer-side staleness control (AReaL's) lets at most `(max_staleness + 1) x batch_size +
retired` prefixes be admitted. Slots used to be one shared counter, raised with INCRBY and lowered only
by a graceful exit, so an actor SIGKILLed, OOM-killed or failing while it held a batch kept its slots
forever: a handful of crashes stalled admission for good. Now each actor's unpublished slots are a field
of its own, kept alive by its heartbeat; an actor whose heartbeat stops is reclaimed (its slots freed, it
leaves the registry) by the next admission anyone asks for. Nothing here is cumulative except the
ledger, so the books heal by themselves.

Keys (`protocol/names.py`):
- `<ns>:admission:leases` (hash): actor id -> slots it reserved and has not published yet;
- `<ns>:admission:expiry` (zset): actor id -> Redis-server ms its heartbeat is good until;
- `<ns>:actors` (set): the actor registry (a draining learner waits for it to empty);
- `<ns>:outcomes` (hash, the ledger's totals): the sum of its fields is every id ever published.

The bound, checked in one script: `published + sum(leases) + want <= limit`, with `published` the ledger's
total (ids publish and lease spend are recorded together, `LUA_SPEND` inside the publish script of
protocol/streams.py) and `limit` the caller's `(max_staleness + 1) x batch_size + retired` from the learner's
published state. Every script reads the time from Redis (`TIME`), so clocks of the actors' machines do not
matter. A live actor whose heartbeat lapsed (stopped for longer than its lease) is reclaimed too: its batch
is then briefly not counted (at most one batch over the bound, once) and counts again when published.
"""

from __future__ import annotations

import redis

from protocol.names import Names

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Frees every lease whose heartbeat expired and drops its actor from the registry. Needs `now` (_NOW);
# `ak` = {leases, expiry, registry}. Returns how many actors were reclaimed.
_LUA_RECLAIM = """
local function admission_reclaim(ak, now)
  local dead = redis.call('ZRANGEBYSCORE', ak[2], '-inf', now)
  for _, actor in ipairs(dead) do
    redis.call('HDEL', ak[1], actor)
    redis.call('ZREM', ak[2], actor)
    redis.call('SREM', ak[3], actor)
  end
  return #dead
end
local function admission_sum(key)
  local total = 0
  for _, v in ipairs(redis.call('HVALS', key)) do total = total + tonumber(v) end
  return total
end
"""

LUA_SPEND = """
local function admission_spend(leases, actor, n)
  if n <= 0 then return end
  local left = tonumber(redis.call('HGET', leases, actor) or '0') - n
  if left > 0 then redis.call('HSET', leases, actor, left) else redis.call('HDEL', leases, actor) end
end
"""
"""Lua: `admission_spend(leases key, actor id, n)`: `n` of the actor's slots became published entries (never
below zero: a lease reclaimed while its actor was stopped has nothing left to spend). Included by the publish
script of protocol/streams.py so the ledger's `produced` and the lease move in one step."""

# KEYS: leases, expiry, registry, ledger outcomes. ARGV: actor id, want, limit, lease ms.
# Reclaims expired leases, then grants min(want, limit - published - held by all) (never negative), adds it
# to the actor's lease and renews its heartbeat. Returns {granted, held by all after, published}.
_ACQUIRE = _NOW + _LUA_RECLAIM + """
local ak = {KEYS[1], KEYS[2], KEYS[3]}
admission_reclaim(ak, now)
local actor, want, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local published, held = admission_sum(KEYS[4]), admission_sum(KEYS[1])
local grant = math.max(0, math.min(want, limit - published - held))
if grant > 0 then redis.call('HINCRBY', KEYS[1], actor, grant) end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), actor)
redis.call('SADD', KEYS[3], actor)
return {grant, held + grant, published}
"""

# KEYS: leases. ARGV: actor id, n ('all': every slot it holds). Returns the slots it still holds.
_RELEASE = LUA_SPEND + """
if ARGV[2] == 'all' then redis.call('HDEL', KEYS[1], ARGV[1]) return 0 end
admission_spend(KEYS[1], ARGV[1], tonumber(ARGV[2]))
return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
"""

# KEYS: expiry, registry. ARGV: actor id, lease ms. The heartbeat: the actor is alive (and registered) for
# another lease. Returns 1.
_BEAT = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: leases, expiry, registry. ARGV: actor id. A graceful exit (or a fresh start under the same id):
# slots given back, heartbeat and registration dropped. Returns 1.
_LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: leases, expiry, registry. ARGV: none. Reclaims expired leases. Returns {actors reclaimed, held by all}.
_RECLAIM = _NOW + _LUA_RECLAIM + """
local n = admission_reclaim({KEYS[1], KEYS[2], KEYS[3]}, now)
return {n, admission_sum(KEYS[1])}
"""


def lease_keys(names: Names) -> list[str]:
    """leases, expiry, registry: the keys every lease script takes first."""
    return [names.admission_leases, names.admission_expiry, names.actors]


def acquire(client: redis.Redis, names: Names, actor: str, *, want: int, limit: int, lease_ms: int) -> int:
    """Reserve up to `want` slots under `limit` for `actor` (renewing its heartbeat); returns how many.

    Additive: a call retried after a lost reply may reserve twice; the actor gives back all it holds at the
    end of each batch (`release(..., n=None)`), so the surplus lives one batch at most.
    """
    granted, _held, _published = client.eval(_ACQUIRE, 4, *lease_keys(names), names.key("outcomes"), actor,
                                             int(want), int(limit), int(lease_ms))
    return int(granted)


def release(client: redis.Redis, names: Names, actor: str, n: int | None = None) -> int:
    """Give back `n` of `actor`'s slots (None: all of them); returns how many it still holds."""
    return int(client.eval(_RELEASE, 1, names.admission_leases, actor, "all" if n is None else int(n)))


def beat(client: redis.Redis, names: Names, actor: str, *, lease_ms: int) -> None:
    """`actor` is alive for another `lease_ms` (and registered: a lease reclaimed by mistake comes back)."""
    client.eval(_BEAT, 2, names.admission_expiry, names.actors, actor, int(lease_ms))


def leave(client: redis.Redis, names: Names, actor: str) -> None:
    """`actor` exits (or starts afresh): its slots are freed and it leaves the registry."""
    client.eval(_LEAVE, 3, *lease_keys(names), actor)


def reclaim(client: redis.Redis, names: Names) -> int:
    """Reclaim expired leases now (acquire does it anyway); returns the slots all live leases hold after."""
    _n, held = client.eval(_RECLAIM, 3, *lease_keys(names))
    return int(held)


def leases(client: redis.Redis, names: Names) -> dict[str, int]:
    """Actor id -> slots it holds, as stored (an expired lease is listed until something reclaims it)."""
    return {k.decode(): int(v) for k, v in client.hgetall(names.admission_leases).items()}
