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
"""

from __future__ import annotations

from typing import Any

import redis

from protocol.names import Names

PRODUCED, TRAINED, DROPPED, DEAD = "produced", "trained", "dropped", "dead"
TERMINAL = (TRAINED, DROPPED, DEAD)

# The one definition of an outcome update, for every script that records one (`record` below, the
# fenced settle of protocol/streams.py, the learner's duplicate check). `lk` = {ledger, outcomes, holders}.
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


def add_stats(client: redis.Redis, names: Names, **increments: float) -> None:
    """Run-wide totals (tokens generated, saved, scored, cached...) that outlive the processes that made them.

    Prometheus counters die with their process; the end-of-run summary and `opd top` read these.
    """
    pipe = client.pipeline(transaction=False)
    for key, value in increments.items():
        if value:
            pipe.hincrbyfloat(names.key("stats"), key, float(value))
    pipe.execute()


def set_stats(client: redis.Redis, names: Names, **values: float) -> None:
    """Run-wide levels (the held-out accuracy at the last evaluation...) in the same hash as the totals.

    Why a second writer: a measurement is not a sum, so it is overwritten rather than incremented; keeping it
    next to the totals lets the summary and `opd top` read one hash.
    """
    if values:
        client.hset(names.key("stats"), mapping={k: float(v) for k, v in values.items()})


def stats(client: redis.Redis, names: Names) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(names.key("stats")).items()}
