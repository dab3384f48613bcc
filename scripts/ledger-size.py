"""The ledger with and without the rollup over N prefixes (docs/reliability.md, "Load and bounded memory").

Starts a redis-server of its own on a free loopback port, records N ids `produced` then `trained` the way the
roles do (`ledger.record`), measures the hash (`HLEN`, `MEMORY USAGE`, `used_memory`), runs two rollup passes
(`keep_s=0`: the first notes when it saw each settled id, the second folds) and measures again.

    .venv/bin/python scripts/ledger-size.py [N]      # default 100000
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from protocol import ledger
from protocol.names import Names


def main(n: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.mkdtemp()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH (apt-get install redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data, "--save", ""],
                            stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        report(client, Names("size"), n)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data)


def report(client: redis.Redis, names: Names, n: int) -> None:
    mem0 = client.info("memory")["used_memory"]
    ids = [uuid.uuid4().hex for _ in range(n)]
    for i in range(0, n, 1000):
        ledger.record(client, names, {m: ledger.PRODUCED for m in ids[i:i + 1000]})
        ledger.record(client, names, {m: ledger.TRAINED for m in ids[i:i + 1000]})
    mem1 = client.info("memory")["used_memory"]
    print(f"without rollup: {n} prefixes, HLEN {client.hlen(names.ledger)}, MEMORY USAGE "
          f"{client.memory_usage(names.ledger, samples=0)} B, used_memory +{mem1 - mem0} B ({(mem1 - mem0) / n:.0f} B/prefix)")
    t0 = time.perf_counter()
    first = ledger.rollup(client, names, keep_s=0)
    t1 = time.perf_counter()
    time.sleep(0.01)  # the fold needs a rollup mark from an earlier millisecond
    second = ledger.rollup(client, names, keep_s=0)
    t2 = time.perf_counter()
    mem2 = client.info("memory")["used_memory"]
    books = ledger.audit(client, names)
    print(f"rollup pass 1 (observe): {first} in {t1 - t0:.2f}s; pass 2 (fold): {second} in {t2 - t1:.2f}s")
    print(f"with rollup: HLEN {client.hlen(names.ledger)}, rolled {books.rolled}, used_memory +{mem2 - mem0} B, "
          f"books balanced: {books.conserved}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
