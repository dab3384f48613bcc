"""The wire contract: `protocol.codec` and the encode/decode of `protocol.messages`.

Behaviours pinned here:
- every message kind round-trips exactly: `RolloutPrefix`, `ScoredPrefix` with float32 and float16
  top-k (and k=0, and an empty response), `WeightsAnnouncement`; array bytes, dtypes and shapes, ids,
  `created_at` and scalar types survive; decoded arrays are read-only;
- a seeded random sweep of `RolloutPrefix` (lengths, int32 extremes, logprob bit patterns) round-trips;
- arrays go on the wire as little-endian: a big-endian input is normalised, not refused or misread;
- `encode` holds a message to the schema `decode` enforces (dtype, ndim, scalar types, validation),
  so a message that encodes also decodes; numpy scalars are sent as plain values;
- every malformed input raises `ProtocolError` whose `.field` names the bad field: not msgpack,
  top-level not a map (or non-string keys), unknown/missing kind, wrong/missing schema version `v`
  (including `True` and `1.0`), missing field, unknown field, wrong scalar type (including a bool where
  an int is expected), array not a map / missing keys, disallowed dtype, allowed dtype wrong for the
  field, data not bytes, shape not matching the bytes, negative dims, too many dims, hostile shapes
  whose product overflows int64, wrong ndim for the field, length mismatches, horizon out of range,
  response longer than the horizon, non-finite or positive logprobs, negative token ids, scored and
  weights specific checks, oversize messages (on pack and on unpack), and `expect=` of the wrong kind;
- schema versions are per kind (rollout and scored v2, weights v1); a v1 rollout, which does not carry
  the sampling parameters of its behaviour logprobs, is refused rather than read with guessed ones;
- `peek_id` recovers the id of an undecodable message when it can, and returns None otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from protocol.codec import decode_array, encode_array, pack, unpack
from protocol.errors import ProtocolError
from protocol.messages import (
    SCHEMA_VERSION,
    WEIGHTS_SCHEMA_VERSION,
    Message,
    RolloutPrefix,
    ScoredPrefix,
    WeightsAnnouncement,
    decode,
    encode,
    peek_id,
)


def make_rollout(**changes: Any) -> RolloutPrefix:
    base: dict[str, Any] = dict(
        prompt_ids_P=np.array([5, 17, 2**31 - 1, 0], np.int32),
        response_ids_R=np.array([3, 9, 11], np.int32),
        behaviour_logprobs_R=np.array([-0.25, -3.5, 0.0], np.float32),
        prompt_index=7,
        horizon=4,
        max_new_tokens=16,
        finished=False,
        policy_version=3,
        actor_id="actor-0",
        id="0123456789abcdef0123456789abcdef",
        created_at=1700000000.125,
        temperature=0.7,
        top_p=0.9,
    )
    base.update(changes)
    return RolloutPrefix(**base)


def make_scored(k: int = 4, topk_dtype: type = np.float32, **changes: Any) -> ScoredPrefix:
    rollout = make_rollout()
    r = len(rollout.response_ids_R)
    rng = np.random.default_rng(0)
    scores: dict[str, Any] = dict(
        teacher_logprobs_R=np.array([-0.5, -1.0, -7.25], np.float32),
        topk_ids_RK=rng.integers(0, 50_000, size=(r, k)).astype(np.int32),
        topk_logprobs_RK=(-rng.random((r, k)) * 10).astype(topk_dtype),
        teacher_id="teacher@rev",
        cached_tokens=2,
        scored_tokens=1,
    )
    scores.update(changes)
    return ScoredPrefix.from_rollout(rollout, **scores)


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in a.arrays:
            assert isinstance(y, np.ndarray), f.name
            assert y.dtype == np.asarray(x).dtype.newbyteorder("<"), f.name
            assert y.shape == x.shape, f.name
            assert np.array_equal(x, y), f.name
            assert np.asarray(x, y.dtype).tobytes() == y.tobytes(), f.name  # bit-exact, incl. -0.0
        else:
            assert type(y) is type(x), f.name
            assert y == x, f.name


def payload_of(message: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(message), raw=False)


def repack(payload: Any) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def mutated(message: Message, **changes: Any) -> bytes:
    """A valid message's wire form with fields replaced (numpy arrays are encoded as arrays)."""
    payload = payload_of(message)
    for name, value in changes.items():
        payload[name] = encode_array(value) if isinstance(value, np.ndarray) else value
    return repack(payload)


