"""Transport settings every role shares: where Redis is and how the streams behave."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.codec import MAX_MESSAGE_BYTES
from protocol.ledger import min_keep_s


class TransportConfig(BaseModel):
    """Redis and stream settings; `reconnect_*` is how every role rides out a Redis outage (protocol/reconnect.py)."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        None, description="redis://[:password@]host:port/db. Empty: `opd up`/`opd demo` start a local redis-server."
    )
    namespace: str = Field("opd", min_length=1, description="Prefix of every stream and key, so runs can share a Redis.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries of one message before it is dead-lettered.")
    claim_idle_ms: int = Field(
        30_000, ge=100, description="Pending this long, a message is reclaimed from its (dead) consumer. Keep it above "
        "the longest teacher batch: a live teacher's batch reclaimed counts a delivery (warned under 5000).")
    high_water: int = Field(256, ge=1, description="Producers wait while a stream's backlog is at or above this.")
    backpressure_timeout_s: float = Field(600.0, gt=0, description="Longest a producer waits for room before failing loudly.")
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024, description="Largest message accepted on either end.")
    stop_timeout_s: float = Field(
        45.0, gt=0, description="SIGTERM/SIGINT: a role finishes its current unit and exits; a drain longer than "
        "this exits anyway (code 0), logging what it left pending for another consumer or a restart. Keep it "
        "below a supervisor's kill grace (compose stop_grace_period: 60s); `opd up` waits this plus a margin per stage.")
    reconnect_base_s: float = Field(
        0.1, gt=0, le=60, description="Redis unreachable: first wait before retrying; doubles per failed attempt "
        "(with jitter) up to transport.reconnect_cap_s.")
    reconnect_cap_s: float = Field(
        5.0, gt=0, le=300, description="Redis unreachable: longest wait between two attempts (small: roles resume "
        "soon after Redis does; not tiny: many replicas retrying at once load a recovering Redis).")
    reconnect_give_up_s: float = Field(
        600.0, gt=0, description="Redis unreachable this long: the role stops with an error saying so (a supervisor "
        "restarts it); shorter outages are ridden out, one log line when they begin and one when they end.")
    ledger_rollup_every_s: float = Field(
        30.0, ge=0, description="The learner folds settled ledger fields into per-state counters this often, so Redis "
        "memory stays bounded over a long run (protocol/ledger.py `rollup`); 0: never (one field per prefix forever).")
    ledger_keep_s: float = Field(
        900.0, gt=0, description="A settled ledger field is kept at least this long before it is rolled up: longer than "
        "a publish retried after a lost reply can take (reconnect_give_up_s + reconnect_cap_s + 75 s), so the retry "
        "is still recognised and skipped.")

    @model_validator(mode="after")
    def _backoff_is_bounded(self) -> TransportConfig:
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError(f"transport.reconnect_cap_s ({self.reconnect_cap_s:g}) must be at least "
                             f"transport.reconnect_base_s ({self.reconnect_base_s:g})")
        floor = min_keep_s(self.reconnect_give_up_s, self.reconnect_cap_s)
        if self.ledger_rollup_every_s > 0 and self.ledger_keep_s < floor:
            raise ValueError(f"transport.ledger_keep_s ({self.ledger_keep_s:g}) must be at least {floor:g}s "
                             "(reconnect_give_up_s + reconnect_cap_s + 75): a publish retried after a lost reply "
                             "could otherwise land after its id was rolled up, and be trained twice")
        return self
