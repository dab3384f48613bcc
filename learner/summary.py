"""What one learner run did, counted by the phases that do it (intake, resume, the loop) and returned by it.

Why its own module: the phases (``learner/intake.py``, ``learner/resume.py``) add to it and ``learner/loop.py``
returns it; defined in the loop, the phases had to import the loop back (an import cycle). A phase takes
the state it needs; it never imports the loop (docs/architecture.md, STYLE.md item 13).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LearnerSummary:
    steps: int = 0
    trained: int = 0
    replayed_steps: int = 0
    duplicates: int = 0
    probes: int = 0  # full-length probe rollouts measured, never trained on
    dropped: dict[str, int] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
