"""Teacher scorers: where a teacher's logprobs come from (embedded transformers or an SGLang server)."""

from cache.scorers.base import Scores, TeacherScorer, empty_scores

__all__ = ["Scores", "TeacherScorer", "empty_scores"]
