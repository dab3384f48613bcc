"""What each `opd` subcommand does, once its config is loaded and validated."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

import yaml

from opd.config import OPDConfig, describe


def _with_env(cfg: OPDConfig) -> OPDConfig:
    """`OPD_REDIS_URL` fills an empty transport.redis_url (how containers get the password)."""
    if not cfg.transport.redis_url and os.environ.get("OPD_REDIS_URL"):
        cfg.transport.redis_url = os.environ["OPD_REDIS_URL"]
    return cfg


def _role_id(role: str, args: argparse.Namespace) -> str:
    return args.role_id or f"{role}-{socket.gethostname()}-{os.getpid()}"


def _require_redis(cfg: OPDConfig, what: str) -> str:
    if not cfg.transport.redis_url:
        raise ValueError(f"{what} needs transport.redis_url (or OPD_REDIS_URL), e.g. redis://127.0.0.1:6379/0")
    return cfg.transport.redis_url


def dispatch(args: argparse.Namespace, cfg: OPDConfig) -> int:
    cfg = _with_env(cfg)
    command = args.command
    if command in ("demo", "up"):
        from opd.launcher import run_pipeline

        return run_pipeline(cfg, progress=not args.no_progress)
    if command in ("actor", "teacher", "learner"):
        return _run_role(command, args, cfg)
    if command == "cache":
        return _cache(args, cfg)
    if command == "config":
        if args.what == "show":
            print(yaml.safe_dump(_shown_config(cfg), sort_keys=False), end="")
        else:
            print(config_docs())
        return 0
    if command == "doctor":
        from opd.doctor import run_doctor

        if args.prompts < 1:
            raise ValueError("--prompts: at least 1")
        report = run_doctor(cfg, prompts=args.prompts, seed=args.seed)
        print("doctor: a check failed" if report.failed else "doctor: no check failed")
        return 1 if report.failed else 0
    if command == "top":
        from opd.top import run_top

        _require_redis(cfg, "opd top")
        return run_top(cfg, once=args.once)
    raise ValueError(f"unknown command {command}")


def _shown_config(cfg: OPDConfig) -> dict[str, Any]:
    """The resolved config as `opd config show` prints it: the Redis password redacted.

    Why: the output lands in terminals, logs and bug reports, and the URL may carry a password from
    `OPD_REDIS_URL` the user never typed here; a config to run from is the YAML file, not this output.
    """
    from protocol.reconnect import redact_url

    shown = cfg.model_dump(mode="json")
    if shown["transport"].get("redis_url"):
        shown["transport"]["redis_url"] = redact_url(shown["transport"]["redis_url"])
    return shown


def _run_role(role: str, args: argparse.Namespace, cfg: OPDConfig) -> int:
    from protocol.runtime import StopFlag, setup_logging

    _require_redis(cfg, f"opd {role}")
    setup_logging(cfg.run.log_level, role)
    stop = StopFlag().install_signal_handlers(bound_s=cfg.transport.stop_timeout_s)
    role_id = _role_id(role, args)
    if role == "actor":
        from actors.actor import run_actor

        run_actor(cfg.actor, cfg.transport, actor_id=role_id, index=args.index, stop=stop)
    elif role == "teacher":
        from cache.teacher import run_teacher

        run_teacher(cfg.teacher, cfg.transport, worker_id=role_id, stop=stop)
    else:
        from learner.loop import run_learner
        from opd.config import advisories

        for advice in advisories(cfg):
            logging.getLogger("opd.config").warning(advice)
        run_learner(cfg.learner, cfg.transport, learner_id=role_id, stop=stop)
    import gc

    gc.freeze()  # exit at once: collecting every model and module object at exit takes seconds on a busy machine
    return 0


def _cache(args: argparse.Namespace, cfg: OPDConfig) -> int:
    from cache import cli as cache_cli
    from protocol.prompts import PromptFormat

    # `warm` encodes text prompts exactly as the actors will (a drift would make every entry a miss)
    args.prompt_format = PromptFormat(use_chat_template=cfg.actor.use_chat_template, add_bos=cfg.actor.add_bos)
    return cache_cli.run(args.cache_command, cfg.teacher, cfg.transport, args)


def config_docs() -> str:
    """Markdown reference of every option (docs/config.md is generated from this)."""
    lines = ["# Configuration reference", "",
             "Every option, its default and meaning. Set them in a YAML file (`opd up --config FILE`) "
             "or on the command line (`--set section.key=value`). Unknown keys are errors.", ""]
    for section in OPDConfig.model_fields:
        lines += [f"## `{section}`", "", "| key | default | meaning |", "|---|---|---|"]
        model = OPDConfig.model_fields[section].annotation
        for key, default, text in describe(model, prefix=f"{section}."):  # type: ignore[arg-type]
            cell = text.replace("|", "\\|")  # a literal '|' in a description would split the table row
            lines.append(f"| `{key}` | `{default}` | {cell} |")
        lines.append("")
    return "\n".join(lines)
