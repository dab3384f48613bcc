"""Teacher scorers: where a teacher's logprobs come from. One file per scorer (`hf`, `sglang`), the union here.

Each scorer file holds the scorer (a `TeacherScorer`, `base.py`) and its config variant: `kind:
Literal[...]`, its own options, `needs_model_dir` (whether teacher.model_dir is the model it runs),
`server_url` (the server it talks to, or None), `check_temperature(temperature)` (refuses, at config load,
a teacher.temperature it cannot score at) and `build(model_dir, revision=, temperature=)`. `ScorerConfig`
below is what `teacher.engine` holds, a union discriminated by `kind`; the teacher loop and `opd cache warm`
call `build()` (`cache/teacher.py`, `make_scorer`) and never branch on the name. Adding a scorer is one new
file plus one member of `ScorerConfig` (docs/architecture.md, "Adding a component").

Only the config variants are imported here: torch, transformers and requests load when a scorer is built.
"""

from __future__ import annotations

from cache.scorers.base import Scores, TeacherScorer, empty_scores
from cache.scorers.hf import HFScorerConfig
from cache.scorers.sglang import SGLangScorerConfig
from protocol.components import component_union

ScorerConfig = component_union(HFScorerConfig, SGLangScorerConfig, default=HFScorerConfig)
"""`teacher.engine`: one variant per teacher scorer, chosen by `kind`; a bare name (`--set ...engine=sglang`) is
that scorer, options without a kind belong to the default (`hf`)."""

# Keys that sat flat in `teacher` before scorers were components: `teacher.<old>` is `teacher.engine.<new>`.
FLAT_KEYS = {"sglang_url": "url", "device": "device"}

__all__ = [
    "FLAT_KEYS",
    "HFScorerConfig",
    "SGLangScorerConfig",
    "ScorerConfig",
    "Scores",
    "TeacherScorer",
    "empty_scores",
]
