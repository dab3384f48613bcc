"""A Docker engine, the images and one `docker compose` project, for tests/integration/test_compose_cpu.py.

Why a module of its own: the compose test reads as the scenario a user goes through (up, scale,
finish, down); how an engine is installed and started on a bare machine, which local torch wheel the
image is built from and how containers are inspected is plumbing, kept here.

Everything goes through the real CLIs (`docker`, `docker compose`) and scripts/setup-docker.sh, the
same commands docs/deploy.md gives users.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SETUP_DOCKER = REPO / "scripts" / "setup-docker.sh"
WHEELS = REPO / "deploy" / "wheels"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")


def run(cmd: list[str], *, timeout_s: float, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (the real error, not a bare exit status)."""
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)}: no result after {timeout_s:.0f}s\n{exc.stdout or ''}{exc.stderr or ''}") from exc
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def ensure_engine() -> bool:
    """Install and start a Docker engine unless one answers; True if this call started it."""
    if engine_answers():
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
            run(["bash", str(SETUP_DOCKER), "install"], timeout_s=900)  # the Compose v2 plugin
        return False
    run(["bash", str(SETUP_DOCKER), "install"], timeout_s=900)
    run(["bash", str(SETUP_DOCKER), "start"], timeout_s=300)
    return True


def stop_engine() -> None:
    run(["bash", str(SETUP_DOCKER), "stop"], timeout_s=120, check=False)


def local_torch_wheel() -> Path | None:
    """A torch wheel for the image's Python (3.11) on this machine's pip find-links, if there is one.

    Why: where download.pytorch.org cannot be reached, the image is built from the wheel folder
    (deploy/wheels, the Dockerfile's air-gapped path), as a user of an air-gapped cluster would.
    """
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            dirs += value.strip().strip("'\"").split()
    arch = platform.machine()
    for d in dirs:
        path = Path(d.removeprefix("file://"))
        if path.is_dir():
            found = sorted(path.glob(f"torch-*-cp311-cp311-*{arch}.whl"))
            if found:
                return found[-1]
    return None


def place_wheel(wheel: Path) -> Path | None:
    """Link (or copy) `wheel` into deploy/wheels unless a torch wheel is there; returns what to remove after."""
    if any(WHEELS.glob("torch-*.whl")):
        return None
    target = WHEELS / wheel.name
    try:
        os.link(wheel, target)
    except OSError:
        shutil.copy2(wheel, target)
    return target


@dataclass
class Container:
    """What `docker inspect` says about one container of the project."""

    id: str
    name: str
    service: str
    number: int
    status: str  # created | running | exited | ...
    exit_code: int
    health: str | None  # starting | healthy | unhealthy, None without a healthcheck
    restarts: int
    ip: str | None

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> Container:
        labels = data["Config"]["Labels"]
        state = data["State"]
        networks = data["NetworkSettings"]["Networks"] or {}
        ips = [n.get("IPAddress") for n in networks.values() if n.get("IPAddress")]
        return cls(id=data["Id"][:12], name=data["Name"].lstrip("/"), service=labels["com.docker.compose.service"],
                   number=int(labels.get("com.docker.compose.container-number", "0")), status=state["Status"],
                   exit_code=int(state["ExitCode"]), health=(state.get("Health") or {}).get("Status"),
                   restarts=int(data["RestartCount"]), ip=ips[0] if ips else None)


class Compose:
    """`docker compose -p NAME --env-file FILE -f docker-compose.yml -f docker-compose.cpu.yml ...`."""

    def __init__(self, project: str, env_file: Path) -> None:
        self.project = project
        self.env_file = env_file
        # Settings of the caller's shell (COMPOSE_PROFILES, COMPOSE_FILE...) must not change the project.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}

    def cmd(self, *args: str) -> list[str]:
        files = [x for f in COMPOSE_FILES for x in ("-f", f)]
        return ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file), *files, *args]

    def __call__(self, *args: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(*args), timeout_s=timeout_s, check=check, env=self.env)

    def containers(self) -> list[Container]:
        ids = self("ps", "-a", "-q", timeout_s=120).stdout.split()
        if not ids:
            return []
        data = json.loads(run(["docker", "inspect", *ids], timeout_s=120).stdout)
        return sorted((Container.from_inspect(d) for d in data), key=lambda c: (c.service, c.number))

    def logs(self, tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), timeout_s=120, check=False).stdout

    def exec(self, container: Container, *cmd: str) -> str:
        return run(["docker", "exec", container.id, *cmd], timeout_s=120).stdout

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run(["docker", "ps", "-a", "-q", "--filter", label], timeout_s=60).stdout.split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label], timeout_s=60).stdout.split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label], timeout_s=60).stdout.split(),
        }


def scrape_metrics(compose: Compose, container: Container) -> dict[str, float]:
    """A role's own /metrics, read inside its container (no address outside it is involved)."""
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=5).read().decode())"
    values: dict[str, float] = {}
    for line in compose.exec(container, "python", "-c", code).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values
