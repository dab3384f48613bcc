"""The whole pipeline, for real: `opd up` with actors, teachers and learner as separate processes.

Pins:
- the held-out full-length reverse KL measured by the learner goes down;
- conservation: every prefix an actor produced ends as trained, dropped (stale) or dead-lettered;
- a malformed message injected into a stream lands in the dead-letter stream with its reason, and the
  pipeline keeps going;
- every role's /metrics endpoint exposes the documented metric names;
- truncation saved student tokens, and the teacher scored tokens;
- probes: actors sent full-length probes, the learner measured them and trained none of them; the summary
  shows the budget bound and the probe estimate; the learner published its KL by position in windows;
- `run.warm_cache` scores the reference answers into the teacher cache before the run starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import redis

from protocol import ledger
from protocol.messages import SCHEMA_VERSION
from protocol.names import Names
from protocol.state import LearnerState, read_state
from protocol.streams import read_dead_letters

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

EXPECTED = {
    "actor": ["opd_queue_depth", "opd_actor_prefixes_total", "opd_actor_tokens_generated_total",
              "opd_actor_tokens_saved_bound_total", "opd_actor_probes_total", "opd_actor_tokens_saved_estimate",
              "opd_actor_horizon_tokens_bucket", "opd_compute_saved_flops_total"],
    "teacher": ["opd_teacher_tokens_scored_total", "opd_teacher_tokens_cached_total", "opd_cache_hit_tokens_total",
                "opd_cache_miss_tokens_total", "opd_dead_letters_total"],
    "learner": ["opd_learner_staleness_bucket", "opd_learner_steps_total", "opd_learner_loss",
                "opd_learner_reverse_kl", "opd_learner_tokens_per_second", "opd_learner_policy_version",
                "opd_learner_probes_total"],
}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_pipeline_end_to_end(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    ns = "e2e"
    names = Names(ns)
    client = redis.Redis.from_url(redis_url)
    workdir = tmp_path / "run"
    overrides = [
        f"transport.redis_url={redis_url}", f"transport.namespace={ns}", f"run.workdir={workdir}",
        "run.tiny_assets=null", "run.actors=2", "run.teachers=1", f"run.warm_cache={tiny_assets / 'prompts.jsonl'}",
        f"actor.model_dir={tiny_assets / 'student'}", f"actor.prompts_file={tiny_assets / 'prompts.jsonl'}",
        f"teacher.model_dir={tiny_assets / 'teacher'}", f"teacher.cache_dir={tmp_path / 'cache'}",
        f"learner.model_dir={tiny_assets / 'student'}", f"learner.workdir={workdir / 'learner'}",
        f"learner.eval.heldout_file={tiny_assets / 'heldout.jsonl'}", f"learner.eval.teacher_dir={tiny_assets / 'teacher'}",
        "learner.eval.every=0", "learner.checkpoint_every=1000",
    ]
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "--steps", "16", "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            scraped = _scrape_all_roles(client, names, proc)
            # A malformed message (valid msgpack, wrong schema) in the middle of the run.
            bad = msgpack.packb({"kind": "rollout", "v": SCHEMA_VERSION, "id": "bad-1", "prompt_ids_P": "oops"})
            client.xadd(names.rollouts, {b"m": bad})
            code = proc.wait(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log_path.read_text()
    assert code == 0, output[-4000:]

    # metrics names
    for role, expected in EXPECTED.items():
        text = scraped[role]
        missing = [name for name in expected if name not in text]
        assert not missing, f"{role} /metrics lacks {missing}"

    # reverse KL on held-out prompts went down
    evals = [json.loads(x) for x in (workdir / "learner" / "eval.jsonl").read_text().splitlines()]
    assert len(evals) >= 2
    assert evals[-1]["reverse_kl"] < evals[0]["reverse_kl"], evals

    # conservation: nothing vanished
    counts = ledger.counts(client, names)
    total = ledger.audit(client, names).total  # fields + rolled-up ids (protocol/ledger.py rollup)
    assert counts[ledger.PRODUCED] == 0, counts
    assert counts[ledger.TRAINED] + counts[ledger.DROPPED] + counts[ledger.DEAD] == total, counts
    assert counts[ledger.TRAINED] >= 16 * 16

    # the malformed message was dead-lettered with a reason naming the field
    dead = read_dead_letters(client, names)
    assert any(d.message_id == "bad-1" and "prompt_ids_P" in d.reason for d in dead), [d.reason for d in dead]
    assert client.xlen(names.rollouts) == 0 and client.xlen(names.scored) == 0

    # probes: sent, measured by the learner (acked untrained, as dropped), in its published KL by position
    stats = ledger.stats(client, names)
    assert stats.get("actor_probes", 0) >= 1 and stats.get("actor_truncated", 0) >= 1, stats
    assert 1 <= stats.get("learner_probes", 0) <= stats["actor_probes"], stats
    assert counts[ledger.DROPPED] >= stats["learner_probes"], counts
    state = read_state(client, names)
    assert isinstance(state, LearnerState) and state.kl_windows and state.bucket_tokens > 0
    assert sum(sum(w.probe_tokens_by_bucket) for w in state.kl_windows) > 0
    assert "(bound)" in output and "(probes)" in output  # the progress line shows both savings

    assert "held-out reverse KL" in output
    assert "warmed the teacher cache" in output  # run.warm_cache: offline teacher caching before the run
    assert (workdir / "summary.png").exists()


def _scrape_all_roles(client: redis.Redis, names: Names, proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """Wait until each role registered its endpoint and has done some work, then scrape it."""
    scraped: dict[str, str] = {}
    deadline = time.monotonic() + 240
    while len(scraped) < 3 and time.monotonic() < deadline and proc.poll() is None:
        endpoints = {k.decode(): v.decode() for k, v in client.hgetall(names.key("endpoints")).items()}
        for role_id, url in endpoints.items():
            role = role_id.split("-")[0]
            if role in scraped:
                continue
            try:
                text = _scrape(url)
            except OSError:
                continue
            if role == "learner" and "opd_learner_steps_total 0.0" in text:
                continue  # wait for one step, so the histograms have samples
            if role == "teacher" and "opd_teacher_tokens_scored_total 0.0" in text:
                continue
            scraped[role] = text
        time.sleep(0.5)
    assert set(scraped) == {"actor", "teacher", "learner"}, f"only scraped {sorted(scraped)}"
    return scraped
