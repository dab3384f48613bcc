"""The GPU layouts of compose (2, 4 and 8 GPUs) and the pinned SGLang image (issue 18, items 2 and 5).

Why: no GPU host runs in CI, so the first user of a layout would find a wrong device id, a student
server without its actors or an unpinned SGLang image. These checks read the files as compose merges
them (`docker compose config`, the same interpolation and merge as `up`) and say which is wrong.

Pins:
- every layout (docker-compose.yml alone: 2 GPUs; plus deploy/docker-compose.gpu4.yml or .gpu8.yml)
  passes `docker compose config -q` with deploy/opd.env.example as its `.env`, and each override file
  validates against the Compose Specification schema (check-jsonschema's vendored copy);
- each layout puts exactly the documented services on each GPU (docs/deploy.md, "GPU layouts"): the
  learner alone or beside the student server, every SGLang server on a GPU of its own otherwise, all
  GPUs of the layout used; the student server's memory fraction leaves room where it shares;
- the learner is a GPU learner: the CUDA image (CUDA torch index), a reservation, learner.device=cuda;
- every student server has its own actor service naming it (an actor reloads weights into the server
  it samples from), extra actor services answer to `actor` (Prometheus' DNS discovery), extra teacher
  servers answer to `teacher-sglang`, and the teacher role waits for all of them;
- the CPU profile still merges to a CPU learner: no reservation, the CPU image and index;
- the SGLang image is `lmsysorg/sglang:v<SGLANG_VERSION>` (protocol/sglang_version.py) in every layout, in
  compose's default and in deploy/opd.env.example, never `:latest`.

Where the docker CLI has no compose v2 the merge checks are skipped (failed under CI, where
scripts/setup.sh installs it with scripts/setup-docker.sh).
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

from protocol.sglang_version import SGLANG_VERSION

ROOT = Path(__file__).resolve().parents[2]
# lmsysorg/sglang tags a release `v<version>` (CUDA 13 builds since 0.5.20; `v0.5.19-cu129` was the last
# CUDA 12 tag, per SGLang's install docs).
SGLANG_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
BASE = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / "deploy" / "opd.env.example"
OVERRIDES = {4: "deploy/docker-compose.gpu4.yml", 8: "deploy/docker-compose.gpu8.yml"}
LAYOUT_FILES = {2: (BASE,), 4: (BASE, OVERRIDES[4]), 8: (BASE, OVERRIDES[8])}
# GPU index -> the services reserving it, as docs/deploy.md's "GPU layouts" table says.
EXPECTED_GPUS = {
    2: {"0": {"learner", "student-sglang"}, "1": {"teacher-sglang"}},
    4: {"0": {"learner"}, "1": {"student-sglang"}, "2": {"teacher-sglang"}, "3": {"teacher-sglang-2"}},
    8: {"0": {"learner"}, "1": {"student-sglang"}, "2": {"student-sglang-2"}, "3": {"student-sglang-3"},
        "4": {"teacher-sglang"}, "5": {"teacher-sglang-2"}, "6": {"teacher-sglang-3"}, "7": {"teacher-sglang-4"}},
}


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose's merge tags (`!override`, `!reset`) as the values they carry."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _tagged)
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _compose_v2() -> list[str]:
    """`docker compose` where it answers; skipped (failed under CI) where it does not."""
    docker = shutil.which("docker")
    ok = docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True,
                                               timeout=60).returncode == 0
    if not ok:
        reason = "no docker CLI with compose v2 (bash scripts/setup-docker.sh install)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return [str(docker), "compose"]


def _compose(files: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose --env-file deploy/opd.env.example -f ... ARGS` at the root, no COMPOSE_* from here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    cmd = [*_compose_v2(), "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE)]
    cmd += [x for f in files for x in ("-f", str(ROOT / f))]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


_MERGED: dict[tuple[str, ...], dict[str, Any]] = {}


def merged(files: tuple[str, ...]) -> dict[str, Any]:
    """The project model compose runs for `files` (interpolated and merged), as JSON."""
    if files not in _MERGED:
        result = _compose(files, "config", "--format", "json")
        assert result.returncode == 0, result.stderr
        _MERGED[files] = json.loads(result.stdout)
    return _MERGED[files]


def gpus_of(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    out = []
    for device in devices:
        assert device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []), device
        assert "count" not in device, f"a GPU pinned by count is any GPU: {device}"
        out += [str(i) for i in device["device_ids"]]
    return out


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("gpus", sorted(LAYOUT_FILES))
def test_layout_passes_docker_compose_config(gpus: int) -> None:
    result = _compose(LAYOUT_FILES[gpus], "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("gpus", sorted(OVERRIDES))
def test_layout_file_validates_against_the_compose_spec(gpus: int, tmp_path: Path) -> None:
    found = shutil.which("check-jsonschema", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("check-jsonschema not found: pip install -e '.[test]'")
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(yaml.load((ROOT / OVERRIDES[gpus]).read_text(), Loader=_ComposeLoader)))
    result = subprocess.run([found, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("gpus", sorted(LAYOUT_FILES))
def test_each_gpu_holds_what_the_layout_says(gpus: int) -> None:
    services = merged(LAYOUT_FILES[gpus])["services"]
    placed: dict[str, set[str]] = {}
    for name, service in services.items():
        for gpu in gpus_of(service):
            placed.setdefault(gpu, set()).add(name)
    assert placed == EXPECTED_GPUS[gpus]
    for name, service in services.items():
        if "sglang" not in name:
            continue
        fraction = float(_option([str(c) for c in service["command"]], "--mem-fraction-static"))
        shares = len(placed[gpus_of(service)[0]]) > 1
        assert (fraction <= 0.5) if shares else (fraction >= 0.8), (name, fraction, "shares a GPU" if shares else "alone")


@pytest.mark.parametrize("gpus", sorted(LAYOUT_FILES))
def test_the_learner_is_a_gpu_learner(gpus: int) -> None:
    learner = merged(LAYOUT_FILES[gpus])["services"]["learner"]
    assert learner["image"] == "opd:local-cuda"
    assert re.search(r"download\.pytorch\.org/whl/cu\d+$", learner["build"]["args"]["TORCH_INDEX_URL"]), learner["build"]
    assert "learner.device=cuda" in learner["command"]
    assert len(gpus_of(learner)) == 1


@pytest.mark.parametrize("gpus", sorted(LAYOUT_FILES))
def test_every_server_has_its_clients(gpus: int) -> None:
    services = merged(LAYOUT_FILES[gpus])["services"]
    students = sorted(n for n in services if n.startswith("student-sglang"))
    teachers = sorted(n for n in services if n.startswith("teacher-sglang"))
    actors = {n: s for n, s in services.items() if n == "actor" or n.startswith("actor-")}
    url_of = {name: next(c for c in s["command"] if c.startswith("actor.engine.url=")) for name, s in actors.items()}
    for student in students:
        mine = [a for a, url in url_of.items() if url == f"actor.engine.url=http://{student}:30000"]
        assert len(mine) == 1, (student, url_of)
        assert services[mine[0]]["depends_on"][student]["condition"] == "service_healthy"
        if mine[0] != "actor":
            assert "actor" in services[mine[0]]["networks"]["default"]["aliases"], mine[0]
    assert len(actors) == len(students), url_of
    for teacher in teachers:
        assert services["teacher"]["depends_on"][teacher]["condition"] == "service_healthy"
        if teacher != "teacher-sglang":
            assert "teacher-sglang" in services[teacher]["networks"]["default"]["aliases"], teacher
    for name in (*students, *teachers):
        assert services[name]["image"] == SGLANG_IMAGE, (name, services[name]["image"])


def test_the_cpu_profile_keeps_a_cpu_learner() -> None:
    learner = merged((BASE, CPU))["services"]["learner"]
    assert learner["image"] == "opd:local" and "deploy" not in learner
    assert learner["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert not any("cuda" in str(c) for c in learner["command"])
    assert "student-sglang" not in learner["depends_on"]


def test_the_sglang_image_is_the_pinned_release() -> None:
    """Fails on the old files: both servers ran `lmsysorg/sglang:latest` (issue 18, item 5)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", SGLANG_VERSION), SGLANG_VERSION
    base = yaml.safe_load((ROOT / BASE).read_text())
    assert base["x-sglang-image"] == f"${{SGLANG_IMAGE:-{SGLANG_IMAGE}}}"
    for name in ("student-sglang", "teacher-sglang"):
        assert base["services"][name]["image"] == base["x-sglang-image"]
    assert re.findall(r"^SGLANG_IMAGE=(.*)$", ENV_EXAMPLE.read_text(), flags=re.M) == [SGLANG_IMAGE]
    for path in (BASE, *OVERRIDES.values(), "docs/deploy.md"):
        assert "sglang:latest" not in (ROOT / path).read_text(), path


def test_env_example_documents_every_variable_of_the_layouts() -> None:
    used = set()
    for path in (BASE, *OVERRIDES.values()):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / path).read_text()))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert {"LEARNER_GPU", "TORCH_CUDA_INDEX_URL", "STUDENT_OWN_GPU_MEM_FRACTION"} <= used
    assert used <= documented, sorted(used - documented)
