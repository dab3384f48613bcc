"""The three messages of the pipeline, their schema, and validation on decode.

Every message carries `kind` (which message) and `v` (its kind's schema version) so a reader can refuse
what it does not understand with a reason instead of misreading it. Versions are per kind: a change to
the rollout schema does not orphan weights announcements.

Schema history (rollout and scored):
- v1: no sampling parameters. The behaviour logprobs' distribution was not recorded, so the learner
  could not recompute it (it assumed temperature 1 over the full vocabulary).
- v2: `temperature` and `top_p` are required. A v1 rollout is refused, not read with assumed values:
  guessing `temperature=1, top_p=1` is exactly the wrong-ratio bug v2 fixes.
- v2, compatibly: `probe` (a full-length probe rollout), optional: absent reads as False (`OPTIONAL_FIELDS`), so
  rollouts written before it still decode. (A reader older than the field refuses it as unknown: upgrade readers
  first.)

Shapes use suffix names: `P` prompt
length, `R` response length, `K` top-k. Arrays are read-only numpy views over the received bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, overload

import numpy as np

from protocol.codec import MAX_MESSAGE_BYTES, decode_array, encode_array, pack, unpack
from protocol.errors import ProtocolError

SCHEMA_VERSION = 2
"""Schema version of `RolloutPrefix` and `ScoredPrefix` (see the history above)."""
WEIGHTS_SCHEMA_VERSION = 1
"""Schema version of `WeightsAnnouncement`."""


@dataclass(frozen=True)
class ArraySpec:
    dtypes: tuple[str, ...]
    ndim: int


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class RolloutPrefix:
    """A student prefix sampled by an actor, truncated at `horizon` tokens by the schedule."""

    kind: ClassVar[str] = "rollout"
    schema_version: ClassVar[int] = SCHEMA_VERSION
    arrays: ClassVar[dict[str, ArraySpec]] = {
        "prompt_ids_P": ArraySpec(("<i4",), 1),
        "response_ids_R": ArraySpec(("<i4",), 1),
        "behaviour_logprobs_R": ArraySpec(("<f4",), 1),
    }

    prompt_ids_P: np.ndarray
    response_ids_R: np.ndarray
    behaviour_logprobs_R: np.ndarray
    prompt_index: int
    horizon: int
    max_new_tokens: int
    finished: bool
    policy_version: int
    actor_id: str
    id: str = field(default_factory=_new_id)
    created_at: float = field(default_factory=time.time)
    # The sampling transform the tokens were drawn with (`protocol/sampling.py`); the behaviour logprobs
    # are of that distribution, and the learner recomputes log pi under it. Required on the wire (v2).
    temperature: float = 1.0
    top_p: float = 1.0
    # A full-length probe (actor.probe_fraction): sampled to max_new_tokens whatever the schedule said, to
    # measure what truncation saves (protocol/savings.py) and the KL past the horizon; the learner measures
    # it and never trains on it. Optional on the wire: absent reads as False (rollouts of writers before it).
    probe: bool = False

    @classmethod
    def from_sample(cls, prompt_ids: Any, response_ids: Any, logprobs: Any, **meta: Any) -> RolloutPrefix:
        """A rollout from an engine's lists: ids as int32, logprobs as float32 clamped at 0 (an engine's
        arithmetic can put a near-certain token a hair above 0, which `validate` would refuse as no logprob).
        Actors and `opd doctor` both build their rollouts here, so the doctor checks what actors send."""
        return cls(prompt_ids_P=np.asarray(prompt_ids, dtype=np.int32), response_ids_R=np.asarray(response_ids, dtype=np.int32),
                   behaviour_logprobs_R=np.minimum(np.asarray(logprobs, dtype=np.float32), 0.0), **meta)

    def validate(self) -> None:
        r = len(self.response_ids_R)
        if len(self.behaviour_logprobs_R) != r:
            raise ProtocolError("behaviour_logprobs_R", f"length {len(self.behaviour_logprobs_R)} != response length {r}")
        if len(self.prompt_ids_P) == 0:
            raise ProtocolError("prompt_ids_P", "empty prompt")
        if self.horizon < 1 or self.horizon > self.max_new_tokens:
            raise ProtocolError("horizon", f"{self.horizon} not in [1, max_new_tokens={self.max_new_tokens}]")
        if r > self.horizon:
            raise ProtocolError("response_ids_R", f"{r} tokens exceed the horizon {self.horizon}")
        if self.policy_version < 0:
            raise ProtocolError("policy_version", f"negative: {self.policy_version}")
        if (self.prompt_ids_P < 0).any():
            raise ProtocolError("prompt_ids_P", "negative token id")
        if (self.response_ids_R < 0).any():
            raise ProtocolError("response_ids_R", "negative token id")
        if not np.isfinite(self.behaviour_logprobs_R).all() or (self.behaviour_logprobs_R > 1e-4).any():
            raise ProtocolError("behaviour_logprobs_R", "logprobs must be finite and <= 0")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ProtocolError("temperature", f"must be finite and > 0 (greedy rollouts have no ratio), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ProtocolError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.probe and self.horizon != self.max_new_tokens:
            raise ProtocolError("probe", f"a probe samples the whole budget: horizon {self.horizon} != max_new_tokens "
                                f"{self.max_new_tokens}")


@dataclass
class ScoredPrefix(RolloutPrefix):
    """A rollout prefix with the teacher's scores of the sampled response tokens (never re-tokenized)."""

    kind: ClassVar[str] = "scored"
    arrays: ClassVar[dict[str, ArraySpec]] = {
        **RolloutPrefix.arrays,
        "teacher_logprobs_R": ArraySpec(("<f4",), 1),
        "topk_ids_RK": ArraySpec(("<i4",), 2),
        "topk_logprobs_RK": ArraySpec(("<f4", "<f2"), 2),
    }

    teacher_logprobs_R: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    topk_ids_RK: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    topk_logprobs_RK: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    teacher_id: str = ""
    cached_tokens: int = 0
    scored_tokens: int = 0

    def validate(self) -> None:
        super().validate()
        r = len(self.response_ids_R)
        if len(self.teacher_logprobs_R) != r:
            raise ProtocolError("teacher_logprobs_R", f"length {len(self.teacher_logprobs_R)} != response length {r}")
        if self.topk_ids_RK.shape != self.topk_logprobs_RK.shape or self.topk_ids_RK.shape[0] != r:
            raise ProtocolError(
                "topk_ids_RK",
                f"shapes {self.topk_ids_RK.shape} / {self.topk_logprobs_RK.shape} do not match response length {r}",
            )
        if not np.isfinite(self.teacher_logprobs_R).all():
            raise ProtocolError("teacher_logprobs_R", "non-finite teacher logprob")
        if (self.topk_ids_RK < 0).any():
            raise ProtocolError("topk_ids_RK", "negative token id")
        if np.isnan(self.topk_logprobs_RK).any():  # -inf is a probability of 0; NaN is no probability at all
            raise ProtocolError("topk_logprobs_RK", "NaN teacher top-k logprob")
        if self.cached_tokens < 0 or self.scored_tokens < 0:
            raise ProtocolError("cached_tokens", "token counts must be >= 0")

    @classmethod
    def from_rollout(cls, rollout: RolloutPrefix, **scores: Any) -> ScoredPrefix:
        base = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(RolloutPrefix)}
        return cls(**base, **scores)

    @classmethod
    def from_sequence_scores(cls, rollout: RolloutPrefix, logprobs_T: np.ndarray, topk_ids_TK: np.ndarray,
                             topk_logprobs_TK: np.ndarray, *, teacher_id: str, cached_upto: int) -> ScoredPrefix:
        """The response's part of a teacher's scores over the whole sequence (prompt + response, T = P + R, as a
        teacher forwards it). `cached_upto` leading tokens of the sequence came from the cache: the response's
        cached tokens are those of them past the prompt, the rest it scored. The teacher and `opd doctor` both
        build their scored prefixes here."""
        P, R = len(rollout.prompt_ids_P), len(rollout.response_ids_R)
        cached = min(R, max(0, cached_upto - P))
        return cls.from_rollout(rollout, teacher_logprobs_R=logprobs_T[P:].copy(), topk_ids_RK=topk_ids_TK[P:].copy(),
                                topk_logprobs_RK=topk_logprobs_TK[P:].copy(), teacher_id=teacher_id,
                                cached_tokens=cached, scored_tokens=R - cached)


