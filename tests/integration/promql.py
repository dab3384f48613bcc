"""The Grafana dashboard's queries against a real Prometheus: shared by the dashboard test (Prometheus
on loopback scraping `opd up`) and the compose test (the compose file's Prometheus scraping the
compose roles).

Why shared: both ask the same question, "does every panel of deploy/grafana/dashboards/opd.json show
data", of two ways to run the pipeline; one implementation keeps their answers comparable.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "opd.json"

METRIC = re.compile(r"\bopd_[a-zA-Z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
# Statuses with which Prometheus' query API answers an expression it cannot parse or evaluate; any
# other error status (503 while it starts, 5xx) is the server's, not the query's.
_QUERY_ERRORS = (400, 422)


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"panel {self.panel!r} query {self.ref}: {self.expr}"


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every target expression, including those of panels nested in collapsed rows."""
    out: list[Query] = []
    for panel in dashboard["panels"]:
        for p in (panel, *panel.get("panels", [])):
            out += [Query(p["title"], t.get("refId", "?"), t["expr"]) for t in p.get("targets", []) if t.get("expr")]
    return out


def grafana_variables(dashboard: dict[str, Any], *, range_s: int, rate_interval_s: int = 30) -> dict[str, str]:
    """Values for Grafana's built-in interval variables and the dashboard's own template variables.

    A template variable takes its saved current value; "All" (or nothing saved) becomes its allValue,
    or `.*`, which is what Grafana sends for a regex matcher.
    """
    values = {
        "__rate_interval": f"{rate_interval_s}s", "__interval": f"{rate_interval_s}s",
        "__interval_ms": str(rate_interval_s * 1000),
        "__range": f"{range_s}s", "__range_s": str(range_s), "__range_ms": str(range_s * 1000),
    }
    for var in dashboard.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = "|".join(current)
        if current in (None, "", "$__all") or "$__all" in str(current):
            current = var.get("allValue") or ".*"
        values[var["name"]] = str(current)
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace `$name`, `${name}`, `${name:format}` and `[[name]]`; an unknown variable is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in variables:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(replace, expr)


class PrometheusUnavailable(OSError):
    """Prometheus did not answer, or answered with a server error (503 while it starts): retry later."""


class Prometheus:
    """The HTTP query API of one Prometheus server."""

    def __init__(self, url: str) -> None:
        self.url = url

    def ready(self) -> bool:
        """`/-/ready` answers 200: the TSDB is open and queries are served (503 before that)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as resp:
                return resp.status == 200
        except OSError:  # refused, reset, timed out, or an HTTP error status such as 503
            return False

    def wait_ready(self, timeout_s: float, alive: Any = None) -> None:
        """Poll `/-/ready` until it answers 200; `alive()` (optional) False means stop waiting: gone."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if alive is not None and not alive():
                raise PrometheusUnavailable(f"Prometheus at {self.url} exited before it was ready")
            if time.monotonic() > deadline:
                raise PrometheusUnavailable(f"Prometheus at {self.url} not ready after {timeout_s:.0f}s")
            time.sleep(0.25)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result as a list of series (a scalar or string becomes one entry).

        A bad expression raises ValueError; a server that is not (yet) answering raises
        PrometheusUnavailable (an OSError), which callers polling a starting server retry.
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in _QUERY_ERRORS:
                raise PrometheusUnavailable(f"Prometheus answered {exc.code} {exc.reason} to {expr!r}") from exc
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {"errorType": f"HTTP {exc.code}", "error": "no JSON body"}
        except urllib.error.URLError as exc:
            raise PrometheusUnavailable(f"Prometheus at {self.url}: {exc.reason}") from exc
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of an aggregating expression, or None when there is no data."""
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None


def queries_without_data(prom: Prometheus, queries: list[Query], variables: dict[str, str], at: float) -> list[str]:
    """One line per query that errors, returns no series, or returns only NaN (e.g. 0/0) at `at`."""
    problems = []
    for q in queries:
        expr = substitute(q.expr, variables)
        try:
            result = prom.query(expr, at)
        except ValueError as exc:
            problems.append(f"{q}\n    error: {exc}")
            continue
        if not result:
            problems.append(f"{q}\n    no data (evaluated: {expr})")
        elif all(math.isnan(float(r["value"][1])) for r in result):
            problems.append(f"{q}\n    only NaN (evaluated: {expr})")
    return problems


def misspelt(expr: str, metric: str) -> str:
    """`expr` with every occurrence of the metric name `metric` (and only that name) misspelt."""
    return re.sub(rf"\b{re.escape(metric)}\b", metric + "_typo", expr)
