"""`opd up` / `opd demo`: the whole pipeline on one machine, each role its own OS process.

Order of events: build tiny assets (`run.tiny_assets`), start a private redis-server unless a URL is given, write
the resolved config, start teachers, learner and actors, show live progress, and when the learner
has finished its steps (and drained what was in flight) stop everyone and print the run summary.

Stopping early (SIGTERM, or SIGINT/Ctrl-C): the roles are stopped in order, each stage SIGTERMed and waited
for (at most `transport.stop_timeout_s` plus a margin, then killed): actors first, so nothing new is
produced; then teachers (what they scored is forwarded, the rest stays queued); then the learner (it
checkpoints what it trained); then the private redis-server, last, so no role loses Redis while stopping.
The summary is printed as after a normal finish, and the exit code is 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM: the run did not reach its steps). A second signal kills every role at once.
Children also die with the launcher (PR_SET_PDEATHSIG), so nothing is left orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opd.config import OPDConfig
from opd.stopping import Interrupted, Signals, stop_in_order
from opd.top import Snapshot
from protocol.reconnect import redact_url
from protocol.savings import ProbeTally, estimate_savings
from protocol.state import LearnerState

log = logging.getLogger("opd.launcher")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: deliver SIGTERM to the child when the launcher dies, even by SIGKILL."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server: loopback, free port, AOF on, its own data dir (wiped: a fresh run).

    It requires a random password, so another local user cannot read or write the run's streams. The
    password reaches redis-server on its stdin (never its argv, which `ps` shows anyone) and the roles in
    the returned URL, which the launcher passes them in its 0600 config file (`_write_private`).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(
            "redis-server is not installed: run `apt-get install redis-server` (scripts/setup.sh does), "
            "or set transport.redis_url to an existing Redis"
        )
    data = (workdir / "redis").resolve()
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
         "--save", "", "--protected-mode", "yes", "--logfile", str(data / "redis.log"), "-"],  # "-": more on stdin
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only: Redis is stopped last, by it
    )
    password = secrets.token_urlsafe(32)  # URL- and config-safe characters only
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # a redis-server that died at once is reported below
        proc.stdin.write(f"requirepass {password}\n".encode())
        proc.stdin.close()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ConnectionError(f"redis-server did not start (see {data / 'redis.log'})") from None
            time.sleep(0.05)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600): the resolved config holds the Redis password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left by an earlier run
    with os.fdopen(fd, "w") as f:
        f.write(text)


def spawn(name: str, role: str, index: int, config_path: Path, logs: Path) -> Child:
    log_path = logs / f"{name}.log"
    out = open(log_path, "wb")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.cli", role, "--config", str(config_path), "--index", str(index), "--id", name],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        env={**_env(), "PYTHONUNBUFFERED": "1"},
    )
    return Child(name, proc, log_path)


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    # Each role is one process among several on a small machine: do not oversubscribe the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Roles log rates themselves; per-file load/save progress bars would bury those lines.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def run_pipeline(cfg: OPDConfig, *, progress: bool = True) -> int:
    """Run the pipeline to its end or to SIGINT/SIGTERM (module doc); returns the exit code (0, 1, 128 + signal)."""
    from protocol.runtime import setup_logging

    setup_logging(cfg.run.log_level, "launcher")
    workdir = Path(cfg.run.workdir)
    children: list[Child] = []
    code = 1
    with Signals(children) as signals:
        with contextlib.suppress(Interrupted):  # raised by the first signal; the roles are stopped by then
            code = _start_and_watch(cfg, workdir, children, progress=progress, signals=signals)
        if signals.exit_code is not None:
            log.info("run interrupted by %s: roles stopped in order; the summary covers what was trained",
                     signal.Signals(signals.signum or 0).name)
            code = signals.exit_code
        if code == 0 or signals.exit_code is not None:
            _summary(cfg, workdir)
    return code


def _start_and_watch(cfg: OPDConfig, workdir: Path, children: list[Child], *, progress: bool, signals: Signals) -> int:
    """Everything up to the end of the run; the roles and the private Redis are stopped (in order) however it ends."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if cfg.run.tiny_assets:
        from opd.tiny import build_tiny_assets

        t0 = time.perf_counter()
        build_tiny_assets(Path(cfg.run.tiny_assets), seed=cfg.learner.seed, log=log.info)
        log.info("tiny models and prompts ready in %s (%.1fs)", cfg.run.tiny_assets, time.perf_counter() - t0)
    _check_inputs(cfg)
    if cfg.run.fresh:
        for path in (cfg.learner.workdir, cfg.teacher.cache_dir):
            shutil.rmtree(path, ignore_errors=True)
        log.info("fresh run: removed %s and %s", cfg.learner.workdir, cfg.teacher.cache_dir)

    redis_proc = None
    code = 1
    try:
        if not cfg.transport.redis_url:
            redis_proc, cfg.transport.redis_url = start_redis(workdir)
            log.info("started redis-server at %s (AOF on, a random password, data in %s)",
                     redact_url(cfg.transport.redis_url), workdir / "redis")
        else:  # a wrong or missing password fails here, in one line, before any role starts
            from protocol.streams import connect_role

            connect_role(cfg.transport).close()
        if cfg.run.warm_cache:
            _warm_cache(cfg)
        config_path = workdir / "config.yaml"
        _write_private(config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        for i in range(cfg.run.teachers):
            children.append(spawn(f"teacher-{i}", "teacher", i, config_path, logs))
        learner = spawn("learner-0", "learner", 0, config_path, logs)
        children.append(learner)
        for i in range(cfg.run.actors):
            children.append(spawn(f"actor-{i}", "actor", i, config_path, logs))
        log.info("started %d actors, %d teachers, 1 learner; logs in %s", cfg.run.actors, cfg.run.teachers, logs)
        code = _watch(cfg, children, learner, progress=progress)
        return code
    finally:
        signals.raising = False  # from here on a first signal is remembered: the roles are being stopped already
        stop_in_order(children, cfg.transport.stop_timeout_s)
        if children and (code == 0 or signals.signum is not None):
            _final_table(cfg)
        if redis_proc is not None:
            log.info("stopping redis-server")
            redis_proc.terminate()
            try:
                redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()


def _warm_cache(cfg: OPDConfig) -> None:
    """Offline teacher caching before the run: rollouts that match a reference pay no teacher forward."""
    import argparse

    from cache import cli as cache_cli
    from protocol.prompts import PromptFormat

    t0 = time.perf_counter()
    fmt = PromptFormat(use_chat_template=cfg.actor.use_chat_template, add_bos=cfg.actor.add_bos)
    args = argparse.Namespace(prompts=cfg.run.warm_cache, model=None, append_eos=True, ids_only=False,
                              no_chat_template=False, prompt_format=fmt, batch_size=None, writer_id=None, json=False)
    if cache_cli.run("warm", cfg.teacher, cfg.transport, args) != 0:
        raise ValueError(f"run.warm_cache: scoring {cfg.run.warm_cache} into the teacher cache failed (see above)")
    log.info("warmed the teacher cache from %s in %.1fs", cfg.run.warm_cache, time.perf_counter() - t0)


def _check_inputs(cfg: OPDConfig) -> None:
    """Fail before starting anything when what the user brings is missing or does not match."""
    from protocol.errors import InputError
    from protocol.files import check_model_dir
    from protocol.prompts import check_prompt_file
    from protocol.vocab import check_model_dirs, check_served_tokenizer, config_vocab_size

    models = {"actor.model_dir": cfg.actor.model_dir, "teacher.model_dir": cfg.teacher.model_dir,
              "learner.model_dir": cfg.learner.model_dir}
    for key, value in [*models.items(), ("actor.prompts_file", cfg.actor.prompts_file)]:
        if not value:
            raise ValueError(f"{key} is not set")
        if not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} does not exist")
    for key, value in models.items():
        check_model_dir(value, key)
    if cfg.learner.eval.heldout_file and cfg.learner.eval.teacher_dir:
        check_model_dir(cfg.learner.eval.teacher_dir, "learner.eval.teacher_dir")
        models["learner.eval.teacher_dir"] = cfg.learner.eval.teacher_dir
    check_model_dirs(models)  # whatever the engines: the local tokenizers agree and each model covers them
    check_prompt_file(cfg.actor.prompts_file)  # a malformed line or an empty file: named now, not by a dying actor
    if cfg.teacher.topk > (vocab := config_vocab_size(cfg.teacher.model_dir)):
        raise InputError(f"teacher.topk={cfg.teacher.topk} exceeds the vocabulary of teacher.model_dir ({vocab} ids)")
    for role, engine in (("actor", cfg.actor.engine), ("teacher", cfg.teacher.engine)):
        url = engine.server_url
        if url:  # and what a server serves agrees with them, where it can be read
            log.info("%s", check_served_tokenizer(url, models[f"{role}.model_dir"], f"{role}.engine.url",
                                                  f"{role}.model_dir"))


