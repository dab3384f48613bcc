"""The Grafana dashboard against a real Prometheus scraping a real pipeline run.

Why: the dashboard is only ever looked at when something is wrong, which is the worst moment to find
a panel that says "No data" because its query names a metric that does not exist (a typo, a renamed
metric, a label no role sets). PromQL cannot tell a misspelt metric from an idle one; only data can.

Pins:
- every PromQL expression of deploy/grafana/dashboards/opd.json, with Grafana's variables filled in,
  returns data from Prometheus (the Debian `prometheus` binary, loopback, a generated config) while
  `opd up` runs 2 actors, 1 teacher and 1 learner on tiny CPU models;
- the check has teeth: the same expression with any one of its metric names misspelt returns nothing;
- targets carry `job` = role and `instance` = replica id (as compose's DNS discovery gives one
  `instance` per replica), so the per-replica panels show one line per replica;
- labelled series with known label values exist from the start (drop reasons), and the exported
  metric names are exactly those of the table in docs/architecture.md.

Targets come from Redis `<ns>:endpoints` (each role registers its /metrics URL there) and are written
to a `file_sd_configs` file that Prometheus re-reads on change, so no restart is needed as roles appear.
Queries are evaluated at one instant (`time=`) at which every target had just been scraped while the
run was going (the roles are kept up until the module is done): after a run, series go stale and
instant queries would rightly return nothing.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from prometheus_client import CollectorRegistry
from promql import (
    METRIC,
    Prometheus,
    PrometheusUnavailable,
    Query,
    dashboard_queries,
    grafana_variables,
    misspelt,
    queries_without_data,
    substitute,
)

from protocol.names import Names
from protocol.state import LearnerState, read_state
from protocol.telemetry import LEARNER_DROP_REASONS, actor_metrics, learner_metrics, teacher_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "opd.json"
ARCHITECTURE = REPO / "docs" / "architecture.md"
REPLICAS = {"actor": 2, "teacher": 1, "learner": 1}
SCRAPE_INTERVAL_S = 1
# What Grafana would give `$__rate_interval` for a 1 s scrape interval on a short time range is 4 s;
# a wider window keeps rate() defined at the chosen instant even if a learner step takes a while.
RATE_INTERVAL = "30s"
# More steps than the module will ever wait for: a tiny CPU run trains ~10 steps/s, which would end
# before Prometheus has scraped a few times. The roles stay up until the module is done, and the
# launcher is then stopped like a user would (Ctrl-C).
STEPS = 1_000_000
READY_STEP = 10  # learner steps done before the dashboard is judged: every stage has produced work
DEADLINE_S = 360.0

# ----------------------------------------------------------------- the run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = ("prometheus not found on PATH: install it with `apt-get install prometheus` "
                  "(scripts/test.sh does, through OPD_WITH_TEST_TOOLS=1 bash scripts/setup.sh)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def _write_targets(path: Path, endpoints: dict[str, str]) -> None:
    """file_sd targets: `job` = role, `instance` = replica id; replaced atomically (Prometheus watches it)."""
    groups = []
    for role_id, url in sorted(endpoints.items()):
        parts = urllib.parse.urlsplit(url)
        groups.append({"targets": [parts.netloc], "labels": {
            "job": role_id.split("-")[0], "instance": role_id, "__metrics_path__": parts.path or "/metrics"}})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    os.replace(tmp, path)


def _prometheus_config(targets: Path) -> str:
    return json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [{"job_name": "opd", "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}],
    }, indent=1)


@dataclass
class ScrapedRun:
    prom: Prometheus
    at: float  # an instant at which every role was up and had just been scraped
    range_s: int  # from Prometheus' start to `at`: the dashboard's time range for `$__range`


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scraped_run(redis_server: str, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapedRun]:
    """`opd up` scraped by Prometheus every second, until every role is up and has done work."""
    binary = _prometheus_binary()
    tmp = tmp_path_factory.mktemp("dashboard")
    ns = f"dash{os.getpid()}"
    names = Names(ns)
    client = redis.Redis.from_url(redis_server)
    targets = tmp / "targets.json"
    _write_targets(targets, {})
    config = tmp / "prometheus.yml"
    config.write_text(_prometheus_config(targets))
    port = _free_port()
    prom_log = tmp / "prometheus.log"
    workdir = tmp / "run"
    overrides = [
        f"transport.redis_url={redis_server}", f"transport.namespace={ns}", f"run.workdir={workdir}",
        "run.tiny_assets=null", "run.warm_cache=null", f"run.actors={REPLICAS['actor']}", f"run.teachers={REPLICAS['teacher']}",
        f"actor.model_dir={tiny_assets / 'student'}", f"actor.prompts_file={tiny_assets / 'prompts.jsonl'}",
        f"teacher.model_dir={tiny_assets / 'teacher'}", f"teacher.cache_dir={tmp / 'cache'}",
        f"learner.model_dir={tiny_assets / 'student'}", f"learner.workdir={workdir / 'learner'}",
        f"learner.eval.heldout_file={tiny_assets / 'heldout.jsonl'}", f"learner.eval.teacher_dir={tiny_assets / 'teacher'}",
        "learner.eval.every=0", "learner.checkpoint_every=1000",
    ]
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "--steps", str(STEPS), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    launcher_log = tmp / "launcher.log"
    with open(prom_log, "wb") as plog, open(launcher_log, "wb") as llog:
        prom_proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=plog, stderr=subprocess.STDOUT,
        )
        prom_started = time.time()
        launcher = subprocess.Popen(cmd, cwd=REPO, stdout=llog, stderr=subprocess.STDOUT)
        try:
            prom = Prometheus(f"http://127.0.0.1:{port}")
            # /-/ready answers 503 until the TSDB is open (seconds on a loaded machine): wait for it.
            prom.wait_ready(DEADLINE_S, alive=lambda: prom_proc.poll() is None)
            at = _wait_until_scraped(prom, prom_proc, prom_log, launcher, launcher_log, client, names, targets)
            yield ScrapedRun(prom, at, math.ceil(at - prom_started))
        finally:
            _stop(launcher, signal.SIGINT, 60)  # the launcher stops its roles on Ctrl-C
            _stop(prom_proc, signal.SIGTERM, 30)


def _wait_until_scraped(prom: Prometheus, prom_proc: subprocess.Popen[bytes], prom_log: Path,
                        launcher: subprocess.Popen[bytes], launcher_log: Path, client: redis.Redis, names: Names,
                        targets: Path) -> float:
    """Poll until every replica is up, the learner has trained, a dead letter exists, and every target
    was scraped after all that; returns the latest instant at which every target had been scraped."""
    deadline = time.monotonic() + DEADLINE_S
    written: dict[str, str] = {}
    injected = False
    ready_at: float | None = None
    state = "starting"
    want = sum(REPLICAS.values())
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            pytest.fail(f"`opd up` exited with {launcher.returncode} before the dashboard was checked "
                        f"({state}):\n{_tail(launcher_log)}")
        if prom_proc.poll() is not None:
            pytest.fail(f"prometheus exited with {prom_proc.returncode}:\n{_tail(prom_log)}")
        endpoints = {k.decode(): v.decode() for k, v in client.hgetall(names.key("endpoints")).items()}
        if endpoints != written:
            _write_targets(targets, endpoints)
            written = endpoints
        if not injected and any(k.startswith("teacher") for k in endpoints):
            # A malformed message (valid msgpack, wrong schema): the dead-letter panels need one, and
            # a healthy run has none. The teacher dead-letters it and counts it by stream and reason.
            bad = msgpack.packb({"kind": "rollout", "v": 1, "id": "dashboard-bad-1", "prompt_ids_P": "oops"})
            client.xadd(names.rollouts, {b"m": bad})
            injected = True
        try:
            up = {r["metric"]["job"]: int(float(r["value"][1])) for r in prom.query("count by (job) (up == 1)")}
            scrapes = prom.value("min(count_over_time(up[10m]))")
            oldest_scrape = prom.value("min(timestamp(up))")
        except OSError:  # PrometheusUnavailable: not listening, or 503 while it (re)loads
            time.sleep(0.2)
            continue
        learner = read_state(client, names)
        step = learner.step if isinstance(learner, LearnerState) else 0
        if ready_at is None:
            state = f"endpoints {sorted(endpoints)}, up {up}, min scrapes {scrapes}, learner step {step}"
            if (len(endpoints) == want and up == REPLICAS and (scrapes or 0) >= 5 and step >= READY_STEP
                    and client.xlen(names.dead) >= 1):
                ready_at = time.time()
        elif oldest_scrape is not None and oldest_scrape > ready_at + 2 * SCRAPE_INTERVAL_S:
            return oldest_scrape
        time.sleep(0.25)
    pytest.fail(f"not ready after {DEADLINE_S:.0f}s ({state}); launcher:\n{_tail(launcher_log)}\n"
                f"prometheus:\n{_tail(prom_log)}")


# ----------------------------------------------------------------- tests against the run


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_dashboard_query_returns_data(scraped_run: ScrapedRun, dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20, f"expected the whole dashboard, found {len(queries)} queries"
    variables = grafana_variables(dashboard, range_s=scraped_run.range_s)
    problems = queries_without_data(scraped_run.prom, queries, variables, scraped_run.at)
    assert not problems, f"{len(problems)} of {len(queries)} dashboard queries show nothing:\n" + "\n".join(problems)


def test_a_misspelt_metric_name_returns_no_data(scraped_run: ScrapedRun, dashboard: dict[str, Any]) -> None:
    """The check above has teeth: a typo in any one metric name of any query is reported."""
    prom, at = scraped_run.prom, scraped_run.at
    variables = grafana_variables(dashboard, range_s=scraped_run.range_s)
    good = Query("demo", "A", "max by (stream) (opd_queue_depth)")
    typo = Query("demo", "B", "max by (stream) (opd_queue_dept)")
    assert queries_without_data(prom, [good], variables, at) == []
    assert len(queries_without_data(prom, [typo], variables, at)) == 1
    mutants = [Query(q.panel, f"{q.ref} ({metric} misspelt)", misspelt(q.expr, metric))
               for q in dashboard_queries(dashboard) for metric in sorted(set(METRIC.findall(q.expr)))]
    assert len(mutants) >= 20
    missed = [str(m) for m in mutants if not queries_without_data(prom, [m], variables, at)]
    assert not missed, "queries that still return data with a misspelt metric (e.g. `or vector(0)`):\n" + "\n".join(missed)


def test_per_replica_series_are_labelled_by_role_and_replica(scraped_run: ScrapedRun) -> None:
    prom, at = scraped_run.prom, scraped_run.at
    series = prom.query(f"sum by (job, instance) (rate(opd_actor_tokens_generated_total[{RATE_INTERVAL}]))", at)
    assert sorted((s["metric"]["job"], s["metric"]["instance"]) for s in series) == [("actor", "actor-0"), ("actor", "actor-1")]
    assert all(float(s["value"][1]) > 0 for s in series), series
    jobs = {s["metric"]["job"] for s in prom.query("opd_queue_depth", at)}
    assert jobs == set(REPLICAS), jobs


def test_drop_reasons_are_exported_before_any_drop(scraped_run: ScrapedRun) -> None:
    reasons = {s["metric"]["reason"] for s in scraped_run.prom.query('opd_learner_dropped_total{job="learner"}', scraped_run.at)}
    assert reasons >= set(LEARNER_DROP_REASONS), reasons


# ----------------------------------------------------------------- no Prometheus needed


class _Starting(http.server.BaseHTTPRequestHandler):
    """Answers like a Prometheus that is still opening its TSDB: 503 and a plain-text body."""

    ready_after = 3  # requests answered 503 before /-/ready and queries succeed
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).seen <= self.ready_after:
            body, status, ctype = b"Service Unavailable", 503, "text/plain"
        elif self.path.startswith("/api/v1/query"):
            body, status, ctype = b'{"status":"success","data":{"resultType":"vector","result":[]}}', 200, "application/json"
        else:
            body, status, ctype = b"Prometheus Server is Ready.", 200, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_starting_prometheus_is_waited_for_not_an_error() -> None:
    """503 "Service Unavailable" (not JSON) while Prometheus starts is retried, never a query error."""
    _Starting.seen = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Starting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        prom = Prometheus(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(PrometheusUnavailable, match="503"):
            prom.query("up")
        assert isinstance(PrometheusUnavailable("x"), OSError)  # what the polling loops retry
        prom.wait_ready(60)
        assert prom.query("up") == []
    finally:
        server.shutdown()
        server.server_close()



def test_grafana_variables_are_substituted() -> None:
    board = {"templating": {"list": [
        {"name": "instance", "current": {"value": "$__all"}},
        {"name": "stream", "current": {"value": ["a", "b"]}},
    ]}}
    variables = grafana_variables(board, range_s=90)
    expr = 'sum(increase(x{instance=~"$instance",s=~"${stream}"}[$__range])) / rate(y[$__rate_interval]) [[instance]]'
    assert substitute(expr, variables) == 'sum(increase(x{instance=~".*",s=~"a|b"}[90s])) / rate(y[30s]) .*'
    with pytest.raises(KeyError, match="nope"):
        substitute("rate(x[$nope])", variables)


def test_misspelt_changes_only_the_named_metric() -> None:
    expr = "sum(rate(opd_a_total[1m])) / sum(rate(opd_a_total_x[1m]))"
    assert misspelt(expr, "opd_a_total") == "sum(rate(opd_a_total_typo[1m])) / sum(rate(opd_a_total_x[1m]))"


def test_drop_reasons_agree_with_the_learner() -> None:
    from learner.staleness import DROP_REASONS

    assert tuple(LEARNER_DROP_REASONS) == tuple(DROP_REASONS)


def _exported_names() -> dict[str, str]:
    """Sample names each role's registry exports -> type, as the architecture table spells them."""
    out: dict[str, str] = {}
    for build in (actor_metrics, teacher_metrics, learner_metrics):
        registry = CollectorRegistry()
        build(registry)
        for family in registry.collect():
            out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return out


def _documented_names() -> dict[str, str]:
    section = ARCHITECTURE.read_text().split("## Metrics", 1)[1]
    out: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`opd_"):
            for name in re.findall(r"`(opd_[a-z0-9_]+)`", cells[0]):
                out[name] = cells[1]
    return out


def test_architecture_metric_table_matches_the_code() -> None:
    assert _documented_names() == _exported_names()
