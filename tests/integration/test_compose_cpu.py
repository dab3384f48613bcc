"""`docker compose up` of the CPU profile, for real: a Docker engine, the compose file's own Redis and
Prometheus, the project's image, 2 actors, 2 (then 3) teachers and 1 learner on tiny CPU models.

Why: `docker compose up` is how users run this system, and until this test the compose file had
never been started by a test: a finished run that restarted forever, model files the image's user
could not read and SGLang as a hard dependency were all found by hand.

Pins (one scenario, one compose project `opdtest<pid>`, checked step by step):
- the engine: started (scripts/setup-docker.sh) when none answers, stopped again if this test started it;
  images: stand-ins for the base images when no registry is reachable (cached), the project's image
  built by `docker compose build` (from the local torch wheel of pip's find-links when there is one);
- `up -d --scale actor=2 --scale teacher=2` of docker-compose.yml + docker-compose.cpu.yml: every
  replica of every role becomes healthy; the models, built by the `assets` service as root, are
  readable by the roles' unprivileged user (they were once written 0600);
- while the learner trains, `up -d --scale teacher=3` adds a teacher that becomes healthy and scores
  prefixes, and Prometheus discovers it;
- the compose Prometheus scrapes every replica of every role (one `instance` per container address)
  and every query of the Grafana dashboard returns data at one instant of the run; the per-replica
  panels show every replica;
- the ledger conserves: what the actors produced = trained + dropped + dead-lettered, nothing in flight;
- the finished run stays finished: the learner and the actors exit 0 and are not restarted;
- `docker compose down -v` leaves no container, network or volume of the project.
Runs for minutes: marked slow, integration and compose (`pytest -m compose` runs it alone).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from compose_stack import (
    Compose,
    Container,
    engine_answers,
    ensure_engine,
    local_torch_wheel,
    place_wheel,
    run,
    scrape_metrics,
    stop_engine,
)
from promql import Prometheus, dashboard_queries, grafana_variables, load_dashboard, queries_without_data

from protocol import ledger
from protocol.names import Names
from protocol.state import LearnerState, read_state

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.compose, pytest.mark.timeout(3600)]

ROLES = ("actor", "teacher", "learner")
START = {"actor": 2, "teacher": 2, "learner": 1}
SCALED = {"actor": 2, "teacher": 3, "learner": 1}
# Learner steps of the run (OPD_CPU_STEPS). The scale-up and the scrapes below must happen while it
# trains; they wait on fixed intervals (health checks every 5 s, DNS discovery every 10 s, scrapes
# every 5 s) while the run's pace follows the CPU. Measured on 2 cores: 3-5 steps/s, everything
# below done by step ~260; 1000 leaves room for a machine twice as fast. A run that ends sooner fails
# with a message saying so rather than passing on a finished pipeline.
STEPS = 1000
NAMESPACE = "opd"  # configs/compose-cpu.yaml keeps the default transport.namespace
SCRAPE_INTERVAL_S = 5  # deploy/prometheus/prometheus.yml
RATE_INTERVAL_S = 30
QUIET_S = 20.0  # watched after the run: Docker restarts a container within a second or two of its exit
DEADLINE_S = 1500.0
BAD_ID = "compose-bad-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    """What was seen while the project ran; the tests below judge it."""

    compose: Compose
    client: redis.Redis
    names: Names
    prom: Prometheus
    prom_started: float = 0.0
    healthy: dict[str, set[str]] = field(default_factory=dict)  # service -> containers seen healthy
    unreadable_models: str = ""
    roles_uid: str = ""
    scaled_at_step: int = -1
    new_teacher: Container | None = None
    new_teacher_prefixes: float = 0.0
    at: float = 0.0  # an instant at which every replica of every role was up and freshly scraped
    containers_at: list[Container] = field(default_factory=list)
    finished: list[Container] = field(default_factory=list)  # after the run and the quiet period
    learner: LearnerState | None = None
    log: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        state = read_state(self.client, self.names)
        where = f"learner step {state.step} ({state.phase})" if isinstance(state, LearnerState) else str(state)
        self.log.append(f"{time.strftime('%H:%M:%S')} {text} [{where}]")


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A Docker engine: the running one, or one installed and started here (and stopped at the end).

    Without root and without a running engine the test is skipped (failed under CI).
    """
    if os.geteuid() != 0 and not engine_answers():
        reason = "no Docker engine answers and starting one needs root (bash scripts/setup-docker.sh start)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    started = ensure_engine()
    yield
    if started:
        stop_engine()


