"""The learner's state, as one typed, versioned message the other roles read.

Why a message and not a Redis hash: actors admit work against it, truncation schedules pick horizons
from it and `opd top` shows it; a hash read with `b"..."` keys has no schema, so a renamed field or a
half-written update is a silent wrong number. `LearnerState` carries `kind` and a schema version `v`,
is encoded with `protocol/codec.py` (msgpack) and published by the learner as one key with one SET
(readers never see half an update). Reading it never raises on bad data: `read_state` returns either
a `LearnerState` or a `StateUnavailable` that says why (no learner yet, or what is malformed).

Flow control (docs/architecture.md): an actor may hold at most
`(max_staleness + 1) x batch_size + retired` admitted samples.

Schema history:
- v1: flow control and the learner's scalar measurements; `kl_by_bucket` an empty slot.
- v2: `kl_by_bucket` filled, and `kl_windows`: the learner's reverse KL by response position over its recent
  steps, with the probes' KL past the horizon (`KLWindow`), which the adaptive schedule decides from. A v1
  state is refused like any unsupported version (the roles are deployed together).
- v2, compatibly: `KLWindow.probes` / `probes_finished` (absent reads as 0): how many of the window's probes
  ended at EOS, the adaptive schedule's end-of-answer guard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.codec import pack, unpack
from protocol.errors import ProtocolError

if TYPE_CHECKING:  # the config tree imports this module (schedules take a LearnerState): keep it light
    import redis

    from protocol.names import Names

STATE_KIND = "learner_state"
STATE_SCHEMA_VERSION = 2
MAX_STATE_BYTES = 1024 * 1024
"""A state is a few hundred bytes; anything near this is not one."""

Phase = Literal["training", "draining", "done"]
Count = Annotated[int, Field(ge=0)]


class KLWindow(BaseModel):
    """The learner's measurements over one window of consecutive steps (`learner.kl_window_steps`).

    Per bucket of `LearnerState.bucket_tokens` response positions (bucket `b` holds positions
    `[b * bucket_tokens, (b + 1) * bucket_tokens)`, the last bucket also everything after): the mean sampled
    reverse KL `log mu(y) - log p_T(y)` of the tokens trained on, and of the probes' tokens (full-length
    rollouts the learner measures and never trains on), with the token counts behind each mean. Lists stop
    at the last bucket with a token. `horizon_min` / `horizon_max` are the smallest and largest horizons of
    the trained samples: equal when every sample of the window was cut at the same horizon.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    step: int = Field(ge=0, description="Learner step at which the window closed.")
    samples: int = Field(ge=0, description="Samples trained in the window (probes not included).")
    horizon_min: int = Field(ge=0, description="Smallest horizon of the trained samples (0: none).")
    horizon_max: int = Field(ge=0, description="Largest horizon of the trained samples (0: none).")
    kl_by_bucket: list[float] = Field(default_factory=list, description="Mean reverse KL of the trained tokens per bucket.")
    tokens_by_bucket: list[Count] = Field(default_factory=list, description="Trained tokens per bucket.")
    probe_kl_by_bucket: list[float] = Field(default_factory=list, description="Mean reverse KL of the probes' tokens per bucket.")
    probe_tokens_by_bucket: list[Count] = Field(default_factory=list, description="Probe tokens per bucket.")
    probes: Count = Field(0, description="Probes measured in the window.")
    probes_finished: Count = Field(0, description="Of them, those that ended at EOS within the budget (the adaptive "
                                   "schedule's end-of-answer guard).")