def bad_field(blob: bytes, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(blob, **kwargs)
    assert str(info.value).startswith(f"{info.value.field}: ")
    return info.value.field


# -- round trips ---------------------------------------------------------------------------------


def test_rollout_round_trip_is_exact() -> None:
    message = make_rollout()
    back = decode(encode(message), expect=RolloutPrefix)
    assert_same(message, back)
    assert back.id == "0123456789abcdef0123456789abcdef"
    assert back.created_at == 1700000000.125
    assert back.prompt_ids_P[2] == 2**31 - 1


def test_decoded_arrays_are_read_only() -> None:
    back = decode(encode(make_rollout()))
    assert isinstance(back, RolloutPrefix)
    with pytest.raises(ValueError):
        back.response_ids_R[0] = 1


@pytest.mark.parametrize("topk_dtype", [np.float32, np.float16])
def test_scored_round_trip_keeps_topk_dtype(topk_dtype: type) -> None:
    message = make_scored(k=5, topk_dtype=topk_dtype)
    back = decode(encode(message), expect=ScoredPrefix)
    assert_same(message, back)
    assert isinstance(back, ScoredPrefix)
    assert back.topk_logprobs_RK.dtype == np.dtype(topk_dtype)
    assert back.topk_ids_RK.shape == (3, 5)
    assert back.id == make_rollout().id  # stable across the hop


def test_scored_with_k_zero_round_trips() -> None:
    message = make_scored(k=0)
    back = decode(encode(message))
    assert_same(message, back)
    assert isinstance(back, ScoredPrefix)
    assert back.topk_ids_RK.shape == (3, 0)
    assert back.topk_logprobs_RK.shape == (3, 0)


def test_empty_response_round_trips() -> None:
    rollout = make_rollout(response_ids_R=np.zeros(0, np.int32), behaviour_logprobs_R=np.zeros(0, np.float32))
    scored = ScoredPrefix.from_rollout(
        rollout,
        teacher_logprobs_R=np.zeros(0, np.float32),
        topk_ids_RK=np.zeros((0, 8), np.int32),
        topk_logprobs_RK=np.zeros((0, 8), np.float16),
    )
    for message in (rollout, scored):
        assert_same(message, decode(encode(message)))


def test_weights_announcement_round_trips() -> None:
    message = WeightsAnnouncement(version=12, path="/ckpt/weights/v000012", step=340, nbytes=123_456_789, created_at=5.5)
    back = decode(encode(message), expect=WeightsAnnouncement)
    assert_same(message, back)


def test_integer_created_at_decodes_as_float() -> None:
    back = decode(mutated(make_rollout(), created_at=1700000000))
    assert type(back.created_at) is float
    assert back.created_at == 1700000000.0


def test_numpy_scalars_are_sent_as_plain_values() -> None:
    message = make_rollout(horizon=np.int64(4), prompt_index=np.int32(7), finished=np.bool_(True), created_at=np.float32(2.5))
    back = decode(encode(message))
    assert (type(back.horizon), back.horizon) == (int, 4)
    assert (type(back.prompt_index), back.prompt_index) == (int, 7)
    assert back.finished is True
    assert (type(back.created_at), back.created_at) == (float, 2.5)


def test_random_rollouts_round_trip() -> None:
    """Property sweep (seeded, so failures reproduce): any valid RolloutPrefix survives the wire bit-exactly."""
    rng = np.random.default_rng(1234)
    specials = np.array([0.0, -0.0, -1e-45, -np.finfo(np.float32).max, -np.finfo(np.float32).tiny], np.float32)
    for _ in range(300):
        max_new = int(rng.integers(1, 300))
        horizon = int(rng.integers(1, max_new + 1))
        r = int(rng.integers(0, horizon + 1))
        p = int(rng.integers(1, 200))
        logprobs = (-rng.exponential(3.0, r)).astype(np.float32)
        if r:
            logprobs[rng.integers(0, r, size=min(r, 3))] = rng.choice(specials, size=min(r, 3))
        message = RolloutPrefix(
            prompt_ids_P=rng.integers(0, 2**31 - 1, p, endpoint=True).astype(np.int32),
            response_ids_R=rng.integers(0, 2**31 - 1, r, endpoint=True).astype(np.int32),
            behaviour_logprobs_R=logprobs,
            prompt_index=int(rng.integers(0, 2**40)),
            horizon=horizon,
            max_new_tokens=max_new,
            finished=bool(rng.integers(0, 2)),
            policy_version=int(rng.integers(0, 10_000)),
            actor_id=f"actor-{rng.integers(0, 64)}-\u00e9",
            created_at=float(rng.random() * 2e9),
        )
        assert_same(message, decode(encode(message), expect=RolloutPrefix))


# -- byte order ----------------------------------------------------------------------------------


def test_big_endian_array_is_normalised_to_little_endian() -> None:
    values = [1, 256, 2**31 - 1, 70000]
    wire = encode_array(np.array(values, dtype=">i4"))
    assert wire["dtype"] == "<i4"
    assert wire["shape"] == [4]
    assert wire["data"] == np.array(values, dtype="<i4").tobytes()
    assert decode_array("x", wire).tolist() == values


def test_big_endian_message_fields_round_trip_by_value() -> None:
    message = make_rollout(
        prompt_ids_P=np.array([1, 256, 65536], dtype=">i4"),
        behaviour_logprobs_R=np.array([-0.25, -3.5, -1e-3], dtype=">f4"),
    )
    back = decode(encode(message))
    assert back.prompt_ids_P.dtype.str == "<i4"
    assert back.prompt_ids_P.tolist() == [1, 256, 65536]
    assert back.behaviour_logprobs_R.dtype.str == "<f4"
    assert np.array_equal(back.behaviour_logprobs_R, np.array([-0.25, -3.5, -1e-3], np.float32))


def test_encode_array_refuses_disallowed_dtype_naming_the_field() -> None:
    with pytest.raises(ProtocolError) as info:
        encode_array(np.zeros(2, np.complex64), field="topk_ids_RK")
    assert info.value.field == "topk_ids_RK.dtype"
    with pytest.raises(ProtocolError) as info:
        encode_array(np.array(["a"]))
    assert info.value.field == "array.dtype"


# -- encode refuses what decode would refuse ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt_ids_P": np.array([1, 2], np.int64)}, "prompt_ids_P"),
        ({"prompt_ids_P": [1, 2]}, "prompt_ids_P"),  # a list becomes int64
        ({"prompt_ids_P": np.array([[1, 2]], np.int32)}, "prompt_ids_P"),
        ({"behaviour_logprobs_R": np.array([-1, -1, -1], np.float64)}, "behaviour_logprobs_R"),
        ({"response_ids_R": np.zeros(3, np.complex64)}, "response_ids_R.dtype"),
        ({"horizon": True}, "horizon"),
        ({"horizon": 4.0}, "horizon"),
        ({"actor_id": None}, "actor_id"),
        ({"finished": 0}, "finished"),
        ({"horizon": 0}, "horizon"),
        ({"response_ids_R": np.arange(5, dtype=np.int32), "behaviour_logprobs_R": np.zeros(5, np.float32)}, "response_ids_R"),
        ({"behaviour_logprobs_R": np.array([-1, 0.5, -1], np.float32)}, "behaviour_logprobs_R"),
        ({"behaviour_logprobs_R": np.zeros(2, np.float32)}, "behaviour_logprobs_R"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(make_rollout(**changes))
    assert info.value.field == field


def test_encode_refuses_wrong_topk_dtype() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(make_scored(topk_dtype=np.float64))
    assert info.value.field == "topk_logprobs_RK"


# -- malformed input: every failure names its field -----------------------------------------------


@pytest.mark.parametrize("blob", [b"\xc1", b"", encode(make_rollout())[:-5], encode(make_rollout()) + b"\x00"])
def test_not_msgpack(blob: bytes) -> None:
    assert bad_field(blob) == "message"


def test_not_bytes_at_all() -> None:
    with pytest.raises(ProtocolError) as info:
        decode("a string")  # type: ignore[arg-type]
    assert info.value.field == "message"


@pytest.mark.parametrize("top", [[1, 2], "rollout", 7, None])
def test_top_level_not_a_map(top: Any) -> None:
    assert bad_field(repack(top)) == "message"


def test_top_level_keys_must_be_strings() -> None:
    payload = payload_of(make_rollout())
    assert bad_field(repack({**payload, b"extra": 1, "other": 2})) == "message"
    assert bad_field(repack({1: 2})) == "message"


@pytest.mark.parametrize("kind", ["nope", "", None, 5, [1], {"a": 1}, b"rollout"])
def test_unknown_kind(kind: Any) -> None:
    assert bad_field(mutated(make_rollout(), kind=kind)) == "kind"


def test_missing_kind() -> None:
    payload = payload_of(make_rollout())
    del payload["kind"]
    assert bad_field(repack(payload)) == "kind"


@pytest.mark.parametrize("version", [0, 1, SCHEMA_VERSION + 1, "2", True, 2.0, None])
def test_wrong_schema_version(version: Any) -> None:
    assert bad_field(mutated(make_rollout(), v=version)) == "v"


def test_a_v1_rollout_without_sampling_parameters_is_refused() -> None:
    """v1 did not say which distribution its behaviour logprobs are of; guessing T=1 is the old bug."""
    payload = payload_of(make_rollout())
    del payload["temperature"], payload["top_p"]
    payload["v"] = 1
    with pytest.raises(ProtocolError, match="rollout schema version 1 is not supported"):
        decode(repack(payload))
    payload["v"] = SCHEMA_VERSION
    assert bad_field(repack(payload)) == "temperature"


def test_schema_versions_are_per_kind() -> None:
    assert payload_of(make_rollout())["v"] == payload_of(make_scored())["v"] == SCHEMA_VERSION == 2
    weights = WeightsAnnouncement(version=1, path="/w", step=1, nbytes=10)
    assert payload_of(weights)["v"] == WEIGHTS_SCHEMA_VERSION == 1
    assert bad_field(mutated(weights, v=SCHEMA_VERSION)) == "v"


def test_probe_flag_round_trips_and_is_optional_on_the_wire() -> None:
    """`probe` was added without a schema bump: a rollout without it (written before it) decodes as no probe."""
    probe = make_rollout(horizon=16, probe=True)
    decoded = decode(encode(probe))
    assert isinstance(decoded, RolloutPrefix) and decoded.probe is True
    scored = ScoredPrefix.from_rollout(probe, teacher_logprobs_R=np.zeros(3, np.float32),
                                       topk_ids_RK=np.zeros((3, 0), np.int32), topk_logprobs_RK=np.zeros((3, 0), np.float32))
    assert decode(encode(scored), expect=ScoredPrefix).probe is True
    payload = payload_of(make_rollout())
    del payload["probe"]
    old = decode(repack(payload))
    assert isinstance(old, RolloutPrefix) and old.probe is False
    assert bad_field(mutated(make_rollout(), probe=1)) == "probe"  # still typed when present


def test_a_probe_samples_the_whole_budget() -> None:
    assert bad_field(mutated(make_rollout(), probe=True)) == "probe"  # horizon 4 of a 16-token budget
    with pytest.raises(ProtocolError, match="probe"):
        encode(make_rollout(probe=True))


def test_missing_schema_version() -> None:
    payload = payload_of(make_rollout())
    del payload["v"]
    assert bad_field(repack(payload)) == "v"


@pytest.mark.parametrize(
    "name", ["id", "horizon", "actor_id", "prompt_ids_P", "created_at", "finished", "temperature", "top_p"]
)
def test_missing_field(name: str) -> None:
    payload = payload_of(make_rollout())
    del payload[name]
    assert bad_field(repack(payload)) == name


def test_missing_scored_field() -> None:
    payload = payload_of(make_scored())
    del payload["topk_ids_RK"]
    assert bad_field(repack(payload)) == "topk_ids_RK"


def test_unknown_field() -> None:
    assert bad_field(mutated(make_rollout(), surprise=1)) == "surprise"
    # a scored-only field on a rollout is unknown there
    assert bad_field(mutated(make_rollout(), teacher_id="t")) == "teacher_id"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("horizon", "4"),
        ("horizon", 4.0),
        ("horizon", True),  # bool is an int subclass in Python; not on this wire
        ("horizon", None),
        ("prompt_index", False),
        ("policy_version", 1.5),
        ("finished", 1),
        ("finished", "true"),
        ("actor_id", 5),
        ("actor_id", b"actor-0"),
        ("id", None),
        ("created_at", "now"),
        ("created_at", True),
        ("created_at", [1.0]),
        ("temperature", "0.7"),
        ("top_p", True),
    ],
)
def test_wrong_scalar_type(name: str, value: Any) -> None:
    assert bad_field(mutated(make_rollout(), **{name: value})) == name


