"""SGLang request/response mapping, without a GPU.

Pins:
- `/generate` bodies carry exactly the `GenerateReqInput` fields SGLang documents (`input_ids`,
  `sampling_params`, `return_logprob`, `logprob_start_len`, `top_logprobs_num`); every sampling
  filter other than temperature / top-p is pinned off (`top_k=-1`, `min_p=0`, no penalties).
- responses in the documented shape (`meta_info.output_token_logprobs` / `input_token_logprobs` /
  `input_top_logprobs` as `[logprob, token_id, text_or_null]`, `finish_reason` objects) map onto
  `Generation` / `Scores` exactly, including SGLang's null placeholder at entry 0 of prompt logprobs.
- every malformed or failed answer is an `SGLangError` naming endpoint, field, HTTP status and body.
- `load_weights` is pause -> update_weights_from_disk -> continue, and continue runs even on failure.
- each `Generation` carries the policy version the server reports (`meta_info.weight_version`, the
  oldest of `weight_versions`; `"default"` is v0); `load_weights` never loads below the server's version.
- model info comes from `/model_info`; the deprecated `/get_model_info` only when a server answers 404.

The HTTP tests talk to a real `http.server` on 127.0.0.1 serving canned bodies; only the GPU server
itself is out of reach.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.engines import sglang as eng
from actors.engines.sglang import (
    SGLangRolloutEngine,
    build_generate_request,
    count_safetensors_parameters,
    parse_generate_response,
)
from cache.scorers import sglang as sc
from cache.scorers.sglang import SGLangTeacherScorer, build_score_request, parse_score_response

# ----------------------------------------------------------------- fixtures in SGLang's documented shape

# A batch of two: the first stopped on EOS (token 151645), the second hit its length limit.
GENERATE_BATCH = json.loads("""
[
  {"text": " Paris.", "output_ids": [12095, 13, 151645],
   "meta_info": {"id": "9f1c", "finish_reason": {"type": "stop", "matched": 151645},
                 "prompt_tokens": 4, "completion_tokens": 3, "cached_tokens": 0, "e2e_latency": 0.05,
                 "weight_version": "7",
                 "output_token_logprobs": [[-0.11, 12095, null], [-0.5, 13, null], [-0.01, 151645, null]]}},
  {"text": " The capital", "output_ids": [576, 6722],
   "meta_info": {"id": "9f1d", "finish_reason": {"type": "length", "length": 2},
                 "prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 2, "e2e_latency": 0.05,
                 "weight_version": "7",
                 "output_token_logprobs": [[-1.5, 576, null], [-0.25, 6722, null]]}}
]
""")

# Prefill-only scoring of [1, 5, 7, 9, 11] from position 3 with k=2: we send logprob_start_len=2, so
# SGLang answers positions 2..4 (ids 7, 9, 11) with its null placeholder at entry 0.
SCORE_SEQ = [1, 5, 7, 9, 11]
SCORE_ONE = json.loads("""
{"text": "", "output_ids": [],
 "meta_info": {"id": "77aa", "finish_reason": {"type": "length", "length": 0},
               "prompt_tokens": 5, "completion_tokens": 0, "cached_tokens": 0,
               "input_token_logprobs": [[null, 7, null], [-0.5, 9, null], [-1.25, 11, null]],
               "input_top_logprobs": [null,
                                      [[-0.5, 9, null], [-1.0, 4, null]],
                                      [[-0.75, 3, null], [-1.25, 11, null]]],
               "output_token_logprobs": [], "output_top_logprobs": []}}
