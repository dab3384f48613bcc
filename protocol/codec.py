"""msgpack codec with numpy arrays as raw little-endian bytes.

Why not pickle: bytes on a queue are untrusted input, and unpickling runs code. Why raw bytes with an
explicit dtype and shape: decoding is a zero-copy `np.frombuffer`, and any consumer in any language
can read it. Every failure raises `ProtocolError` naming the field.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from protocol.errors import ProtocolError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default upper bound on one encoded message; larger messages are refused on both ends."""

ALLOWED_DTYPES = frozenset({"<i4", "<i8", "<f2", "<f4", "<f8", "|u1", "|b1"})
MAX_NDIM = 4


def encode_array(array: np.ndarray, *, field: str = "array") -> dict[str, Any]:
    """An array as a msgpack map; dtype is normalised to little-endian. `field` names it in errors."""
    arr = np.ascontiguousarray(array)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<", "=") else arr.dtype
    arr = arr.astype(dtype, copy=False)
    descr = np.dtype(dtype).str.replace("=", "<")
    if descr not in ALLOWED_DTYPES:
        raise ProtocolError(f"{field}.dtype", f"dtype {descr} is not allowed on the wire")
    return {"dtype": descr, "shape": list(arr.shape), "data": arr.tobytes()}


def decode_array(field: str, value: Any) -> np.ndarray:
    """Inverse of `encode_array`, validating dtype, shape and byte length; the result is read-only."""
    if not isinstance(value, dict):
        raise ProtocolError(field, f"expected an array map, got {type(value).__name__}")
    missing = {"dtype", "shape", "data"} - value.keys()
    if missing:
        raise ProtocolError(field, f"array map lacks {sorted(missing)}")
    descr, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(descr, str) or descr not in ALLOWED_DTYPES:
        raise ProtocolError(f"{field}.dtype", f"dtype {descr!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"{field}.shape", f"expected a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{field}.data", f"expected bytes, got {type(data).__name__}")
    dtype = np.dtype(descr)
    count = math.prod(shape)  # exact Python ints: np.prod would wrap around on hostile shapes
    if count * dtype.itemsize != len(data):
        raise ProtocolError(
            f"{field}.data", f"{len(data)} bytes do not fit shape {shape} of {descr} ({count * dtype.itemsize} expected)"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError) as exc:  # e.g. a zero-size array with a dimension numpy cannot hold
        raise ProtocolError(f"{field}.shape", f"cannot reshape to {shape}: {exc}") from None


def pack(payload: dict[str, Any], *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    try:
        blob = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("message", f"cannot be encoded ({type(exc).__name__}: {exc})") from None
    if len(blob) > max_bytes:
        raise ProtocolError("message", f"encoded size {len(blob)} bytes exceeds the limit of {max_bytes}")
    return blob


def unpack(blob: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ProtocolError("message", f"expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise ProtocolError("message", f"size {len(blob)} bytes exceeds the limit of {max_bytes}")
    try:
        payload = msgpack.unpackb(
            bytes(blob), raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ProtocolError("message", f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise ProtocolError("message", f"expected a msgpack map at the top level, got {type(payload).__name__}")
    bad_keys = [k for k in payload if not isinstance(k, str)]
    if bad_keys:
        raise ProtocolError("message", f"top-level map keys must be strings, got {bad_keys[0]!r}")
    return payload
