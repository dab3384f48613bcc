"""`opd top --once` against a real Redis holding a pipeline's state, through the real CLI.

Why: `opd top` is what an operator runs against a deployment that misbehaves; it must show the key
numbers from the keys the roles actually write (protocol.names / protocol.ledger / register_endpoint),
say which replicas stopped answering, and fail with a readable error (no password) when Redis is
not there.

Pins:
- into a pipe, `--once` prints plain `what: value` lines with the learner's step, version and phase,
  loss, queue depth per stream, token totals and percentages, ledger outcomes, dead letters, and every
  registered /metrics endpoint, marking one that does not answer `(down)` while the run goes on and
  `(stopped)` once the learner says it is done;
- the per-replica row comes from the live replica's own /metrics;
- the rich table (what a terminal and the launcher show) has the same rows; the live view adds
  tokens/s per stage from two consecutive snapshots;
- an unreachable Redis is exit code 1 with the URL, its password masked.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from opd.top import render, render_text, rows, snapshot
from protocol import ledger
from protocol.names import Names
from protocol.runtime import register_endpoint
from protocol.state import LearnerState, publish_state
from protocol.telemetry import MetricsServer, actor_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NS = "toptest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def pipeline_state(redis_url: str) -> Iterator[redis.Redis]:
    """What a run leaves in Redis mid-flight, written with the same helpers the roles use."""
    client = redis.Redis.from_url(redis_url)
    names = Names(NS)
    publish_state(client, names, LearnerState(step=17, version=18, batch_size=4, max_staleness=1, loss=0.51234,
                                              reverse_kl=0.25, support_kl=0.0312, tokens_per_second=1234.0, idle_fraction=0.125, phase="done"))
    for i in range(3):
        client.xadd(names.rollouts, {b"m": f"r{i}".encode()})
    for i in range(2):
        client.xadd(names.scored, {b"m": f"s{i}".encode()})
    client.xadd(names.dead, {b"m": b"x", b"stream": names.rollouts.encode(), b"reason": b"malformed: x"})
    outcomes = {f"p{i}": ledger.PRODUCED for i in range(4)}
    outcomes |= {f"t{i}": ledger.TRAINED for i in range(5)} | {"d0": ledger.DROPPED, "d1": ledger.DROPPED, "x0": ledger.DEAD}
    ledger.record(client, names, outcomes)
    ledger.add_stats(client, names, writer="test", seq=1, actor_tokens_generated=1500, actor_tokens_saved=500,
                     teacher_tokens_scored=750, teacher_tokens_cached=250, flops_saved_truncation=2e9, flops_saved_cache=3e8,
                     # 3 probes (300 tokens) saved 10, 20 and 30 past their drawn horizons; 30 other rollouts truncated
                     actor_budget_tokens=2500, actor_truncated=30, actor_probes=3, actor_probe_tokens=300,
                     probe_saving_sum=60, probe_saving_sq_sum=1400)
    registry = CollectorRegistry()
    metrics = actor_metrics(registry)
    metrics.tokens_generated.inc(321)
    server = MetricsServer(registry)
    register_endpoint(client, names, "actor-0", server.url)
    register_endpoint(client, names, "teacher-0", f"http://127.0.0.1:{_free_port()}/metrics")  # a replica that is gone
    try:
        yield client
    finally:
        server.close()


def _top(redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opd.cli", "top", "--once", "--set", f"transport.redis_url={redis_url}",
         "--set", f"transport.namespace={NS}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def _parse(text: str) -> dict[str, list[str]]:
    """`what: value` lines (`what` ends at the first colon followed by a blank: stream names hold
    colons); indented lines continue the previous value."""
    out: dict[str, list[str]] = {}
    last = ""
    for line in text.splitlines():
        if line.startswith(" ") and last:
            out[last].append(line.strip())
            continue
        match = re.match(r"^(\S.*?):\s+(.*)$", line)
        assert match, f"not a `what: value` line: {line!r}"
        last = match.group(1)
        out[last] = [match.group(2).strip()]
    return out


def test_top_once_prints_the_key_numbers(pipeline_state: redis.Redis, redis_url: str) -> None:
    result = _top(redis_url)
    assert result.returncode == 0, result.stderr
    assert "┃" not in result.stdout and "│" not in result.stdout, "a pipe should get plain lines"
    shown = _parse(result.stdout)
    assert shown["learner step / version"] == ["17 / 18 (done)"]
    assert shown["reverse KL on training prefixes (sampled est.)"] == ["0.2500"]  # the true KL's estimate
    assert shown["loss / the loss's top-k support KL"] == ["0.5123 / 0.0312"]  # the bucket, a lower bound
    assert shown["learner tokens/s, idle fraction"] == ["1234, 0.12"]
    assert shown[f"queue depth {NS}:rollouts"] == ["3"]
    assert shown[f"queue depth {NS}:scored"] == ["2"]
    assert shown["student tokens generated (in probes)"] == ["1500 (300)"]
    assert shown["saved by truncation (budget bound)"] == ["at most 500 (20% of the budget)"]
    # 30 x mean(10, 20, 30) = 600 +- sd 10 x sqrt(30^2 / 3 + 30); 600 / (1500 - 300 + 600) of full rollouts
    assert shown["saved by truncation (probe estimate)"] == [
        "600 +- 182 (33% of what full rollouts would have generated; 3 probes, 60 extra tokens)"]
    assert shown["teacher tokens scored / served from cache"] == ["750 / 250 (25% hit)"]
    assert shown["FLOPs saved (truncation bound + cache)"] == ["2e+09 + 3e+08"]
    assert shown["prefixes in flight / trained / dropped / dead"] == ["4 / 5 / 2 / 1"]
    assert shown["dead-letter stream length"] == ["1"]
    assert shown["tokens so far per live replica"] == ["actor-0: 321"]
    endpoints = shown["metrics endpoints"]
    assert len(endpoints) == 2
    assert endpoints[0].startswith("actor-0: http://127.0.0.1:") and not endpoints[0].endswith(")")
    # The learner says the run is done, so a replica that no longer answers has stopped, not failed.
    assert endpoints[1].startswith("teacher-0: http://127.0.0.1:") and endpoints[1].endswith("(stopped)")



def test_a_silent_replica_of_a_running_pipeline_is_down(redis_url: str, pipeline_state: redis.Redis) -> None:
    publish_state(pipeline_state, Names(NS), LearnerState(step=17, version=18, batch_size=4, max_staleness=1))
    result = _top(redis_url)
    assert result.returncode == 0, result.stderr
    endpoints = _parse(result.stdout)["metrics endpoints"]
    assert endpoints[1].startswith("teacher-0: ") and endpoints[1].endswith("(down)")

def test_a_malformed_learner_state_is_shown_not_raised(redis_url: str, pipeline_state: redis.Redis) -> None:
    pipeline_state.set(Names(NS).learner_state, b"\xc1 garbage")
    result = _top(redis_url)
    assert result.returncode == 0, result.stderr
    shown = _parse(result.stdout)
    assert shown["learner step / version"][0].startswith("- (learner state is malformed: message: not valid msgpack")
    assert shown["prefixes in flight / trained / dropped / dead"] == ["4 / 5 / 2 / 1"]  # the rest is still there
    assert shown["metrics endpoints"][1].endswith("(down)")  # no state saying the run is done


def test_the_table_has_the_same_rows(pipeline_state: redis.Redis) -> None:
    from rich.console import Console

    snap = snapshot(pipeline_state, Names(NS))
    console = Console(record=True, width=240)
    console.print(render(snap))
    table = console.export_text()
    for what, value in rows(snap):
        assert what in table
        for line in value.split("\n"):
            assert line in table, f"{what}: {line!r} missing from the table"
    assert render_text(snap).count("\n") >= len(rows(snap)) - 1


def test_top_fails_clearly_without_redis() -> None:
    url = f"redis://:s3cret@127.0.0.1:{_free_port()}/0"
    result = _top(url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "opd top: error: Redis at redis://:***@127.0.0.1:" in result.stderr, result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_the_live_view_shows_rates_between_two_snapshots(pipeline_state: redis.Redis) -> None:
    names = Names(NS)
    first = snapshot(pipeline_state, names)
    assert not any(what.startswith("tokens/s now") for what, _ in rows(first)), "one snapshot has no rate"
    ledger.StatsWriter(pipeline_state, names, "test").add(actor_tokens_generated=400, teacher_tokens_scored=200,
                                                          teacher_tokens_cached=100)
    second = snapshot(pipeline_state, names)
    second.taken_at = first.taken_at + 2.0  # the rate is per second of the snapshots' own clock
    shown = dict(rows(second, first))
    assert shown["tokens/s now: actors / teachers (scored + cached)"] == "200 / 100 + 50"
