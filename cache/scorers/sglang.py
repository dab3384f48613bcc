"""Teacher scorer backed by a running SGLang server: prefill-only `/generate` with prompt logprobs.

One request scores a batch: `input_ids` (full prompt+response ids), `sampling_params.max_new_tokens
= 0`, `return_logprob: true`, `logprob_start_len` per sequence and `top_logprobs_num: k`. The answer's
`meta_info.input_token_logprobs` holds `[logprob, token_id, text_or_null]` for the positions
`logprob_start_len .. T-1`, and `meta_info.input_top_logprobs` one list of `k` such triples per
position.

What SGLang's sources say about those lists, and how we use it (`python/sglang/srt/managers/
scheduler_output_processor_mixin.py`, `_process_input_token_logprobs` / `_process_input_top_logprobs`):
the server *always* puts `None` at entry 0 ("add None at start, remove last (sampling token)"),
whatever `logprob_start_len` is, and the entry ids are `origin_input_ids[logprob_start_len:]`. So to
score positions `start .. T-1` we ask for `logprob_start_len = start - 1` and drop entry 0: entry
`j >= 1` is the logprob of token `start - 1 + j` given the tokens before it. Every id the server
echoes is checked against the id we sent, so an off-by-one on either side is an error, not a quietly
shifted training signal.

Prompt logprobs from SGLang are, by default, the model's own (`log_softmax` of the untempered
logits; slime's OPD recipes patch SGLang to change that), so this scorer only scores at temperature 1
and refuses any other (the transformers scorer in `cache/scorers/hf.py` divides by the temperature);
`SGLangScorerConfig` (this scorer's `teacher.engine` variant, `kind: sglang`) refuses it at config load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cache.scorers.base import Scores, empty_scores

# The wire contract shared with `actors/engines/sglang.py`; `SGLangError`, `GENERATE` and `MODEL_INFO`
# stay importable from here.
from protocol.sglang_http import (
    CONNECT_TIMEOUT_S,
    CONTROL_TIMEOUT_S,
    GENERATE,
    MODEL_INFO,
    SGLangClient,
    SGLangError,
    error_message,
    field_error,
    first_checkpoint_parameters,
    logprob_entry,
)

if TYPE_CHECKING:
    import requests

# --------------------------------------------------------------------------- pure mapping


def build_score_request(sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> dict[str, Any]:
    """The prefill-only `/generate` body scoring positions `starts[i] .. T_i - 1` of each sequence."""
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    if not sequences:
        raise ValueError("empty batch")
    if k < 0:
        raise ValueError(f"k = {k}: must be >= 0")
    for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start < len(seq):
            raise ValueError(f"starts[{i}] = {start}: must be in [1, {len(seq) - 1}] for a sequence of {len(seq)} tokens")
    body: dict[str, Any] = {
        "input_ids": [[int(t) for t in seq] for seq in sequences],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        # SGLang nulls entry 0 of whatever range it returns, so start one position early.
        "logprob_start_len": [int(start) - 1 for start in starts],
        "stream": False,
    }
    if k > 0:
        body["top_logprobs_num"] = int(k)
    return body


def parse_score_response(body: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[Scores]:
    """Map the answer of `build_score_request(sequences, starts, k)` onto one `Scores` per sequence.

    Raises `SGLangError` naming the field (e.g. `[0].meta_info.input_token_logprobs[2]`) for a missing
    or malformed field, a length that does not match the request, or an echoed id that is not ours.
    """
    if isinstance(body, dict):
        if "error" in body:
            raise SGLangError(GENERATE, f"server error: {error_message(body)}", body=json.dumps(body))
        body = [body]
    if not isinstance(body, list) or len(body) != len(sequences):
        got = f"{len(body)} results" if isinstance(body, list) else type(body).__name__
        raise SGLangError(GENERATE, f"{got} for {len(sequences)} sequences")
    out: list[Scores] = []
    for i, (item, seq, start) in enumerate(zip(body, sequences, starts, strict=True)):
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise field_error(f"[{i}].meta_info", "missing or not an object", item)
        reason = meta.get("finish_reason")
        if isinstance(reason, dict) and reason.get("type") == "abort":
            raise SGLangError(GENERATE, f"request [{i}] aborted: {reason.get('message')!r}", body=json.dumps(reason))
        seq = [int(t) for t in seq]
        first = start - 1  # the logprob_start_len we sent
        n = len(seq) - first  # entries SGLang returns, entry 0 being the null placeholder
        tokens = _list_of(meta, "input_token_logprobs", n, i, item)
        logprobs_R = np.empty(n - 1, dtype=np.float32)
        for j, entry in enumerate(tokens):
            where = f"[{i}].meta_info.input_token_logprobs[{j}]"
            logprob, token_id = logprob_entry(entry, where, item)
            _check_id(token_id, seq[first + j], where, item)
            if j == 0:
                if logprob is not None:
                    raise field_error(where, "expected the null placeholder at entry 0 (server semantics changed?)", item)
                continue
            if logprob is None:
                raise field_error(where, "logprob is null", item)
            logprobs_R[j - 1] = logprob
        topk_ids_RK = np.zeros((n - 1, k), dtype=np.int32)
        topk_logprobs_RK = np.zeros((n - 1, k), dtype=np.float32)
        if k > 0:
            tops = _list_of(meta, "input_top_logprobs", n, i, item)
            for j in range(1, n):
                where = f"[{i}].meta_info.input_top_logprobs[{j}]"
                row = tops[j]
                if not isinstance(row, list) or len(row) < k:
                    raise field_error(where, f"expected {k} [logprob, token_id, text] entries, got {row!r}", item)
                for c, entry in enumerate(row[:k]):
                    logprob, token_id = logprob_entry(entry, f"{where}[{c}]", item)
                    if logprob is None:
                        raise field_error(f"{where}[{c}]", "logprob is null", item)
                    topk_ids_RK[j - 1, c] = token_id
                    topk_logprobs_RK[j - 1, c] = logprob
        out.append(Scores(logprobs_R=logprobs_R, topk_ids_RK=topk_ids_RK, topk_logprobs_RK=topk_logprobs_RK))
    return out


def _list_of(meta: dict[str, Any], key: str, n: int, i: int, item: Any) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list):
        raise field_error(f"[{i}].meta_info.{key}", "missing or not a list (was return_logprob honoured?)", item)
    if len(value) != n:
        raise field_error(f"[{i}].meta_info.{key}", f"{len(value)} entries, expected {n}", item)
    return value


def _check_id(got: int, sent: int, where: str, item: Any) -> None:
    # SGLang reports ids >= vocab_size - 1 as 0 (it clips multimodal pad hashes), so 0 is not proof of a shift.
    if got != sent and got != 0:
        raise field_error(where, f"server echoes token id {got} where we sent {sent}: positions are misaligned", item)


# --------------------------------------------------------------------------- HTTP


class SGLangTeacherScorer:
    """`TeacherScorer` over SGLang's native API.

    Args:
        base_url: the teacher server, e.g. `http://teacher-sglang:30000`.
        timeout_s: read timeout of one scoring request.
        max_tokens_per_request: sequences are sent in consecutive requests of at most this many tokens
            (a single longer sequence goes alone).
        temperature: must be 1.0 (see the module docstring); accepted so configs can say so.
        dtype, revision: describe the served weights for `identity`. Pass `revision` (e.g. the hub
            commit) whenever the weights behind a model path can change: the identity otherwise
            names the weights by the server's `model_path` only.
        num_parameters / model_dir: the parameter count, or a local checkpoint to count it from;
            otherwise it is counted from the server's `model_path` when that is a local directory.
        connect_timeout_s, control_timeout_s, session: the connection, an `SGLangClient`
            (`protocol/sglang_http.py`) held as `self.http`.

    `tokens_forwarded` counts every token sent for scoring (prompt + response of each sequence).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 300.0,
        max_tokens_per_request: int = 65536,
        temperature: float = 1.0,
        dtype: str = "auto",
        revision: str | None = None,
        num_parameters: int | None = None,
        model_dir: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        control_timeout_s: float = CONTROL_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature}: SGLang returns untempered prompt logprobs, so the SGLang "
                "scorer only scores at temperature 1.0 (use the transformers scorer for other temperatures)"
            )
        if max_tokens_per_request < 1:
            raise ValueError(f"max_tokens_per_request must be >= 1, got {max_tokens_per_request}")
        self.http = SGLangClient(
            base_url, connect_timeout_s=connect_timeout_s, control_timeout_s=control_timeout_s, session=session
        )
        self.timeout_s = timeout_s
        self.max_tokens_per_request = max_tokens_per_request
        self.temperature = float(temperature)
        self.dtype = dtype
        self.revision = revision
        self._identity: str | None = None
        self._model_info: dict[str, Any] | None = None
        self.identity_fields: dict[str, str] = {}
        self.tokens_forwarded = 0
        self._num_parameters = num_parameters
        self._model_dir = model_dir

    @property
    def base_url(self) -> str:
        return self.http.base_url

    @property
    def identity(self) -> str:
        """sha256 of model + revision + tokenizer + dtype + temperature (k is the cache's business).

        The model and tokenizer come from `/model_info` (read once). The server's
        `weight_version` is left out on purpose: a teacher's weights do not change, and a server
        restart must not invalidate the cache.
        """
        if self._identity is None:
            info = self.model_info()
            model = info.get("model_path")
            if not isinstance(model, str) or not model:
                raise SGLangError(MODEL_INFO, f"no model_path in {info!r}")
            self.identity_fields = {
                "backend": "sglang",
                "weights": f"revision:{self.revision}" if self.revision else f"path:{model}",
                "tokenizer": str(info.get("tokenizer_path") or model),
                "dtype": self.dtype,
                "temperature": repr(self.temperature),
            }
            blob = json.dumps(self.identity_fields, sort_keys=True)
            self._identity = hashlib.sha256(blob.encode()).hexdigest()
        return self._identity

    def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            self._model_info = self.http.model_info()
        return self._model_info

    def score(self, sequences: list[np.ndarray], starts: list[int], k: int) -> list[Scores]:
        """Score tokens starts[i]..T_i-1 of each sequence; a sequence with start == T costs no request."""
        if k < 0:
            raise ValueError(f"k = {k}: must be >= 0")
        if len(sequences) != len(starts):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        out: list[Scores | None] = [None] * len(sequences)
        todo: list[int] = []
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= start <= len(seq):
                raise ValueError(f"starts[{i}] = {start}: must be in [1, {len(seq)}] for a sequence of {len(seq)} tokens")
            if start == len(seq):  # nothing left to score: no request
                out[i] = empty_scores(k)
            else:
                todo.append(i)
        for lo, hi in self._chunks([len(sequences[i]) for i in todo]):
            index = todo[lo:hi]
            seqs, sts = [sequences[i] for i in index], [starts[i] for i in index]
            request = build_score_request(seqs, sts, k)
            body = self.http.call("POST", GENERATE, request, self.timeout_s)
            self.tokens_forwarded += sum(len(s) for s in seqs)
            for i, scores in zip(index, parse_score_response(body, seqs, sts, k), strict=True):
                out[i] = scores
        return out  # type: ignore[return-value]

    def num_parameters(self) -> int:
        if self._num_parameters is None:
            candidates = [c for c in (self._model_dir, str(self.model_info().get("model_path", ""))) if c]
            self._num_parameters = first_checkpoint_parameters(candidates, "teacher", "SGLangTeacherScorer")
        return self._num_parameters

    def _chunks(self, lengths: list[int]) -> list[tuple[int, int]]:
        chunks: list[tuple[int, int]] = []
        lo, tokens = 0, 0
        for i, n in enumerate(lengths):
            if i > lo and tokens + n > self.max_tokens_per_request:
                chunks.append((lo, i))
                lo, tokens = i, 0
            tokens += n
        if lo < len(lengths):
            chunks.append((lo, len(lengths)))
        return chunks


