"""Smoke tests of the benchmarks in bench/: each runs end to end at its smallest size and prints every
row of its table, so they do not rot. Nothing here looks at a timing (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def run_bench(script: str, *args: str, timeout: int = 300) -> str:
    """stdout of `python bench/<script> args...`; fails the test with its stderr on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(out: str, head_word: str) -> list[list[str]]:
    """The rows of the table whose header line contains `head_word`, split on runs of 2+ spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if head_word in line)
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append([c for c in line.strip().split("  ") if c])
    return rows


def test_codec_bench_prints_every_codec_for_every_dtype() -> None:
    out = run_bench("bench_codec.py", "--quick")
    rows = table_rows(out, "enc+dec msg/s")
    got = {(r[0].strip(), r[1].strip()) for r in rows}
    assert got == {(d, c) for d in ("float32", "float16") for c in ("raw copy (ceiling)", "opd msgpack", "json")}
    for r in rows:  # the raw copy is the ceiling: its own ratio is exactly 1
        if r[1].strip().startswith("raw"):
            assert r[-1].strip() == "1.000x"


def test_queue_bench_settles_every_prefix_and_prints_every_path() -> None:
    """The bench itself refuses (exit != 0) a row whose prefixes were not all trained and acked."""
    out = run_bench("bench_queue.py", "--quick")
    rows = table_rows(out, "XADD ceiling/s")
    got = [(r[0].strip(), r[1].strip()) for r in rows]
    assert got == [(p, load) for load in ("rollout", "scored")
                   for p in ("publish only", "publish_many (batch 16)", "read + ack only", "publish -> read -> ack")] + [
        ("teacher hop (publish -> forward -> ack)", "rollout+scored")]
    assert all(r[-1].strip().endswith("x") for r in rows)


def test_cache_bench_prints_throughput_and_storage_for_every_vocabulary() -> None:
    out = run_bench("bench_cache.py", "--quick")
    speed = table_rows(out, "cache write")
    assert [(r[0].strip(), r[1].strip()) for r in speed] == [("tiny", "0"), ("tiny", "8"), ("tiny", "32"), ("1000", "32")]
    assert all(r[2].strip() != "n/a" for r in speed), "the teacher recomputation baseline was not measured"
    storage = table_rows(out, "disk B/tok")
    got = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in storage}
    assert ("1000", "32", "float16") in got and ("1000", "32", "float32") in got and ("tiny", "0", "float32") in got
    assert all(r[-1].strip() in ("met", "MISSED") for r in storage if r[1].strip() == "32")


def test_pipeline_bench_compares_async_with_sync_and_writes_stage_rates(tmp_path: Path) -> None:
    """The quick run: a sync loop and one `opd up` layout on the tiny models, the table, the JSON scaling.py reads."""
    out = run_bench("bench_pipeline.py", "--quick", "--json", str(tmp_path / "rates.json"), timeout=600)
    rows = [r for r in out.splitlines() if r.startswith("| demo |")]
    assert [r.split("|")[2].strip().split(" (")[0] for r in rows] == ["sync 1 thread", "async 1x1"]
    assert rows[0].split("|")[5].strip() == "1.00x"  # the ratio is against the best sync loop
    assert "best layout on this machine: **1x1**" in out
    rates = json.loads((tmp_path / "rates.json").read_text())["scenarios"]["demo"]
    assert set(rates["stage_seconds_per_step"]) == {"generate", "score", "train"}
    assert all(v > 0 for v in rates["stage_seconds_per_step"].values())
    async_row = rates["results"][-1]
    assert async_row["redis_reads_per_step"] > 0 and async_row["tokens"] > 0
    scaling = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), str(tmp_path / "rates.json")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert scaling.returncode == 0, scaling.stderr[-3000:]
    assert "replicas per learner" in scaling.stdout and "Redis saturates" in scaling.stdout


@pytest.mark.slow
def test_real_pair_bench_measures_every_part_on_the_pair(pair: Path, tmp_path: Path) -> None:
    """bench/bench_real_pair.py --quick on the real pair (`opd models smollm2`): every table, and the facts the
    published figures rest on (a warmed answer re-scored forwards nothing; the logits cap sets the learner's
    micro-batch from the 49,152-token vocabulary)."""
    out = run_bench("bench_real_pair.py", "--quick", "--pair", str(pair), "--json", str(tmp_path / "real.json"),
                    timeout=1800)
    res = json.loads((tmp_path / "real.json").read_text())["results"]
    assert {(r["source"], r["k"], r["dtype"]) for r in res["bytes"]} == {
        (s, k, d) for s in ("student samples", "teacher answers", "synthetic Zipfian") for k in (8, 32)
        for d in ("float32", "float16")}
    assert all(r["bytes_per_token"] > 0 and r["stored_tokens"] > 0 for r in res["bytes"])
    reproduced, student = res["hits"]
    assert reproduced["hit_rate"] == 1.0 and reproduced["tokens_forwarded"] == 0 and reproduced["flops_saved"] == 1.0
    assert student["tokens_forwarded"] > 0 and student["response_hit_rate"] < 1.0
    roles = {(r["role"], r.get("max_logits_mb")): r for r in res["roles"]}
    assert set(roles) == {("actor", None), ("teacher", None), ("learner", 256), ("learner", 1 << 20)}
    assert roles[("learner", 256)]["micro_batch_tokens"] == (256 << 20) // (49152 * 4 * 4)
    assert roles[("learner", 1 << 20)]["micro_batch_tokens"] == 1 << 16
    assert all(r["tokens"] > 0 and r["peak_rss_mb"] >= r["rss_loaded_mb"] > 0 for r in res["roles"])
    assert [r["k"] for r in res["topk"]] == [8, 32] and res["start_kl"] > 0
    assert all(r["heldout_kl"] > 0 for r in res["topk"])
    for head in ("| source | k | top-k dtype", "| re-scored |", "| role | setting |", "| teacher.topk |"):
        assert head in out, head