def _watch(cfg: OPDConfig, children: list[Child], learner: Child, *, progress: bool) -> int:
    from opd.top import render, snapshot
    from protocol.names import Names
    from protocol.streams import connect_role

    assert cfg.transport.redis_url
    client = connect_role(cfg.transport)  # rides out a Redis outage, as the roles do
    names = Names(cfg.transport.namespace)

    def failed() -> Child | None:
        for c in children:
            code = c.proc.poll()
            if code not in (None, 0) or (code == 0 and c is not learner and c.name.startswith("teacher")):
                return c
        return None

    live = None
    if progress and sys.stdout.isatty():
        from rich.live import Live

        live = Live(render(snapshot(client, names)), refresh_per_second=4)
        live.start()
    last_line = 0.0
    try:
        while learner.proc.poll() is None:
            bad = failed()
            if bad is not None:
                log.error("%s exited with code %s; last lines of %s:\n%s", bad.name, bad.proc.returncode, bad.log_path,
                          bad.tail())
                return 1
            time.sleep(min(cfg.run.progress_interval_s, 0.5))
            if live is not None:
                live.update(render(snapshot(client, names)))
            elif time.monotonic() - last_line >= max(cfg.run.progress_interval_s, 2.0):
                last_line = time.monotonic()
                _log_line(snapshot(client, names))
        if live is not None:
            live.update(render(snapshot(client, names)))
    finally:
        if live is not None:
            live.stop()
    if learner.proc.returncode != 0:
        log.error("learner exited with code %s:\n%s", learner.proc.returncode, learner.tail())
        return 1
    return 0


