"""A TCP proxy in front of a test's redis-server that loses a reply for real (tests of retried writes).

Why a proxy: a retried write is only exercised when Redis executed a command and the client never heard
back. The proxy passes traffic both ways and, when armed, closes both connections instead of passing the
next reply on; the client's retry (`protocol/reconnect.py`) then reconnects and sends the command again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, loses the next reply: it closes both connections instead of
    passing the reply on, after Redis executed the command (the reply proves it did)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.armed = threading.Event()
        self.dropped = 0
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.connections += 1
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if replies and self.armed.is_set():
                    self.armed.clear()
                    self.dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    @classmethod
    def in_front_of(cls, redis_url: str) -> ReplyDropper:
        """A proxy to the redis-server of ``redis_url`` (use it as a context manager)."""
        return cls(int(urlsplit(redis_url).port or 6379))

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> ReplyDropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