def test_wrong_scalar_type_on_weights() -> None:
    message = WeightsAnnouncement(version=1, path="/w", step=1, nbytes=10)
    assert bad_field(mutated(message, nbytes=True)) == "nbytes"
    assert bad_field(mutated(message, path=3)) == "path"


def _array_map(**changes: Any) -> dict[str, Any]:
    wire = encode_array(np.array([1, 2, 3, 4], np.int32))
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not ...}


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ([1, 2, 3, 4], "prompt_ids_P"),  # not an array map
        (b"\x01\x00\x00\x00", "prompt_ids_P"),
        (_array_map(data=...), "prompt_ids_P"),  # map missing keys
        (_array_map(dtype=...), "prompt_ids_P"),
        (_array_map(shape=...), "prompt_ids_P"),
        (_array_map(dtype="<u4"), "prompt_ids_P.dtype"),  # not allowed on the wire
        (_array_map(dtype=">i4"), "prompt_ids_P.dtype"),  # wire arrays are little-endian
        (_array_map(dtype="O"), "prompt_ids_P.dtype"),
        (_array_map(dtype=4), "prompt_ids_P.dtype"),
        (_array_map(shape=[5]), "prompt_ids_P.data"),  # shape does not match the bytes
        (_array_map(shape=[3]), "prompt_ids_P.data"),
        (_array_map(data=b"\x00" * 15), "prompt_ids_P.data"),
        (_array_map(data="abcdabcdabcdabcd"), "prompt_ids_P.data"),
        (_array_map(data=[1, 2, 3, 4]), "prompt_ids_P.data"),
        (_array_map(shape=[-4]), "prompt_ids_P.shape"),  # negative dims
        (_array_map(shape=[2, -2]), "prompt_ids_P.shape"),
        (_array_map(shape=[1, 1, 1, 1, 4]), "prompt_ids_P.shape"),  # too many dims
        (_array_map(shape="4"), "prompt_ids_P.shape"),
        (_array_map(shape=[4.0]), "prompt_ids_P.shape"),
        (_array_map(shape=[True, 4]), "prompt_ids_P.shape"),
        (_array_map(shape=[2**32, 2**32], data=b""), "prompt_ids_P.data"),  # product wraps in int64
        (_array_map(shape=[0, 2**63], data=b""), "prompt_ids_P.shape"),  # zero-size, dim too big for numpy
        (_array_map(shape=[2, 2]), "prompt_ids_P"),  # wrong ndim for the field
        (_array_map(shape=[]), "prompt_ids_P.data"),
        (_array_map(dtype="<f4"), "prompt_ids_P"),  # allowed on the wire, wrong for the field
        (_array_map(dtype="<i8", shape=[2]), "prompt_ids_P"),
    ],
)
def test_malformed_array(value: Any, field: str) -> None:
    assert bad_field(mutated(make_rollout(), prompt_ids_P=value)) == field


