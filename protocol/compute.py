"""Compute a run spends, in FLOPs, from token and parameter counts: one formula, shared by every role.

WHY token x parameter counts and not measured time: the truncation experiment compares schedules at an
equal compute budget, and wall-clock on a shared machine is noise; the FLOPs of a dense decoder are
`2 N` per token for a forward pass and `6 N` for forward + backward (N = its parameter count), which
every role can count exactly from the tokens it processed. Each role adds its part to the run stats
(`protocol/ledger.py` `add_stats`), where they outlive the processes; the learner's `learner.max_flops`
and the experiment read the sum.

    generation  2 * N_student * (prompt tokens + generated tokens)   per rollout, probes included
                                                                     (prefill + KV-cached decode)
    teacher     2 * N_teacher * tokens forwarded                     prompt + response of every sequence the
                                                                     scorer ran; a full cache hit forwards
                                                                     nothing (a partial hit still runs all)
    learner     6 * N_student * tokens trained                       prompt + response of every trained
                                                                     sample (forward + backward; the loss's
                                                                     log pi comes from that same forward)
    total       generation + teacher + learner

N counts every parameter (embeddings included, as `num_parameters()` reports). Not counted: attention's
context-dependent term (`~2 * layers * context * hidden` per token, which truncation also shrinks),
padding, probes measured by the learner (no forward pass), held-out evaluation (outside the budget by
design), and the compute of a batch that failed and was redone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Run-stat keys (`<ns>:stats` hash): the FLOPs of each part, and the token counters they are computed from.
FLOPS_GENERATION, FLOPS_TEACHER, FLOPS_LEARNER = "flops_generation", "flops_teacher", "flops_learner"
PROMPT_TOKENS, GENERATED_TOKENS = "actor_prompt_tokens", "actor_tokens_generated"
FORWARDED_TOKENS = "teacher_tokens_forwarded"
FLOPS_SAVED_CACHE = "flops_saved_cache"  # teacher forwards that full cache hits avoided (cache/teacher.py)
TRAINED_TOKENS, TRAINED_RESPONSE_TOKENS, LEARNER_STEPS = "learner_tokens", "learner_response_tokens", "learner_steps"


def forward_flops(params: int, tokens: int) -> float:
    """FLOPs of a forward pass over `tokens` tokens of a `params`-parameter decoder: 2 N per token."""
    return 2.0 * params * tokens


def train_flops(params: int, tokens: int) -> float:
    """FLOPs of a forward + backward pass over `tokens` tokens: 6 N per token (the backward costs twice the forward)."""
    return 6.0 * params * tokens


@dataclass(frozen=True)
class ComputeTally:
    """FLOPs spent so far, by part (see the module docstring)."""

    generation: float = 0.0
    teacher: float = 0.0
    learner: float = 0.0

    @property
    def total(self) -> float:
        return self.generation + self.teacher + self.learner

    @classmethod
    def from_stats(cls, stats: Mapping[str, float], *, charge_cache: bool = False) -> ComputeTally:
        """The tally in a run's stats (`protocol/ledger.py` `stats`); absent keys count 0.

        `charge_cache`: count the teacher forwards that full cache hits avoided as spent, so that every
        teacher-scored token costs `2 N_teacher` whether the cache served it or not. WHY an option: a run's
        real spend leaves them out (the cache did save them), but a comparison at equal compute must not hand
        rows whose rollouts repeat (short horizons on a deterministic task) teacher scoring for free.
        """
        teacher = float(stats.get(FLOPS_TEACHER, 0.0))
        if charge_cache:
            teacher += float(stats.get(FLOPS_SAVED_CACHE, 0.0))
        return cls(generation=float(stats.get(FLOPS_GENERATION, 0.0)), teacher=teacher,
                   learner=float(stats.get(FLOPS_LEARNER, 0.0)))

    def as_dict(self) -> dict[str, float]:
        return {"generation": self.generation, "teacher": self.teacher, "learner": self.learner, "total": self.total}

    def __add__(self, other: ComputeTally) -> ComputeTally:
        return ComputeTally(self.generation + other.generation, self.teacher + other.teacher,
                            self.learner + other.learner)


def format_flops(flops: float) -> str:
    """`1.23e13` as `12.3 TFLOP`: a human-sized unit."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"
