"""Conservation accounting: every prefix an actor produces ends exactly once as trained, dropped or dead.

The ledger is a hash `message id -> outcome`, and `outcomes` a hash `outcome -> count` kept equal to
the number of ids in each state by one Lua script (atomic, and usable inside MULTI), so
`outcomes["produced"]` is the work in flight and a repeated outcome is never counted twice.
"""

from __future__ import annotations

from typing import Any

import redis

from protocol.names import Names

PRODUCED, TRAINED, DROPPED, DEAD = "produced", "trained", "dropped", "dead"
TERMINAL = (TRAINED, DROPPED, DEAD)

_RECORD = """
for i = 1, #ARGV, 2 do
  local prev = redis.call('HGET', KEYS[1], ARGV[i])
  if prev ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1], 1)
    if prev then redis.call('HINCRBY', KEYS[2], prev, -1) end
  end
end
return 1
"""


def record(pipe: Any, names: Names, outcomes: dict[str, str]) -> None:
    """Queue the outcome update on a client or (transactional) pipeline."""
    if not outcomes:
        return
    args: list[str] = []
    for message_id, outcome in outcomes.items():
        args += [message_id, outcome]
    pipe.eval(_RECORD, 2, names.ledger, names.key("outcomes"), *args)


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


def stats(client: redis.Redis, names: Names) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(names.key("stats")).items()}