""")

MODEL_INFO = {
    "model_path": "Qwen/Qwen2.5-7B-Instruct",
    "tokenizer_path": "Qwen/Qwen2.5-7B-Instruct",
    "is_generation": True,
    "preferred_sampling_params": None,
    "weight_version": "default",
}


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------- a tiny real HTTP server


class CannedServer:
    """`http.server` on 127.0.0.1:0; each path answers the next canned (status, body, delay_s)."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple[int, Any, float]]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                server.requests.append((method, self.path, json.loads(raw) if raw else None))
                queue = server.routes.get(self.path)
                if not queue:
                    status, body, delay = 404, {"detail": "Not Found"}, 0.0
                else:
                    status, body, delay = queue.pop(0) if len(queue) > 1 else queue[0]
                time.sleep(delay)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def on(self, path: str, *answers: tuple[int, Any] | tuple[int, Any, float]) -> None:
        self.routes[path] = [(a[0], a[1], a[2] if len(a) > 2 else 0.0) for a in answers]

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    def body_of(self, path: str) -> Any:
        return next(body for _, p, body in self.requests if p == path)


@pytest.fixture()
def server() -> Iterator[CannedServer]:
    s = CannedServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# ----------------------------------------------------------------- rollout engine: pure mapping


# Every other SGLang filter at its off value: the tokens come from softmax(logits / T) (top-p aside),
# the distribution the learner recomputes, whatever a server's defaults or generation config say.
NEUTRAL = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def test_generate_request_uses_documented_fields() -> None:
    body = build_generate_request([[1, 2, 3], [4, 5]], [16, 8], temperature=0.7, top_p=0.95, seed=None)
    assert body == {
        "input_ids": [[1, 2, 3], [4, 5]],
        "sampling_params": [
            {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.95, **NEUTRAL},
            {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, **NEUTRAL},
        ],
        "return_logprob": True,
        "logprob_start_len": -1,
        "stream": False,
    }
    json.dumps(body)  # plain JSON, no numpy scalars


def test_generate_request_seed_is_per_item_and_accepts_numpy() -> None:
    prompts = [np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.int32)]
    body = build_generate_request(prompts, [np.int64(4), 4], temperature=1.0, top_p=1.0, seed=10)
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [10, 11]
    assert body["input_ids"] == [[1, 2], [1, 2]] and type(body["input_ids"][0][0]) is int
    json.dumps(body)


@pytest.mark.parametrize(
    ("prompts", "budgets", "match"),
    [([[1]], [1, 2], "1 prompts but 2"), ([[]], [4], "prompt 0 is empty"), ([[1]], [0], "must be >= 1"), ([], [], "empty")],
)
def test_generate_request_rejects_bad_input(prompts: list, budgets: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_generate_request(prompts, budgets, temperature=1.0, top_p=1.0, seed=None)


def test_parse_generate_batch() -> None:
    stop, length = parse_generate_response(_copy(GENERATE_BATCH), [8, 2])
    assert stop.response_ids == [12095, 13, 151645]
    assert stop.logprobs == pytest.approx([-0.11, -0.5, -0.01])
    assert stop.finished is True
    assert length.response_ids == [576, 6722]
    assert length.logprobs == pytest.approx([-1.5, -0.25])
    assert length.finished is False


def test_parse_single_object_and_index_order() -> None:
    (only,) = parse_generate_response(_copy(GENERATE_BATCH[1]), [2])
    assert only.response_ids == [576, 6722]
    shuffled = _copy(GENERATE_BATCH)[::-1]
    shuffled[0]["index"], shuffled[1]["index"] = 1, 0
    first, second = parse_generate_response(shuffled, [8, 2])
    assert first.finished and not second.finished


def _mutated(mutate) -> list[dict[str, Any]]:
    body = _copy(GENERATE_BATCH)
    mutate(body)
    return body


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[1].pop("meta_info"), r"\[1\]\.meta_info: missing"),
        (lambda b: b[0]["meta_info"].pop("output_token_logprobs"), r"\[0\]\.meta_info\.output_token_logprobs: missing"),
        (lambda b: b[0]["meta_info"]["output_token_logprobs"].__setitem__(1, [-0.5]), r"output_token_logprobs\[1\]: expected \[logprob, token_id, text\]"),
        (lambda b: b[0]["meta_info"]["output_token_logprobs"].__setitem__(2, [None, 7, None]), r"output_token_logprobs\[2\]: logprob is null"),
        (lambda b: b[0]["meta_info"]["output_token_logprobs"].__setitem__(0, [-0.1, "x", None]), r"token id 'x' is not an integer"),
        (lambda b: b[0]["meta_info"].pop("finish_reason"), r"\[0\]\.meta_info\.finish_reason: expected"),
        (lambda b: b[0]["meta_info"].__setitem__("finish_reason", {"type": "weird"}), "unknown finish reason 'weird'"),
        (lambda b: b[1]["meta_info"].__setitem__("finish_reason", {"type": "abort", "message": "Abort before prefill"}), r"request \[1\] aborted: 'Abort before prefill'"),
        (lambda b: b.pop(), "1 results for 2 prompts"),
    ],
)
def test_parse_generate_errors_name_the_field(mutate, match: str) -> None:
    with pytest.raises(eng.SGLangError, match=match) as info:
        parse_generate_response(_mutated(mutate), [8, 2])
    assert "SGLang /generate" in str(info.value)


