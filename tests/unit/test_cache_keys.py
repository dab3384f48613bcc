"""Chained block keys: shared prefixes share keys, a change propagates to the end, teachers never mix."""

from __future__ import annotations

import numpy as np
import pytest

from cache.keys import BlockKey, block_keys, cache_namespace

NS = cache_namespace("hf|model=tiny-teacher|dtype=float32|temperature=1", 8, "float16")


def seq(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n).astype(np.int32)


def test_blocks_cover_sequence_with_partial_tail() -> None:
    keys = block_keys(seq(70), 16, NS)
    assert [(k.start, k.end) for k in keys] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    assert all(isinstance(k, BlockKey) and len(k.key_hex) == 32 for k in keys)
    assert keys[-1].length == 6
    assert len({k.key_hex for k in keys}) == len(keys)


def test_exact_multiple_has_no_tail_and_empty_has_no_blocks() -> None:
    assert [(k.start, k.end) for k in block_keys(seq(32), 16, NS)] == [(0, 16), (16, 32)]
    assert block_keys(np.zeros(0, np.int32), 16, NS) == []


def test_deterministic_and_dtype_independent() -> None:
    ids = seq(50)
    assert block_keys(ids, 16, NS) == block_keys(ids.astype(np.int64), 16, NS) == block_keys(ids.tolist(), 16, NS)


def test_shared_prefix_shares_keys() -> None:
    a = seq(200, seed=1)
    b = np.concatenate([a[:96], seq(104, seed=2)])
    ka, kb = block_keys(a, 16, NS), block_keys(b, 16, NS)
    assert [k.key_hex for k in ka[:6]] == [k.key_hex for k in kb[:6]]
    assert all(x.key_hex != y.key_hex for x, y in zip(ka[6:], kb[6:], strict=True))


@pytest.mark.parametrize("changed", [0, 5, 17, 63, 199])
def test_token_change_in_block_i_changes_keys_i_to_end(changed: int) -> None:
    a = seq(200, seed=3)
    b = a.copy()
    b[changed] += 1
    ka, kb = block_keys(a, 16, NS), block_keys(b, 16, NS)
    i = changed // 16
    assert [k.key_hex for k in ka[:i]] == [k.key_hex for k in kb[:i]]
    assert all(x.key_hex != y.key_hex for x, y in zip(ka[i:], kb[i:], strict=True))


def test_tail_key_differs_from_longer_sequence_but_repeats_exactly() -> None:
    a = seq(40, seed=4)
    longer = np.concatenate([a, seq(30, seed=5)])
    ka, kl = block_keys(a, 16, NS), block_keys(longer, 16, NS)
    assert ka[:2] == kl[:2]
    assert ka[2].key_hex != kl[2].key_hex  # partial [32, 40) vs full [32, 48)
    assert block_keys(a.copy(), 16, NS)[2] == ka[2]


def test_namespace_separation() -> None:
    ids = seq(100, seed=6)
    namespaces = [
        NS,
        cache_namespace("hf|model=other-teacher|dtype=float32|temperature=1", 8, "float16"),
        cache_namespace("hf|model=tiny-teacher|dtype=float32|temperature=1", 32, "float16"),
        cache_namespace("hf|model=tiny-teacher|dtype=float32|temperature=1", 8, "float32"),
    ]
    assert len(set(namespaces)) == len(namespaces)
    all_keys = [{k.key_hex for k in block_keys(ids, 16, ns)} for ns in namespaces]
    for i in range(len(all_keys)):
        for j in range(i + 1, len(all_keys)):
            assert not all_keys[i] & all_keys[j]


def test_namespace_is_length_prefixed() -> None:
    """Moving a boundary between namespace and tokens must not produce the same key."""
    assert block_keys([1, 2], 16, "ab")[0] != block_keys([1, 2], 16, "a")[0]


@pytest.mark.parametrize(
    ("ids", "block_size", "namespace", "match"),
    [
        (np.zeros((2, 3), np.int32), 16, NS, "must be 1-D"),
        (np.array([0.5, 1.0]), 16, NS, "integer token ids"),
        (np.array([-1, 2]), 16, NS, "outside"),
        (np.array([2**31]), 16, NS, "outside"),
        ([1, 2], 0, NS, "block_size"),
        ([1, 2], True, NS, "block_size"),
        ([1, 2], 16, "", "namespace"),
    ],
)
def test_bad_input_names_the_problem(ids: object, block_size: int, namespace: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block_keys(ids, block_size, namespace)


def test_cache_namespace_validates() -> None:
    with pytest.raises(ValueError, match="teacher_identity"):
        cache_namespace("", 8, "float16")
    with pytest.raises(ValueError, match="k must be"):
        cache_namespace("t", -1, "float16")
    assert "k=0" in cache_namespace("t", 0, "float32")
