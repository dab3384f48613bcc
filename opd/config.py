"""The composed config tree: one YAML file, `--set key=value` overrides, validated at start.

Each role owns its section (`actors/config.py`, `cache/config.py`, `learner/config.py`); this file
only composes them. Every model forbids unknown keys, so a typo fails at start with the key's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.config import ActorConfig
from cache.config import TeacherConfig
from learner.config import LearnerConfig
from protocol.config import TransportConfig


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("opd", description="Run name (used in the work dir).")
    workdir: str = Field("runs/opd", description="Where Redis data, logs and outputs of `opd up` go.")
    actors: int = Field(1, ge=1, description="Actor processes `opd up` starts.")
    teachers: int = Field(1, ge=1, description="Teacher processes `opd up` starts.")
    tiny_assets: str | None = Field(None, description="Build tiny demo models and prompts into this dir before starting.")
    warm_cache: str | None = Field(
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
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


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
            key = ".".join(str(x) for x in err["loc"]) or "(top level)"
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            problems.append(f"  {key}: {err['msg']}{got}")
        source = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{source}:\n" + "\n".join(problems)) from None


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every option, for `--help` and docs/config.md."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, repr(default), field.description or ""))
    return rows
