"""`opd top`: the pipeline's numbers in a terminal, read from Redis and every role's /metrics.

The launcher's live view is the same table, so what a user watches locally is what `opd top`
shows against a compose deployment. Redis is the source of truth for the run-wide numbers (the
`stats` hash, the ledger, the learner's state): Prometheus counters die with their process, and a
replica that restarted would otherwise make the totals go backwards. /metrics adds what only a live
replica knows (its own throughput) and whether it is still up.

`opd top --once` prints one snapshot; into a pipe or a file it prints plain `what: value` lines
(no box drawing, no wrapping at 80 columns), so scripts and logs can read the numbers.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from prometheus_client.parser import text_string_to_metric_families

from opd.config import OPDConfig
from protocol import ledger
from protocol.names import Names
from protocol.reconnect import redact_url
from protocol.runtime import endpoints
from protocol.savings import ProbeTally, estimate_savings
from protocol.state import LearnerState, StateUnavailable, read_state

if TYPE_CHECKING:
    from rich.table import Table


@dataclass
class Snapshot:
    depths: dict[str, int]
    outcomes: dict[str, int]
    learner: LearnerState | StateUnavailable  # the learner's published state, or why there is none
    totals: dict[str, float] = field(default_factory=dict)
    per_role: dict[str, dict[str, float]] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    dead: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    down: list[str] = field(default_factory=list)  # registered endpoints that did not answer
    taken_at: float = field(default_factory=time.monotonic)


SUMMED = (
    "opd_actor_prefixes_total", "opd_actor_tokens_generated_total", "opd_actor_tokens_saved_bound_total",
    "opd_teacher_tokens_scored_total", "opd_teacher_tokens_cached_total", "opd_cache_hit_tokens_total",
    "opd_cache_miss_tokens_total", "opd_learner_tokens_trained_total", "opd_compute_saved_flops_total",
    "opd_learner_tokens_per_second", "opd_learner_idle_fraction", "opd_dead_letters_total",
)
# What one replica has done, by role (the first of these its /metrics exports).
REPLICA_WORK = ("opd_actor_tokens_generated_total", "opd_teacher_tokens_scored_total", "opd_learner_tokens_trained_total")


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


def _try_scrape(url: str) -> dict[str, float] | None:
    try:
        return scrape(url)
    except (OSError, ValueError):  # refused, timed out, or not a metrics page
        return None


def snapshot(client: redis.Redis, names: Names) -> Snapshot:
    depths = {s: int(client.xlen(s)) for s in (names.rollouts, names.scored)}
    learner = read_state(client, names)
    snap = Snapshot(depths=depths, outcomes=ledger.counts(client, names), learner=learner,
                    endpoints=endpoints(client, names), dead=int(client.xlen(names.dead)),
                    stats=ledger.stats(client, names))
    # Concurrently: an endpoint of a replica that is gone (its entry stays in Redis) may take the whole
    # timeout to fail, and the live view refreshes several times a second.
    items = sorted(snap.endpoints.items())
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(items)))) as pool:
        results = list(pool.map(_try_scrape, [url for _, url in items]))
    totals: dict[str, float] = defaultdict(float)
    for (role_id, _url), values in zip(items, results, strict=True):
        if values is None:
            snap.down.append(role_id)
            continue
        snap.per_role[role_id] = values
        for k, v in values.items():
            totals[k] += v
    snap.totals = dict(totals)
    return snap


def rows(snap: Snapshot, previous: Snapshot | None = None) -> list[tuple[str, str]]:
    """(what, value) pairs: the one definition of what `opd top` and the launcher show."""
    st = snap.stats
    scored = st.get("teacher_tokens_scored", 0.0)
    cached = st.get("teacher_tokens_cached", 0.0)
    out = _learner_rows(snap.learner)
    if "learner_eval_accuracy" in st:  # only when learner.eval.accuracy_prompts is on
        out.append(("held-out exact match (first -> last)",
                    f"{100 * st.get('learner_eval_accuracy_first', 0.0):.1f}% -> {100 * st['learner_eval_accuracy']:.1f}%"))
    out += [(f"queue depth {stream}", str(depth)) for stream, depth in snap.depths.items()]
    out += savings_rows(st)
    out += [
        ("teacher tokens scored / served from cache",
         f"{scored:.0f} / {cached:.0f} ({100 * cached / max(scored + cached, 1):.0f}% hit)"),
        ("FLOPs saved (truncation bound + cache)",
         f"{st.get('flops_saved_truncation', 0.0):.3g} + {st.get('flops_saved_cache', 0.0):.3g}"),
    ]
    if previous is not None and snap.taken_at > previous.taken_at:
        dt = snap.taken_at - previous.taken_at

        def rate(key: str) -> str:
            return f"{max(st.get(key, 0.0) - previous.stats.get(key, 0.0), 0.0) / dt:.0f}"

        out.append(("tokens/s now: actors / teachers (scored + cached)",
                    f"{rate('actor_tokens_generated')} / {rate('teacher_tokens_scored')} + {rate('teacher_tokens_cached')}"))
    per_replica = []
    for role_id, values in sorted(snap.per_role.items()):
        work = next((values[k] for k in REPLICA_WORK if k in values), None)
        if work is not None:
            per_replica.append(f"{role_id}: {work:.0f}")
    out.append(("tokens so far per live replica", ", ".join(per_replica) or "-"))
    o = snap.outcomes
    out.append(("prefixes in flight / trained / dropped / dead",
                f"{o[ledger.PRODUCED]} / {o[ledger.TRAINED]} / {o[ledger.DROPPED]} / {o[ledger.DEAD]}"))
    out.append(("dead-letter stream length", str(snap.dead)))
    down = set(snap.down)
    done = isinstance(snap.learner, LearnerState) and snap.learner.phase == "done"
    gone = " (stopped)" if done else " (down)"  # after a run, exited is normal
    out.append(("metrics endpoints", "\n".join(f"{k}: {v}{gone if k in down else ''}"
                                               for k, v in sorted(snap.endpoints.items())) or "-"))
    return out


def render(snap: Snapshot, previous: Snapshot | None = None) -> Table:
    """A rich table (imported lazily: rich is only needed when someone looks)."""
    from rich.table import Table

    table = Table(title="opd pipeline", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in rows(snap, previous):
        table.add_row(what, value)
    return table


def render_text(snap: Snapshot, previous: Snapshot | None = None) -> str:
    """The same rows as plain `what: value` lines (continuation lines indented), for pipes and logs."""
    pairs = rows(snap, previous)
    width = max(len(what) for what, _ in pairs)
    lines = []
    for what, value in pairs:
        first, *rest = value.split("\n")
        lines.append(f"{what + ':':<{width + 1}} {first}")
        lines += [f"{'':<{width + 1}} {line}" for line in rest]
    return "\n".join(lines)


def savings_rows(st: dict[str, float]) -> list[tuple[str, str]]:
    """Student tokens generated, and what truncation saved: the budget bound and the probes' estimate.

    The bound (`max_new_tokens - horizon` per prefix cut short) is a share of the budget (rollouts x
    max_new_tokens); the estimate (protocol/savings.py) is a share of what full rollouts would have generated,
    the honest denominator, since many would have stopped at EOS before the budget.
    """
    gen, probe_tokens = st.get("actor_tokens_generated", 0.0), st.get("actor_probe_tokens", 0.0)
    bound, budget = st.get("actor_tokens_saved", 0.0), st.get("actor_budget_tokens", 0.0)
    tally = ProbeTally(int(st.get("actor_probes", 0)), st.get("probe_saving_sum", 0.0), st.get("probe_saving_sq_sum", 0.0))
    est = estimate_savings(tally, int(st.get("actor_truncated", 0)))
    if est is None:
        estimate = "unknown: no probe yet (actor.probe_fraction)"
    else:
        spread = f" +- {est.stderr:.0f}" if est.stderr is not None else " (one probe: no error yet)"
        estimate = (f"{est.tokens:.0f}{spread} ({100 * est.fraction_of_full(gen - probe_tokens):.0f}% of what full "
                    f"rollouts would have generated; {tally.probes} probes, {tally.saving_sum:.0f} extra tokens)")
    return [
        ("student tokens generated (in probes)", f"{gen:.0f} ({probe_tokens:.0f})"),
        ("saved by truncation (budget bound)", f"at most {bound:.0f} ({100 * bound / max(budget, 1):.0f}% of the budget)"),
        ("saved by truncation (probe estimate)", estimate),
    ]


def _learner_rows(state: LearnerState | StateUnavailable) -> list[tuple[str, str]]:
    """The learner's rows, from its typed state; without one, why (not yet published, or malformed)."""
    if isinstance(state, StateUnavailable):
        return [("learner step / version", f"- ({state.reason})")]
    step = f"{state.step} / {state.version}"
    if state.phase != "training":
        step += f" ({state.phase})"
    return [
        ("learner step / version", step),
        ("reverse KL on training prefixes (sampled est.)", _f(state.reverse_kl)),
        ("loss / the loss's top-k support KL", f"{_f(state.loss)} / {_f(state.support_kl)}"),
        ("held-out reverse KL (first -> last)", f"{_f(state.eval_kl_first)} -> {_f(state.eval_kl_last)}"),
        ("learner tokens/s, idle fraction", f"{_f(state.tokens_per_second, 0)}, {_f(state.idle_fraction, 2)}"),
    ]


def _f(value: float | str | None, digits: int = 4) -> str:
    if value in (None, ""):
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except ValueError:
        return str(value)


def run_top(cfg: OPDConfig, *, once: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    from protocol.streams import connect, connect_role

    assert cfg.transport.redis_url
    client = connect(cfg.transport.redis_url)  # the first look fails fast: a wrong URL is an error at once
    names = Names(cfg.transport.namespace)
    console = Console()
    try:
        snap = snapshot(client, names)
        if once:
            if console.is_terminal:
                console.print(render(snap))
            else:
                print(render_text(snap), flush=True)
            return 0
        client = connect_role(cfg.transport)  # the live view rides out a Redis outage, as the roles do
        with Live(render(snap), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(cfg.run.progress_interval_s)
                previous, snap = snap, snapshot(client, names)
                live.update(render(snap, previous))
    except redis.RedisError as exc:
        # The CLI turns ConnectionError into `opd top: error: ...` and exit code 1.
        raise ConnectionError(f"Redis at {redact_url(cfg.transport.redis_url)}: {exc}") from None
