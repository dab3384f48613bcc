"""Transport settings every role shares: where Redis is and how the streams behave."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protocol.codec import MAX_MESSAGE_BYTES


class TransportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        None, description="redis://[:password@]host:port/db. Empty: `opd up`/`opd demo` start a local redis-server."
    )
    namespace: str = Field("opd", min_length=1, description="Prefix of every stream and key, so runs can share a Redis.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries of one message before it is dead-lettered.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Pending this long, a message is reclaimed from its (dead) consumer.")
    high_water: int = Field(256, ge=1, description="Producers wait while a stream's backlog is at or above this.")
    backpressure_timeout_s: float = Field(600.0, gt=0, description="Longest a producer waits for room before failing loudly.")
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024, description="Largest message accepted on either end.")
