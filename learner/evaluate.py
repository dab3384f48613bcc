"""Held-out evaluation: full-length reverse KL(student || teacher) on the student's own samples.

Why full-distribution KL and full length: training sees truncated prefixes scored on one sampled
token each; the question a user asks is whether the student got closer to the teacher on complete
responses. So we sample full-length responses from the student (same prompts and seed every time,
to keep the comparison paired) and average the exact per-token KL over the vocabulary.

Why "the vocabulary" is the shared tokenizer's: checkpoints pad their embedding matrices to
different widths (Qwen2.5 0.5B: 151936 rows, 7B: 152064, one 151665-token tokenizer), so the two
models' logits are sliced to the tokenizer's ids before sampling and before the KL
(`protocol/vocab.py`). Held-out prompts are encoded exactly as the actors encode training prompts
(`protocol/prompts.py`, with the actor's `use_chat_template` / `add_bos`, which the composed config
copies into `learner.eval`).

Optionally (`learner.eval.accuracy_prompts` > 0) also greedy exact match against reference answers in the
held-out file (`response` or `continuation`, as `opd cache warm` reads them): a prompt counts as answered
when the student's greedy completion, stopped at EOS, is the reference text exactly and did end with EOS.
Why this generic rule and no task checker: roles do not import task code (opd/), and the rule needs none.
For a deterministic task whose reference is the one correct output (the experiment task's halving trace)
it is the task's correctness, slightly stricter than its checker (which reads only the trace's last
line). Why EOS counts: a student trained on truncated prefixes must still finish its answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from learner.config import LearnerConfig
from protocol.files import check_model_dir
from protocol.prompts import PromptFormat, encode_prompt, load_prompts, load_references
from protocol.stops import stop_token_ids
from protocol.vocab import check_model_covers, compare_tokenizers, load_tokenizer, shared_vocab_size


@dataclass
class AccuracyResult:
    """Greedy exact match on held-out prompts with reference answers."""

    correct: int
    total: int
    finished: int  # greedy answers that ended with EOS (right or wrong)
    mean_tokens: float  # greedy answer length in tokens, EOS included

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


@dataclass
class EvalResult:
    reverse_kl: float  # nats per response token
    tokens: int
    mean_response_len: float
    accuracy: AccuracyResult | None = None  # only when learner.eval.accuracy_prompts > 0
    kl_by_position: list[float] | None = None  # per bucket of response positions (`position_edges`), nats/token
    tokens_by_position: list[int] | None = None
    kl_sum_by_prompt: list[float] | None = None  # summed KL of each prompt's response, in the prompts' order
    tokens_by_prompt: list[int] | None = None  # (a bootstrap over prompts resamples these pairs)

    def row(self) -> dict[str, float | int]:
        """The measurements as one eval.jsonl row (the accuracy's keys only when it was measured)."""
        row: dict[str, float | int] = {"reverse_kl": self.reverse_kl, "tokens": self.tokens,
                                       "mean_response_len": self.mean_response_len}
        if (acc := self.accuracy) is not None:
            row.update(accuracy=acc.accuracy, correct=acc.correct, accuracy_prompts=acc.total,
                       finished=acc.finished / max(acc.total, 1), mean_greedy_tokens=acc.mean_tokens)
        return row


def load_heldout(path: str, tokenizer: Any, limit: int, fmt: PromptFormat | None = None) -> list[list[int]]:
    """Held-out prompts as token ids, encoded as training prompts are (same JSONL format and encoder)."""
    return load_prompts(path, tokenizer, fmt or PromptFormat(), limit=limit)


class HeldoutEvaluator:
    """Held-out reverse KL against a teacher loaded once (only when evaluation is configured).

    Checked at construction, before any evaluation runs: the teacher directory is readable, its
    tokenizer is the student's, and its logits cover every id of that tokenizer.
    """

    def __init__(self, cfg: LearnerConfig, tokenizer: Any, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        teacher_dir = cfg.eval.teacher_dir
        check_model_dir(teacher_dir, "learner.eval.teacher_dir")
        try:
            compare_tokenizers(tokenizer, load_tokenizer(teacher_dir), ("learner.model_dir", "learner.eval.teacher_dir"))
        except ValueError as exc:
            raise ValueError(f"learner.eval.teacher_dir ({teacher_dir}) must share the student's tokenizer: {exc}") from None
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32,
                                                            use_safetensors=True).to(device)
        self.teacher.eval()
        check_model_covers(int(self.teacher.config.vocab_size), tokenizer, f"learner.eval.teacher_dir ({teacher_dir})")
        self.vocab_size = shared_vocab_size(tokenizer)
        fmt = PromptFormat(use_chat_template=cfg.eval.use_chat_template, add_bos=cfg.eval.add_bos)
        self.prompts = load_heldout(cfg.eval.heldout_file, tokenizer, cfg.eval.num_prompts, fmt)
        self.pad_id = next(int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.eos_id: list[int] | None = stop_token_ids(cfg.model_dir, tokenizer) or None  # where the actor stops
        self.tokenizer = tokenizer
        self.accuracy_prompts: list[list[int]] = []
        self.references: list[str] = []
        if cfg.eval.accuracy_prompts:
            self._load_references(fmt)

    def _load_references(self, fmt: PromptFormat) -> None:
        """Prompts and reference answers for exact match; refused when no answer could ever match."""
        if not self.eos_id:
            raise ValueError("learner.eval.accuracy_prompts needs a tokenizer with an EOS token (an exact answer "
                             "must end with EOS); this one defines none")
        budget = self.cfg.eval.max_new_tokens
        for ref in load_references(self.cfg.eval.heldout_file, limit=self.cfg.eval.accuracy_prompts):
            needed = len(self.tokenizer.encode(ref.reference, add_special_tokens=False)) + 1
            if needed > budget:
                raise ValueError(f"learner.eval.max_new_tokens ({budget}) is shorter than the reference answer at "
                                 f"{ref.where} ({needed} tokens with EOS): no greedy answer could match it")
            self.accuracy_prompts.append(encode_prompt(self.tokenizer, ref.prompt, fmt))
            self.references.append(ref.reference)

    @classmethod
    def maybe(cls, cfg: LearnerConfig, tokenizer: Any, device: torch.device) -> HeldoutEvaluator | None:
        if not cfg.eval.heldout_file:
            return None
        if not cfg.eval.teacher_dir:
            raise ValueError("learner.eval.teacher_dir is required when learner.eval.heldout_file is set")
        return cls(cfg, tokenizer, device)

    def run(self, model: torch.nn.Module) -> EvalResult:
        result = heldout_reverse_kl(model, self.teacher, self.prompts, max_new_tokens=self.cfg.eval.max_new_tokens,
                                    pad_id=self.pad_id, eos_id=self.eos_id, seed=self.cfg.seed + 1234,
                                    vocab_size=self.vocab_size)
        if self.accuracy_prompts:
            assert self.eos_id
            result.accuracy = greedy_exact_match(
                model, self.tokenizer, self.accuracy_prompts, self.references,
                max_new_tokens=self.cfg.eval.max_new_tokens, pad_id=self.pad_id, eos_id=self.eos_id,
                vocab_size=self.vocab_size)
        return result


@torch.no_grad()
def heldout_reverse_kl(
    student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
    pad_id: int, eos_id: int | Sequence[int] | None, vocab_size: int, seed: int = 1234, batch_size: int = 16,
    use_cache: bool = True,
    position_edges: tuple[int, ...] | None = None,
) -> EvalResult:
    """Mean per-token KL(student || teacher) over `[0, vocab_size)` on full-length student samples.

    `position_edges` (e.g. (0, 40, 100, 200)): also the mean KL per bucket of response positions [e_i, e_i+1)
    (the last bucket open-ended): where along the answer a student is close to its teacher, which is what a
    truncated schedule trains unevenly.
    `use_cache`: sample with the student's KV cache (one token's forward per step instead of the whole sequence:
    hundreds of tokens cost linear, not quadratic, time); False recomputes every prefix (the same samples up
    to float rounding, kept as the reference the cached path is tested against).
    """
    was_training = student.training
    student.eval()
    total_kl, total_tokens = 0.0, 0
    edges = torch.tensor(position_edges or (0,))
    kl_by_bucket, tokens_by_bucket = torch.zeros(len(edges), dtype=torch.float64), torch.zeros(len(edges))
    kl_by_prompt: list[float] = []
    tokens_by_prompt: list[int] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        ids_BT, attn_BT, resp_mask_BR, P = _sample(student, prompts[start:start + batch_size], max_new_tokens,
                                                   pad_id=pad_id, eos_id=eos_id, vocab_size=vocab_size, gen=gen,
                                                   use_cache=use_cache)
        R = resp_mask_BR.shape[1]
        # logits at position t predict token t+1: response positions are P-1 .. P+R-2
        pos_BT = _positions(attn_BT)
        s_logits_BRV = _logits(student, ids_BT, attn_BT, pos_BT, vocab_size)[:, P - 1:P - 1 + R]
        t_logits_BRV = _logits(teacher, ids_BT, attn_BT, pos_BT, vocab_size)[:, P - 1:P - 1 + R]
        s_logp, t_logp = F.log_softmax(s_logits_BRV, -1), F.log_softmax(t_logits_BRV, -1)
        kl_BR = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
        total_kl += float((kl_BR * resp_mask_BR).sum())
        total_tokens += int(resp_mask_BR.sum())
        kl_by_prompt += (kl_BR * resp_mask_BR).sum(1).double().cpu().tolist()
        tokens_by_prompt += [int(t) for t in resp_mask_BR.sum(1).cpu().tolist()]
        bucket_R = torch.bucketize(torch.arange(R), edges, right=True) - 1  # response position -> bucket
        kl_by_bucket.index_add_(0, bucket_R, (kl_BR * resp_mask_BR).sum(0).double().cpu())
        tokens_by_bucket.index_add_(0, bucket_R, resp_mask_BR.sum(0).float().cpu())
    student.train(was_training)
    result = EvalResult(reverse_kl=total_kl / max(total_tokens, 1), tokens=total_tokens,
                        mean_response_len=total_tokens / len(prompts), kl_sum_by_prompt=kl_by_prompt,
                        tokens_by_prompt=tokens_by_prompt)
    if position_edges:
        result.kl_by_position = (kl_by_bucket / tokens_by_bucket.clamp(min=1)).tolist()
        result.tokens_by_position = [int(x) for x in tokens_by_bucket]
    return result


@torch.no_grad()
def greedy_exact_match(
    student: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], references: list[str], *, max_new_tokens: int,
    pad_id: int, eos_id: int | Sequence[int], vocab_size: int, batch_size: int = 16,
) -> AccuracyResult:
    """How many greedy completions (KV-cached, stopped at EOS) are their reference answer exactly, with EOS.

    A completion matches when its ids are the reference's encoding or its decoded text is the reference text:
    the text comparison also accepts the same text written in other tokens (a BPE model need not produce the
    canonical tokenization), the ids comparison is immune to a decoder's clean-up of spaces.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} reference answers")
    was_training = student.training
    student.eval()
    correct, finished, tokens = 0, 0, 0
    stops = _stop_ids(eos_id)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids_BT, _, resp_mask_BR, P = _sample(student, chunk, max_new_tokens, pad_id=pad_id, eos_id=eos_id,
                                             vocab_size=vocab_size, gen=None)
        for row_ids, row_mask, reference in zip(ids_BT[:, P:].tolist(), resp_mask_BR.tolist(),
                                                references[start:start + batch_size], strict=True):
            response = [t for t, keep in zip(row_ids, row_mask, strict=True) if keep]
            ended = bool(response) and response[-1] in stops
            body = response[:-1] if ended else response
            tokens += len(response)
            finished += ended
            correct += ended and _matches(tokenizer, body, reference)
    student.train(was_training)
    return AccuracyResult(correct=correct, total=len(prompts), finished=finished,
                          mean_tokens=tokens / max(len(prompts), 1))


def _matches(tokenizer: Any, ids: list[int], reference: str) -> bool:
    if ids == list(tokenizer.encode(reference, add_special_tokens=False)):
        return True
    return bool(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == reference)


def _sample(
    student: torch.nn.Module, chunk: list[list[int]], max_new_tokens: int, *, pad_id: int,
    eos_id: int | Sequence[int] | None, vocab_size: int, gen: torch.Generator | None, use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Left-pad `chunk`, sample up to `max_new_tokens` from the student; (ids, attention, response mask, P).

    `gen` None: greedy (the most likely token at every step) instead of sampling. A row ends at any of the
    stop ids `eos_id` (`protocol.stops.stop_token_ids`: where the actor's engine stops too).
    """
    device = next(student.parameters()).device
    stops_E = torch.tensor(_stop_ids(eos_id), dtype=torch.long, device=device)
    P = max(len(p) for p in chunk)
    ids_BT = torch.full((len(chunk), P), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((len(chunk), P), dtype=torch.long)
    for i, p in enumerate(chunk):  # left padding, so every row continues at the same position
        ids_BT[i, P - len(p):] = torch.tensor(p)
        attn_BT[i, P - len(p):] = 1
    ids_BT, attn_BT = ids_BT.to(device), attn_BT.to(device)
    resp_mask_list = []
    done_B = torch.zeros(len(chunk), dtype=torch.bool, device=device)
    cache: Any = None
    for _ in range(max_new_tokens):
        if use_cache:  # the new token only, attending to the cached keys/values of everything before it
            from transformers import DynamicCache

            new = slice(None) if cache is None else slice(-1, None)
            cache = cache if cache is not None else DynamicCache(config=student.config)
            out = student(input_ids=ids_BT[:, new], attention_mask=attn_BT, position_ids=_positions(attn_BT)[:, new],
                          cache=cache, use_cache=True)
            logits_BV = _vocab(out.logits[:, -1], vocab_size)
        else:
            logits_BV = _logits(student, ids_BT, attn_BT, _positions(attn_BT), vocab_size)[:, -1]
        if gen is None:
            nxt_B = logits_BV.argmax(dim=-1)
        else:
            nxt_B = torch.multinomial(torch.softmax(logits_BV, dim=-1).cpu(), 1, generator=gen).to(device).squeeze(1)
        nxt_B = torch.where(done_B, torch.full_like(nxt_B, pad_id), nxt_B)
        resp_mask_list.append(~done_B)
        ids_BT = torch.cat([ids_BT, nxt_B[:, None]], dim=1)
        attn_BT = torch.cat([attn_BT, (~done_B).long()[:, None]], dim=1)
        if len(stops_E):
            done_B = done_B | torch.isin(nxt_B, stops_E)
        if done_B.all():
            break
    return ids_BT, attn_BT, torch.stack(resp_mask_list, dim=1), P


def _stop_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    return [] if eos_id is None else [int(eos_id)] if isinstance(eos_id, int) else [int(t) for t in eos_id]


def _logits(model: torch.nn.Module, ids_BT: torch.Tensor, attn_BT: torch.Tensor, pos_BT: torch.Tensor,
            vocab_size: int) -> torch.Tensor:
    """float32 logits over the shared tokenizer's ids only (a padded embedding's extra rows dropped)."""
    return _vocab(model(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT).logits, vocab_size)


def _vocab(logits_BxV: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits of the shared tokenizer's ids (a padded embedding's extra rows dropped)."""
    if logits_BxV.shape[-1] < vocab_size:
        raise ValueError(f"the model's logits have {logits_BxV.shape[-1]} entries, fewer than the tokenizer's "
                         f"{vocab_size} ids")
    return logits_BxV[..., :vocab_size].float()


def _positions(attn_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so a padded row sees the positions an unpadded one would."""
    return (attn_BT.cumsum(-1) - 1).clamp(min=0)
