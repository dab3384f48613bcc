"""Look up, score the rest, store: the cache side of teacher scoring, shared by the teacher loop and warming.

Why its own module: `score_with_cache` is the one implementation of "look up, score the rest, store";
the teacher loop (`cache/teacher.py`) and offline warming (`opd cache warm`, `cache/warm.py`) both call
it, so a warmed entry is exactly what a live teacher would have stored. Keeping it (and its error
handling) apart from the teacher's Redis loop lets the two be read, and tested, on their own.

Why the cache is looked up and written once per batch (`lookup_many` / `put_many`): a put costs
~10-20 ms of zarr overhead (chunk rewrite + fsync) whatever its size, so one put per sequence would
cost more than scoring a batch of short prefixes.

Why cache failures never fail the work: the cache is an optimisation. A lookup that raises is a miss
(the teacher scores the whole sequence); a put that raises is logged and counted (`CacheBatchStats`,
which the teacher turns into `opd_cache_errors_total{op}` and the run-wide `teacher_cache_errors`
stat) and the scored prefixes are forwarded anyway. The only cost of a broken cache is compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cache.scorers.base import Scores, TeacherScorer
from protocol.files import DISK_FULL, write_error_reason

if TYPE_CHECKING:
    from cache.reader import CacheHit
    from cache.store import TeacherCache
    from cache.writer import PutResult

log = logging.getLogger(__name__)


@dataclass
class FullScores:
    """Teacher values for every position 0..T-1 of one sequence (position 0 has none: NaN)."""

    logprobs_T: np.ndarray
    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    cached_upto: int


@dataclass
class CacheBatchStats:
    """What one `score_with_cache` call did to the cache (for metrics, logs and warm totals)."""

    bytes_written: int = 0
    blocks_written: int = 0
    tokens_written: int = 0
    lookup_errors: int = 0
    put_errors: int = 0
    put_error_reasons: dict[str, int] = field(default_factory=dict)  # protocol.files.write_error_reason

    @property
    def errors(self) -> int:
        return self.lookup_errors + self.put_errors

    def put_failed(self, exc: BaseException) -> None:
        self.put_errors += 1
        reason = write_error_reason(exc)
        self.put_error_reasons[reason] = self.put_error_reasons.get(reason, 0) + 1


def _lookup(cache: TeacherCache, seqs: list[np.ndarray], stats: CacheBatchStats) -> list[CacheHit | None]:
    """Cache hits per sequence; any failure is a miss for the whole batch (see module docs)."""
    try:
        return list(cache.lookup_many(seqs))
    except Exception as exc:
        stats.lookup_errors += 1
        log.warning("teacher cache: lookup of %d sequences failed (%s: %s); scoring them in full",
                    len(seqs), type(exc).__name__, exc)
        return [None] * len(seqs)


PutItem = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _put(cache: TeacherCache, items: list[PutItem], stats: CacheBatchStats) -> None:
    """Store a batch in one `put_many`; a failure is logged and counted, never raised.

    A ValueError means one item's data was refused (e.g. a NaN score): the items are then retried
    one by one so that one bad sequence does not cost the others their entries. Other failures
    (Redis, disk) are not retried: they would fail again, once per item.
    """
    try:
        results: list[PutResult] = list(cache.put_many(items))
    except ValueError as exc:
        if len(items) == 1:
            stats.put_failed(exc)
            log.warning("teacher cache: put refused (%s); forwarding the scores uncached", exc)
            return
        results = []
        for item in items:
            try:
                results += cache.put_many([item])
            except Exception as one_exc:
                stats.put_failed(one_exc)
                log.warning("teacher cache: put of one sequence (%d tokens) failed (%s: %s); forwarding it uncached",
                            len(item[0]), type(one_exc).__name__, one_exc)
    except Exception as exc:
        stats.put_failed(exc)
        if write_error_reason(exc) != DISK_FULL:  # a full disk: the writer says so itself, once (cache.writer)
            log.warning("teacher cache: put of %d sequences failed (%s: %s); forwarding the scores uncached",
                        len(items), type(exc).__name__, exc)
        return
    for r in results:
        stats.bytes_written += r.bytes_written
        stats.blocks_written += r.blocks_written
        stats.tokens_written += r.tokens_written


def score_with_cache(scorer: TeacherScorer, cache: TeacherCache | None, seqs: list[np.ndarray], *, k: int,
                     topk_dtype: np.dtype) -> tuple[list[FullScores], CacheBatchStats]:
    """Scores for every position of each sequence: from the cache where it has them, else computed.

    One `lookup_many` for the batch, one scorer call for every sequence not fully cached (each
    scored from its hit's `prefix_len`, position 0 never), and one `put_many` storing the newly
    computed blocks (`from_pos` = the hit's `prefix_len`).
    """
    stats = CacheBatchStats()
    hits = _lookup(cache, seqs, stats) if cache is not None else [None] * len(seqs)
    starts = [max(1, h.prefix_len) if h is not None else 1 for h in hits]
    todo = [i for i, s in enumerate(seqs) if starts[i] < len(s)]
    computed: dict[int, Scores] = {}
    if todo:
        out = scorer.score([seqs[i] for i in todo], [starts[i] for i in todo], k)
        computed = dict(zip(todo, out, strict=True))
    full: list[FullScores] = []
    to_store: list[PutItem] = []
    for i, seq in enumerate(seqs):
        T = len(seq)
        lp = np.full(T, np.nan, dtype=np.float32)
        ids = np.zeros((T, k), dtype=np.int32)
        tlp = np.zeros((T, k), dtype=topk_dtype)
        h, start = hits[i], starts[i]
        if h is not None and h.prefix_len > 0:
            n = h.prefix_len
            lp[:n], ids[:n], tlp[:n] = h.logprobs_N, h.topk_ids_NK, h.topk_logprobs_NK
        if i in computed:
            c = computed[i]
            lp[start:], ids[start:], tlp[start:] = c.logprobs_R, c.topk_ids_RK, c.topk_logprobs_RK
            if cache is not None:
                to_store.append((seq, lp, ids, tlp, h.prefix_len if h is not None else 0))
        cached_upto = min(h.prefix_len, T) if h is not None else 0
        full.append(FullScores(lp, ids, tlp, cached_upto))
    if cache is not None and to_store:
        _put(cache, to_store, stats)
    return full, stats