def test_scalar_where_array_expected_and_zero_dim_array() -> None:
    assert bad_field(mutated(make_rollout(), response_ids_R=3)) == "response_ids_R"
    zero_d = {"dtype": "<i4", "shape": [], "data": np.int32(3).tobytes()}
    assert bad_field(mutated(make_rollout(), response_ids_R=zero_d)) == "response_ids_R"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"behaviour_logprobs_R": np.zeros(2, np.float32)}, "behaviour_logprobs_R"),  # length mismatch
        ({"behaviour_logprobs_R": np.zeros(4, np.float32)}, "behaviour_logprobs_R"),
        ({"horizon": 0}, "horizon"),  # horizon out of range
        ({"horizon": -1}, "horizon"),
        ({"horizon": 17}, "horizon"),  # > max_new_tokens (16)
        ({"horizon": 2}, "response_ids_R"),  # response (3) longer than the horizon
        ({"behaviour_logprobs_R": np.array([-1, np.nan, -1], np.float32)}, "behaviour_logprobs_R"),
        ({"behaviour_logprobs_R": np.array([-1, -np.inf, -1], np.float32)}, "behaviour_logprobs_R"),
        ({"behaviour_logprobs_R": np.array([np.inf, -1, -1], np.float32)}, "behaviour_logprobs_R"),
        ({"behaviour_logprobs_R": np.array([-1, -1, 0.5], np.float32)}, "behaviour_logprobs_R"),  # positive
        ({"behaviour_logprobs_R": np.array([-1, -1, 1e-3], np.float32)}, "behaviour_logprobs_R"),
        ({"prompt_ids_P": np.zeros(0, np.int32)}, "prompt_ids_P"),  # empty prompt
        ({"prompt_ids_P": np.array([1, -2], np.int32)}, "prompt_ids_P"),  # negative token id
        ({"response_ids_R": np.array([1, -2, 3], np.int32)}, "response_ids_R"),
        ({"policy_version": -1}, "policy_version"),
        ({"temperature": 0.0}, "temperature"),  # greedy: no distribution to take a ratio against
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_invalid_rollout_values(changes: dict[str, Any], field: str) -> None:
    assert bad_field(mutated(make_rollout(), **changes)) == field


