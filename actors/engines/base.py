"""The rollout-engine interface every actor backend implements (see docs/architecture.md).

WHY a Protocol: the actor loop must not care whether tokens come from in-process transformers
(`actors/engines/hf.py`, CPU tests) or a remote SGLang server (`actors/engines/sglang.py`, GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Generation:
    """One sampled continuation of one prompt."""

    response_ids: list[int]  # sampled tokens, len <= max_new_tokens (includes the EOS token if sampled)
    logprobs: list[float]  # behaviour logprob of each sampled token
    finished: bool  # stopped on EOS (not on the length limit)
    # The policy version of the weights that sampled it, as a server reports them (SGLang's
    # `meta_info.weight_version`): a server shared by several actors, or restarted, may hold other weights
    # than the ones this actor last asked it to load. None: the engine samples in process, with exactly
    # the weights of its last `load_weights`, and the actor tags the rollout with that version.
    policy_version: int | None = None


class RolloutEngine(Protocol):
    """Samples continuations from the current student weights.

    The actor asks the engine, not its name, how to treat a failure: `is_transient(exc)` says whether
    retrying can help (a server-side engine's weight reload aborts requests in flight), and
    `max_failures` how many such failures in a row it retries (with back-off) before giving up.
    """

    max_failures: int

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        *,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[Generation]: ...

    def load_weights(self, path: str, version: int) -> None: ...

    def num_parameters(self) -> int: ...

    def is_transient(self, exc: Exception) -> bool: ...
