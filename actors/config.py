"""The actor's section of the config tree."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.engines import FLAT_KEYS, EngineConfig, HFEngineConfig
from actors.schedules import FullScheduleConfig, ScheduleConfig
from protocol.components import adopt_flat_keys
from protocol.files import UserPath


class ActorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: UserPath = Field("", description="Student model directory (Hugging Face format).")
    prompts_file: UserPath = Field("", description="JSONL file, one {\"prompt\": str} per line.")
    use_chat_template: bool | None = Field(None, description="Apply the student's chat template (None: when it has one).")
    add_bos: bool | None = Field(
        None, description="Start every prompt with the BOS token (None: as the tokenizer does, i.e. `tokenizer(text)`; "
        "also how `opd cache warm` and held-out evaluation encode prompts).")
    engine: EngineConfig = Field(default_factory=HFEngineConfig, description="Rollout engine (one file each in "
                                 "actors/engines/): embedded transformers or an SGLang server; a bare name such as "
                                 "`sglang` means that engine. The flat keys of earlier configs (actor.sglang_url, "
                                 "actor.sglang_timeout_s, actor.max_engine_failures, actor.device) are still read.")
    batch_size: int = Field(16, ge=1, description="Prompts sampled together.")
    max_new_tokens: int = Field(64, ge=1, description="Full-rollout response budget; the schedule truncates below it.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; each rollout carries it and the learner "
                               "computes log pi under the same transform (protocol/sampling.py).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (an engine that cannot report the "
                         "renormalised nucleus logprob the learner needs, such as sglang, requires 1.0).")
    schedule: ScheduleConfig = Field(default_factory=FullScheduleConfig, description="Truncation schedule (one file "
                                     "each in actors/schedules/); a bare name such as `full` means that schedule with its "
                                     "defaults. Default `full`: which truncation pays depends on the pair (docs/experiments.md), "
                                     "so none is assumed; options without a kind (`fraction`) mean `fixed`.")
    probe_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of truncated rollouts sampled to full length "
                                  "instead, as probes (seeded per actor): they measure what truncation saves and the "
                                  "KL past the horizon; the learner never trains on them. 0: no probes (the estimate "
                                  "of tokens saved is then unknown).")
    probe_truth: bool = Field(False, description="Also sample every truncated rollout that is not a probe to full "
                              "length, send (and charge) only its first `horizon` tokens, and record its true saving "
                              "(run stat truth_saving_sum): checks the probes' estimate against the truth at the "
                              "cost of wall-clock, not of the compute budget or of what is trained (the truncation "
                              "experiment's `probe_truth` rows).")
    seed: int = Field(0, description="Base seed; each actor adds its index.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port (0: a free port).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics (0.0.0.0 in containers).")
    weights_poll_s: float = Field(1.0, gt=0, description="How often to look for newly published weights.")
    admission_control: bool = Field(True, description="Do not start work that would be stale on arrival.")
    lease_s: float = Field(30.0, gt=0, description="Heartbeat lease: an actor renews it every lease_s/3; one silent "
                           "this long (SIGKILL, OOM kill, frozen) is taken for gone: its unpublished admission "
                           "slots are freed and it leaves the actor registry.")
    max_prefixes: int | None = Field(None, ge=1, description="Stop after producing this many prefixes (tests).")

    @model_validator(mode="before")
    @classmethod
    def _flat_engine_keys(cls, data: Any) -> Any:
        """`actor.sglang_url` and the other flat engine keys of earlier configs, read as `actor.engine.*`."""
        return adopt_flat_keys(data, field="engine", flat_keys=FLAT_KEYS, union=EngineConfig)

    @model_validator(mode="after")
    def _schedule_fits_the_budget(self) -> ActorConfig:
        """A schedule's rules that depend on max_new_tokens, checked at start-up with the key named."""
        try:
            self.schedule.check(self.max_new_tokens)
        except ValueError as exc:
            raise ValueError(f"schedule.{exc}") from None
        return self

    @model_validator(mode="after")
    def _engine_reports_the_sampled_distribution(self) -> ActorConfig:
        """The engine refuses a sampling setting whose behaviour logprobs it cannot report exactly (the
        learner's importance ratio would be wrong): checked at start, not mid-run."""
        self.engine.check_sampling(self.temperature, self.top_p)
        return self
