"""Model files other users and servers must read (issue 8, defect 5).

safetensors writes through a 0600 temporary file and our atomic directory writes through 0700
`mkdtemp` dirs, so published weights, checkpoints and the demo's models used to be readable by their
writer only, and loading them as anyone else failed with "No such file or directory". Pinned:
- published weights, checkpoints and the tiny demo models get the umask's modes (0644 / 0755 under
  umask 022; a stricter umask is honoured);
- another user (`nobody`, a real unprivileged process) can load what the learner published;
- a model file that user cannot read is named with the real error (Permission denied, mode, owner),
  and a directory that is not a model says it has no config.json.
The tests run as root, which reads anything, so the permission cases run a child process as
`nobody` (skipped where that is impossible: not root, or no `setpriv`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.hf import HFRolloutEngine
from learner.checkpoint import save_checkpoint
from learner.publish import publish_weights
from opd.tiny import asset_paths, build_tiny_assets
from protocol.files import check_model_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, set[int]]:
    """The permission bits of every file and directory under `root` (root included)."""
    out: dict[str, set[int]] = {"file": set(), "dir": {stat.S_IMODE(root.stat().st_mode)}}
    for p in root.rglob("*"):
        out["dir" if p.is_dir() else "file"].add(stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_weights_and_checkpoints_get_the_umask_modes(
    tiny_assets: Path, tmp_path: Path, mask: int, file_mode: int, dir_mode: int
) -> None:
    student = asset_paths(tiny_assets).student_dir
    model = AutoModelForCausalLM.from_pretrained(student)
    with umask(mask):
        published, _ = publish_weights(model, tmp_path / "weights", 1, 2, tokenizer=AutoTokenizer.from_pretrained(student))
        ckpt = save_checkpoint(tmp_path / "ckpt", model, None, step=1, policy_version=1)
    assert (published / "model.safetensors").is_file() and (ckpt / "model" / "model.safetensors").is_file()
    for root in (published, ckpt):
        assert modes(root) == {"file": {file_mode}, "dir": {dir_mode}}, root


def test_the_demo_models_are_readable_by_others(tmp_path: Path) -> None:
    with umask(0o022):
        paths = build_tiny_assets(tmp_path / "tiny", teacher_steps=2, n_train_prompts=8, n_heldout_prompts=4)
    for d in (paths.student_dir, paths.teacher_dir):
        assert (d / "model.safetensors").is_file()
        assert modes(d) == {"file": {0o644}, "dir": {0o755}}, d


def test_a_directory_that_is_not_a_model_says_so(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model_dir: .*weights has no config.json"):
        HFRolloutEngine(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=r"learner.model_dir: .*nope does not exist"):
        check_model_dir(tmp_path / "nope", "learner.model_dir")


# ---- as another user ------------------------------------------------------------------------------


def as_nobody(code: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a Python child as uid/gid nobody (HF caches under `home`)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HOME": str(home / "hf"), "PYTHONPATH": str(REPO)}
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp dirs are 0700), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a child process as another user")
    root = Path(tempfile.mkdtemp(prefix="opd-modes-"))
    try:
        root.chmod(0o755)
        (root / "home").mkdir(mode=0o777)
        (root / "home").chmod(0o777)
        probe = as_nobody("import os; print(os.getuid())", root / "home")
        if probe.stdout.strip() != str(NOBODY):
            pytest.skip(f"cannot run Python as nobody here: {probe.stderr.strip()[-200:]}")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_another_user_loads_published_weights_and_is_told_what_it_cannot_read(
    tiny_assets: Path, shared_dir: Path
) -> None:
    student = asset_paths(tiny_assets).student_dir
    with umask(0o022):
        published, _ = publish_weights(AutoModelForCausalLM.from_pretrained(student), shared_dir / "weights", 1, 2,
                                       tokenizer=AutoTokenizer.from_pretrained(student))
    # What every loader does (HF engine, HF scorer, learner, evaluator): check_model_dir, then from_pretrained.
    # (Not the engine itself: the child runs the system Python, as root's pyenv is closed to nobody, and
    # there redis, which the engine's imports pull in, needs a backport the venv does not have.)
    load = ("from transformers import AutoModelForCausalLM; from protocol.files import check_model_dir; "
            f"AutoModelForCausalLM.from_pretrained(check_model_dir({str(published)!r}, 'model_dir')); print('loaded')")
    ok = as_nobody(load, shared_dir / "home")
    assert ok.stdout.strip().endswith("loaded"), ok.stderr[-2000:]

    (published / "model.safetensors").chmod(0o600)  # what the writer used to leave
    denied = as_nobody(load, shared_dir / "home")
    assert denied.returncode != 0
    last = denied.stderr.strip().splitlines()[-1]
    assert last.startswith("PermissionError: model_dir: cannot read ") and "model.safetensors" in last, last
    assert "Permission denied (mode 0600, owner uid 0; this process runs as uid 65534)" in last, last
    assert "No such file or directory" not in denied.stderr
