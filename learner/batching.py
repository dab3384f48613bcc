"""Turning scored prefixes into padded training tensors.

Layout of one row (``P`` prompt tokens, ``R`` response tokens, right padding to ``T``)::

    position      0 .. P-1        P .. P+R-1           P+R .. T-1
    input_ids     prompt          response             pad_id
    attention     1               1                    0
    response_mask 0               1                    0
    per-token     0               response arrays      0 (topk_ids 0)

Alignment convention (used by every loss in ``learner/losses/``): everything at index ``t`` refers to
*token* ``t``. HF logits at position ``t`` predict token ``t + 1``, so response token ``j`` (position
``P + j``) gets its log-prob from the logits at ``P + j - 1``; ``gather_response_logprobs`` does that
shift and returns log p(input_ids[t] | input_ids[<t]) at index ``t`` (0 at t = 0). The teacher's top-k
for response token ``j`` is likewise stored at position ``P + j``; to feed the top-k losses with HF
logits pass ``logits_BTV[:, :-1]`` with ``topk_*[:, 1:]`` and ``response_mask_BT[:, 1:]``.

Right padding is safe for causal LMs: real tokens never attend to later pad tokens, so positions and
logits of real tokens are those of the unpadded sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from protocol.sampling import check_sampling_params, token_logprobs

# A log-prob a hair above 0 is float16/bfloat16 rounding; more than this is a corrupt record.
LOGPROB_TOLERANCE: float = 1e-3


class ScoredRecord(Protocol):
    """What a sample is built from: ``protocol.messages.ScoredPrefix``'s fields (duck-typed, so the loss probe's
    records and a test's namespace serve too)."""

    prompt_ids_P: np.ndarray
    response_ids_R: np.ndarray
    behaviour_logprobs_R: np.ndarray
    teacher_logprobs_R: np.ndarray
    topk_ids_RK: np.ndarray
    topk_logprobs_RK: np.ndarray
    policy_version: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class Sample:
    """One scored prefix, as the learner needs it (a ``ScoredPrefix`` minus bookkeeping)."""

    prompt_ids: np.ndarray  # int[P], P >= 1
    response_ids: np.ndarray  # int[R]; R = 0 is allowed (the protocol allows it) and trains on nothing
    behaviour_logprobs: np.ndarray  # float[R], log mu(y_j) at sampling time
    teacher_logprobs: np.ndarray  # float[R], log p_T(y_j)
    topk_ids: np.ndarray  # int[R, K], teacher's top-k token ids for response token j
    topk_logprobs: np.ndarray  # float32|float16[R, K], their teacher log-probs
    policy_version: int
    temperature: float = 1.0  # the sampling transform mu used (protocol/sampling.py); log pi is recomputed
    top_p: float = 1.0  # under the same one, so the importance ratio compares like with like

    @classmethod
    def from_record(cls, record: ScoredRecord) -> Sample:
        """Build from any object with ``ScoredPrefix``'s field names (a ``ScoredPrefix``, or a record of the experiment's
        loss probe); one that lacks a field is refused with a ValueError naming it."""
        try:
            return cls(
                prompt_ids=record.prompt_ids_P,
                response_ids=record.response_ids_R,
                behaviour_logprobs=record.behaviour_logprobs_R,
                teacher_logprobs=record.teacher_logprobs_R,
                topk_ids=record.topk_ids_RK,
                topk_logprobs=record.topk_logprobs_RK,
                policy_version=int(record.policy_version),
                temperature=float(record.temperature),
                top_p=float(record.top_p),
            )
        except AttributeError as exc:
            raise ValueError(f"record {type(record).__name__} lacks a scored-prefix field: {exc}") from exc


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors for a list of ``Sample``s (CPU until ``.to(device)``)."""

    input_ids_BT: torch.Tensor  # int64
    attention_mask_BT: torch.Tensor  # int64, 1 on prompt + response
    response_mask_BT: torch.Tensor  # bool, True on response tokens (the tokens to train on)
    behaviour_logprobs_BT: torch.Tensor  # float32, 0 off-response
    teacher_logprobs_BT: torch.Tensor  # float32, 0 off-response
    topk_ids_BTK: torch.Tensor  # int64, 0 off-response
    topk_logprobs_BTK: torch.Tensor  # float32, 0 off-response
    policy_versions_B: torch.Tensor  # int64
    temperature_B: torch.Tensor  # float32, each row's sampling temperature
    top_p_B: torch.Tensor  # float32, each row's sampling top-p
    prompt_lengths_B: torch.Tensor  # int64
    response_lengths_B: torch.Tensor  # int64

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return Batch(**moved)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    @property
    def padding_fraction(self) -> float:
        """Fraction of the B*T grid that is padding (compute spent on nothing)."""
        total = self.attention_mask_BT.numel()
        return 0.0 if total == 0 else 1.0 - float(self.attention_mask_BT.sum()) / total


# ---------------------------------------------------------------------------------------------------
# microbatch packing


def _require_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    checked = []
    for i, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or int(length) < 0:
            raise ValueError(f"lengths[{i}] must be an int >= 0, got {length!r}")
        checked.append(int(length))
    return checked


def pack_by_tokens(lengths: Sequence[int], max_tokens_per_microbatch: int) -> list[list[int]]:
    """Group sequence indices into microbatches whose *padded* size fits the token budget.

    Cost of a microbatch = ``len(mb) * max(lengths in mb)``, because ``collate`` right-pads every row to the
    longest one: that, not the sum of lengths, is what the forward pass and activations cost.
    First-fit-decreasing: visit items longest first (ties by index) and put each in the first microbatch it
    fits in. Visiting longest first keeps similar lengths together (little padding), and the first
    microbatch is the largest, so an out-of-memory shows up on the first one, not midway through a step.

    Never drops an item; one longer than the budget gets a microbatch of its own. Indices inside a
    microbatch are ascending; microbatches are in creation order (longest first).
    """
    budget = _require_positive_int("max_tokens_per_microbatch", max_tokens_per_microbatch)
    checked = _check_lengths(lengths)
    order = sorted(range(len(checked)), key=lambda i: (-checked[i], i))
    bins: list[list[int]] = []
    bin_max: list[int] = []  # longest item of each bin = its first item, since we go longest first
    for index in order:
        length = checked[index]
        for b, members in enumerate(bins):
            if (len(members) + 1) * max(bin_max[b], length) <= budget:
                members.append(index)
                break
        else:
            bins.append([index])
            bin_max.append(length)
    return [sorted(members) for members in bins]


def padding_fraction(lengths: Sequence[int]) -> float:
    """Fraction of a right-padded ``len(lengths) x max(lengths)`` grid that is padding (0 if empty)."""
    checked = _check_lengths(lengths)
    if not checked or max(checked) == 0:
        return 0.0
    return 1.0 - sum(checked) / (len(checked) * max(checked))


# ---------------------------------------------------------------------------------------------------
# collation


def _as_array(where: str, value: object, ndim: int, kind: str) -> np.ndarray:
    """Check an array's rank and dtype kind ('i' integer, 'f' float) and return it as an ndarray."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{where} must be a numpy array, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{where} must have {ndim} dims, got shape {value.shape}")
    if kind == "i" and value.dtype.kind not in "iu":
        raise ValueError(f"{where} must have an integer dtype, got {value.dtype}")
    if kind == "f" and value.dtype.kind != "f":
        raise ValueError(f"{where} must have a float dtype, got {value.dtype}")
    return value


