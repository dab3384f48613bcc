"""Rollout engines: where an actor's tokens come from. One file per engine (`hf`, `sglang`), the union here.

Each engine file holds the engine (a `RolloutEngine`, `base.py`) and its config variant: `kind:
Literal[...]`, its own options, `server_url` (the server it talks to, or None), `check_sampling(temperature,
top_p)` (refuses, at config load, a sampling setting whose behaviour logprobs it cannot report exactly)
and `build(model_dir)`. `EngineConfig` below is what `actor.engine` holds, a union discriminated by `kind`;
the actor calls `cfg.engine.build(cfg.model_dir)` and asks the built engine how to treat its failures
(`is_transient`, `max_failures`), never the engine's name. Adding an engine is one new file plus one
member of `EngineConfig` (docs/architecture.md, "Adding a component").

Only the config variants are imported here: torch, transformers and requests load when an engine is built.
"""

from __future__ import annotations

from actors.engines.base import Generation, RolloutEngine
from actors.engines.hf import HFEngineConfig
from actors.engines.sglang import SGLangEngineConfig
from protocol.components import component_union

EngineConfig = component_union(HFEngineConfig, SGLangEngineConfig, default=HFEngineConfig)
"""`actor.engine`: one variant per rollout engine, chosen by `kind`; a bare name (`--set ...engine=sglang`) is
that engine, options without a kind belong to the default (`hf`)."""

# Keys that sat flat in `actor` before engines were components: `actor.<old>` is `actor.engine.<new>`.
FLAT_KEYS = {"sglang_url": "url", "sglang_timeout_s": "timeout_s", "max_engine_failures": "max_failures",
             "device": "device"}

__all__ = [
    "FLAT_KEYS",
    "EngineConfig",
    "Generation",
    "HFEngineConfig",
    "RolloutEngine",
    "SGLangEngineConfig",
]