def test_parse_generate_tags_the_version_the_server_ran() -> None:
    """main tagged rollouts with the actor's version; the server's `weight_version` is what sampled them."""
    assert [g.policy_version for g in parse_generate_response(_copy(GENERATE_BATCH), [8, 2])] == [7, 7]
    launch = _mutated(lambda b: [item["meta_info"].__setitem__("weight_version", "default") for item in b])
    assert [g.policy_version for g in parse_generate_response(launch, [8, 2])] == [0, 0]
    unsaid = _mutated(lambda b: [item["meta_info"].pop("weight_version") for item in b])
    assert [g.policy_version for g in parse_generate_response(unsaid, [8, 2])] == [None, None]
    spans = [{"version": "6", "start": 0, "end": 2}, {"version": "7", "start": 2, "end": 3}]
    mixed = _mutated(lambda b: b[0]["meta_info"].__setitem__("weight_versions", spans))
    assert [g.policy_version for g in parse_generate_response(mixed, [8, 2])] == [6, 7]  # the oldest weights


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[1]["meta_info"].__setitem__("weight_version", "v1"), r"\[1\]\.meta_info\.weight_version: weight_version 'v1' is not a policy version"),
        (lambda b: b[0]["meta_info"].__setitem__("weight_version", 7), r"\[0\]\.meta_info\.weight_version: weight_version 7 is not"),
        (lambda b: b[0]["meta_info"].__setitem__("weight_versions", [["7", 0, 3]]), r"\[0\]\.meta_info\.weight_versions\[0\]: expected"),
    ],
)
def test_parse_generate_refuses_a_version_that_is_not_ours(mutate, match: str) -> None:
    with pytest.raises(eng.SGLangError, match=match):
        parse_generate_response(_mutated(mutate), [8, 2])


def test_parse_generate_rejects_more_tokens_than_budget() -> None:
    with pytest.raises(eng.SGLangError, match=r"3 tokens for max_new_tokens=2"):
        parse_generate_response(_copy(GENERATE_BATCH), [2, 2])


def test_parse_generate_error_body() -> None:
    with pytest.raises(eng.SGLangError, match="server error: The input is too long"):
        parse_generate_response({"error": {"message": "The input is too long"}}, [4])


# ----------------------------------------------------------------- teacher scorer: pure mapping


def test_score_request_uses_documented_fields() -> None:
    body = build_score_request([SCORE_SEQ, [3, 4]], [3, 1], 2)
    assert body == {
        "input_ids": [SCORE_SEQ, [3, 4]],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": [2, 0],
        "top_logprobs_num": 2,
        "stream": False,
    }
    assert "top_logprobs_num" not in build_score_request([SCORE_SEQ], [3], 0)


@pytest.mark.parametrize("start", [0, 5, 9])
def test_score_request_rejects_unscoreable_start(start: int) -> None:
    with pytest.raises(ValueError, match=r"starts\[0\]"):
        build_score_request([SCORE_SEQ], [start], 2)


