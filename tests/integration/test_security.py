"""Security of a running pipeline, from outside, with real processes and a real password-protected Redis (issue 11).

Pins:
- Redis with a password (`--requirepass`) works end to end: the roles get the URL from `OPD_REDIS_URL` (not
  their command line), the learner finishes, the ledger conserves; the password is in no role's command
  line, log or /metrics;
- while they run, every listening socket of every role is on the configured address (127.0.0.1 by
  default), none on 0.0.0.0 or ::, read from /proc/net/tcp{,6} and each process's fds;
- a wrong and a missing password: `opd actor|teacher|learner|up` each exit 1 soon (a generous bound, no
  timing assert) with one error line that says authentication failed and names the URL with its password
  redacted; no traceback, the password nowhere in the output;
- `opd up`'s private redis-server requires a random password of its own (a connection without one gets
  NOAUTH), listens on 127.0.0.1 only, and gets the password on stdin: it is in no process's command line.
  The roles read it from the launcher's resolved config, a 0600 file.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml
from conftest import free_port
from learner_streams import start
from roles import (
    REPO,
    Pipeline,
    RedisServer,
    assert_conserved_and_trained_once,
    pipeline_overrides,
    wait_until,
)

from opd.launcher import start_redis
from protocol import ledger
from protocol.names import Names
from protocol.reconnect import auth_failed, redact_url

pytestmark = pytest.mark.integration

CONFIG = REPO / "configs" / "tiny-cpu.yaml"
STEPS = 12  # long enough that every role is still up while the test reads its sockets
T = TypeVar("T")
EXIT_BOUND_S = 180  # generous: a role imports torch before it connects; never a timing assert


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on: /proc/net/tcp{,6} rows in state LISTEN (0A)
    whose inode is one of the process's fds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)  # the kernel's words, each in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
            family = socket.AF_INET if size == 4 else socket.AF_INET6
            found.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


def assert_listens_only_on(pid: int, name: str, address: str = "127.0.0.1") -> list[tuple[str, int]]:
    sockets = listening(pid)
    assert sockets, f"{name} (pid {pid}) listens on nothing: its /metrics should be up"
    wrong = [s for s in sockets if s[0] != address]
    assert not wrong, f"{name} (pid {pid}) listens on {wrong}, not only on {address}"
    return sockets


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the direct children of ``pid``."""
    out = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append((int(stat_path.parent.name), comm))
    return out


def scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_a_password_protected_redis_runs_the_pipeline(tiny_assets: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    password = "pw-" + secrets.token_hex(12)
    server = RedisServer(tmp_path / "redis", free_port())
    server.start(password=password)
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    monkeypatch.setenv("OPD_REDIS_URL", url)  # how compose hands roles the password: never on a command line
    names = Names("secure")
    client = redis.Redis.from_url(url, socket_timeout=10)
    overrides = pipeline_overrides("null", names, tiny_assets, tmp_path, **{"learner.steps": STEPS})
    pipe = Pipeline()
    try:
        for role in ("learner", "teacher", "actor"):
            pipe.start(role, f"{role}-0", overrides, tmp_path)
        wait_until("every role's /metrics", lambda: client.hlen(names.key("endpoints")) == 3, pipe)
        endpoints = {k.decode(): v.decode() for k, v in client.hgetall(names.key("endpoints")).items()}
        for r in pipe.roles.values():
            assert r.proc.poll() is None, f"{r.name} ended before its sockets were read:\n{r.log()[-3000:]}"
            sockets = assert_listens_only_on(r.proc.pid, r.name)
            assert int(endpoints[r.name].rsplit(":", 1)[1].split("/")[0]) in {port for _, port in sockets}
            assert password not in cmdline(r.proc.pid)
            assert password not in scrape(endpoints[r.name])
        learner = pipe.roles["learner-0"]
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()
        try:
            counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
        finally:
            server.stop()
    assert counts[ledger.TRAINED] >= STEPS * 4
    for r in pipe.roles.values():
        text = r.log()
        assert "Traceback" not in text, f"{r.name}:\n{text[-3000:]}"
        assert password not in text, f"{r.name} logged the Redis password"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:s3cret@h/0", "redis://user:***@h/0"),
    ("rediss://:s3cret@h:6380/1", "rediss://:***@h:6380/1"),
    ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://:s3cret@h:notaport/0", "<unparseable URL>"),
])
def test_redact_url_hides_every_form_of_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    message = str(auth_failed(redis.AuthenticationError("WRONGPASS invalid password"), url))
    assert "s3cret" not in message and message.startswith(f"Redis authentication failed at {shown} ")


def _auth_failure_commands(port: int, tiny_assets: Path, tmp_path: Path, wrong: str) -> dict[str, list[str]]:
    """`opd ROLE` and `opd up` against a password-protected Redis, with a wrong and with no password."""
    urls = {"wrong": f"redis://:{wrong}@127.0.0.1:{port}/0", "missing": f"redis://127.0.0.1:{port}/0"}
    commands = {}
    for case, url in urls.items():
        for role in ("actor", "teacher", "learner", "up"):
            work = tmp_path / f"{role}-{case}"
            overrides = pipeline_overrides(url, Names(f"auth{case}"), tiny_assets, work,
                                           **{"run.workdir": work, "run.fresh": "false"})
            cmd = [sys.executable, "-m", "opd.cli", role, "--config", str(CONFIG)]
            cmd += ["--no-progress"] if role == "up" else ["--id", f"{role}-{case}"]
            commands[f"{role}-{case}"] = cmd + [x for o in overrides for x in ("--set", o)]
    return commands


