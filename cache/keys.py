"""Content-addressed block keys for the teacher cache, chained like an inference engine's prefix cache.

Why chained: the teacher's score of token t depends on *every* earlier token, so a block's cached
values are only reusable behind exactly the same prefix. Hashing each block together with the key
of the block before it makes key i a digest of tokens 0..end_i (and of how they were cut), so a hit
on key i implies the whole prefix matches and a walk from block 0 finds the longest reusable prefix
with one index lookup per block.

Why a namespace: it is the teacher identity (model, revision, tokenizer, dtype, temperature) plus k
and the top-k storage dtype. Two teachers, or one teacher stored with a different k, must never
share an entry, so the namespace goes into every block's digest (not only the first one's).

A tail shorter than `block_size` gets its own (partial-block) key, so an exact repeat of a sequence
hits on every token. Keys are 128-bit BLAKE2b digests (hex): far past collision risk for any cache
this system could hold, and half the index memory of SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 16
"""Digest size of a block key (BLAKE2b-128)."""

_PERSON = b"opd-cache-v1"
"""BLAKE2b personalisation: a change of key format must never alias keys of the old format."""

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class BlockKey:
    """One block of a token sequence: its key and the positions [start, end) it covers."""

    key_hex: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def cache_namespace(teacher_identity: str, k: int, topk_dtype: str | np.dtype) -> str:
    """The namespace of a teacher's entries: identity plus k and the top-k storage dtype.

    k and the dtype are added explicitly (even if the identity already names k) because they change
    what an entry holds: a k=8 float16 entry cannot serve a k=32 float32 reader.
    """
    if not isinstance(teacher_identity, str) or not teacher_identity:
        raise ValueError(f"teacher_identity must be a non-empty str, got {teacher_identity!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    dtype = np.dtype(topk_dtype)
    return f"{teacher_identity}|k={int(k)}|topk_dtype={dtype.name}"


def as_token_ids(ids_T: object, name: str = "ids_T") -> np.ndarray:
    """Validate a token sequence and return it as a C-contiguous little-endian int32 array.

    Token ids are hashed as int32 bytes, so anything that does not fit int32 exactly is refused
    rather than silently wrapped into a different (and colliding) key.
    """
    arr = np.asarray(ids_T)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT32.max):
        raise ValueError(f"{name} holds ids outside [0, {_INT32.max}]: min {arr.min()}, max {arr.max()}")
    return np.ascontiguousarray(arr, dtype="<i4")


def block_keys(ids_T: object, block_size: int, namespace: str) -> list[BlockKey]:
    """Cut `ids_T` into blocks of `block_size` tokens (last one possibly shorter) and key each.

    key_i = BLAKE2b-128(len(namespace) || namespace || key_{i-1} || tokens_i as little-endian int32),
    with key_{-1} = 16 zero bytes. The namespace is length-prefixed so that no (namespace, tokens)
    pair can be re-split into another. An empty sequence has no blocks.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
    tokens = as_token_ids(ids_T)
    ns = namespace.encode()
    head = len(ns).to_bytes(4, "little") + ns
    prev = bytes(KEY_BYTES)
    out: list[BlockKey] = []
    n = int(tokens.shape[0])
    for start in range(0, n, int(block_size)):
        end = min(start + int(block_size), n)
        h = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON)
        h.update(head)
        h.update(prev)
        h.update(tokens[start:end].tobytes())
        prev = h.digest()
        out.append(BlockKey(prev.hex(), start, end))
    return out


@dataclass(frozen=True)
class CacheSpec:
    """What every entry of one cache shares: the key namespace (`cache_namespace`), the block size, K and
    the top-k storage dtype. The reader and the writer of a `TeacherCache` both work from it."""

    namespace: str
    block_size: int
    k: int
    topk_dtype: np.dtype

    def keys(self, ids_T: object) -> list[BlockKey]:
        """The chained block keys of a token sequence under this cache's namespace."""
        return block_keys(ids_T, self.block_size, self.namespace)

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one stored position: a float32 logprob, K int32 ids, K top-k logprobs."""
        return 4 + self.k * (4 + self.topk_dtype.itemsize)