def test_tiny_positive_logprob_rounding_is_tolerated() -> None:
    message = make_rollout(behaviour_logprobs_R=np.array([-1, 5e-5, -1], np.float32))
    assert decode(encode(message)).behaviour_logprobs_R[1] == np.float32(5e-5)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"teacher_logprobs_R": np.zeros(2, np.float32)}, "teacher_logprobs_R"),
        ({"teacher_logprobs_R": np.array([-1, np.nan, -1], np.float32)}, "teacher_logprobs_R"),
        ({"topk_ids_RK": np.zeros((2, 4), np.int32)}, "topk_ids_RK"),  # rows != response length
        ({"topk_ids_RK": np.zeros((2, 4), np.int32), "topk_logprobs_RK": np.zeros((2, 4), np.float32)}, "topk_ids_RK"),
        ({"topk_ids_RK": np.zeros((4, 0), np.int32), "topk_logprobs_RK": np.zeros((4, 0), np.float16)}, "topk_ids_RK"),
        ({"topk_ids_RK": np.zeros((3, 3), np.int32)}, "topk_ids_RK"),  # K differs from the logprobs
        ({"topk_ids_RK": np.zeros(3, np.int32)}, "topk_ids_RK"),  # wrong ndim
        ({"topk_logprobs_RK": np.zeros((3, 4), np.float64)}, "topk_logprobs_RK"),  # dtype not allowed here
        ({"topk_logprobs_RK": np.zeros((3, 4), np.int32)}, "topk_logprobs_RK"),
        ({"cached_tokens": -1}, "cached_tokens"),
        ({"scored_tokens": 1.0}, "scored_tokens"),
    ],
)
def test_invalid_scored_values(changes: dict[str, Any], field: str) -> None:
    assert bad_field(mutated(make_scored(k=4), **changes)) == field


