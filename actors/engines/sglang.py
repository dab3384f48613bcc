"""Rollout engine backed by a running SGLang server, through its native HTTP API.

Field names and response shapes follow SGLang's own sources, not guesses:

- request body: `GenerateReqInput` in `python/sglang/srt/managers/io_struct.py` (`input_ids` as a list
  of lists for a batch, `sampling_params` as one dict per item, `return_logprob`, `logprob_start_len`);
  sampling fields from `python/sglang/srt/sampling/sampling_params.py` (`max_new_tokens`,
  `temperature`, `top_p`, `sampling_seed`).
- response: a batch answers a list, one object per input, each with
  `meta_info.output_token_logprobs` as `[logprob, token_id, text_or_null]` triples
  (`TokenizerManager.detokenize_logprob_tokens`) and `meta_info.finish_reason` as
  `{"type": "length", "length": n}`, `{"type": "stop", "matched": ...}` or
  `{"type": "abort", "message": ...}` (`FINISH_*.to_json()` in `schedule_batch.py`), and
  `meta_info.weight_version` / `weight_versions` (`protocol/sglang_http.py`, `served_policy_version`).
- weight reload: `POST /pause_generation`, `POST /update_weights_from_disk` with
  `UpdateWeightFromDiskReqInput` (`model_path`, `weight_version: Optional[str]`), answering
  `{"success", "message", ...}` and HTTP 400 on failure, then `POST /continue_generation`
  (`python/sglang/srt/entrypoints/http_server.py`).

Where we depart from the obvious mapping, and why:

- Response tokens are read from `output_token_logprobs`, not from `output_ids`: the two come from the
  same sampler step, but only the former is guaranteed to pair each id with its logprob, which is
  what the learner's importance ratio needs. A response whose logprob list is missing or malformed is
  an error, never silently an empty generation.
- What those logprobs are (`Sampler.forward` in `python/sglang/srt/layers/sampler.py`): with
  `SGLANG_RETURN_ORIGINAL_LOGPROB` false (the default, and what the compose file sets),
  `log(softmax(logits / temperature))` over the whole vocabulary, computed *before* the top-k /
  top-p / min-p filters and never renormalised on the nucleus the token was drawn from; with it
  true, `log_softmax(logits)` (temperature ignored). The learner recomputes log pi under
  `protocol/sampling.py`'s transform (temperature, then the renormalised top-p nucleus), so the two
  agree exactly only for `top_p == 1` with the server variable false: `actor.top_p < 1` is refused
  with this engine at config validation (`actors/config.py`), and the server variable must stay
  false whenever `actor.temperature != 1`.
- Every request states the neutral value of each other filter SGLang applies (`top_k=-1`,
  `min_p=0`, no repetition / frequency / presence penalty), so neither SGLang's defaults nor a
  server-side `--preferred-sampling-params` / model generation config can narrow the distribution
  behind the learner's back.
- Reproducibility: `sampling_seed` is honoured only by a server started with
  `--enable-deterministic-inference` (`SamplingBatchInfo` builds the per-request seeds only in that
  mode; it also switches to the pytorch sampling backend and batch-invariant kernels, and may
  disable the radix cache, so it is slower). Without the flag the seed is accepted and ignored:
  the same `actor.seed` does not reproduce a run. `docker-compose.yml` passes the flag when
  `SGLANG_DETERMINISTIC=true` (see `deploy/opd.env.example`). Reproducible here means the same
  tokens for the same requests and weights; actor timing still decides which weights a batch
  is sampled with.
- Each `Generation` carries the version the *server* ran (`served_policy_version`), not the one this
  actor last asked for: actors share a server, which may restart or be reloaded by a peer while a batch
  is retried. `load_weights` never loads below the server's version (`actors/actor.py` follows it).
- `pause_generation` uses mode `"abort"` by default: requests of other clients of the same server that
  are in flight during a reload are aborted (they come back with `finish_reason.type == "abort"`,
  which we raise as `SGLangError`, so the caller retries) rather than resumed on new weights, which
  would silently mix two policy versions inside one rollout.

The pure functions `build_generate_request` / `parse_generate_response` hold all the mapping and are
unit-tested without a server; `SGLangRolloutEngine` only adds HTTP. `SGLangEngineConfig` at the end is
this engine's `actor.engine` variant (`kind: sglang`) and its `build()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.engines.base import Generation

# The wire contract shared with `cache/scorers/sglang.py`; re-exported from here (`SGLangError`,
# `count_safetensors_parameters`, `http_json`, the endpoint constants) for existing importers.
from protocol.sglang_http import (
    CONNECT_TIMEOUT_S,
    CONTINUE,
    CONTROL_TIMEOUT_S,
    GENERATE,
    HEALTH,
    MODEL_INFO,
    PAUSE,
    PAUSE_MODES,
    UPDATE_FROM_DISK,
    SGLangClient,
    SGLangError,
    count_safetensors_parameters,
    error_message,
    field_error,
    first_checkpoint_parameters,
    logprob_entry,
    parse_weight_version,
    served_policy_version,
)
from protocol.sglang_http import (
    http_json as http_json,
)

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure mapping

# SGLang `SamplingParams` fields that would change the sampled distribution: each at its "off" value.
_NEUTRAL_FILTERS: dict[str, Any] = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
                                    "presence_penalty": 0.0}


def build_generate_request(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> dict[str, Any]:
    """The `/generate` body for a batch of token-id prompts (one sampling dict per prompt).

    `seed` (if given) becomes `sampling_params.sampling_seed = seed + i` for prompt `i`, so identical
    prompts in one batch still draw different samples while the batch as a whole is reproducible on a
    server started with `--enable-deterministic-inference` (others ignore the seed; see the module
    docstring). The key is left out entirely when `seed` is None, for servers that predate it.
    `_NEUTRAL_FILTERS` pins every other filter off, so the tokens are drawn from exactly
    `softmax(logits / temperature)` restricted to top-p.
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
    if not prompts:
        raise ValueError("empty batch")
    sampling: list[dict[str, Any]] = []
    for i, (prompt, budget) in enumerate(zip(prompts, max_new_tokens, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if budget < 1:
            raise ValueError(f"max_new_tokens[{i}] = {budget}: must be >= 1")
        params: dict[str, Any] = {
            "max_new_tokens": int(budget),
            "temperature": float(temperature),
            "top_p": float(top_p),
            **_NEUTRAL_FILTERS,
        }
        if seed is not None:
            params["sampling_seed"] = int(seed) + i
        sampling.append(params)
    return {
        "input_ids": [[int(t) for t in prompt] for prompt in prompts],
        "sampling_params": sampling,
        "return_logprob": True,
        # -1: logprobs of output tokens only (GenerateReqInput's documented default), no prompt scoring.
        "logprob_start_len": -1,
        "stream": False,
    }


def parse_generate_response(body: Any, max_new_tokens: Sequence[int]) -> list[Generation]:
    """Map a `/generate` batch response onto one `Generation` per prompt, validating every field.

    Raises `SGLangError` naming the exact field (e.g. `[1].meta_info.output_token_logprobs[3]`) when
    the body is not what SGLang documents, when a request was aborted, or when the server returned
    more tokens than asked for.
    """
    items = _as_items(body, len(max_new_tokens))
    out: list[Generation] = []
    for i, (item, budget) in enumerate(zip(items, max_new_tokens, strict=True)):
        meta = _meta_info(item, i)
        finished = _finished(meta, i)
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list):
            raise field_error(f"[{i}].meta_info.output_token_logprobs", "missing or not a list (was return_logprob honoured?)", body)
        ids: list[int] = []
        logprobs: list[float] = []
        for j, entry in enumerate(entries):
            logprob, token_id = logprob_entry(entry, f"[{i}].meta_info.output_token_logprobs[{j}]", body)
            if logprob is None:
                raise field_error(f"[{i}].meta_info.output_token_logprobs[{j}]", "logprob is null for an output token", body)
            ids.append(token_id)
            logprobs.append(logprob)
        if len(ids) > budget:
            raise field_error(f"[{i}].meta_info.output_token_logprobs", f"{len(ids)} tokens for max_new_tokens={budget}", body)
        out.append(Generation(response_ids=ids, logprobs=logprobs, finished=finished,
                              policy_version=served_policy_version(meta, i, body)))
    return out


def _as_items(body: Any, expected: int) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        if "error" in body:
            raise SGLangError(GENERATE, f"server error: {error_message(body)}", body=json.dumps(body))
        body = [body]
    if not isinstance(body, list):
        raise SGLangError(GENERATE, f"response is {type(body).__name__}, expected a list of results")
    if len(body) != expected:
        raise SGLangError(GENERATE, f"{len(body)} results for {expected} prompts", body=json.dumps(body)[:2000])
    if all(isinstance(item, dict) and isinstance(item.get("index"), int) for item in body):
        body = sorted(body, key=lambda item: item["index"])
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise SGLangError(GENERATE, f"result [{i}] is {type(item).__name__}, expected an object")
    return body


def _meta_info(item: dict[str, Any], i: int) -> dict[str, Any]:
    meta = item.get("meta_info")
    if not isinstance(meta, dict):
        raise field_error(f"[{i}].meta_info", "missing or not an object", item)
    return meta


def _finished(meta: dict[str, Any], i: int) -> bool:
    """True on a stop (EOS / stop token), False on the length limit; abort and the unknown raise."""
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or not isinstance(reason.get("type"), str):
        raise field_error(f"[{i}].meta_info.finish_reason", f"expected {{'type': ...}}, got {reason!r}", meta)
    kind = reason["type"]
    if kind == "stop":
        return True
    if kind == "length":
        return False
    if kind == "abort":
        raise SGLangError(GENERATE, f"request [{i}] aborted: {reason.get('message')!r}", body=json.dumps(reason))
    raise field_error(f"[{i}].meta_info.finish_reason.type", f"unknown finish reason {kind!r}", meta)


# --------------------------------------------------------------------------- HTTP


class SGLangRolloutEngine:
    """`RolloutEngine` over SGLang's native API. One instance per actor; not shared across threads.

    Args:
        base_url: the server, e.g. `http://student-sglang:30000`.
        timeout_s: read timeout of one `/generate` batch (generation of the whole batch).
        connect_timeout_s: TCP connect timeout of every call.
        control_timeout_s: timeout of `/pause_generation`, `/continue_generation`, `/model_info`.
        load_timeout_s: timeout of `/update_weights_from_disk` (reads the whole checkpoint).
        pause_mode: `/pause_generation` mode (`abort`, `retract`, `in_place`); see the module docstring.
        max_failures: consecutive transient failures the actor retries with back-off (`is_transient`).
        num_parameters: the student's parameter count, if known; otherwise counted from the
            safetensors headers of the last loaded weights directory or of `model_dir`.
        model_dir: a local copy of the initial student checkpoint, for `num_parameters()`.
        session: the `requests.Session` to call through.

    The connection (`base_url`, the two timeouts, `session`) is an `SGLangClient`
    (`protocol/sglang_http.py`), held as `self.http`.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 600.0,
        *,
        load_timeout_s: float = 900.0,
        pause_mode: str = "abort",
        max_failures: int = 5,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        control_timeout_s: float = CONTROL_TIMEOUT_S,
        num_parameters: int | None = None,
        model_dir: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode {pause_mode!r} not in {PAUSE_MODES}")
        self.http = SGLangClient(
            base_url, connect_timeout_s=connect_timeout_s, control_timeout_s=control_timeout_s, session=session
        )
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.pause_mode = pause_mode
        self.max_failures = max_failures
        self.loaded_version: int | None = None
        self._num_parameters = num_parameters
        self._model_dir = model_dir

    @property
    def base_url(self) -> str:
        return self.http.base_url

    # ---- RolloutEngine

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        *,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[Generation]:
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
        # A zero budget needs no server call (and SGLang's max_new_tokens=0 means "prefill only").
        live = [i for i, n in enumerate(max_new_tokens) if n > 0]
        out = [Generation(response_ids=[], logprobs=[], finished=False) for _ in prompts]
        if not live:
            return out
        budgets = [max_new_tokens[i] for i in live]
        request = build_generate_request(
            [prompts[i] for i in live], budgets, temperature=temperature, top_p=top_p, seed=seed
        )
        body = self.http.call("POST", GENERATE, request, self.timeout_s)
        parsed = parse_generate_response(body, budgets)
        served = [g.policy_version for g in parsed if g.policy_version is not None]
        for generation in out:  # the empty ones: of the weights the rest of the batch ran on
            generation.policy_version = min(served, default=None)
        for i, generation in zip(live, parsed, strict=True):
            out[i] = generation
        return out

    def load_weights(self, path: str, version: int) -> None:
        """pause -> update_weights_from_disk(path, version) -> continue (always, in `finally`).

        `path` must be readable *by the server* (the same volume mounted at the same path). When the
        server already reports `version` or a newer one (another actor sharing this server got there
        first), nothing is paused or reloaded: a lagging actor never puts older weights over newer ones.
        Two actors whose checks both pass can still land in either order (SGLang has no conditional
        update); the answers then carry the version actually served and the actor that finds the server
        behind reloads (`actors/actor.py`).
        """
        served = self.served_version()
        if served is not None and served >= version:
            if served > version:
                log.info("server already holds v%d, newer than v%d: not reloading", served, version)
            self.loaded_version = served
            return
        self.http.control("POST", PAUSE, {"mode": self.pause_mode})
        failure: BaseException | None = None
        try:
            body = self.http.call(
                "POST",
                UPDATE_FROM_DISK,
                {"model_path": str(path), "weight_version": str(version)},
                self.load_timeout_s,
            )
            if not isinstance(body, dict) or body.get("success") is not True:
                raise SGLangError(UPDATE_FROM_DISK, f"update not successful: {error_message(body)}", body=json.dumps(body))
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                self.http.control("POST", CONTINUE, {})
            except SGLangError as exc:
                if failure is None:
                    raise
                log.error("continue_generation failed after a failed weight update: %s", exc)
        self.loaded_version = version
        if self._num_parameters is None:
            # The path may not be visible from this container; num_parameters() then says what to do.
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._num_parameters = count_safetensors_parameters(path)

    def num_parameters(self) -> int:
        if self._num_parameters is None:
            candidates = [self._model_dir] if self._model_dir else []
            try:
                candidates.append(str(self.model_info().get("model_path", "")))
            except SGLangError as exc:
                log.warning("cannot read %s for the parameter count: %s", MODEL_INFO, exc)
            self._num_parameters = first_checkpoint_parameters(candidates, "student", "SGLangRolloutEngine")
        return self._num_parameters

    def is_transient(self, exc: Exception) -> bool:
        """A server fails transiently (a weight reload aborts the requests in flight, a restart refuses
        connections); a ValueError / TypeError is a bad request, which retrying would only repeat."""
        return not isinstance(exc, ValueError | TypeError)

    # ---- extras

    def served_version(self) -> int | None:
        """The policy version the server reports (`/model_info`); None when it cannot be read or is not ours."""
        try:
            return parse_weight_version(self.model_info().get("weight_version"))
        except (SGLangError, ValueError) as exc:
            log.warning("cannot read the server's weight version, reloading anyway: %s", exc)
            return None

    def model_info(self) -> dict[str, Any]:
        """`/model_info`: `model_path`, `tokenizer_path`, `weight_version`, ..."""
        return self.http.model_info()

    def health(self) -> bool:
        """True when `/health` answers 200."""
        try:
            self.http.control("GET", HEALTH, None)
        except SGLangError:
            return False
        return True


class SGLangEngineConfig(BaseModel):
    """`actor.engine` for a running SGLang server (`python -m sglang.launch_server`, or compose's)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sglang"] = "sglang"
    url: str = Field(..., min_length=1, description="SGLang server base URL, e.g. http://student-sglang:30000.")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of each /generate batch.")
    max_failures: int = Field(5, ge=0, description="Consecutive failed requests tolerated (retried with back-off).")

    @property
    def server_url(self) -> str | None:
        """The server whose served model's tokenizer `opd up` checks against actor.model_dir."""
        return self.url

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """Refuse top_p < 1: SGLang's logprobs are `log_softmax(logits / T)` taken before its top-p filter,
        never renormalised on the nucleus (module docstring), so every importance ratio would be off."""
        if top_p < 1:
            raise ValueError(
                f"actor.top_p={top_p} is not supported with actor.engine={self.kind}: SGLang reports "
                "log_softmax(logits / temperature) before its top-p filter, not the renormalised nucleus the "
                "tokens were drawn from, so the learner's importance ratio would be wrong. Set actor.top_p=1.0 "
                "(temperature is fine) or use actor.engine=hf"
            )

    def build(self, model_dir: str) -> SGLangRolloutEngine:
        """The engine on the server at `url`; `model_dir` (actor.model_dir, optional) counts parameters."""
        return SGLangRolloutEngine(self.url, timeout_s=self.timeout_s, max_failures=self.max_failures,
                                   model_dir=model_dir or None)