def test_parse_score_response() -> None:
    (scores,) = parse_score_response([_copy(SCORE_ONE)], [SCORE_SEQ], [3], 2)
    assert scores.logprobs_R.dtype == np.float32 and scores.logprobs_R.shape == (2,)
    np.testing.assert_allclose(scores.logprobs_R, [-0.5, -1.25])
    assert scores.topk_ids_RK.dtype == np.int32 and scores.topk_ids_RK.shape == (2, 2)
    np.testing.assert_array_equal(scores.topk_ids_RK, [[9, 4], [3, 11]])
    assert scores.topk_logprobs_RK.dtype == np.float32
    np.testing.assert_allclose(scores.topk_logprobs_RK, [[-0.5, -1.0], [-0.75, -1.25]])
    (single,) = parse_score_response(_copy(SCORE_ONE), [np.array(SCORE_SEQ, dtype=np.int32)], [3], 2)
    np.testing.assert_array_equal(single.topk_ids_RK, scores.topk_ids_RK)


def _score_mutated(mutate) -> dict[str, Any]:
    body = _copy(SCORE_ONE)
    mutate(body["meta_info"])
    return body


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.pop("input_token_logprobs"), r"\[0\]\.meta_info\.input_token_logprobs: missing"),
        (lambda m: m["input_token_logprobs"].pop(), r"input_token_logprobs: 2 entries, expected 3"),
        (lambda m: m["input_token_logprobs"].__setitem__(0, [-0.3, 7, None]), r"input_token_logprobs\[0\]: expected the null placeholder"),
        (lambda m: m["input_token_logprobs"].__setitem__(1, [-0.5, 8, None]), r"input_token_logprobs\[1\]: server echoes token id 8 where we sent 9"),
        (lambda m: m["input_token_logprobs"].__setitem__(2, [None, 11, None]), r"input_token_logprobs\[2\]: logprob is null"),
        (lambda m: m.pop("input_top_logprobs"), r"input_top_logprobs: missing"),
        (lambda m: m["input_top_logprobs"].__setitem__(2, [[-0.75, 3, None]]), r"input_top_logprobs\[2\]: expected 2"),
        (lambda m: m["input_top_logprobs"][1].__setitem__(0, [None, 9, None]), r"input_top_logprobs\[1\]\[0\]: logprob is null"),
        (lambda m: m.__setitem__("finish_reason", {"type": "abort", "message": "paused"}), r"request \[0\] aborted"),
    ],
)
def test_parse_score_errors_name_the_field(mutate, match: str) -> None:
    with pytest.raises(sc.SGLangError, match=match):
        parse_score_response(_score_mutated(mutate), [SCORE_SEQ], [3], 2)


def test_parse_score_count_mismatch() -> None:
    with pytest.raises(sc.SGLangError, match="1 results for 2 sequences"):
        parse_score_response([_copy(SCORE_ONE)], [SCORE_SEQ, SCORE_SEQ], [3, 3], 2)


# ----------------------------------------------------------------- over HTTP


def test_engine_generate_over_http(server: CannedServer) -> None:
    server.on("/generate", (200, GENERATE_BATCH))
    engine = SGLangRolloutEngine(server.url, timeout_s=10)
    out = engine.generate([[1, 2, 3, 4], [9, 9], [5, 6, 7]], [8, 0, 2], temperature=1.0, top_p=1.0, seed=3)
    assert [g.response_ids for g in out] == [[12095, 13, 151645], [], [576, 6722]]
    assert [g.finished for g in out] == [True, False, False]
    assert [g.policy_version for g in out] == [7, 7, 7]  # the unsent one: the batch's weights
    sent = server.body_of("/generate")
    # the zero-budget prompt is answered locally, not sent
    assert sent == build_generate_request([[1, 2, 3, 4], [5, 6, 7]], [8, 2], temperature=1.0, top_p=1.0, seed=3)


