"""The learner's state message (protocol/state.py): typed, versioned, and safe to read.

Pins:
- encode -> decode gives back the same state, measurements, the per-bucket KL and the KL windows included;
- whatever is malformed (not msgpack, another kind, another schema version, a missing field, a wrong
  type, a value out of bounds, an unknown field) decodes to a `StateUnavailable` value whose reason
  names the field, and never raises;
- `assumed(version)` is what an actor uses before any learner published its state.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol.state import KLWindow, LearnerState, StateUnavailable, decode_state, encode_state

WINDOW = KLWindow(step=12, samples=64, horizon_min=16, horizon_max=16, kl_by_bucket=[0.5, 0.25],
                  tokens_by_bucket=[512, 480], probe_kl_by_bucket=[0.5, 0.25, 0.0625, 0.0],
                  probe_tokens_by_bucket=[24, 24, 20, 0])


def _state(**changes: Any) -> LearnerState:
    base = LearnerState(version=12, step=12, batch_size=16, max_staleness=2, ranks=2, retired=190, phase="draining",
                        loss=-0.25, reverse_kl=0.125, tokens_per_second=812.5, idle_fraction=0.3,
                        eval_kl_first=1.5, eval_kl_last=0.75, kl_by_bucket=[0.5, 0.25, 0.0625], bucket_tokens=8,
                        kl_windows=[WINDOW, WINDOW.model_copy(update={"step": 16})])
    return base.model_copy(update=changes)


def _payload(**changes: Any) -> dict[str, Any]:
    payload = _state().model_dump(mode="python")
    payload.update(changes)
    return payload


def test_round_trip() -> None:
    state = _state()
    assert decode_state(encode_state(state)) == state
    minimal = LearnerState(version=0, step=0, batch_size=1, max_staleness=0)
    decoded = decode_state(encode_state(minimal))
    assert decoded == minimal and isinstance(decoded, LearnerState)
    assert decoded.loss is None and decoded.kl_by_bucket == [] and decoded.phase == "training"


def test_assumed_state_carries_only_the_version() -> None:
    state = LearnerState.assumed(7)
    assert (state.version, state.step, state.retired, state.kl_by_bucket) == (7, 0, 0, [])


def _without(field: str) -> dict[str, Any]:
    payload = _payload()
    del payload[field]
    return payload


@pytest.mark.parametrize(
    ("blob", "names"),
    [
        (b"\xc1 not msgpack", "not valid msgpack"),
        (msgpack.packb([1, 2]), "top level"),
        (msgpack.packb(_payload(kind="weights")), "kind"),
        (msgpack.packb(_payload(v=1)), "v: schema version 1"),  # v1 had no KL windows
        (msgpack.packb(_payload(v=3)), "v: schema version 3"),
        (msgpack.packb(_payload(v=True)), "v: schema version True"),
        (msgpack.packb(_without("version")), "version"),
        (msgpack.packb(_payload(batch_size="16")), "batch_size"),
        (msgpack.packb(_payload(retired=True)), "retired"),  # a bool is not a count
        (msgpack.packb(_payload(batch_size=0)), "batch_size"),
        (msgpack.packb(_payload(retired=-1)), "retired"),
        (msgpack.packb(_payload(phase="paused")), "phase"),
        (msgpack.packb(_payload(kl_by_bucket=["high"])), "kl_by_bucket.0"),
        (msgpack.packb(_payload(kl_windows=[{**WINDOW.model_dump(), "tokens_by_bucket": [1, -1]}])),
         "kl_windows.0.tokens_by_bucket.1"),
        (msgpack.packb(_payload(kl_windows=[{**WINDOW.model_dump(), "extra": 1}])), "kl_windows.0.extra"),
        (msgpack.packb(_payload(admitted=3)), "admitted"),
    ],
)
def test_malformed_state_is_a_value_naming_the_field(blob: bytes, names: str) -> None:
    result = decode_state(blob)
    assert isinstance(result, StateUnavailable) and result.malformed
    assert names in result.reason and result.reason.startswith("learner state is malformed"), result.reason