def test_a_wrong_or_missing_password_fails_fast_with_one_clear_line(tiny_assets: Path, tmp_path: Path) -> None:
    password, wrong = "right-" + secrets.token_hex(8), "wrong-" + secrets.token_hex(8)
    server = RedisServer(tmp_path / "redis", free_port())
    server.start(password=password)
    procs = {}
    try:
        for name, cmd in _auth_failure_commands(server.port, tiny_assets, tmp_path, wrong).items():
            procs[name] = (start(cmd, tmp_path / f"{name}.log"), tmp_path / f"{name}.log")
        for name, (proc, log_path) in procs.items():
            try:
                proc.wait(timeout=EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {EXIT_BOUND_S}s (retrying a refused password?):\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
    for name, (proc, log_path) in procs.items():
        text = log_path.read_text(errors="replace")
        shown = f"redis://:***@127.0.0.1:{server.port}/0" if name.endswith("wrong") else \
            f"redis://127.0.0.1:{server.port}/0"
        lines = [line for line in text.splitlines() if "Redis authentication failed" in line]
        assert proc.returncode == 1, f"{name} exited with {proc.returncode}:\n{text[-3000:]}"
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
        assert len(lines) == 1 and f"at {shown} " in lines[0] and "error:" in lines[0], f"{name}:\n{text[-3000:]}"
        assert wrong not in text and password not in text, f"{name} printed a password"


def test_the_private_redis_requires_a_random_password_off_the_command_line(tmp_path: Path) -> None:
    servers = [start_redis(tmp_path / f"run{i}") for i in range(2)]
    try:
        passwords = []
        for proc, url in servers:
            parsed = redis.connection.parse_url(url)
            assert parsed["host"] == "127.0.0.1" and len(parsed["password"]) >= 32
            passwords.append(parsed["password"])
            assert redis.Redis.from_url(url).ping()
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=parsed["port"], socket_timeout=10).ping()
            assert_listens_only_on(proc.pid, "redis-server")
            assert parsed["password"] not in cmdline(proc.pid)
        assert passwords[0] != passwords[1], "each private Redis needs a password of its own"
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)


def _up_command(tiny_assets: Path, workdir: Path) -> list[str]:
    overrides = pipeline_overrides("null", Names("opd"), tiny_assets, workdir, **{
        "run.workdir": workdir, "run.fresh": "false", "run.actors": 1, "learner.steps": STEPS})
    return [sys.executable, "-m", "opd.cli", "up", "--config", str(CONFIG), "--no-progress",
            *[x for o in overrides for x in ("--set", o)]]


def _poll(launcher: subprocess.Popen[bytes], log_path: Path, what: str, check: Callable[[], T | None]) -> T:
    """``check()`` once it is not None; fails if `opd up` ends first or the generous guard runs out."""
    deadline = time.monotonic() + 300
    while (result := check()) is None:
        assert launcher.poll() is None, f"opd up ended before {what}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)
    return result


def _private_redis(launcher_pid: int, workdir: Path) -> dict[str, Any] | None:
    """The private Redis's URL, parsed, once a role has been started (the config is complete by then)."""
    if not any(name != "redis-server" for _, name in children_of(launcher_pid)):
        return None
    return redis.connection.parse_url(yaml.safe_load((workdir / "config.yaml").read_text())["transport"]["redis_url"])


def _all_listening(launcher_pid: int) -> dict[tuple[int, str], tuple[list[tuple[str, int]], str]] | None:
    """(listening sockets, command line) of every child, taken in one pass once redis-server and the 3 roles
    all listen (roles: once their /metrics is up); None before."""
    snapshot = {}
    for pid, name in children_of(launcher_pid):
        try:
            sockets, command = listening(pid), cmdline(pid)
        except OSError:  # gone since the listing
            return None
        if not sockets:
            return None
        snapshot[(pid, name)] = (sockets, command)
    return snapshot if len(snapshot) >= 4 and any(n == "redis-server" for _, n in snapshot) else None


def test_opd_up_private_redis_has_a_password_the_roles_get(tiny_assets: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    log_path = tmp_path / "up.log"
    launcher = start(_up_command(tiny_assets, workdir), log_path)
    try:
        url = _poll(launcher, log_path, "the first role", lambda: _private_redis(launcher.pid, workdir))
        password = url["password"]
        assert password and len(password) >= 32
        assert stat.S_IMODE((workdir / "config.yaml").stat().st_mode) == 0o600, "the config holds the password"
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: the port alone gets nobody in
            redis.Redis(host="127.0.0.1", port=url["port"], socket_timeout=10).ping()
        snapshot = _poll(launcher, log_path, "every process listening", lambda: _all_listening(launcher.pid))
        for (pid, name), (sockets, command) in snapshot.items():
            assert all(address == "127.0.0.1" for address, _ in sockets), f"{name} (pid {pid}) listens on {sockets}"
            assert password not in command, f"{name}'s command line shows the Redis password"
        code = launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "a random password" in text and "redis://:***@127.0.0.1:" in text
    for path in [log_path, *(workdir / "logs").glob("*.log"), workdir / "redis" / "redis.log"]:
        assert password not in path.read_text(errors="replace"), f"{path} shows the Redis password"