def test_engine_http_error_names_endpoint_status_and_body(server: CannedServer) -> None:
    server.on("/generate", (400, {"error": {"message": "Input length (40000 tokens) exceeds the maximum allowed length"}}))
    engine = SGLangRolloutEngine(server.url, timeout_s=10)
    with pytest.raises(eng.SGLangError) as info:
        engine.generate([[1, 2]], [4], temperature=1.0, top_p=1.0, seed=None)
    text = str(info.value)
    assert text.startswith("SGLang /generate HTTP 400: Input length (40000 tokens) exceeds")
    assert "| body: {" in text
    assert info.value.status == 400 and info.value.endpoint == "/generate"


def test_engine_http_error_with_non_json_body(server: CannedServer) -> None:
    server.on("/generate", (500, "Internal Server Error: " + "x" * 1000))
    with pytest.raises(eng.SGLangError, match=r"HTTP 500: .*\| body: Internal Server Error: x+\.\.\. \(1023 chars\)"):
        SGLangRolloutEngine(server.url).generate([[1]], [1], temperature=1.0, top_p=1.0, seed=None)


def test_engine_timeout_and_refused_connection(server: CannedServer) -> None:
    server.on("/generate", (200, GENERATE_BATCH, 2.0))
    with pytest.raises(eng.SGLangError, match=r"SGLang /generate: timed out after 0.3s"):
        SGLangRolloutEngine(server.url, timeout_s=0.3).generate([[1]], [1], temperature=1.0, top_p=1.0, seed=None)
    dead = SGLangRolloutEngine("http://127.0.0.1:9", connect_timeout_s=1.0)
    with pytest.raises(eng.SGLangError, match=r"SGLang /generate: request failed \(http://127.0.0.1:9/generate\)"):
        dead.generate([[1]], [1], temperature=1.0, top_p=1.0, seed=None)
    assert dead.health() is False


def _write_safetensors(directory: Path, shapes: dict[str, list[int]]) -> int:
    """A real safetensors file (header + float32 zeros); returns the parameter count."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return sum(int(np.prod(s)) for s in shapes.values())


def test_load_weights_pauses_updates_and_continues(server: CannedServer, tmp_path: Path) -> None:
    weights = tmp_path / "v000007"
    expected = _write_safetensors(weights, {"embed.weight": [10, 4], "lm_head.weight": [10, 4], "norm": [4]})
    server.on("/model_info", (200, MODEL_INFO))
    server.on("/pause_generation", (200, {"message": "Generation paused successfully.", "status": "ok"}))
    server.on("/update_weights_from_disk", (200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}))
    server.on("/continue_generation", (200, {"message": "Generation continued successfully.", "status": "ok"}))
    engine = SGLangRolloutEngine(server.url)
    engine.load_weights(str(weights), 7)
    assert server.paths() == ["/model_info", "/pause_generation", "/update_weights_from_disk", "/continue_generation"]
    assert server.body_of("/pause_generation") == {"mode": "abort"}
    assert server.body_of("/update_weights_from_disk") == {"model_path": str(weights), "weight_version": "7"}
    assert engine.loaded_version == 7
    assert engine.num_parameters() == expected == count_safetensors_parameters(weights) == 84


def test_load_weights_skips_when_server_already_has_the_version(server: CannedServer) -> None:
    server.on("/model_info", (200, {**MODEL_INFO, "weight_version": "7"}))
    engine = SGLangRolloutEngine(server.url)
    engine.load_weights("/data/weights/v000007", 7)
    assert server.paths() == ["/model_info"] and engine.loaded_version == 7


def test_load_weights_never_loads_below_the_server(server: CannedServer) -> None:
    """A lagging actor (announcement v7 read before a peer loaded v9) must not put v7 back: main reloaded
    whenever the server's version was not exactly the one asked for."""
    server.on("/model_info", (200, {**MODEL_INFO, "weight_version": "9"}))
    engine = SGLangRolloutEngine(server.url)
    engine.load_weights("/data/weights/v000007", 7)
    assert server.paths() == ["/model_info"] and engine.loaded_version == 9