@pytest.fixture(scope="module")
def compose(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    """The project, built and started; `down -v` at the end whatever happened."""
    tmp = tmp_path_factory.mktemp("compose")
    env_file = tmp / "compose.env"
    ports = {"REDIS_HOST_PORT": _free_port(), "PROMETHEUS_HOST_PORT": _free_port(), "GRAFANA_HOST_PORT": _free_port()}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        "REDIS_PASSWORD": secrets.token_hex(16), "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
        "OPD_CPU_STEPS": STEPS, **ports}.items()))
    project = Compose(f"opdtest{os.getpid()}", env_file)
    run(["bash", "scripts/setup-docker.sh", "standins"], timeout_s=1800)
    wheel = local_torch_wheel()
    placed = place_wheel(wheel) if wheel else None
    try:
        project("build", timeout_s=1800)
    finally:
        if placed is not None:
            placed.unlink()
    try:
        project("up", "-d", "--scale", "actor=2", "--scale", "teacher=2", timeout_s=900)
        yield project
    finally:
        (tmp / "compose.log").write_text(project.logs(tail=100000))
        project("down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=300, check=False)
        # Old builds of the role image, untagged by this build: without this every code change
        # would leave ~1 GB behind on a machine that runs the suite again and again.
        run(["docker", "image", "prune", "-f", "--filter", "label=org.opd.image=roles"], timeout_s=300, check=False)
        # And the build cache, which grows by the image's new layers every build (15.7 GB after a few dozen
        # runs, part of what once filled this machine's disk): the newest 4 GB stay for the next build.
        run(["docker", "builder", "prune", "-f", "--keep-storage", "4GB"], timeout_s=300, check=False)


def _env_value(compose: Compose, key: str) -> str:
    for line in compose.env_file.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    raise KeyError(key)


def _fail(run_: Run, what: str) -> None:
    ps = "\n".join(f"  {c.name}: {c.status} exit={c.exit_code} health={c.health} restarts={c.restarts}"
                   for c in run_.compose.containers())
    pytest.fail(f"{what}\ncontainers:\n{ps}\nscenario:\n  " + "\n  ".join(run_.log) + f"\nlogs:\n{run_.compose.logs(40)}")


def _wait(run_: Run, what: str, ready: Callable[[], bool], deadline: float, poll_s: float = 1.0) -> None:
    while not ready():
        crashed = [c for c in run_.compose.containers() if c.service in ROLES and (c.restarts or
                   (c.status == "exited" and c.exit_code != 0))]
        if crashed:
            _fail(run_, f"while waiting for {what}: {', '.join(c.name for c in crashed)} crashed or restarted")
        if time.monotonic() > deadline:
            _fail(run_, f"timed out waiting for {what}")
        time.sleep(poll_s)
    run_.note(what)


def _state(run_: Run) -> LearnerState | None:
    state = read_state(run_.client, run_.names)
    return state if isinstance(state, LearnerState) else None


def _still_training(run_: Run, what: str) -> None:
    state = _state(run_)
    if state is None or state.phase != "training":
        _fail(run_, f"the run ended before {what} (learner at {state}): raise STEPS in {Path(__file__).name}")


def _role_containers(run_: Run) -> list[Container]:
    return [c for c in run_.compose.containers() if c.service in ROLES]


def _all_healthy(run_: Run, want: dict[str, int]) -> bool:
    running = [c for c in _role_containers(run_) if c.status == "running"]
    for c in running:
        if c.health == "healthy":
            run_.healthy.setdefault(c.service, set()).add(c.name)
    counts = {role: sum(1 for c in running if c.service == role and c.health == "healthy") for role in ROLES}
    return counts == want


@pytest.fixture(scope="module")
def scenario(compose: Compose) -> Run:
    """Drive the run: healthy, scale up, all scraped, finished and quiet. Fails with the state seen."""
    password = _env_value(compose, "REDIS_PASSWORD")
    client = redis.Redis(host="127.0.0.1", port=int(_env_value(compose, "REDIS_HOST_PORT")), password=password)
    prom = Prometheus(f"http://127.0.0.1:{_env_value(compose, 'PROMETHEUS_HOST_PORT')}")
    run_ = Run(compose, client, Names(NAMESPACE), prom)
    deadline = time.monotonic() + DEADLINE_S
    _models_as_the_roles_see_them(run_)
    _wait(run_, "every replica healthy", lambda: _all_healthy(run_, START), deadline)
    # A malformed message (valid msgpack, wrong schema): the dead-letter panels need one.
    bad = msgpack.packb({"kind": "rollout", "v": 1, "id": BAD_ID, "prompt_ids_P": "oops"})
    client.xadd(run_.names.rollouts, {b"m": bad})
    _wait(run_, "learner trained a step", lambda: (_state(run_) or LearnerState.assumed(0)).step >= 1, deadline)
    _scale_up(run_, deadline)
    _find_scraped_instant(run_, deadline)
    _wait(run_, "run finished", lambda: _finished(run_), deadline, poll_s=2.0)
    time.sleep(QUIET_S)
    run_.finished = _role_containers(run_)
    run_.learner = _state(run_)
    run_.note(f"quiet for {QUIET_S:.0f}s after the run")
    print("compose scenario:\n  " + "\n  ".join(run_.log))  # shown with -s or -rP
    return run_


def _models_as_the_roles_see_them(run_: Run) -> None:
    """Files under /data/assets that others cannot read, seen from a one-off container of the teacher
    service (its user, its mounts): a role that cannot read its model fails with a misleading
    "No such file or directory", so this is checked and named before the roles are waited for."""
    script = "id -u; find /data/assets ! -perm -0004 2>&1"
    out = run_.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "teacher", "-c", script,
                       timeout_s=300, check=False)
    lines = out.stdout.splitlines()
    run_.roles_uid = lines[0].strip() if lines else ""
    run_.unreadable_models = "\n".join(lines[1:]) + out.stderr[-2000:] * (out.returncode != 0)
    if run_.unreadable_models:
        _fail(run_, f"models not readable by the roles' user (uid {run_.roles_uid}):\n{run_.unreadable_models}")
    run_.note(f"models readable by uid {run_.roles_uid}")


