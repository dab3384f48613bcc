"""Stopping `opd up` early: SIGTERM or SIGINT (Ctrl-C) stop the roles in order; a second signal kills them.

Why in order: a role stops by finishing its unit in hand (protocol/runtime.py `StopFlag`); what it finished
must have somewhere to go. Actors first, so nothing new is produced; then teachers, whose scored batches
reach the learner's stream; then the learner, which checkpoints what it trained; the launcher stops its
private Redis after all of them, so no role loses Redis while it stops (before, SIGTERM killed the launcher
outright and its roles died with Redis connection errors).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, Protocol

log = logging.getLogger("opd.launcher")

STAGES = (("actors", "actor-"), ("teachers", "teacher-"), ("learner", "learner-"))
"""The order roles are stopped in (by the name prefix `opd up` gives them)."""
MARGIN_S = 15.0
"""`opd up` waits transport.stop_timeout_s plus this per stage: a role's own bound, then its interpreter's exit."""


class Interrupted(KeyboardInterrupt):
    """The first SIGINT/SIGTERM while `opd up` starts or watches the run (raised out of that, to stop in order)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Role(Protocol):
    name: str
    proc: subprocess.Popen[bytes]


class Signals:
    """SIGINT/SIGTERM handlers for the launcher's lifetime (restored on exit; the main thread only).

    The first signal raises `Interrupted` while `raising` (starting and watching) and is only remembered
    afterwards (the roles are being stopped already); a second one kills every role at once.
    """

    def __init__(self, roles: Sequence[_Role]) -> None:
        self.roles = roles
        self.signum: int | None = None
        self.raising = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int | None:
        """128 + the signal number (the shell's convention for a process ended by that signal), None if none came."""
        return None if self.signum is None else 128 + self.signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.info("%s: stopping the run: actors, then teachers, then the learner, then Redis; a second signal "
                     "kills every role at once", name)
            if self.raising:
                raise Interrupted(signum)
            return
        log.warning("second signal (%s): killing every role now", name)
        for role in self.roles:
            if role.proc.poll() is None:
                role.proc.kill()


def stop_group(roles: Sequence[_Role], timeout_s: float) -> None:
    """SIGTERM every role of `roles` at once, wait for all (`timeout_s` in all), then SIGKILL what is left."""
    for r in roles:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for r in roles:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: killing it", r.name, timeout_s)
            r.proc.kill()
            r.proc.wait()


def stop_in_order(roles: Sequence[_Role], stop_timeout_s: float) -> None:
    """Stop the running roles stage by stage (`STAGES`), each given `stop_timeout_s` + `MARGIN_S`."""
    for label, prefix in STAGES:
        live = [r for r in roles if r.name.startswith(prefix) and r.proc.poll() is None]
        if not live:
            continue
        log.info("stopping %s: %s", label, ", ".join(r.name for r in live))
        stop_group(live, stop_timeout_s + MARGIN_S)
        log.info("%s stopped (exit codes: %s)", label, ", ".join(f"{r.name} {r.proc.returncode}" for r in live))
    stop_group([r for r in roles if r.proc.poll() is None], stop_timeout_s + MARGIN_S)  # any other, last