def test_load_weights_from_the_launch_weights(server: CannedServer) -> None:
    server.on("/model_info", (200, MODEL_INFO))  # "default": the launch weights, v0
    for path in ("/pause_generation", "/continue_generation"):
        server.on(path, (200, {"status": "ok"}))
    server.on("/update_weights_from_disk", (200, {"success": True, "message": "ok"}))
    SGLangRolloutEngine(server.url, num_parameters=1).load_weights("/data/weights/v000001", 1)
    assert server.body_of("/update_weights_from_disk") == {"model_path": "/data/weights/v000001", "weight_version": "1"}


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (400, {"success": False, "message": "Failed to get weights iterator: /nope (repository not found).", "num_paused_requests": 0},
         r"SGLang /update_weights_from_disk HTTP 400: Failed to get weights iterator: /nope"),
        (200, {"success": False, "message": "shape mismatch"}, r"SGLang /update_weights_from_disk: update not successful: shape mismatch"),
    ],
)
def test_load_weights_failure_still_continues(server: CannedServer, status: int, body: dict, match: str) -> None:
    server.on("/model_info", (200, MODEL_INFO))
    server.on("/pause_generation", (200, {"status": "ok"}))
    server.on("/update_weights_from_disk", (status, body))
    server.on("/continue_generation", (200, {"status": "ok"}))
    engine = SGLangRolloutEngine(server.url)
    with pytest.raises(eng.SGLangError, match=match):
        engine.load_weights("/nope", 8)
    assert server.paths()[-1] == "/continue_generation"
    assert engine.loaded_version is None


def test_load_weights_reports_a_failed_continue(server: CannedServer) -> None:
    server.on("/model_info", (500, "boom"))  # unreadable version: reload anyway
    server.on("/pause_generation", (200, {"status": "ok"}))
    server.on("/update_weights_from_disk", (200, {"success": True, "message": "ok"}))
    server.on("/continue_generation", (503, "Service Unavailable"))
    with pytest.raises(eng.SGLangError, match=r"SGLang /continue_generation HTTP 503"):
        SGLangRolloutEngine(server.url).load_weights("/data/weights/v000009", 9)
    assert server.paths() == ["/model_info", "/pause_generation", "/update_weights_from_disk", "/continue_generation"]


def test_load_weights_pause_timeout_is_an_sglang_error(server: CannedServer) -> None:
    server.on("/model_info", (200, MODEL_INFO))
    server.on("/pause_generation", (200, {"status": "ok"}, 2.0))
    engine = SGLangRolloutEngine(server.url, control_timeout_s=0.3)
    with pytest.raises(eng.SGLangError, match=r"SGLang /pause_generation: timed out after 0.3s"):
        engine.load_weights("/data/weights/v000001", 1)
    assert "/update_weights_from_disk" not in server.paths()


def test_num_parameters_without_local_weights_says_what_to_do(server: CannedServer) -> None:
    server.on("/model_info", (200, MODEL_INFO))
    with pytest.raises(RuntimeError, match="pass num_parameters="):
        SGLangRolloutEngine(server.url).num_parameters()
    assert SGLangRolloutEngine(server.url, num_parameters=123).num_parameters() == 123