def _final_table(cfg: OPDConfig) -> None:
    """The run's numbers as `opd top` shows them, once every role has stopped (before the private Redis does)."""
    import redis
    from rich.console import Console

    from opd.top import render, snapshot
    from protocol.names import Names

    assert cfg.transport.redis_url
    client = redis.Redis.from_url(cfg.transport.redis_url, socket_timeout=10)  # one try: a summary never waits
    try:
        Console().print(render(snapshot(client, Names(cfg.transport.namespace))))
    except redis.RedisError as exc:
        log.warning("no final table: Redis did not answer (%s)", exc)


def _log_line(s: Snapshot) -> None:
    L, t = s.learner, s.stats
    learner = (f"step {L.step} v{L.version} loss {L.loss} kl {L.reverse_kl}" if isinstance(L, LearnerState)
               else f"learner: {L}")
    est = estimate_savings(ProbeTally(int(t.get("actor_probes", 0)), t.get("probe_saving_sum", 0.0),
                                      t.get("probe_saving_sq_sum", 0.0)), int(t.get("actor_truncated", 0)))
    log.info(
        "%s | queues %s | gen %d saved <=%d (bound) ~%s (probes) | teacher scored %d cached %d | outcomes %s", learner,
        s.depths, t.get("actor_tokens_generated", 0), t.get("actor_tokens_saved", 0),
        "?" if est is None else f"{est.tokens:.0f}", t.get("teacher_tokens_scored", 0), t.get("teacher_tokens_cached", 0),
        s.outcomes,
    )


def _summary(cfg: OPDConfig, workdir: Path) -> None:
    """What the user wants after a run: did KL go down, what was saved, where the outputs are."""
    history = Path(cfg.learner.workdir) / "history.jsonl"
    evals = Path(cfg.learner.workdir) / "eval.jsonl"
    if not history.exists():
        return
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    eval_rows = [json.loads(line) for line in evals.read_text().splitlines() if line.strip()] if evals.exists() else []
    try:
        from opd.plots import plot_run

        png = plot_run(rows, eval_rows, workdir / "summary.png")
        log.info("plot of the run (reverse KL, tokens per prefix, held-out KL and exact match): %s", png)
    except Exception as exc:  # plotting must never fail a finished run
        log.warning("could not plot the run: %s", exc)
    if eval_rows:
        log.info("held-out reverse KL: %.4f (step %d) -> %.4f (step %d)", eval_rows[0]["reverse_kl"],
                 eval_rows[0]["step"], eval_rows[-1]["reverse_kl"], eval_rows[-1]["step"])
    scored = [r for r in eval_rows if "accuracy" in r]
    if scored:
        log.info("held-out exact match (first -> last): %s -> %s", _exact_match(scored[0]), _exact_match(scored[-1]))


def _exact_match(row: dict[str, Any]) -> str:
    """`40.6% (26/64, step 150)`: an eval.jsonl row's greedy exact match."""
    return f"{100 * row['accuracy']:.1f}% ({row['correct']}/{row['accuracy_prompts']}, step {row['step']})"