class LearnerState(BaseModel):
    """What the learner tells every other role: where it is, its flow-control numbers, what it measured.

    `kl_by_bucket` (the mean sampled reverse KL of the newest window per bucket of `bucket_tokens`
    response positions) and `kl_windows` (the recent windows, oldest first) are the measurements a
    truncation schedule may be driven by (`actors/schedules/adaptive.py`); a schedule that needs a new
    measurement adds a field here and reads it from the state it is handed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["learner_state"] = STATE_KIND
    v: Literal[2] = STATE_SCHEMA_VERSION
    version: int = Field(ge=0, description="Policy version of the newest published weights.")
    step: int = Field(ge=0, description="Optimizer steps taken (and committed).")
    batch_size: int = Field(ge=1, description="Samples per optimizer step (learner.batch_size).")
    max_staleness: int = Field(ge=0, description="learner.max_staleness: admission and drop bound.")
    ranks: int = Field(1, ge=1, description="Learner ranks (torchrun world size).")
    retired: int = Field(0, ge=0, description="Samples trained, dropped or dead-lettered, counted after the "
                         "weights of `version` were published.")
    phase: Phase = Field("training", description="training | draining (stop_producing is set) | done.")
    loss: float | None = Field(None, description="Loss of the last step.")
    reverse_kl: float | None = Field(None, description="Reverse KL on the last step's training prefixes: the sampled-"
                                     "token estimate, mean log mu(y) - log p_T(y) over the student's tokens.")
    support_kl: float | None = Field(None, description="The loss's restricted-support KL of the last step (top-k + "
                                     "tail bucket): a lower bound of reverse_kl.")
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput of the last step.")
    idle_fraction: float | None = Field(None, ge=0, le=1, description="Fraction of wall time spent waiting for data.")
    eval_kl_first: float | None = Field(None, description="Held-out reverse KL at the first evaluation.")
    eval_kl_last: float | None = Field(None, description="Held-out reverse KL at the last evaluation.")
    kl_by_bucket: list[float] = Field(default_factory=list, description="Reverse KL per response-position bucket.")
    bucket_tokens: int = Field(0, ge=0, description="Width in tokens of each kl_by_bucket bucket (0: none measured).")
    kl_windows: list[KLWindow] = Field(default_factory=list, description="The learner's recent KL windows, oldest "
                                       "first (learner.kl_history of them).")
    published_at: float = Field(default_factory=time.time, description="Wall-clock time of publication.")

    @classmethod
    def assumed(cls, version: int) -> LearnerState:
        """What an actor assumes when no learner has published a state (admission control off).

        Only `version` (that of the weights the actor holds) means anything; nothing is measured.
        """
        return cls(version=version, step=0, batch_size=1, max_staleness=0)


@dataclass(frozen=True)
class StateUnavailable:
    """Why there is no usable learner state: none published yet, or what is wrong with the one there is."""

    reason: str
    malformed: bool = False

    def __str__(self) -> str:
        return self.reason


def encode_state(state: LearnerState) -> bytes:
    """msgpack bytes of the state (the schema is enforced when the model is built, not here)."""
    return pack(state.model_dump(mode="python"), max_bytes=MAX_STATE_BYTES)


def decode_state(blob: bytes) -> LearnerState | StateUnavailable:
    """The state in `blob`, or a `StateUnavailable` naming the first bad field. Never raises on bad data."""
    try:
        payload = unpack(blob, max_bytes=MAX_STATE_BYTES)
    except ProtocolError as exc:
        return StateUnavailable(f"learner state is malformed: {exc}", malformed=True)
    if payload.get("kind") != STATE_KIND:
        return StateUnavailable(f"learner state is malformed: kind: expected {STATE_KIND!r}, got "
                                f"{payload.get('kind')!r}", malformed=True)
    if payload.get("v") != STATE_SCHEMA_VERSION or type(payload.get("v")) is not int:
        return StateUnavailable(f"learner state is malformed: v: schema version {payload.get('v')!r} is not "
                                f"supported (this reader speaks {STATE_SCHEMA_VERSION})", malformed=True)
    try:
        return LearnerState.model_validate(payload)
    except ValidationError as exc:
        return StateUnavailable(f"learner state is malformed: {_first_problem(exc)}", malformed=True)


def publish_state(client: redis.Redis, names: Names, state: LearnerState) -> None:
    """Replace the published state with one SET: readers see the old state or the new one, never a mix."""
    client.set(names.learner_state, encode_state(state))


def read_state(client: redis.Redis, names: Names) -> LearnerState | StateUnavailable:
    """The learner's newest state, or why there is none. Redis errors propagate (they are not the state's)."""
    blob = client.get(names.learner_state)
    if blob is None:
        return StateUnavailable("no learner has published its state yet")
    return decode_state(blob)


def _first_problem(exc: ValidationError) -> str:
    err: Any = exc.errors()[0]
    field = ".".join(str(x) for x in err["loc"]) or "state"
    return f"{field}: {err['msg']} (got {err.get('input')!r})"