def test_scorer_over_http(server: CannedServer) -> None:
    server.on("/model_info", (200, MODEL_INFO))
    server.on("/generate", (200, [SCORE_ONE]), (200, [SCORE_ONE]))
    scorer = SGLangTeacherScorer(server.url, max_tokens_per_request=6)
    assert scorer.identity_fields == {}  # read lazily: constructing needs no server
    identity = scorer.identity
    assert re.fullmatch(r"[0-9a-f]{64}", identity)
    assert scorer.identity_fields == {
        "backend": "sglang",
        "weights": "path:Qwen/Qwen2.5-7B-Instruct",
        "tokenizer": "Qwen/Qwen2.5-7B-Instruct",
        "dtype": "auto",
        "temperature": "1.0",
    }
    pinned = SGLangTeacherScorer(server.url, revision="a1b2c3")
    assert pinned.identity != identity and pinned.identity_fields["weights"] == "revision:a1b2c3"
    assert server.paths().count("/model_info") == 2  # once per scorer, cached afterwards
    seq = np.array(SCORE_SEQ, dtype=np.int32)
    out = scorer.score([seq, seq, seq], [3, 5, 3], 2)
    # the middle one has nothing left to score: answered without a request; the others are 5 tokens
    # each, so a 6-token budget sends them in two requests
    assert [s.logprobs_R.shape for s in out] == [(2,), (0,), (2,)]
    assert out[1].topk_ids_RK.shape == (0, 2) and out[1].topk_ids_RK.dtype == np.int32
    np.testing.assert_allclose(out[2].logprobs_R, [-0.5, -1.25])
    assert server.paths().count("/generate") == 2
    assert scorer.tokens_forwarded == 10
    assert server.body_of("/generate") == build_score_request([SCORE_SEQ], [3], 2)
    with pytest.raises(ValueError, match=r"starts\[0\] = 6"):
        scorer.score([seq], [6], 2)


def test_scorer_refuses_a_temperature_sglang_cannot_apply() -> None:
    with pytest.raises(ValueError, match=r"only scores at temperature 1\.0"):
        SGLangTeacherScorer("http://127.0.0.1:9", temperature=0.7)


def test_scorer_http_error(server: CannedServer) -> None:
    server.on("/generate", (400, {"error": {"message": "logprob_start_len is out of range"}}))
    scorer = SGLangTeacherScorer(server.url)
    with pytest.raises(sc.SGLangError, match=r"SGLang /generate HTTP 400: logprob_start_len is out of range \| body: "):
        scorer.score([np.array(SCORE_SEQ)], [3], 2)
    assert scorer.tokens_forwarded == 0


def test_scorer_identity_needs_model_path(server: CannedServer) -> None:
    server.on("/model_info", (200, {"is_generation": True}))
    with pytest.raises(sc.SGLangError, match="SGLang /model_info: no model_path"):
        _ = SGLangTeacherScorer(server.url).identity


def test_scorer_counts_local_parameters(server: CannedServer, tmp_path: Path) -> None:
    expected = _write_safetensors(tmp_path / "teacher", {"w": [3, 5], "b": [5]})
    server.on("/model_info", (200, {**MODEL_INFO, "model_path": str(tmp_path / "teacher")}))
    assert SGLangTeacherScorer(server.url).num_parameters() == expected == 20


def test_model_info_asks_model_info_not_the_deprecated_name(server: CannedServer) -> None:
    """SGLang 0.5.23 logs a deprecation warning on every `/get_model_info` (main asked only that name)."""
    server.on("/model_info", (200, MODEL_INFO))
    server.on("/get_model_info", (500, "must not be asked"))
    assert SGLangRolloutEngine(server.url).model_info() == MODEL_INFO
    assert server.paths() == ["/model_info"]


def test_model_info_falls_back_on_404_once(server: CannedServer) -> None:
    """A server older than `/model_info` answers it 404: the old name is asked, and remembered."""
    server.on("/get_model_info", (200, MODEL_INFO))  # /model_info is not routed: 404
    engine = SGLangRolloutEngine(server.url)
    assert engine.model_info() == MODEL_INFO and engine.model_info() == MODEL_INFO
    assert server.paths() == ["/model_info", "/get_model_info", "/get_model_info"]


def test_model_info_other_errors_do_not_fall_back(server: CannedServer) -> None:
    server.on("/model_info", (503, "Service Unavailable"))
    server.on("/get_model_info", (200, MODEL_INFO))
    with pytest.raises(eng.SGLangError, match=r"SGLang /model_info HTTP 503"):
        SGLangRolloutEngine(server.url).model_info()
    assert server.paths() == ["/model_info"]
