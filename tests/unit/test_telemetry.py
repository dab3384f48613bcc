"""Metrics: `protocol.telemetry`.

Behaviours pinned here:
- `MetricsServer` on port 0 binds a real free port and serves `/metrics` in the Prometheus text format
  with the documented `opd_*` names (counters with `_total`), and the values set through the metric
  objects; `/metrics?query` and `/metrics/` are the same page;
- `/health` answers 200 `ok`; any other path (including `/`, `/metricsfoo`, `/healthz`) answers 404;
- `close()` stops the server (the port no longer answers);
- registries are isolated: two `actor_metrics` on different registries do not collide and do not share
  values, the three role builders coexist on their own registries, and building the same role twice
  on one registry is refused (a duplicate metric would otherwise be silently shadowed).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from protocol.telemetry import MetricsServer, actor_metrics, learner_metrics, teacher_metrics


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    srv = MetricsServer(registry, port=0)
    yield srv
    srv.close()


def base(server: MetricsServer) -> str:
    return f"http://{server.host}:{server.port}"


def sample(text: str, name: str) -> float:
    """Value of one exact sample line `name value` in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


def test_metrics_endpoint_serves_documented_names(registry: CollectorRegistry, server: MetricsServer) -> None:
    metrics = actor_metrics(registry)
    metrics.prefixes.inc(3)
    metrics.tokens_generated.inc(120)
    metrics.policy_version.set(7)
    metrics.horizon.observe(5)
    metrics.queue_depth.labels(stream="opd:rollouts").set(11)
    metrics.compute_saved.labels(stage="actor_truncation").inc(1e9)
    metrics.dead_letters.labels(stream="opd:rollouts", reason="malformed").inc()

    assert server.port > 0
    assert server.url == f"{base(server)}/metrics"
    status, ctype, text = get(server.url)
    assert status == 200
    assert ctype.startswith("text/plain")
    for name in (
        "opd_actor_prefixes_total",
        "opd_actor_tokens_generated_total",
        "opd_actor_tokens_saved_bound_total",
        "opd_actor_probes_total",
        "opd_actor_tokens_saved_estimate",
        "opd_actor_tokens_saved_estimate_stderr",
        "opd_actor_horizon_tokens_bucket",
        "opd_actor_policy_version",
        "opd_queue_depth",
        "opd_compute_saved_flops_total",
        "opd_dead_letters_total",
    ):
        assert f"\n{name}" in text, name
    assert sample(text, "opd_actor_prefixes_total") == 3
    assert sample(text, "opd_actor_tokens_generated_total") == 120
    assert sample(text, "opd_actor_policy_version") == 7
    assert sample(text, "opd_actor_tokens_saved_estimate_stderr") == float("inf")  # unknown before two probes
    assert sample(text, 'opd_queue_depth{stream="opd:rollouts"}') == 11
    assert sample(text, 'opd_actor_horizon_tokens_bucket{le="4.0"}') == 0
    assert sample(text, 'opd_actor_horizon_tokens_bucket{le="8.0"}') == 1
    assert sample(text, 'opd_dead_letters_total{reason="malformed",stream="opd:rollouts"}') == 1

    # a later scrape sees later values (it is live, not a snapshot taken at start)
    metrics.prefixes.inc()
    assert sample(get(server.url)[2], "opd_actor_prefixes_total") == 4
    assert get(server.url + "?name=x")[0] == 200
    assert get(base(server) + "/metrics/")[0] == 200


def test_teacher_and_learner_names(registry: CollectorRegistry, server: MetricsServer) -> None:
    other = CollectorRegistry()
    teacher_metrics(registry).cache_hit_tokens.inc(5)
    learner_metrics(other)
    text = get(server.url)[2]
    for name in ("opd_teacher_tokens_scored_total", "opd_cache_hit_tokens_total", "opd_cache_miss_tokens_total",
                 "opd_cache_bytes_written_total", "opd_teacher_tokens_cached_total"):
        assert f"\n{name}" in text, name
    assert sample(text, "opd_cache_hit_tokens_total") == 5
    assert "opd_learner_steps_total" not in text  # built on another registry
    names = {m.name for m in other.collect()}
    assert {"opd_learner_steps", "opd_learner_loss", "opd_learner_reverse_kl", "opd_learner_staleness",
            "opd_learner_dropped", "opd_learner_tokens_trained", "opd_learner_policy_version",
            "opd_learner_tokens_per_second"} <= names


def test_health(server: MetricsServer) -> None:
    status, _ctype, text = get(base(server) + "/health")
    assert (status, text) == (200, "ok\n")


@pytest.mark.parametrize("path", ["/", "/nope", "/metricsfoo", "/healthz", "/favicon.ico"])
def test_other_paths_are_404(server: MetricsServer, path: str) -> None:
    status, _ctype, text = get(base(server) + path)
    assert status == 404
    assert "opd_" not in text


def test_close_stops_serving(registry: CollectorRegistry) -> None:
    srv = MetricsServer(registry, port=0)
    assert get(srv.url)[0] == 200
    srv.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url, timeout=2)


def test_registries_are_isolated() -> None:
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    a, b = actor_metrics(reg_a), actor_metrics(reg_b)  # would raise "Duplicated timeseries" if shared
    a.prefixes.inc(2)
    b.prefixes.inc(5)
    assert reg_a.get_sample_value("opd_actor_prefixes_total") == 2
    assert reg_b.get_sample_value("opd_actor_prefixes_total") == 5
    servers = [MetricsServer(reg_a), MetricsServer(reg_b)]
    try:
        assert servers[0].port != servers[1].port
        assert sample(get(servers[0].url)[2], "opd_actor_prefixes_total") == 2
        assert sample(get(servers[1].url)[2], "opd_actor_prefixes_total") == 5
    finally:
        for srv in servers:
            srv.close()


def test_all_roles_coexist_on_separate_registries_but_not_twice_on_one() -> None:
    # `opd_compute_saved_flops` exists for actor and teacher; separate registries keep them apart
    actor_metrics(CollectorRegistry())
    teacher_metrics(CollectorRegistry())
    learner_metrics(CollectorRegistry())
    shared = CollectorRegistry()
    actor_metrics(shared)
    with pytest.raises(ValueError, match="Duplicated"):
        actor_metrics(shared)