def _validate_sample(i: int, sample: Sample) -> tuple[int, int, int]:
    """Check one sample's arrays; returns (P, R, K)."""
    name = f"samples[{i}]"
    if not isinstance(sample, Sample):
        raise ValueError(f"{name} must be a learner.batching.Sample, got {type(sample).__name__}")
    prompt = _as_array(f"{name}.prompt_ids", sample.prompt_ids, 1, "i")
    response = _as_array(f"{name}.response_ids", sample.response_ids, 1, "i")
    P, R = len(prompt), len(response)
    if P < 1:
        raise ValueError(f"{name}.prompt_ids is empty: the first response token needs a preceding token")
    for field_name, ids in (("prompt_ids", prompt), ("response_ids", response)):
        if ids.size and ids.min() < 0:
            raise ValueError(f"{name}.{field_name} has negative token ids")
    for field_name in ("behaviour_logprobs", "teacher_logprobs"):
        values = _as_array(f"{name}.{field_name}", getattr(sample, field_name), 1, "f")
        if values.shape != (R,):
            raise ValueError(f"{name}.{field_name} has shape {values.shape}, expected ({R},) like response_ids")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name}.{field_name} has non-finite values")
        if np.any(values > LOGPROB_TOLERANCE):
            raise ValueError(f"{name}.{field_name} has log-probs > 0 (max {values.max()})")
    topk_ids = _as_array(f"{name}.topk_ids", sample.topk_ids, 2, "i")
    topk_logprobs = _as_array(f"{name}.topk_logprobs", sample.topk_logprobs, 2, "f")
    if topk_ids.shape[0] != R:
        raise ValueError(f"{name}.topk_ids has shape {topk_ids.shape}, expected ({R}, K)")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"{name}.topk_logprobs has shape {topk_logprobs.shape}, expected {topk_ids.shape}")
    if topk_ids.size and topk_ids.min() < 0:
        raise ValueError(f"{name}.topk_ids has negative token ids")
    if np.isnan(topk_logprobs).any():
        raise ValueError(f"{name}.topk_logprobs has NaN values")
    if topk_logprobs.size and np.any(topk_logprobs > LOGPROB_TOLERANCE):
        raise ValueError(f"{name}.topk_logprobs has log-probs > 0 (max {topk_logprobs.max()})")
    version = sample.policy_version
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or int(version) < 0:
        raise ValueError(f"{name}.policy_version must be an int >= 0, got {version!r}")
    check_sampling_params(sample.temperature, sample.top_p, where=name)
    return P, R, topk_ids.shape[1]


