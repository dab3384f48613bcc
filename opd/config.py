"""The composed config tree: one YAML file, `--set key=value` overrides, validated at start.

Each role owns its section (`actors/config.py`, `cache/config.py`, `learner/config.py`); this file
only composes them. Every model forbids unknown keys, so a typo fails at start with the key's path.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.config import ActorConfig
from cache.config import TeacherConfig
from learner.config import LearnerConfig
from protocol.config import TransportConfig
from protocol.files import UserPath


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("opd", description="Run name (used in the work dir).")
    workdir: UserPath = Field("runs/opd", description="Where Redis data, logs and outputs of `opd up` go.")
    actors: int = Field(1, ge=1, description="Actor processes `opd up` starts.")
    teachers: int = Field(1, ge=1, description="Teacher processes `opd up` starts.")
    tiny_assets: UserPath | None = Field(None, description="Build tiny demo models and prompts into this dir before starting.")
    warm_cache: UserPath | None = Field(
        None, description="JSONL of prompts with reference responses to score into the teacher cache before starting."
    )
    fresh: bool = Field(False, description="Delete the learner's work dir and the teacher cache before starting.")
    log_level: str = Field("INFO", description="Python logging level of every role.")
    progress_interval_s: float = Field(1.0, gt=0, description="Refresh period of the live progress view.")


class OPDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=RunConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)

    @model_validator(mode="after")
    def _evaluation_encodes_like_the_actors(self) -> OPDConfig:
        """Held-out prompts are encoded as training prompts: learner.eval takes the actor's prompt format."""
        for name in ("use_chat_template", "add_bos"):
            mine, actors = getattr(self.learner.eval, name), getattr(self.actor, name)
            if name in self.learner.eval.model_fields_set and mine != actors:
                raise ValueError(f"learner.eval.{name}={mine} differs from actor.{name}={actors}: held-out "
                                 f"prompts must be encoded as training prompts are; leave learner.eval.{name} unset")
            setattr(self.learner.eval, name, actors)
        return self

    @model_validator(mode="after")
    def _default_loss_follows_teacher_topk(self) -> OPDConfig:
        """Unset ``learner.loss``: the exact top-k KL, or the sampled reverse KL when the teacher sends no top-k.

        WHY: the sampled single-token estimator trails the exact loss by far at equal steps, and without its
        baseline and clip it diverges at learning rates where the exact loss converges (docs/learner.md,
        'Which loss'); it stays the loss for ``teacher.topk: 0``, the one setting the top-k losses cannot use.
        """
        if "loss" not in self.learner.model_fields_set and self.teacher.topk == 0:
            from learner.losses import SampledReverseKLConfig

            self.learner.loss = SampledReverseKLConfig()
        return self

    @model_validator(mode="after")
    def _sections_agree(self) -> OPDConfig:
        """Rules that span sections, checked at start-up rather than discovered mid-run."""
        if self.learner.loss.needs_teacher_topk and self.teacher.topk == 0:
            raise ValueError(f"learner.loss.kind={self.learner.loss.kind} trains on the teacher's top-k, but "
                             "teacher.topk is 0: set teacher.topk > 0 or use learner.loss.kind=sampled_reverse_kl")
        windows_needed = getattr(self.actor.schedule, "learner_windows_needed", None)  # schedules the learner drives
        if windows_needed is not None:
            need = windows_needed(max_staleness=self.learner.max_staleness, window_steps=self.learner.kl_window_steps)
            if self.learner.kl_history < need:
                raise ValueError(f"learner.kl_history={self.learner.kl_history} keeps fewer KL windows than "
                                 f"actor.schedule.kind={self.actor.schedule.kind} needs ({need}, with "
                                 f"learner.max_staleness={self.learner.max_staleness} and learner.kl_window_steps="
                                 f"{self.learner.kl_window_steps}): raise learner.kl_history")
        return self


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """`a.b.c=value`, value parsed as YAML (so `3`, `true`, `null`, `[1, 2]` work)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE (e.g. learner.lr=3e-4)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, str) and _is_component(parts[: i + 1]):  # `actor.engine=sglang`, then its options
            child = node[part] = {"kind": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _is_component(path: list[str]) -> bool:
    """Whether the key `path` holds a component union (`actor.engine`, `learner.loss`), which a bare kind names."""
    model: Any = OPDConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = field.annotation
    return bool(_variants(model))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> OPDConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
        tree = loaded or {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return OPDConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            problems.append("  " + _problem(err))
        source = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{source}:\n" + "\n".join(problems)) from None


def _config_path(loc: tuple[Any, ...]) -> list[str]:
    """The key path of an error location, without the variant tag pydantic inserts after a component union
    (`learner.loss.gkd_jsd.beta` is the key `learner.loss.beta`)."""
    out: list[str] = []
    model: Any = OPDConfig
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            variants = {v.model_fields["kind"].default: v for v in _variants(model)}
            if part in variants:
                model = variants[part]
                continue
        out.append(str(part))
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
        skip_tag = bool(_variants(model))
    return out


def _problem(err: Any) -> str:
    """One validation error as `dotted.key: what is wrong (got value)`.

    A model validator (a rule between fields, such as a schedule that must fit `actor.max_new_tokens`)
    reports at its model's path and names the field it blames at the start of its message
    (`schedule.tokens: ...`); the two are joined so the full key leads.
    """
    loc = ".".join(_config_path(err["loc"]))
    msg = str(err["msg"])
    if err.get("type") == "value_error":
        msg = msg.removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and head and " " not in head and "=" not in head:
            return f"{loc + '.' if loc else ''}{head}: {rest}"
        return f"{loc}: {msg}" if loc else msg
    if err.get("type") == "union_tag_invalid":  # a component's `kind` that no variant has
        return f"{loc}.kind: {msg}"
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{loc or '(top level)'}: {msg}{got}"


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every option, for `--help` and docs/config.md.

    A component union (e.g. `learner.loss`) lists its `kind`, then each variant's own options tagged
    with the kind they belong to (and `experimental` for a variant whose class says `experimental = True`).
    """
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        variants = _variants(ann)
        if variants:
            kinds = [v.model_fields["kind"].default for v in variants]
            tags = [f"{k}, experimental" if getattr(v, "experimental", False) else k
                    for k, v in zip(kinds, variants, strict=True)]
            rows.append((f"{key}.kind", repr(default.kind), f"{field.description or ''} One of: "
                         + ", ".join(f"`{k}`" + (" (experimental)" if t != k else "")
                                     for k, t in zip(kinds, tags, strict=True)) + "."))
            for tag, variant in zip(tags, variants, strict=True):
                rows.extend((k, d, f"({tag}) {text}") for k, d, text in describe(variant, key + ".")
                            if k != f"{key}.kind")
            continue
        rows.append((key, "(required)" if field.is_required() else repr(default), field.description or ""))
    return rows


