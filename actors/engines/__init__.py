"""Rollout engines: where an actor's tokens come from (embedded transformers or an SGLang server)."""

from actors.engines.base import Generation, RolloutEngine

__all__ = ["Generation", "RolloutEngine"]