def pad_id_of(tokenizer) -> int:  # type: ignore[no-untyped-def]
    """The id that fills a batch's padding: the tokenizer's pad, else its EOS, else 0 (padding is masked out of
    every loss and logprob, so any in-vocabulary id serves; the learner and `opd doctor` use the same)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(samples: Sequence[Sample], pad_id: int, *, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad ``prompt_ids + response_ids`` rows and align the per-token arrays to response positions.

    ``T = max(P + R)`` rounded up to ``pad_to_multiple_of`` (tensor-core friendly shapes on GPU).
    All samples must share the same top-k width K.
    """
    if len(samples) == 0:
        raise ValueError("samples is empty: cannot collate a batch of 0 sequences")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int | np.integer) or int(pad_id) < 0:
        raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
    multiple = _require_positive_int("pad_to_multiple_of", pad_to_multiple_of)
    shapes = [_validate_sample(i, sample) for i, sample in enumerate(samples)]
    widths = {K for _, _, K in shapes}
    if len(widths) != 1:
        raise ValueError(f"samples disagree on the top-k width K: {sorted(widths)}")
    (K,) = widths
    B = len(samples)
    T = max(P + R for P, R, _ in shapes)
    T = int(math.ceil(T / multiple) * multiple)

    input_ids = np.full((B, T), int(pad_id), dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    response_mask = np.zeros((B, T), dtype=np.bool_)
    behaviour = np.zeros((B, T), dtype=np.float32)
    teacher = np.zeros((B, T), dtype=np.float32)
    topk_ids = np.zeros((B, T, K), dtype=np.int64)
    topk_logprobs = np.zeros((B, T, K), dtype=np.float32)
    for b, (sample, (P, R, _)) in enumerate(zip(samples, shapes, strict=True)):
        response = slice(P, P + R)  # response token j lives at position P + j
        input_ids[b, :P] = sample.prompt_ids
        input_ids[b, response] = sample.response_ids
        attention_mask[b, : P + R] = 1
        response_mask[b, response] = True
        behaviour[b, response] = sample.behaviour_logprobs
        teacher[b, response] = sample.teacher_logprobs
        topk_ids[b, response] = sample.topk_ids
        topk_logprobs[b, response] = sample.topk_logprobs
    return Batch(
        input_ids_BT=torch.from_numpy(input_ids),
        attention_mask_BT=torch.from_numpy(attention_mask),
        response_mask_BT=torch.from_numpy(response_mask),
        behaviour_logprobs_BT=torch.from_numpy(behaviour),
        teacher_logprobs_BT=torch.from_numpy(teacher),
        topk_ids_BTK=torch.from_numpy(topk_ids),
        topk_logprobs_BTK=torch.from_numpy(topk_logprobs),
        policy_versions_B=torch.tensor([int(s.policy_version) for s in samples], dtype=torch.int64),
        temperature_B=torch.tensor([float(s.temperature) for s in samples], dtype=torch.float32),
        top_p_B=torch.tensor([float(s.top_p) for s in samples], dtype=torch.float32),
        prompt_lengths_B=torch.tensor([P for P, _, _ in shapes], dtype=torch.int64),
        response_lengths_B=torch.tensor([R for _, R, _ in shapes], dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------------
# log-probs of the given tokens


def gather_response_logprobs(
    logits_BTV: torch.Tensor,
    input_ids_BT: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor = 1.0,
    mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logprobs_BT[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])``, with ``logprobs_BT[:, 0] = 0``.

    ``pi`` is the distribution the actor sampled from: ``protocol.sampling.token_logprobs`` at each row's
    ``temperature`` and ``top_p`` (scalars, or ``[B]`` tensors such as ``Batch.temperature_B`` /
    ``Batch.top_p_B``: rows of one batch may have been sampled with different settings). Only then does
    the importance ratio ``exp(log pi - behaviour)`` compare the same distribution (1 on policy).

    Shifts HF logits (position ``t`` predicts token ``t + 1``) so the result is aligned per token like the
    rest of the batch; computed in at least float32 (bf16 log-softmax loses the precision the IS ratio
    needs). ``mask_BT`` (e.g. ``Batch.response_mask_BT``) restricts the work to the positions it marks
    (others are 0): the top-p nucleus needs a sort over the vocabulary per position, which prompt and
    padding positions do not need. Without a mask every position is computed; values at padding
    positions are finite but meaningless, mask them.
    """
    if not isinstance(logits_BTV, torch.Tensor) or logits_BTV.dim() != 3:
        raise ValueError(f"logits_BTV must be a 3-D tensor, got {getattr(logits_BTV, 'shape', type(logits_BTV))}")
    if not logits_BTV.is_floating_point():
        raise ValueError(f"logits_BTV must be floating point, got {logits_BTV.dtype}")
    B, T, V = logits_BTV.shape
    if not isinstance(input_ids_BT, torch.Tensor) or tuple(input_ids_BT.shape) != (B, T):
        raise ValueError(f"input_ids_BT must have shape {(B, T)}, got {getattr(input_ids_BT, 'shape', None)}")
    if input_ids_BT.is_floating_point() or input_ids_BT.dtype == torch.bool:
        raise ValueError(f"input_ids_BT must be an integer tensor, got {input_ids_BT.dtype}")
    temperature_B = _per_row_param("temperature", temperature, B, low=0.0, high=math.inf, logits=logits_BTV)
    top_p_B = _per_row_param("top_p", top_p, B, low=0.0, high=1.0, logits=logits_BTV)
    if input_ids_BT.numel() and bool(((input_ids_BT < 0) | (input_ids_BT >= V)).any()):
        raise ValueError(f"input_ids_BT has token ids outside [0, {V})")
    if mask_BT is not None and tuple(mask_BT.shape) != (B, T):
        raise ValueError(f"mask_BT must have shape {(B, T)}, got {tuple(mask_BT.shape)}")

    dtype = torch.promote_types(logits_BTV.dtype, torch.float32)
    wanted_BT = torch.ones((B, T), dtype=torch.bool, device=logits_BTV.device) if mask_BT is None else mask_BT != 0
    rows_N, cols_N = wanted_BT[:, 1:].nonzero(as_tuple=True)  # token t = cols + 1, predicted at position cols
    logprobs_N = token_logprobs(
        logits_BTV[rows_N, cols_N], input_ids_BT[rows_N, cols_N + 1], temperature_B[rows_N], top_p_B[rows_N]
    )
    logprobs_BT = torch.zeros((B, T), dtype=dtype, device=logits_BTV.device)
    return logprobs_BT.index_put((rows_N, cols_N + 1), logprobs_N.to(dtype))


def policy_logprobs(batch: Batch, logits_BTV: torch.Tensor) -> torch.Tensor:
    """The learner's side of the importance ratio: ``log pi`` of every response token of ``batch``.

    Each row under the sampling transform its actor used (``batch.temperature_B`` / ``top_p_B``), only at
    response positions (0 elsewhere); differentiable. ``exp(policy_logprobs - behaviour_logprobs_BT)`` is
    1 on policy whatever the sampling settings.
    """
    return gather_response_logprobs(
        logits_BTV, batch.input_ids_BT, temperature=batch.temperature_B, top_p=batch.top_p_B,
        mask_BT=batch.response_mask_BT,
    )


def _per_row_param(
    name: str, value: float | torch.Tensor, B: int, *, low: float, high: float, logits: torch.Tensor
) -> torch.Tensor:
    """A scalar or ``[B]`` sampling parameter as a ``[B]`` tensor on ``logits``' device; ``low < x <= high``."""
    if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
        raise ValueError(f"{name} must be a number or a [B] tensor, got {value!r}")
    if isinstance(value, torch.Tensor):
        values_B = value.to(logits.device)
    else:
        values_B = torch.tensor(float(value), dtype=torch.float64, device=logits.device)
    if values_B.dim() == 0:
        values_B = values_B.expand(B)
    if tuple(values_B.shape) != (B,) or not values_B.is_floating_point():
        raise ValueError(f"{name} must be a number or a float tensor of shape ({B},), got {value!r}")
    if not bool(((values_B > low) & (values_B <= high)).all()):
        raise ValueError(f"{name} must be in ({low}, {high}], got {value!r}")
    return values_B