def _scale_up(run_: Run, deadline: float) -> None:
    _still_training(run_, "the scale-up")
    run_.scaled_at_step = _state(run_).step  # type: ignore[union-attr]
    run_.compose("up", "-d", "--scale", "actor=2", "--scale", "teacher=3", timeout_s=900)
    run_.note(f"scaled to 3 teachers at learner step {run_.scaled_at_step}")
    _wait(run_, "three healthy teachers", lambda: _all_healthy(run_, SCALED), deadline)
    run_.new_teacher = next(c for c in _role_containers(run_) if c.service == "teacher" and c.number == 3)

    def took_work() -> bool:
        run_.new_teacher_prefixes = scrape_metrics(run_.compose, run_.new_teacher).get("opd_teacher_prefixes_total", 0.0)  # type: ignore[arg-type]
        return run_.new_teacher_prefixes > 0

    _wait(run_, "the new teacher scored prefixes", took_work, deadline)
    _still_training(run_, "the new teacher took work")


def _find_scraped_instant(run_: Run, deadline: float) -> None:
    """An instant at which every replica had been scraped up a few times, after the scale-up."""
    jobs = 'job=~"actor|teacher|learner"'
    ready_at: list[float] = []

    def scraped() -> bool:
        try:
            up = {r["metric"]["job"]: int(float(r["value"][1])) for r in run_.prom.query(f"count by (job) (up{{{jobs}}} == 1)")}
            least = run_.prom.value(f"min(count_over_time(up{{{jobs}}}[2m]))")
            oldest = run_.prom.value(f"min(timestamp(up{{{jobs}}}))")
        except OSError:  # not up yet, or 503 while it starts
            return False
        if not ready_at:
            if up == SCALED and (least or 0) >= 3 and run_.client.xlen(run_.names.dead) >= 1:
                ready_at.append(time.time())
            return False
        if oldest is not None and oldest > ready_at[0] + SCRAPE_INTERVAL_S:
            run_.at = oldest
            return True
        return False

    _wait(run_, "every replica scraped by Prometheus", scraped, deadline)
    _still_training(run_, "Prometheus had scraped every replica")
    run_.containers_at = _role_containers(run_)
    prometheus = next(c for c in run_.compose.containers() if c.service == "prometheus")
    started = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", prometheus.id], timeout_s=60).stdout.strip()
    # RFC 3339 with nanoseconds ("2026-11-30T12:51:02.123456789Z"): microseconds are enough here.
    run_.prom_started = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp()


