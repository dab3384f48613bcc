"""SGLang's native HTTP API as we speak it: endpoints, error bodies, logprob triples, one JSON call.

The rollout engine (`actors/engines/sglang.py`) and the teacher scorer (`cache/scorers/sglang.py`) both
talk to an SGLang server we do not control, so the shapes below are a wire contract with an external
process, like the rest of `protocol/`: they live here so that both roles share one reading of it
without importing each other. What each role sends and how it maps the answer stays in that role.

Names and shapes follow SGLang's own sources, not guesses:

- endpoints (`/generate`, `/model_info`, `/health`, `/pause_generation` with its `mode`,
  `/update_weights_from_disk`, `/continue_generation`) and error bodies: `python/sglang/srt/entrypoints/
  http_server.py`, whose `_create_error_response` answers `{"error": {"message": ...}}` with HTTP 400
  (the schema check in front of `/generate` answers `{"error": "<text>"}`).
- `/model_info` replaced `/get_model_info`, which SGLang 0.5.23 still serves but marks deprecated (a
  warning in the server log on every call, "will be removed"); servers older than `/model_info` answer
  it 404, so `SGLangClient.model_info` falls back to the old name then and remembers it.
- request and weight-update bodies: `GenerateReqInput` / `UpdateWeightFromDiskReqInput` in
  `python/sglang/srt/managers/io_struct.py`.
- logprob entries: `[logprob, token_id, text_or_null]` triples (`TokenizerManager.detokenize_logprob_tokens`
  in `python/sglang/srt/managers/tokenizer_manager.py`), for output tokens (`output_token_logprobs`)
  and prompt tokens (`input_token_logprobs`, `input_top_logprobs`) alike.
- parameter counts read checkpoint headers in the safetensors file format (an 8-byte little-endian
  header length, then a JSON header listing every tensor's shape): a file format, not an SGLang shape.

Every failure surfaces as `SGLangError`, whose message names the endpoint, the HTTP status and a body
excerpt. `SGLangClient` is the connection each role holds (base URL, timeouts, session, one JSON call,
`/model_info`); what each sends over it stays in its role. The version these shapes are checked
against is `protocol/sglang_version.py`'s (`tests/unit/test_sglang_contract.py`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a call is made: the config tree (`opd --help`) loads this module
    import requests

GENERATE = "/generate"
PAUSE = "/pause_generation"
CONTINUE = "/continue_generation"
UPDATE_FROM_DISK = "/update_weights_from_disk"
MODEL_INFO = "/model_info"
MODEL_INFO_LEGACY = "/get_model_info"  # deprecated by SGLang; asked only when MODEL_INFO answers 404
HEALTH = "/health"

PAUSE_MODES = ("abort", "retract", "in_place")
# SGLang's `--weight-version` default: what a server reports until its first weight update, i.e. the
# weights it was launched with. Every launcher of this project starts the student server on the initial
# student (policy version 0), so a server that reports it after a restart is read as version 0.
LAUNCH_WEIGHT_VERSION = "default"
CONNECT_TIMEOUT_S = 5.0  # default TCP connect timeout of every call
CONTROL_TIMEOUT_S = 60.0  # default read timeout of the small control calls
_EXCERPT = 300


class SGLangError(RuntimeError):
    """An SGLang call failed; the message names the endpoint, the HTTP status and a body excerpt."""

    def __init__(self, endpoint: str, reason: str, *, status: int | None = None, body: str | None = None) -> None:
        parts = [f"SGLang {endpoint}"]
        if status is not None:
            parts.append(f"HTTP {status}")
        message = " ".join(parts) + f": {reason}"
        if body:
            message += f" | body: {excerpt(body)}"
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason
        self.status = status
        self.body = body


def excerpt(body: str, limit: int = _EXCERPT) -> str:
    """`body` on one line, cut to `limit` characters (saying how long it was)."""
    body = " ".join(body.split())
    return body if len(body) <= limit else body[:limit] + f"... ({len(body)} chars)"


def logprob_entry(entry: Any, where: str, context: Any) -> tuple[float | None, int]:
    """`[logprob, token_id, text_or_null]` -> (logprob or None, token_id)."""
    if not isinstance(entry, list | tuple) or len(entry) < 2:
        raise field_error(where, f"expected [logprob, token_id, text], got {entry!r}", context)
    logprob, token_id = entry[0], entry[1]
    if logprob is not None and (isinstance(logprob, bool) or not isinstance(logprob, int | float)):
        raise field_error(where, f"logprob {logprob!r} is not a number", context)
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise field_error(where, f"token id {token_id!r} is not an integer", context)
    return (None if logprob is None else float(logprob)), token_id


def parse_weight_version(value: Any) -> int:
    """A server's `weight_version` as our policy version; ValueError for anything else.

    We send `str(version)` with every `/update_weights_from_disk`, so a server reports a decimal string,
    or `LAUNCH_WEIGHT_VERSION` (version 0) before its first update. A version set by someone else
    (`--weight-version v1`, another trainer) is not one of ours: refused, never guessed.
    """
    if value == LAUNCH_WEIGHT_VERSION:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(
        f"weight_version {value!r} is not a policy version of this project (a decimal string we sent with "
        f"/update_weights_from_disk, or {LAUNCH_WEIGHT_VERSION!r} for the launch weights, version 0)"
    )


def served_policy_version(meta: dict[str, Any], i: int, body: Any) -> int | None:
    """The oldest policy version that sampled a token of this answer; None when the server does not say.

    `weight_version` is the server's version when the answer was built; `weight_versions` spans
    (`[{"version", "start", "end"}]` over the output tokens, only when an update landed mid-request, pause
    modes `retract` / `in_place`) name each version that sampled a part (`TokenizerManager.
    _handle_batch_output`, `utils/weight_versions.py`). The oldest bounds the rollout's staleness, so it is
    the one the rollout is tagged with.
    """
    found: list[tuple[str, Any]] = []
    if "weight_version" in meta:
        found.append((f"[{i}].meta_info.weight_version", meta["weight_version"]))
    spans = meta.get("weight_versions")
    if spans is not None:
        if not isinstance(spans, list):
            raise field_error(f"[{i}].meta_info.weight_versions", f"expected a list of spans, got {spans!r}", body)
        for j, span in enumerate(spans):
            where = f"[{i}].meta_info.weight_versions[{j}]"
            if not isinstance(span, dict) or "version" not in span:
                raise field_error(where, f"expected {{'version', 'start', 'end'}}, got {span!r}", body)
            found.append((where + ".version", span["version"]))
    versions = []
    for where, value in found:
        try:
            versions.append(parse_weight_version(value))
        except ValueError as exc:
            raise field_error(where, str(exc), body) from None
    return min(versions) if versions else None


def field_error(where: str, reason: str, context: Any) -> SGLangError:
    """A `/generate` answer whose field `where` is wrong; `context` (JSON if it can be) is the body."""
    try:
        text = json.dumps(context)
    except (TypeError, ValueError):
        text = repr(context)
    return SGLangError(GENERATE, f"{where}: {reason}", body=text)


def error_message(body: Any) -> str:
    """SGLang's error bodies are `{"error": {"message": ...}}` (`_create_error_response`)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return "unexpected response"


