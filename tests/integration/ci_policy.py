"""Skip or fail: a test that cannot run here skips on a developer's machine and fails under CI.

Why: a test that skips in CI proves nothing, and a skip in `-q` output is one letter nobody reads, so under
CI a missing capability (root for a tmpfs mount, ...) is a failure. What counts as CI, first match wins:
- `OPD_REQUIRE_ROOT_TESTS=1`: required (set it to demand these tests on any machine); `=0`: not required,
  even under CI (the tests of this rule run a child pytest with it);
- the environment variable `CI` (set by GitHub Actions, GitLab CI and most runners);
- `.ci/run` among this process's ancestors: the project's CI entry point runs `scripts/test.sh`, which execs
  pytest, and neither sets `CI`, so the process tree is how a run of `.ci/run` (a fresh clone on a clean
  machine, as root) is recognised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_ENV = "OPD_REQUIRE_ROOT_TESTS"
CI_ENTRY = ".ci/run"


def _ancestors(pid: int) -> list[list[str]]:
    """The command lines of `pid`'s ancestors, nearest first (from /proc; empty where there is none)."""
    out: list[list[str]] = []
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name: the parent's pid
            if pid <= 0:
                break
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
        except (OSError, ValueError, IndexError):
            break
    return out


def ci_reason() -> str | None:
    """Why this run counts as CI (a test must not skip), or None (see the module docstring)."""
    required = os.environ.get(REQUIRE_ENV)
    if required == "0":
        return None
    if required == "1":
        return f"{REQUIRE_ENV}=1"
    if os.environ.get("CI"):
        return f"CI={os.environ['CI']}"
    for argv in _ancestors(os.getpid()):
        if any(arg.replace("\\", "/").endswith(CI_ENTRY) for arg in argv):
            return f"run by {CI_ENTRY} ({' '.join(argv)[:200]})"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip with `reason` outside CI; fail with it (and why this is CI) under CI. Never returns."""
    why = ci_reason()
    if why is not None:
        pytest.fail(f"{reason} (not skipped: this run is CI, {why})", pytrace=False)
    pytest.skip(f"{reason} (skipped outside CI; {REQUIRE_ENV}=1 makes it a failure)")
