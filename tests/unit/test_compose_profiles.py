"""The CPU profile (docker-compose.cpu.yml), the restart policy, the image's wheel folder and the
stand-in base images: the files agree with each other before anything is started.

Why: tests/integration/test_compose_cpu.py starts all of it, but takes minutes and needs root; these
checks say which file is wrong in a second, on any machine.

Pins:
- docker-compose.cpu.yml validates against the Compose Specification (its `!override` merge tags
  read as the values they carry); it moves both SGLang services to the `gpu` profile and replaces
  (`!override`) the roles' dependencies with init-volumes, assets and redis, so nothing waits for SGLang;
- the roles run the transformers engines with configs/compose-cpu.yaml, which the CLI accepts, on
  the models the root-run `assets` service builds into a volume the roles mount read-only;
- roles restart on failure only: a finished run (exit 0) stays finished;
- Grafana is in the `grafana` profile, which deploy/opd.env.example enables; every variable either
  compose file uses is documented there;
- the Dockerfile installs torch from the wheel folder when a torch wheel is there (no index asked)
  and from TORCH_INDEX_URL otherwise (its own shell, run with a recording `pip`), and copies every
  package pyproject.toml installs;
- scripts/setup-docker.sh builds a stand-in for every base image the compose files and the
  Dockerfile use, except the GPU-only SGLang image, Grafana (a profile) and the project's own image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / "deploy" / "opd.env.example"
DOCKERFILE = ROOT / "Dockerfile"
SETUP_DOCKER = ROOT / "scripts" / "setup-docker.sh"
ROLES = ("actor", "teacher", "learner")
SGLANG = ("student-sglang", "teacher-sglang")


class Override(dict):  # type: ignore[type-arg]
    """A mapping tagged `!override`: compose replaces the base file's value instead of merging."""


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose's merge tags (`!override`, `!reset`) as the values they carry."""


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # `<<:` merge keys inside the tagged mapping
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _override)
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load(BASE)["services"]


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return load(CPU)


