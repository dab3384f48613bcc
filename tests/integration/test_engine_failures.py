"""The actor asks its engine how to treat a failure, never the engine's name.

A real `Actor` (real Redis, the tiny student's tokenizer) on the SGLang engine, against a real HTTP server
on 127.0.0.1 that fails `/generate` with HTTP 503 (as a server reloading weights or restarting does) and
then answers: the engine calls the failure transient, so the actor backs off and retries, up to
`actor.engine.max_failures` failures in a row, and the retried batch is published. With
`max_failures=0` the first failure stops the actor with a message that counts them. The HF engine calls
nothing transient (an in-process failure is a bug or a bad input; retrying would repeat it).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from actors.actor import Actor
from actors.config import ActorConfig
from actors.engines.hf import HFRolloutEngine
from opd.tiny import asset_paths
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix, decode
from protocol.runtime import StopFlag

pytestmark = pytest.mark.integration

BATCH = 2
TOKENS = [5, 6, 7]


def _generation(tokens: list[int]) -> dict[str, Any]:
    """One item of SGLang's `/generate` batch answer: stopped at the length limit."""
    return {"meta_info": {"finish_reason": {"type": "length", "length": len(tokens)},
                          "output_token_logprobs": [[-0.5, t, None] for t in tokens]}}


class FlakyServer:
    """`/generate` answers HTTP 503 `failures` times, then a batch of `BATCH` generations; 404 elsewhere."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.generate_calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/generate":
                    return self._send(404, {"detail": "Not Found"})
                server.generate_calls += 1
                if server.generate_calls <= server.failures:
                    return self._send(503, {"error": {"message": "weights are being updated"}})
                return self._send(200, [_generation(TOKENS) for _ in range(BATCH)])

            def do_GET(self) -> None:
                self._send(404, {"detail": "Not Found"})

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def flaky() -> Iterator[Callable[[int], FlakyServer]]:
    servers: list[FlakyServer] = []

    def start(failures: int) -> FlakyServer:
        servers.append(FlakyServer(failures))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _actor(redis_url: str, root: Path, url: str, max_failures: int) -> Actor:
    paths = asset_paths(root)
    cfg = ActorConfig.model_validate({
        "model_dir": str(paths.student_dir), "prompts_file": str(paths.prompts_file),
        "engine": {"kind": "sglang", "url": url, "timeout_s": 10, "max_failures": max_failures},
        "batch_size": BATCH, "max_new_tokens": len(TOKENS), "schedule": "full", "admission_control": False,
    })
    transport = TransportConfig(redis_url=redis_url, namespace=f"engfail-{uuid.uuid4().hex[:8]}")
    return Actor(cfg, transport, actor_id="engfail-actor", stop=StopFlag())


def test_a_transient_engine_failure_is_retried_and_the_batch_published(
    redis_url: str, tiny_assets: Path, flaky: Callable[[int], FlakyServer]
) -> None:
    server = flaky(1)
    actor = _actor(redis_url, tiny_assets, server.url, max_failures=1)
    assert actor.step() == 0 and actor.failures == 1  # the 503: backed off, nothing published
    assert actor.step() == BATCH and actor.failures == 0  # the retry
    entries = actor.client.xrange(actor.names.rollouts)
    assert [decode(f[b"m"], expect=RolloutPrefix).response_ids_R.tolist() for _, f in entries] == [TOKENS] * BATCH
    assert server.generate_calls == 2


def test_failures_past_max_failures_stop_the_actor_naming_the_count(
    redis_url: str, tiny_assets: Path, flaky: Callable[[int], FlakyServer]
) -> None:
    server = flaky(5)
    actor = _actor(redis_url, tiny_assets, server.url, max_failures=0)
    with pytest.raises(RuntimeError, match=r"1 engine failures in a row, last: .*503"):
        actor.step()
    assert server.generate_calls == 1
    assert actor.client.xlen(actor.names.rollouts) == 0


def test_the_hf_engine_calls_nothing_transient(tiny_assets: Path) -> None:
    engine = HFRolloutEngine(asset_paths(tiny_assets).student_dir)
    assert engine.max_failures == 0
    assert not engine.is_transient(RuntimeError("CUDA error")) and not engine.is_transient(ValueError("bad"))