def _variants(annotation: object) -> tuple[type[BaseModel], ...]:
    """The members of a union of config models discriminated by `kind`, or () for any other annotation."""
    args = typing.get_args(annotation)
    if args and all(isinstance(a, type) and issubclass(a, BaseModel) and "kind" in a.model_fields for a in args):
        return args
    return ()


CLAIM_IDLE_FLOOR_MS = 5_000
"""Below this `transport.claim_idle_ms` is advised against: shorter than a teacher batch can take (see `advisories`)."""


def advisories(cfg: OPDConfig) -> list[str]:
    """Settings that load and run but that a measurement or the deployment may make go wrong: `opd learner` logs
    each as a warning.

    WHY not an error: they are legitimate choices (a teacher that sends no top-k), just measured to go wrong on
    the shipped task; or whether they go wrong depends on what the config cannot see (how long a teacher batch
    takes on this hardware, how many teachers compose scales to). A pair that fails by construction whatever
    the deployment is refused at load instead (`learner.publish_every` against `learner.max_staleness`).
    """
    out = []
    if cfg.learner.loss.kind == "sampled_reverse_kl" and cfg.teacher.topk == 0:
        out.append("learner.loss is sampled_reverse_kl with teacher.topk=0: on the shipped task at lr 1e-3 this lost "
                   "EOS in both seeds of `opd experiment run --preset loss` (docs/experiments.md); prefer "
                   "teacher.topk >= 8 (the default loss is then the top-k KL) or a lower learner.lr")
    if cfg.transport.claim_idle_ms < CLAIM_IDLE_FLOOR_MS:
        out.append(f"transport.claim_idle_ms={cfg.transport.claim_idle_ms} is under {CLAIM_IDLE_FLOOR_MS} ms: a teacher "
                   f"batch (teacher.batch_size={cfg.teacher.batch_size}) that takes longer is reclaimed by another "
                   "teacher while it is scored, each reclaim counts a delivery, and after transport.max_deliveries "
                   f"({cfg.transport.max_deliveries}) the prefix is dead-lettered, not trained; raise "
                   "transport.claim_idle_ms above the longest teacher batch")
    if cfg.learner.batch_size > cfg.transport.high_water:
        out.append(f"learner.batch_size={cfg.learner.batch_size} is above transport.high_water="
                   f"{cfg.transport.high_water}: the entries the learner has read stay in the scored stream until "
                   "its step commits, and teachers stop forwarding at the mark (a batch forwarded just under it "
                   "overshoots it by less than teacher.batch_size), so a step can wait learner.read_timeout_s for "
                   "a full batch; raise transport.high_water")
    if getattr(cfg.actor.schedule, "experimental", False):
        out.append(f"actor.schedule is `{cfg.actor.schedule.kind}`, which is experimental: in the truncation experiment "
                   "it collapsed to 0% exact match in one seed of two, and its end-of-answer guard has not been shown "
                   "to prevent that over several seeds (docs/experiments.md); full rollouts are the supported default")
    return out