def _check_jsonschema() -> str:
    found = shutil.which("check-jsonschema", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("check-jsonschema not found: pip install -e '.[test]'")
    return found


def test_cpu_override_validates_against_the_compose_spec(cpu: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "docker-compose.cpu.json"
    path.write_text(json.dumps(cpu))
    result = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_roles_restart_on_failure_only(base: dict[str, Any]) -> None:
    """unless-stopped/always restart a learner that finished (exit 0): the run would start over, forever."""
    for role in ROLES:
        assert base[role]["restart"] == "on-failure", (role, base[role]["restart"])


def test_cpu_profile_starts_no_sglang_and_waits_for_none(cpu: dict[str, Any]) -> None:
    services = cpu["services"]
    for name in SGLANG:
        assert services[name] == {"profiles": ["gpu"]}, services[name]
    for role in ROLES:
        deps = services[role]["depends_on"]
        assert isinstance(deps, Override), f"{role}: depends_on must be `!override`, or the SGLang ones stay"
        assert deps == {
            "init-volumes": {"condition": "service_completed_successfully"},
            "assets": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
        }, (role, deps)


def test_cpu_roles_run_transformers_on_the_cpu_config(cpu: dict[str, Any]) -> None:
    from opd.config import load_config

    services = cpu["services"]
    for role in ROLES:
        command = [str(c) for c in services[role]["command"]]
        assert command[:4] == ["opd", role, "--config", "/app/configs/compose-cpu.yaml"], command
        assert f"{role}.metrics_host=0.0.0.0" in command and f"{role}.metrics_port=9400" in command
        if role != "learner":
            assert f"{role}.engine=hf" in command
        assert services[role]["environment"]["OMP_NUM_THREADS"] == "1"
    overrides = [c.replace("${OPD_CPU_STEPS:-200}", "200") for c in map(str, services["learner"]["command"][5::2])]
    cfg = load_config(ROOT / "configs" / "compose-cpu.yaml", overrides)
    for path in (cfg.actor.model_dir, cfg.teacher.model_dir, cfg.learner.model_dir, cfg.actor.prompts_file):
        assert str(path).startswith("/data/assets/"), path
    assert cfg.learner.steps == 200


def test_models_are_built_as_root_and_read_by_the_roles(cpu: dict[str, Any]) -> None:
    """Root writes, uid 10001 reads: a model file written 0600 (as once) fails the compose test."""
    assets = cpu["services"]["assets"]
    assert assets["user"] == "0:0" and assets["restart"] == "no"
    assert "build_tiny_assets" in " ".join(assets["command"])
    assert assets["volumes"] == ["cpu-assets:/data/assets"]
    for role in ROLES:
        assert "cpu-assets:/data/assets:ro" in cpu["services"][role]["volumes"]
    assert "cpu-assets" in cpu["volumes"]
    assert re.search(r"useradd .*--uid 10001 opd", DOCKERFILE.read_text()) and "\nUSER opd\n" in DOCKERFILE.read_text()


def test_grafana_is_a_profile_the_env_example_enables(base: dict[str, Any]) -> None:
    assert base["grafana"]["profiles"] == ["grafana"]
    profiles = re.findall(r"^COMPOSE_PROFILES=(.*)$", ENV_EXAMPLE.read_text(), flags=re.M)
    assert profiles and "grafana" in profiles[0].split(","), profiles


def test_env_example_documents_every_variable_of_both_files() -> None:
    used = set()
    for path in (BASE, CPU):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert {"OPD_CPU_STEPS", "REDIS_HOST_PORT", "PROMETHEUS_HOST_PORT"} <= used
    assert used <= documented, sorted(used - documented)


def _torch_install_step() -> str:
    """The Dockerfile's RUN instruction that installs torch, as one shell command."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    steps = [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ") and "TORCH_INDEX_URL" in line]
    assert len(steps) == 1, steps
    return steps[0]


@pytest.mark.parametrize("with_wheel", [True, False])
def test_torch_comes_from_the_wheel_folder_when_one_is_there(tmp_path: Path, with_wheel: bool) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if with_wheel:
        (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "pip").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TORCH_SPEC": "torch>=2.4", "TORCH_INDEX_URL": "https://index.invalid/cpu"}
    step = _torch_install_step().replace("/tmp/wheels", str(wheels))
    subprocess.run(["sh", "-c", step], env=env, check=True, capture_output=True, text=True)
    lines = calls.read_text().splitlines()
    if with_wheel:
        assert len(lines) == 2 and all(f"--find-links {wheels}" in x for x in lines), lines
        assert "--no-index" in lines[0] and "index.invalid" not in calls.read_text()
    else:
        assert lines == ["install --index-url https://index.invalid/cpu torch>=2.4"], lines


def test_the_image_copies_every_package_pyproject_installs() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) /src/\1$", DOCKERFILE.read_text(), flags=re.M))
    assert copied == {p.rstrip("*") for p in patterns}, (copied, patterns)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "deploy/wheels" not in ignored and (ROOT / "deploy" / "wheels").is_dir()
    assert re.search(r"^ARG WHEELS=deploy/wheels$", DOCKERFILE.read_text(), flags=re.M)


def _standins() -> dict[str, str]:
    block = re.search(r"^STANDINS=\((.*?)^\)", SETUP_DOCKER.read_text(), flags=re.M | re.S)
    assert block, "STANDINS=( ... ) not found in scripts/setup-docker.sh"
    return dict(entry.split("=", 1) for entry in re.findall(r'"([^"]+)"', block.group(1)))


def test_every_base_image_has_a_stand_in(base: dict[str, Any]) -> None:
    standins = _standins()
    images = {s["image"] for name, s in base.items() if "image" in s and name not in (*SGLANG, "grafana")}
    images -= {"opd:local", "opd:local-cuda"}  # the project's own (CPU roles, GPU learner)
    images |= set(re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), flags=re.M))
    assert images == set(standins), (images, standins)
    for dockerfile in standins.values():
        assert (ROOT / "deploy" / "standins" / dockerfile).is_file(), dockerfile
