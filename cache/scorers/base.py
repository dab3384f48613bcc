"""The teacher-scorer interface every teacher backend implements (see docs/architecture.md).

WHY a Protocol: the teacher loop and `opd cache warm` must not care whether scores come from an
in-process transformers model (`cache/scorers/hf.py`, CPU tests) or a remote SGLang server
(`cache/scorers/sglang.py`, GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Scores:
    """Teacher view of the response part (positions starts..T-1) of one sequence."""

    logprobs_R: np.ndarray  # float32[R] teacher logprob of each given response token
    topk_ids_RK: np.ndarray  # int32[R, K]
    topk_logprobs_RK: np.ndarray  # float32[R, K], sorted descending along K


class TeacherScorer(Protocol):
    """What a teacher worker needs from a scoring backend."""

    identity: str  # model + revision + tokenizer + dtype + temperature (the cache adds k)
    tokens_forwarded: int  # tokens run through the model so far (what the cache saves is measured on it)

    def score(self, sequences: list[np.ndarray], starts: list[int], k: int) -> list[Scores]: ...

    def num_parameters(self) -> int: ...


def empty_scores(k: int) -> Scores:
    """Scores for a zero-length response (shapes (0,), (0, k), (0, k))."""
    return Scores(
        logprobs_R=np.zeros((0,), dtype=np.float32),
        topk_ids_RK=np.zeros((0, k), dtype=np.int32),
        topk_logprobs_RK=np.zeros((0, k), dtype=np.float32),
    )