class SGLangScorerConfig(BaseModel):
    """`teacher.engine` for a running SGLang teacher server (teacher.temperature must be 1.0)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sglang"] = "sglang"
    url: str = Field(..., min_length=1, description="SGLang server base URL, e.g. http://teacher-sglang:30000.")
    timeout_s: float = Field(300.0, gt=0, description="Timeout of each scoring request.")

    needs_model_dir: ClassVar[bool] = False  # the server holds the model; teacher.model_dir only counts parameters

    @property
    def server_url(self) -> str | None:
        """The server whose served model's tokenizer `opd up` checks against teacher.model_dir."""
        return self.url

    def check_temperature(self, temperature: float) -> None:
        """SGLang's prompt logprobs are untempered: any other teacher.temperature is refused at load."""
        if temperature != 1.0:
            raise ValueError(
                f"teacher.temperature={temperature} is not supported with teacher.engine={self.kind}: SGLang returns "
                "untempered prompt logprobs (log_softmax(logits)), so the teacher distribution would not be the one "
                "the cache key names. Set teacher.temperature=1.0 or use teacher.engine=hf"
            )

    def build(self, model_dir: str, *, revision: str | None, temperature: float) -> SGLangTeacherScorer:
        """The scorer on the server at `url`; `model_dir` (teacher.model_dir, optional) counts parameters."""
        return SGLangTeacherScorer(self.url, timeout_s=self.timeout_s, temperature=temperature, revision=revision,
                                   model_dir=model_dir or None)
