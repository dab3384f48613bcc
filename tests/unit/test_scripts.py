"""The shell scripts in scripts/: they parse, and the GPU smoke test refuses a machine without a GPU.

Why: scripts are only run by hand on machines CI never sees (a GPU host, a fresh VM), so a syntax
error or a confusing failure would be found by the person who can least afford it.

Pins:
- every scripts/*.sh passes `bash -n` (and shellcheck, where it is installed);
- scripts/gpu-smoke.sh exits non-zero with a message naming the cause when nvidia-smi is missing,
  and when nvidia-smi lists a GPU but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="" hides the GPUs
  from torch, so this holds on GPU hosts too); bad arguments are a usage error (exit 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SMOKE = ROOT / "scripts" / "gpu-smoke.sh"


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


@pytest.mark.parametrize("args", [("--engine", "vllm"), ("--steps", "0"), ("--bogus",)])
def test_gpu_smoke_rejects_bad_arguments(args: tuple[str, ...]) -> None:
    result = _smoke(*args)
    assert result.returncode == 2, result.stderr
    assert "gpu-smoke:" in result.stderr


def test_gpu_smoke_help_lists_the_engines() -> None:
    result = _smoke("--help")
    assert result.returncode == 0
    assert "--engine hf" in result.stdout and "--engine sglang" in result.stdout and "OPD_STUDENT_DIR" in result.stdout