@pytest.mark.parametrize(("changes", "field"), [({"version": -1}, "version"), ({"path": ""}, "path")])
def test_invalid_weights_values(changes: dict[str, Any], field: str) -> None:
    message = WeightsAnnouncement(version=1, path="/w", step=1, nbytes=10)
    assert bad_field(mutated(message, **changes)) == field


# -- size limit ------------------------------------------------------------------------------------


def test_oversize_refused_on_pack() -> None:
    message = make_rollout()
    size = len(encode(message))
    with pytest.raises(ProtocolError) as info:
        encode(message, max_bytes=size - 1)
    assert info.value.field == "message"
    assert str(size) in info.value.reason
    assert len(encode(message, max_bytes=size)) == size  # the limit is inclusive
    with pytest.raises(ProtocolError) as info:
        pack({"data": b"x" * 100}, max_bytes=50)
    assert info.value.field == "message"


def test_oversize_refused_on_unpack() -> None:
    blob = encode(make_rollout())
    assert bad_field(blob, max_bytes=len(blob) - 1) == "message"
    assert bad_field(blob, max_bytes=16) == "message"
    assert isinstance(decode(blob, max_bytes=len(blob)), RolloutPrefix)
    with pytest.raises(ProtocolError) as info:
        unpack(blob, max_bytes=10)
    assert info.value.field == "message"


def test_unencodable_payload_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        pack({"x": object()})
    assert info.value.field == "message"


# -- expect= ---------------------------------------------------------------------------------------


def test_expect_wrong_kind() -> None:
    assert bad_field(encode(make_rollout()), expect=ScoredPrefix) == "kind"
    # a ScoredPrefix is a subclass of RolloutPrefix, but not the kind a rollout stream expects
    assert bad_field(encode(make_scored()), expect=RolloutPrefix) == "kind"
    weights = WeightsAnnouncement(version=1, path="/w", step=1, nbytes=10)
    assert bad_field(encode(weights), expect=RolloutPrefix) == "kind"
    assert isinstance(decode(encode(make_scored()), expect=ScoredPrefix), ScoredPrefix)


# -- peek_id ---------------------------------------------------------------------------------------


def test_peek_id() -> None:
    assert peek_id(mutated(make_rollout(), horizon=0)) == make_rollout().id  # undecodable, id still readable
    assert peek_id(b"\xc1garbage") is None
    assert peek_id(repack([1, 2])) is None
    assert peek_id(repack({"id": 5})) is None