@dataclass
class WeightsAnnouncement:
    """The learner published policy `version` as an HF-format directory at `path`."""

    kind: ClassVar[str] = "weights"
    schema_version: ClassVar[int] = WEIGHTS_SCHEMA_VERSION
    arrays: ClassVar[dict[str, ArraySpec]] = {}

    version: int
    path: str
    step: int
    nbytes: int
    created_at: float = field(default_factory=time.time)

    def validate(self) -> None:
        if self.version < 0:
            raise ProtocolError("version", f"negative: {self.version}")
        if not self.path:
            raise ProtocolError("path", "empty")


Message = Union[RolloutPrefix, ScoredPrefix, WeightsAnnouncement]  # noqa: UP007 (a runtime alias)
MESSAGE_TYPES: dict[str, type[Message]] = {t.kind: t for t in (RolloutPrefix, ScoredPrefix, WeightsAnnouncement)}

_M = TypeVar("_M", bound=Message)  # `decode(..., expect=ScoredPrefix)` is a ScoredPrefix

OPTIONAL_FIELDS = frozenset({"probe"})
"""Fields added without a schema bump: a message without one decodes with the field's default."""

_SCALARS: dict[type, tuple[type, ...]] = {int: (int,), float: (float, int), bool: (bool,), str: (str,)}


