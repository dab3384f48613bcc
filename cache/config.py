"""The teacher's section of the config tree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cache.scorers import FLAT_KEYS, HFScorerConfig, ScorerConfig
from protocol.components import adopt_flat_keys
from protocol.files import UserPath


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: UserPath = Field("", description="Teacher model directory (Hugging Face format); must share the student's tokenizer.")
    revision: str | None = Field(None, description="Teacher revision tag; part of the cache key (change it when weights change in place).")
    engine: ScorerConfig = Field(default_factory=HFScorerConfig, description="Teacher scorer (one file each in "
                                 "cache/scorers/): embedded transformers or an SGLang server; a bare name such as "
                                 "`sglang` means that scorer. The flat keys of earlier configs (teacher.sglang_url, "
                                 "teacher.device) are still read.")
    topk: int = Field(8, ge=0, le=256, description="Top-k teacher logprobs kept per token (0: sampled token only).")
    topk_dtype: Literal["float16", "float32"] = Field("float32", description="Storage dtype of top-k logprobs.")
    temperature: float = Field(1.0, gt=0, description="Temperature of the teacher distribution the KL targets, "
                               "log_softmax(logits / T) (part of the cache key). Unrelated to actor.temperature, "
                               "the student's sampling transform.")
    batch_size: int = Field(16, ge=1, description="Prefixes scored in one forward.")
    cache_enabled: bool = Field(True, description="Use the Zarr logprob cache.")
    cache_dir: UserPath = Field("runs/cache", description="Zarr cache root (local path or fsspec URL).")
    block_size: int = Field(16, ge=1, description="Tokens per content-addressed cache block.")
    cache_budget_bytes: int | None = Field(
        None, ge=1, description="Teachers evict least-recently-hit shards above this size (also `opd cache evict`)."
    )
    cache_evict_interval_s: float = Field(300.0, gt=0, description="How often a teacher checks the cache budget.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port (0: a free port).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics.")

    @model_validator(mode="before")
    @classmethod
    def _flat_scorer_keys(cls, data: Any) -> Any:
        """`teacher.sglang_url` and `teacher.device` of earlier configs, read as `teacher.engine.*`."""
        return adopt_flat_keys(data, field="engine", flat_keys=FLAT_KEYS, union=ScorerConfig)

    @model_validator(mode="after")
    def _scorer_scores_at_the_temperature(self) -> TeacherConfig:
        """A scorer refuses a teacher.temperature it cannot score at (SGLang: untempered only), at start."""
        self.engine.check_temperature(self.temperature)
        return self
