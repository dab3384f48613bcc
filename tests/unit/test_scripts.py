"""The shell scripts in scripts/: they parse, and the GPU smoke test refuses a machine without a GPU.

Why: scripts are only run by hand on machines CI never sees (a GPU host, a fresh VM), so a syntax
error or a confusing failure would be found by the person who can least afford it.

Pins:
- every scripts/*.sh passes `bash -n` (and shellcheck, where it is installed);
- scripts/gpu-smoke.sh exits non-zero with a message naming the cause when nvidia-smi is missing,
  and when nvidia-smi lists a GPU but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="" hides the GPUs
  from torch, so this holds on GPU hosts too); bad arguments are a usage error (exit 2);
- its `--dry-run` runs nowhere near a GPU: it prints every phase in order, each as "would run" or
  "skipped" with the reason (no --wheels, no or a broken OPD_SGLANG_PYTHON), warns when the SGLang
  interpreter is not the pinned release, writes nothing and exits 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.sglang_version import SGLANG_VERSION

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SMOKE = ROOT / "scripts" / "gpu-smoke.sh"
PHASES = ["preflight", "wheels", "python", "models", "hf-pipeline", "sglang-student", "sglang-teacher", "sglang-pipeline",
          "sglang-live"]


def _smoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHON: this interpreter (has torch), wherever the test runs from.
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SMOKE), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_there_are_scripts() -> None:
    assert SMOKE in SCRIPTS and len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_smoke_without_nvidia_smi_fails_clearly(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    result = _smoke("--workdir", str(workdir), env={"NVIDIA_SMI": str(tmp_path / "no-such-nvidia-smi")})
    assert result.returncode != 0
    assert "gpu-smoke: error: no NVIDIA GPU" in result.stderr and "no-such-nvidia-smi" in result.stderr, result.stderr
    assert not workdir.exists(), "nothing may be set up before the GPU check"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_smoke_on_this_machine_without_a_gpu_fails_clearly() -> None:
    result = _smoke()
    assert result.returncode != 0
    assert "no NVIDIA GPU: 'nvidia-smi' not found" in result.stderr, result.stderr


def test_gpu_smoke_fails_clearly_when_torch_sees_no_cuda(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"  # a driver that lists a GPU; torch is then asked for real
    fake.write_text("#!/bin/sh\necho 'GPU 0: Some GPU (UUID: GPU-00000000)'\n")
    fake.chmod(0o755)
    result = _smoke(env={"NVIDIA_SMI": str(fake), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "sees no CUDA device although nvidia-smi lists 1 GPU(s)" in result.stderr, result.stderr


@pytest.mark.parametrize("args", [("--steps", "0"), ("--bogus",), ("--wheels", "/no/such/dir")])
def test_gpu_smoke_rejects_bad_arguments(args: tuple[str, ...]) -> None:
    result = _smoke(*args)
    assert result.returncode == 2, result.stderr
    assert "gpu-smoke:" in result.stderr


def test_gpu_smoke_help_lists_the_phases() -> None:
    result = _smoke("--help")
    assert result.returncode == 0
    for phase in PHASES:
        assert phase in result.stdout, phase
    assert "OPD_SGLANG_PYTHON" in result.stdout and "--dry-run" in result.stdout and "--wheels" in result.stdout


def _dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    workdir = tmp_path / "run"
    result = _smoke("--dry-run", "--workdir", str(workdir), env={"OPD_SGLANG_PYTHON": "", **env})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not workdir.exists(), "a dry run writes nothing"
    return result


def test_gpu_smoke_dry_run_prints_every_phase_and_why_sglang_is_skipped(tmp_path: Path) -> None:
    """Issue 18: `--dry-run` on a machine without a GPU lists the plan and exits 0 (was: unknown argument)."""
    out = _dry_run(tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith("==> [")]
    assert [line.split()[2].rstrip("]") for line in lines] == PHASES, out
    for line in lines:
        assert "] would run: " in line or "] skipped: " in line, line
    assert "[2/9 wheels] skipped: no --wheels DIR" in out
    for phase in PHASES[5:]:
        assert f"{phase}] skipped: OPD_SGLANG_PYTHON is not set" in out, out
    assert "hf-pipeline] would run: " in out and "learner.device=cuda" in out and "ratio" in out
    if shutil.which("nvidia-smi") is None:
        assert "it would stop here: 'nvidia-smi' not found" in out


def test_gpu_smoke_dry_run_says_why_an_sglang_interpreter_is_not_used(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, OPD_SGLANG_PYTHON=str(tmp_path / "no-python")).stdout
    assert "sglang-student] skipped: OPD_SGLANG_PYTHON=" in out and "is not an executable" in out
    broken = tmp_path / "python-without-sglang"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'sglang'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _dry_run(tmp_path, OPD_SGLANG_PYTHON=str(broken)).stdout
    assert "sglang-live] skipped: " in out and "cannot import sglang: ModuleNotFoundError" in out


def test_gpu_smoke_dry_run_plans_the_sglang_phases_and_warns_off_the_pin(tmp_path: Path) -> None:
    fake = tmp_path / "sglang-python"  # answers `import sglang; print(sglang.__version__)`
    fake.write_text("#!/bin/sh\necho 0.5.22\n")
    fake.chmod(0o755)
    out = _dry_run(tmp_path, OPD_SGLANG_PYTHON=str(fake)).stdout
    for phase in PHASES[5:]:
        assert f"{phase}] would run: " in out, out
    assert f"{fake} -m sglang.launch_server" in out and "--enable-deterministic-inference" in out
    assert f"SGLang 0.5.22 is not the pinned {SGLANG_VERSION}" in out
    assert "9 phases, 1 skipped" in out


def test_gpu_wheels_dry_run_carries_everything_but_torch(tmp_path: Path) -> None:
    """scripts/gpu-wheels.sh: the project, its dependencies without torch (the host's CUDA one stays), pytest,
    a redis-server; for the host's Python and platform, binary wheels only. --dry-run downloads nothing."""
    dest = tmp_path / "wheels"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-wheels.sh"), "--dry-run", "--dest", str(dest),
                             "--python-version", "3.12", "--redis-server", "/usr/bin/redis-server"],
                            cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    download = next(line for line in result.stdout.splitlines() if line.startswith("+ ") and " download " in line)
    assert "--only-binary=:all:" in download and "--python-version 3.12" in download and "--platform manylinux" in download
    words = download.split()
    assert "transformers>=5.24" in words and "zarr>=3.0" in words and "redis>=5.0" in words and "msgpack>=1.0" in words
    assert "pytest>=8.0" in words and not any(w.startswith("torch") for w in words), words
    assert f"+ cp /usr/bin/redis-server {dest}/bin/redis-server" in result.stdout
    assert any(line.startswith("+ ") and " wheel --no-deps " in line for line in result.stdout.splitlines())
    assert not dest.exists()
