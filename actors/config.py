"""The actor's section of the config tree."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.files import UserPath


class ScheduleConfig(BaseModel):
    """Truncation schedule: how many tokens each prefix may have (its horizon)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["full", "fixed", "progressive", "random"] = Field("fixed", description="Schedule family.")
    fraction: float | None = Field(0.25, gt=0, le=1, description="fixed: horizon as a fraction of max_new_tokens.")
    tokens: int | None = Field(None, ge=1, description="fixed: absolute horizon (overrides fraction).")
    start: float = Field(0.1, gt=0, le=1, description="progressive: starting fraction of max_new_tokens.")
    ramp_versions: int = Field(50, ge=1, description="progressive: policy versions to reach the full length.")
    shape: Literal["linear", "staged"] = Field("linear", description="progressive: linear ramp or discrete stages.")
    stages: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], description="progressive/staged: fractions.")
    min_fraction: float = Field(0.05, gt=0, le=1, description="random: lower bound as a fraction of max_new_tokens.")
    max_fraction: float = Field(1.0, gt=0, le=1, description="random: upper bound as a fraction of max_new_tokens.")

    @model_validator(mode="after")
    def _bounds(self) -> ScheduleConfig:
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"min_fraction {self.min_fraction} > max_fraction {self.max_fraction}")
        return self


class ActorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: UserPath = Field("", description="Student model directory (Hugging Face format).")
    prompts_file: UserPath = Field("", description="JSONL file, one {\"prompt\": str} per line.")
    use_chat_template: bool | None = Field(None, description="Apply the student's chat template (None: when it has one).")
    add_bos: bool | None = Field(
        None, description="Start every prompt with the BOS token (None: as the tokenizer does, i.e. `tokenizer(text)`; "
        "also how `opd cache warm` and held-out evaluation encode prompts).")
    engine: Literal["hf", "sglang"] = Field("hf", description="Rollout engine: embedded transformers or an SGLang server.")
    sglang_url: str | None = Field(None, description="SGLang server base URL (engine=sglang).")
    sglang_timeout_s: float = Field(120.0, gt=0, description="Timeout of each SGLang request.")
    max_engine_failures: int = Field(5, ge=0, description="sglang: consecutive failed requests tolerated (retried with back-off).")
    batch_size: int = Field(16, ge=1, description="Prompts sampled together.")
    max_new_tokens: int = Field(64, ge=1, description="Full-rollout response budget; the schedule truncates below it.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    seed: int = Field(0, description="Base seed; each actor adds its index.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port (0: a free port).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics (0.0.0.0 in containers).")
    weights_poll_s: float = Field(1.0, gt=0, description="How often to look for newly published weights.")
    admission_control: bool = Field(True, description="Do not start work that would be stale on arrival.")
    max_prefixes: int | None = Field(None, ge=1, description="Stop after producing this many prefixes (tests).")
