"""The deployment files agree with the Compose Specification, with each other and with the code.

Pins:
- docker-compose.yml validates against the Compose Specification's JSON Schema (the copy that
  check-jsonschema ships, `--builtin-schema vendor.compose-spec`: nothing outside the repository
  and its test dependencies), and that check rejects a file that breaks the schema;
- host ports of redis/grafana/prometheus are bound to 127.0.0.1; replicated roles have neither
  `container_name` nor host ports, so `--scale` works;
- the SGLang services reserve an NVIDIA GPU; every long-running service has a healthcheck and every
  dependency waits on a condition;
- Prometheus discovers exactly the compose role services by DNS, on the port the roles listen on;
- every dashboard query is valid PromQL (promtool, when installed) and names only metrics listed in
  docs/architecture.md (plus `opd_learner_idle_fraction`), through the provisioned datasource;
- every variable compose requires is documented in deploy/opd.env.example.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "opd.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "opd.yml"
ENV_EXAMPLE = ROOT / "deploy" / "opd.env.example"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

ROLES = ("actor", "teacher", "learner")
SGLANG = ("student-sglang", "teacher-sglang")
LOOPBACK_ONLY = ("redis", "grafana", "prometheus")
METRICS_PORT = 9400
# Exported by the learner (protocol/telemetry.py) but not (yet) in the architecture table.
EXTRA_METRICS = {"opd_learner_idle_fraction"}
# Grafana's built-in interval variables, replaced by a fixed duration before PromQL parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for panel in dashboard["panels"]:
        out += [(panel["title"], target) for target in panel.get("targets", [])]
        for inner in panel.get("panels", []):  # collapsed rows
            out += [(inner["title"], target) for target in inner.get("targets", [])]
    return out


def _architecture_metrics() -> dict[str, str]:
    """metric name -> type, from the Metrics table of docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Metrics") :]
    metrics: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`opd_"):
            continue
        for name in re.findall(r"`(opd_[a-z0-9_]+)`", cells[0]):
            metrics[name] = cells[1]
    return metrics


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    assert isinstance(deps, dict), f"depends_on must be the long form with conditions, got {deps!r}"
    return deps


# ----------------------------------------------------------------- compose


def check_jsonschema() -> str:
    """The check-jsonschema CLI of this interpreter's environment (the `test` extra installs it)."""
    found = shutil.which("check-jsonschema", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("check-jsonschema not found: pip install -e '.[test]' (it carries the Compose Specification schema)")
    return found


def validate_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_validates_against_the_compose_spec() -> None:
    result = validate_compose_spec(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_file(compose: dict[str, Any], tmp_path: Path) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restart_policy"] = "always"  # not a service key (`restart` is)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = validate_compose_spec(path)
    assert result.returncode != 0 and "restart_policy" in result.stdout + result.stderr, result.stdout + result.stderr


def test_expected_services_exist(services: dict[str, Any]) -> None:
    for name in (*ROLES, *SGLANG, *LOOPBACK_ONLY):
        assert name in services, f"service {name} missing from docker-compose.yml"


def test_no_container_name_anywhere(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: container_name prevents --scale and reuse of the project name"


def test_host_ports_only_on_loopback_singletons(services: dict[str, Any]) -> None:
    for name, service in services.items():
        ports = service.get("ports", [])
        if name not in LOOPBACK_ONLY:
            assert not ports, f"{name}: replicated or internal services must not publish host ports ({ports})"
            continue
        assert ports, f"{name}: expected a host port bound to 127.0.0.1"
        for port in ports:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: port {port!r} is not bound to 127.0.0.1"


def test_sglang_services_reserve_an_nvidia_gpu(services: dict[str, Any]) -> None:
    for name in SGLANG:
        service = services[name]
        assert "lmsysorg/sglang" in service["image"], f"{name}: image {service['image']}"
        command = " ".join(map(str, service["command"]))
        assert "sglang.launch_server" in command and "--host 0.0.0.0" in command and "--port 30000" in command
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        assert gpu, f"{name}: no nvidia GPU reservation"
        assert ("count" in gpu[0]) != ("device_ids" in gpu[0]), f"{name}: exactly one of count / device_ids"
        assert "/health" in " ".join(service["healthcheck"]["test"])


def test_healthchecks_and_dependency_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if service.get("restart") == "no":  # one-shot jobs are waited on by completion instead
            continue
        assert "healthcheck" in service, f"{name}: no healthcheck"
        assert service["healthcheck"].get("test"), f"{name}: empty healthcheck"
    for name, service in services.items():
        for dep, spec in _depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            expected = "service_completed_successfully" if services[dep].get("restart") == "no" else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dep}: condition {spec.get('condition')!r}, expected {expected}"
    assert {"redis", "student-sglang"} <= set(_depends_on(services["actor"]))
    assert {"redis", "teacher-sglang"} <= set(_depends_on(services["teacher"]))
    assert "redis" in _depends_on(services["learner"])
    assert "prometheus" in _depends_on(services["grafana"])


def test_roles_run_the_cli_on_the_metrics_port(services: dict[str, Any]) -> None:
    for role in ROLES:
        service = services[role]
        command = [str(c) for c in service["command"]]
        assert command[:4] == ["opd", role, "--config", "/app/configs/compose.yaml"], command
        assert f"{role}.metrics_port={METRICS_PORT}" in command and f"{role}.metrics_host=0.0.0.0" in command
        assert str(METRICS_PORT) in [str(p) for p in service.get("expose", [])]
        assert f":{METRICS_PORT}/health" in " ".join(service["healthcheck"]["test"])
        assert service["build"]["context"] == "." and "OPD_REDIS_URL" in service["environment"]
        assert service["environment"]["OPD_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")


def test_redis_has_aof_and_a_password(services: dict[str, Any]) -> None:
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_shared_volumes_are_named_and_consistent(compose: dict[str, Any], services: dict[str, Any]) -> None:
    def mounts(name: str) -> dict[str, str]:
        out = {}
        for volume in services[name].get("volumes", []):
            source, target = volume.split(":")[:2]
            out[target] = source
        return out

    named = set(compose["volumes"])
    assert mounts("teacher")["/data/cache"] in named
    assert mounts("learner")["/data/learner"] in named
    # published weights are loaded by path: the learner, the actors and the student server must agree
    assert mounts("actor")["/data/learner"] == mounts("learner")["/data/learner"] == mounts("student-sglang")["/data/learner"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist in the repository"
            elif not source.startswith("${"):
                assert source in named, f"{name}: volume {source} is not declared under top-level volumes"


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert required, "expected required secrets (${VAR:?...}) in docker-compose.yml"
    assert used <= documented, f"variables used by compose but not in {ENV_EXAMPLE.name}: {sorted(used - documented)}"


def test_dockerfile_is_slim_and_cpu_torch_by_default() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", dockerfile, flags=re.M)
    assert "--index-url \"${TORCH_INDEX_URL}\"" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored


# ----------------------------------------------------------------- prometheus


def test_prometheus_discovers_the_compose_roles(services: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    discovered: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            for name in sd["names"]:
                discovered[name] = sd["port"]
    assert set(discovered) == set(ROLES)
    for name, port in discovered.items():
        assert name in services, f"prometheus resolves {name}, which is not a compose service"
        assert port == METRICS_PORT, f"{name}: scraped on {port}, roles listen on {METRICS_PORT}"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): config syntax not checked")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------- grafana


def test_dashboard_uses_only_documented_metrics(dashboard: dict[str, Any]) -> None:
    documented = _architecture_metrics()
    assert "opd_queue_depth" in documented and documented["opd_actor_horizon_tokens"] == "histogram"
    histograms = {name for name, kind in documented.items() if kind == "histogram"}
    allowed = set(documented) | EXTRA_METRICS
    allowed |= {f"{h}{suffix}" for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    targets = _targets(dashboard)
    assert len(targets) >= 20
    used: set[str] = set()
    for title, target in targets:
        names = set(re.findall(r"\bopd_[a-zA-Z0-9_:]*", target["expr"]))
        assert names, f"panel {title!r}: query names no opd_ metric: {target['expr']}"
        unknown = names - allowed
        assert not unknown, f"panel {title!r}: metrics not in docs/architecture.md: {sorted(unknown)}"
        used |= names
    for needed in ("opd_queue_depth", "opd_actor_horizon_tokens_bucket", "opd_actor_tokens_saved_bound_total",
                   "opd_actor_tokens_saved_estimate",
                   "opd_teacher_tokens_cached_total", "opd_compute_saved_flops_total", "opd_learner_staleness_bucket",
                   "opd_learner_dropped_total", "opd_learner_idle_fraction", "opd_learner_reverse_kl",
                   "opd_dead_letters_total", "opd_learner_tokens_per_second"):
        assert needed in used, f"no panel shows {needed}"
    assert any("by (instance)" in t["expr"] for _, t in targets), "no per-replica panel"


def _substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_dashboard_queries_are_well_formed(dashboard: dict[str, Any]) -> None:
    for title, target in _targets(dashboard):
        expr = _substituted(target["expr"])
        assert "$" not in expr, f"panel {title!r}: unknown Grafana variable in {target['expr']}"
        depth = 0
        for ch in expr:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0, f"panel {title!r}: unbalanced parentheses: {expr}"
        assert depth == 0, f"panel {title!r}: unbalanced parentheses: {expr}"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): PromQL not parsed")
    rules = [
        {"record": f"dashboard:panel_{i}:{target['refId'].lower()}", "expr": _substituted(target["expr"])}
        for i, (_, target) in enumerate(_targets(dashboard))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisioned_read_only(dashboard: dict[str, Any], services: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {ds["uid"] for ds in datasources}
    assert {ds["url"] for ds in datasources} == {"http://prometheus:9090"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, f"panel {panel['title']!r}: unknown datasource"
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids
    assert dashboard["editable"] is False
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert provider["allowUiUpdates"] is False
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


@pytest.mark.parametrize(("value", "flag"), [("true", True), ("false", False), ("", False)])
def test_student_sglang_is_deterministic_only_when_asked(services: dict[str, Any], value: str, flag: bool) -> None:
    """SGLang honours sampling_seed only under --enable-deterministic-inference; SGLANG_DETERMINISTIC adds it.

    Runs the service's entrypoint in a real shell (compose's `$$` unescaped to `$`) with `echo` in front
    of the command, and reads back the argv the server would get.
    """
    service = services["student-sglang"]
    assert service["environment"]["SGLANG_DETERMINISTIC"] == "${SGLANG_DETERMINISTIC:-false}"
    entrypoint = [str(part).replace("$$", "$") for part in service["entrypoint"]]
    command = [str(part) for part in service["command"]]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SGLANG_DETERMINISTIC": value}
    out = subprocess.run([*entrypoint, "echo", *command], env=env, capture_output=True, text=True, check=True)
    argv = out.stdout.split()
    assert argv[: len(command)] == command
    assert ("--enable-deterministic-inference" in argv) is flag
