"""Rollouts carry the weight version the SGLang server ran, not the one the actor last asked it to load.

A real `Actor` (real Redis, the tiny student's tokenizer) on the SGLang engine, against a real HTTP server on
127.0.0.1 that keeps a weight version the way SGLang 0.5.23 does: `"default"` until its first update, then the
`weight_version` of the last `/update_weights_from_disk`, reported in `/model_info` and in every `/generate`
answer's `meta_info.weight_version`. Pins (each failed on main, which tagged rollouts with the actor's own
version and reloaded whenever the server's version was not exactly the announced one):

- a batch aborted by another actor's reload and retried runs on the new weights, and is tagged with them;
- a server restarted on its launch weights tags rollouts v0, and the actor reloads the newest weights at
  its next step;
- an actor whose announcement is older than what the server holds does not reload it (never back);
- a server holding a version this run never announced stops the actor with a message naming it.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from actors.actor import Actor
from actors.config import ActorConfig
from opd.tiny import asset_paths
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix, WeightsAnnouncement, decode
from protocol.runtime import StopFlag, announce_weights

pytestmark = pytest.mark.integration

BATCH = 2
TOKENS = [5, 6, 7]


class VersionedServer:
    """SGLang's weight-version bookkeeping over HTTP; `aborts` answers abort the next batches, `on_abort`
    runs as each abort is answered (another actor's reload landing meanwhile)."""

    def __init__(self) -> None:
        self.version = "default"
        self.aborts = 0
        self.on_abort: Any = None
        self.paths: list[str] = []
        self.updates: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                server.paths.append(self.path)
                if self.path == "/generate":
                    return self._send(200, server.generate(len(body["input_ids"])))
                if self.path == "/update_weights_from_disk":
                    server.updates.append(body)
                    server.version = body["weight_version"]
                    return self._send(200, {"success": True, "message": "ok", "num_paused_requests": 0})
                if self.path in ("/pause_generation", "/continue_generation"):
                    return self._send(200, {"message": "ok", "status": "ok"})
                return self._send(404, {"detail": "Not Found"})

            def do_GET(self) -> None:
                server.paths.append(self.path)
                if self.path == "/model_info":
                    return self._send(200, {"model_path": "/data/assets/student", "weight_version": server.version})
                return self._send(404, {"detail": "Not Found"})

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

    def generate(self, n: int) -> list[dict[str, Any]]:
        if self.aborts:
            self.aborts -= 1
            answer = [{"meta_info": {"finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                                     "weight_version": self.version}} for _ in range(n)]
            if self.on_abort is not None:
                self.on_abort()
            return answer
        return [{"meta_info": {"finish_reason": {"type": "length", "length": len(TOKENS)},
                               "weight_version": self.version,
                               "output_token_logprobs": [[-0.5, t, None] for t in TOKENS]}} for _ in range(n)]


@pytest.fixture()
def server() -> Iterator[VersionedServer]:
    s = VersionedServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _actor(redis_url: str, root: Path, url: str) -> Actor:
    paths = asset_paths(root)
    cfg = ActorConfig.model_validate({
        "model_dir": str(paths.student_dir), "prompts_file": str(paths.prompts_file),
        "engine": {"kind": "sglang", "url": url, "timeout_s": 10, "max_failures": 2},
        "batch_size": BATCH, "max_new_tokens": len(TOKENS), "schedule": "full", "admission_control": False,
        "weights_poll_s": 3600,  # polls only when forced or told the server is behind
    })
    transport = TransportConfig(redis_url=redis_url, namespace=f"served-{uuid.uuid4().hex[:8]}")
    return Actor(cfg, transport, actor_id="served-actor", stop=StopFlag())


def _announce(actor: Actor, version: int) -> str:
    path = f"/data/learner/weights/v{version:06d}"
    announce_weights(actor.client, actor.names, WeightsAnnouncement(version=version, path=path, step=version, nbytes=1))
    return path


def _published_versions(actor: Actor) -> list[int]:
    entries = actor.client.xrange(actor.names.rollouts)
    return [decode(f[b"m"], expect=RolloutPrefix).policy_version for _, f in entries]


def test_a_retried_batch_is_tagged_with_the_weights_it_ran_on(
    redis_url: str, tiny_assets: Path, server: VersionedServer
) -> None:
    actor = _actor(redis_url, tiny_assets, server.url)
    _announce(actor, 1)
    server.version = "1"
    actor.maybe_reload(force=True)
    assert actor.version == 1 and "/update_weights_from_disk" not in server.paths  # already there

    def peer_reloads() -> None:  # another actor on this server loads v2 while our batch is aborted
        _announce(actor, 2)
        server.version = "2"

    server.aborts, server.on_abort = 1, peer_reloads
    assert actor.step() == 0 and actor.failures == 1
    assert actor.step() == BATCH
    assert _published_versions(actor) == [2] * BATCH
    assert actor.version == 2


def test_a_restarted_server_tags_v0_and_the_actor_reloads_the_newest(
    redis_url: str, tiny_assets: Path, server: VersionedServer
) -> None:
    actor = _actor(redis_url, tiny_assets, server.url)
    path = _announce(actor, 3)
    actor.maybe_reload(force=True)  # server on its launch weights: reloaded
    assert server.updates == [{"model_path": path, "weight_version": "3"}] and actor.version == 3
    server.version = "default"  # the server restarted: back on the initial student
    assert actor.step() == BATCH
    assert _published_versions(actor) == [0] * BATCH and actor.version == 0
    assert actor.step() == BATCH  # this step polls and reloads v3 first
    assert server.updates[-1] == {"model_path": path, "weight_version": "3"}
    assert _published_versions(actor) == [0] * BATCH + [3] * BATCH and actor.version == 3


def test_a_lagging_actor_never_loads_older_weights(redis_url: str, tiny_assets: Path, server: VersionedServer) -> None:
    actor = _actor(redis_url, tiny_assets, server.url)
    _announce(actor, 4)
    server.version = "5"  # a peer already loaded v5, announced after this actor read v4
    server.paths.clear()
    actor.engine.load_weights("/data/learner/weights/v000004", 4)
    assert server.updates == [] and server.paths == ["/model_info"]
    _announce(actor, 5)
    actor.version = 4
    assert actor.step() == BATCH
    assert _published_versions(actor) == [5] * BATCH and actor.version == 5


def test_a_server_ahead_of_every_announcement_stops_the_actor(
    redis_url: str, tiny_assets: Path, server: VersionedServer
) -> None:
    actor = _actor(redis_url, tiny_assets, server.url)
    _announce(actor, 2)
    server.version = "50"  # left over from another run
    with pytest.raises(RuntimeError, match=r"weight version 50, but this run has announced at most v2: it holds "
                                           r"another run's weights"):
        actor.step()
    assert actor.client.xlen(actor.names.rollouts) == 0 and actor.in_hand == 0