def _finished(run_: Run) -> bool:
    by_service: dict[str, list[Container]] = {}
    for c in _role_containers(run_):
        by_service.setdefault(c.service, []).append(c)
    return all(c.status == "exited" for s in ("actor", "learner") for c in by_service.get(s, []))


# ----------------------------------------------------------------- the run, judged


def test_every_replica_became_healthy(scenario: Run) -> None:
    seen = {role: len(scenario.healthy.get(role, ())) for role in ROLES}
    assert seen == SCALED, seen


def test_the_roles_user_reads_the_models(scenario: Run) -> None:
    """The `assets` service writes the models as root; the roles run as uid 10001 and must read them."""
    assert scenario.roles_uid == "10001"
    assert scenario.unreadable_models == "", f"not readable by others:\n{scenario.unreadable_models}"


def test_a_teacher_added_during_the_run_takes_work(scenario: Run) -> None:
    assert scenario.scaled_at_step >= 1 and scenario.new_teacher is not None
    assert scenario.new_teacher_prefixes > 0
    assert scenario.learner is not None and scenario.learner.step >= STEPS


def test_prometheus_scrapes_every_replica_of_every_role(scenario: Run) -> None:
    for role in ROLES:
        up = scenario.prom.query(f'up{{job="{role}"}} == 1', scenario.at)
        scraped = sorted(r["metric"]["instance"] for r in up)
        expected = sorted(f"{c.ip}:9400" for c in scenario.containers_at if c.service == role and c.status == "running")
        assert scraped == expected and len(scraped) == SCALED[role], (role, scraped, expected)
    per_replica = scenario.prom.query(
        f"sum by (instance) (rate(opd_teacher_tokens_scored_total[{RATE_INTERVAL_S}s]) "
        f"+ rate(opd_teacher_tokens_cached_total[{RATE_INTERVAL_S}s]))", scenario.at)
    assert len(per_replica) == SCALED["teacher"], per_replica


def test_every_dashboard_query_returns_data(scenario: Run) -> None:
    dashboard = load_dashboard()
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20
    variables = grafana_variables(dashboard, range_s=math.ceil(scenario.at - scenario.prom_started),
                                  rate_interval_s=RATE_INTERVAL_S)
    problems = queries_without_data(scenario.prom, queries, variables, scenario.at)
    assert not problems, f"{len(problems)} of {len(queries)} dashboard queries show nothing:\n" + "\n".join(problems)


def test_the_ledger_conserves(scenario: Run) -> None:
    client, names = scenario.client, scenario.names
    counts = ledger.counts(client, names)
    total = ledger.audit(client, names).total  # fields + rolled-up ids (protocol/ledger.py rollup)
    produced = ledger.stats(client, names).get("actor_prefixes", 0.0)
    injected = 1 if ledger.outcome_of(client, names, BAD_ID) is not None else 0
    assert counts[ledger.PRODUCED] == 0, counts
    assert counts[ledger.TRAINED] + counts[ledger.DROPPED] + counts[ledger.DEAD] == total, counts
    assert total - injected == produced > 0, (total, injected, produced, counts)
    assert scenario.learner is not None
    assert counts[ledger.TRAINED] >= STEPS * scenario.learner.batch_size, counts


def test_a_finished_run_stays_finished(scenario: Run) -> None:
    assert scenario.learner is not None and scenario.learner.phase == "done", scenario.learner
    problems: list[Any] = []
    for c in scenario.finished:
        if c.restarts:
            problems.append(f"{c.name} restarted {c.restarts} times")
        if c.service in ("actor", "learner") and (c.status, c.exit_code) != ("exited", 0):
            problems.append(f"{c.name}: {c.status}, exit {c.exit_code} (expected exited 0)")
        if c.service == "teacher" and c.status != "running":
            problems.append(f"{c.name}: {c.status} (teachers idle until `down`)")
    assert not problems, problems
    assert sorted(c.service for c in scenario.finished) == sorted(r for r, n in SCALED.items() for _ in range(n))


def test_down_leaves_no_container_network_or_volume(scenario: Run, compose: Compose) -> None:
    before = compose.leftovers()
    assert before["containers"] and before["networks"] and before["volumes"], before  # the check can fail
    compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=300)
    assert compose.leftovers() == {"containers": [], "networks": [], "volumes": []}