def count_safetensors_parameters(model_dir: str | Path) -> int:
    """Exact parameter count of an HF checkpoint directory from its safetensors headers (no tensor I/O).

    Each `.safetensors` file starts with an 8-byte little-endian header length and a JSON header that
    lists every tensor's shape; summing the products is exact and reads a few kilobytes.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    total = 0
    for path in files:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in spec["shape"]:
                n *= int(dim)
            total += n
    return total


def first_checkpoint_parameters(candidates: Iterable[str | None], role: str, owner: str) -> int:
    """`count_safetensors_parameters` of the first candidate that is a local safetensors directory.

    Empty candidates and directories that cannot be counted are passed over; when none is left, the
    `RuntimeError` names them all and tells the caller to pass `num_parameters=` (or `model_dir=`) to
    `owner`, the class whose `role` (e.g. "student") could not be counted.
    """
    candidates = list(candidates)
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            try:
                return count_safetensors_parameters(candidate)
            except (OSError, ValueError, KeyError):
                continue
    raise RuntimeError(
        f"cannot count the {role}'s parameters: none of {candidates} is a local safetensors "
        f"directory; pass num_parameters= (or model_dir=) to {owner}"
    )


def http_json(
    session: requests.Session,
    method: str,
    base_url: str,
    endpoint: str,
    payload: Any,
    timeout: tuple[float, float],
) -> Any:
    """One HTTP call; JSON body in and out (an empty body is None). Every failure is an `SGLangError`.

    `timeout` is `(connect, read)` seconds, as `requests` takes it.
    """
    import requests

    url = base_url + endpoint
    try:
        response = session.request(method, url, json=payload, timeout=timeout)
    except requests.Timeout as exc:
        raise SGLangError(endpoint, f"timed out after {timeout[1]}s ({url}): {exc}") from exc
    except requests.RequestException as exc:
        raise SGLangError(endpoint, f"request failed ({url}): {exc}") from exc
    text = response.text
    if response.status_code >= 400:
        try:
            reason = error_message(response.json())
        except ValueError:
            reason = response.reason or "error"
        raise SGLangError(endpoint, reason, status=response.status_code, body=text)
    if not text.strip():
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise SGLangError(endpoint, "response is not JSON", status=response.status_code, body=text) from exc


class SGLangClient:
    """One SGLang server, over its native HTTP API; not shared across threads.

    Held (not inherited) by the rollout engine and the teacher scorer, which say what to send.

    Args:
        base_url: the server, e.g. `http://student-sglang:30000` (a trailing `/` is dropped).
        connect_timeout_s: TCP connect timeout of every call.
        control_timeout_s: read timeout of the small control calls (`/model_info`, ...).
        session: the `requests.Session` to call through (a new one by default).
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        control_timeout_s: float = CONTROL_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.control_timeout_s = control_timeout_s
        if session is None:
            import requests

            session = requests.Session()
        self.session = session
        self._model_info_endpoint = MODEL_INFO

    def call(self, method: str, endpoint: str, payload: Any, read_timeout_s: float) -> Any:
        """`http_json` against this server, with this connect timeout and `read_timeout_s`."""
        return http_json(self.session, method, self.base_url, endpoint, payload, (self.connect_timeout_s, read_timeout_s))

    def control(self, method: str, endpoint: str, payload: Any) -> Any:
        """A small control call (`/pause_generation`, `/health`, ...), under `control_timeout_s`."""
        return self.call(method, endpoint, payload, self.control_timeout_s)

    def model_info(self) -> dict[str, Any]:
        """`/model_info` (uncached): `model_path`, `tokenizer_path`, `weight_version`, ...

        A server that answers `/model_info` 404 predates it: the deprecated `/get_model_info` is asked
        instead, and from then on. Any other failure is raised as is.
        """
        endpoint = self._model_info_endpoint
        try:
            body = self.control("GET", endpoint, None)
        except SGLangError as exc:
            if exc.status != 404 or endpoint == MODEL_INFO_LEGACY:
                raise
            endpoint = self._model_info_endpoint = MODEL_INFO_LEGACY
            body = self.control("GET", endpoint, None)
        if not isinstance(body, dict):
            raise SGLangError(endpoint, f"expected an object, got {type(body).__name__}")
        return body
