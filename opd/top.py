"""`opd top`: the pipeline's numbers in a terminal, read from Redis and every role's /metrics.

The launcher's live view is the same table, so what a user watches locally is what `opd top`
shows against a compose deployment.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import redis
from prometheus_client.parser import text_string_to_metric_families

from opd.config import OPDConfig
from protocol import ledger
from protocol.names import Names
from protocol.runtime import endpoints


@dataclass
class Snapshot:
    depths: dict[str, int]
    outcomes: dict[str, int]
    learner: dict[str, str]
    totals: dict[str, float] = field(default_factory=dict)
    per_role: dict[str, dict[str, float]] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    dead: int = 0
    stats: dict[str, float] = field(default_factory=dict)


SUMMED = (
    "opd_actor_prefixes_total", "opd_actor_tokens_generated_total", "opd_actor_tokens_saved_total",
    "opd_teacher_tokens_scored_total", "opd_teacher_tokens_cached_total", "opd_cache_hit_tokens_total",
    "opd_cache_miss_tokens_total", "opd_learner_tokens_trained_total", "opd_compute_saved_flops_total",
    "opd_learner_tokens_per_second", "opd_learner_idle_fraction", "opd_dead_letters_total",
)


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Sum every sample of each metric family (labels folded) from one /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SUMMED:
                out[sample.name] += sample.value
    return dict(out)


def snapshot(client: redis.Redis, names: Names) -> Snapshot:
    depths = {s: int(client.xlen(s)) for s in (names.rollouts, names.scored)}
    learner = {k.decode(): v.decode() for k, v in client.hgetall(names.learner_state).items()}
    snap = Snapshot(depths=depths, outcomes=ledger.counts(client, names), learner=learner,
                    endpoints=endpoints(client, names), dead=int(client.xlen(names.dead)),
                    stats=ledger.stats(client, names))
    totals: dict[str, float] = defaultdict(float)
    for role_id, url in snap.endpoints.items():
        try:
            values = scrape(url)
        except OSError:
            continue
        snap.per_role[role_id] = values
        for k, v in values.items():
            totals[k] += v
    snap.totals = dict(totals)
    return snap


def render(snap: Snapshot):  # type: ignore[no-untyped-def]
    """A rich renderable (imported lazily: rich is only needed when someone looks)."""
    from rich.table import Table

    st = snap.stats
    gen = st.get("actor_tokens_generated", 0.0)
    saved = st.get("actor_tokens_saved", 0.0)
    scored = st.get("teacher_tokens_scored", 0.0)
    cached = st.get("teacher_tokens_cached", 0.0)
    table = Table(title="opd pipeline", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    L = snap.learner
    table.add_row("learner step / version", f"{L.get('step', '-')} / {L.get('version', '-')}")
    table.add_row("loss / sampled reverse KL", f"{_f(L.get('loss'))} / {_f(L.get('reverse_kl'))}")
    table.add_row("held-out reverse KL (first -> last)", f"{_f(L.get('eval_kl_first'))} -> {_f(L.get('eval_kl_last'))}")
    table.add_row("learner tokens/s, idle fraction", f"{_f(L.get('tokens_per_second'), 0)}, {_f(L.get('idle_fraction'), 2)}")
    for stream, depth in snap.depths.items():
        table.add_row(f"queue depth {stream}", str(depth))
    table.add_row("student tokens generated / saved by truncation",
                  f"{gen:.0f} / {saved:.0f} ({100 * saved / max(gen + saved, 1):.0f}% of the full budget)")
    table.add_row("teacher tokens scored / served from cache",
                  f"{scored:.0f} / {cached:.0f} ({100 * cached / max(scored + cached, 1):.0f}% hit)")
    table.add_row("FLOPs saved (truncation + cache)",
                  f"{st.get('flops_saved_truncation', 0.0):.3g} + {st.get('flops_saved_cache', 0.0):.3g}")
    rates = ", ".join(f"{k}: {v.get('opd_actor_tokens_generated_total', v.get('opd_teacher_tokens_scored_total', 0)):.0f}"
                      for k, v in sorted(snap.per_role.items()) if not k.startswith("learner"))
    table.add_row("tokens per live replica", rates or "-")
    o = snap.outcomes
    table.add_row("prefixes in flight / trained / dropped / dead",
                  f"{o['produced']} / {o['trained']} / {o['dropped']} / {o['dead']}")
    table.add_row("metrics endpoints", "\n".join(f"{k}: {v}" for k, v in sorted(snap.endpoints.items())) or "-")
    return table


def _f(value: str | None, digits: int = 4) -> str:
    if value in (None, ""):
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except ValueError:
        return str(value)


def run_top(cfg: OPDConfig, *, once: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    from protocol.streams import connect

    assert cfg.transport.redis_url
    client = connect(cfg.transport.redis_url)
    names = Names(cfg.transport.namespace)
    console = Console()
    if once:
        console.print(render(snapshot(client, names)))
        return 0
    with Live(render(snapshot(client, names)), console=console, refresh_per_second=2) as live:
        while True:
            time.sleep(cfg.run.progress_interval_s)
            live.update(render(snapshot(client, names)))