def encode(message: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Check types, validate, then pack. Refusing to send a bad message is cheaper than dead-lettering it later.

    Every field is held to the same schema `decode` enforces (array dtype and ndim, scalar types), so what
    encodes also decodes. Numpy scalars (e.g. `np.int64` from a schedule) are sent as plain Python values.
    """
    payload: dict[str, Any] = {"kind": message.kind, "v": message.schema_version}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name in message.arrays:
            wire = encode_array(value, field=f.name)
            _check_array(message.arrays[f.name], f.name, wire["dtype"], len(wire["shape"]))
            payload[f.name] = wire
        else:
            if isinstance(value, np.generic):
                value = value.item()
            _check_scalar(f, value)
            payload[f.name] = value
    message.validate()
    return pack(payload, max_bytes=max_bytes)


@overload
def decode(blob: bytes, *, max_bytes: int = ..., expect: type[_M], vocab_size: int | None = ...) -> _M: ...


@overload
def decode(blob: bytes, *, max_bytes: int = ..., expect: None = ..., vocab_size: int | None = ...) -> Message: ...


def decode(blob: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, expect: type[_M] | None = None,
           vocab_size: int | None = None) -> Message:
    """Unpack and validate every field; raises `ProtocolError` naming the first bad field.

    `vocab_size`: the width of the reading model's logits; a token id outside `[0, vocab_size)` is refused
    here (see `check_vocab`), not discovered as an index error deep inside a forward pass.
    """
    payload = unpack(blob, max_bytes=max_bytes)
    kind = payload.get("kind")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError("kind", f"unknown message kind {kind!r} (known: {sorted(MESSAGE_TYPES)})")
    cls = MESSAGE_TYPES[kind]
    version = payload.get("v")
    if type(version) is not int or version != cls.schema_version:  # not True, not 1.0
        raise ProtocolError(
            "v", f"{kind} schema version {version!r} is not supported (this reader speaks {cls.schema_version})"
        )
    if expect is not None and cls is not expect:
        raise ProtocolError("kind", f"expected {expect.kind!r} on this stream, got {kind!r}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(payload) - set(hints) - {"kind", "v"}
    if unknown:
        raise ProtocolError(sorted(unknown)[0], "unknown field")
    values: dict[str, Any] = {}
    for name, f in hints.items():
        if name not in payload and name in OPTIONAL_FIELDS:
            continue  # added compatibly: the dataclass default holds
        if name not in payload:
            raise ProtocolError(name, "missing")
        raw = payload[name]
        if name in cls.arrays:
            arr = decode_array(name, raw)
            _check_array(cls.arrays[name], name, arr.dtype.str, arr.ndim)
            values[name] = arr
            continue
        _check_scalar(f, raw)
        values[name] = float(raw) if _scalar_type(f) is float else raw
    message = cls(**values)
    message.validate()
    if vocab_size is not None:
        check_vocab(message, vocab_size)
    return message


TOKEN_ID_FIELDS = ("prompt_ids_P", "response_ids_R", "topk_ids_RK")
"""Arrays of token ids: what a model indexes its embedding or its logits with."""


def check_vocab(message: Message, vocab_size: int) -> None:
    """Refuse token ids a model with `vocab_size` logits cannot take (`ProtocolError` naming the field).

    WHY at the consumer, with its own model's size: the message schema cannot know the vocabulary, and an
    id past it crashes the reader's forward pass (an embedding lookup or a gather out of range) instead
    of dead-lettering one message. The bound is the model's `config.vocab_size` (its logits' width, padded
    rows included), the widest range that cannot crash; `protocol/vocab.py` checks the tokenizers agree.
    """
    for name in TOKEN_ID_FIELDS:
        ids = getattr(message, name, None)
        if ids is None or ids.size == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ProtocolError(name, f"token id {bad} outside the vocabulary [0, {vocab_size}) of this consumer's model")


def _check_array(spec: ArraySpec, name: str, descr: str, ndim: int) -> None:
    if descr not in spec.dtypes:
        raise ProtocolError(name, f"dtype {descr} not in {spec.dtypes}")
    if ndim != spec.ndim:
        raise ProtocolError(name, f"expected {spec.ndim} dimensions, got {ndim}")


def _check_scalar(f: dataclasses.Field[Any], value: Any) -> None:
    expected = _SCALARS[_scalar_type(f)]
    if not isinstance(value, expected) or (expected != (bool,) and isinstance(value, bool)):
        raise ProtocolError(f.name, f"expected {_scalar_type(f).__name__}, got {type(value).__name__}")


def _scalar_type(f: dataclasses.Field[Any]) -> type:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"int": int, "float": float, "bool": bool, "str": str}[annotation]


def peek_id(blob: bytes) -> str | None:
    """Best-effort message id of an undecodable message, so a dead letter can still be accounted for."""
    try:
        payload = unpack(blob)
    except ProtocolError:
        return None
    value = payload.get("id")
    return value if isinstance(value, str) else None
