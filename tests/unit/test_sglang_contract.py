"""Our SGLang requests and parsers, checked against SGLang's own schema (the release pinned in
`protocol/sglang_version.py`), without a GPU and without installing SGLang.

How: `sglang_schema.py` downloads the pinned wheel without dependencies into `.cache/sglang-contract/`
(or `$OPD_SGLANG_CONTRACT_CACHE`), runs its generated `api_types.py` and reads the server's definitions
with `ast`. The real rollout engine and teacher scorer then talk to a loopback HTTP server answering in
the shapes SGLang's source defines, and every request they send is checked. Pins:

- every endpoint we call is a route of SGLang's `http_server.py`, with that method;
- every `/generate` body (sampling and scoring) passes the gate SGLang puts in front of `/generate`
  (`api_contract.generate_contract_error` = `GenerateRequest.from_json_value`, whose `SamplingParams`
  rejects unknown keys), and each key is a field of both `GenerateRequest` and the server's
  `GenerateReqInput` / `SamplingParams` (the gate ignores unknown *top-level* keys, so a renamed one would
  otherwise be dropped silently);
- every control body (`/pause_generation`, `/update_weights_from_disk`, `/continue_generation`) uses only
  fields of the struct its route parses, with every required field present and `mode` one of its values;
- the responses we parse decode under SGLang's response schema, and the fields we read exist there and in
  the handlers' answers (`/model_info`, `/update_weights_from_disk`); `"default"` is still the launch
  weight version;
- each check fails on a renamed key (the last test renames one of each).

The project never calls `/abort_request`: aborted requests come back through `/generate` with
`finish_reason.type == "abort"`, a shape checked here. Where the wheel cannot be downloaded (no network)
the tests are skipped with the reason; CI has PyPI access.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import sglang_schema as ss

from actors.engines.sglang import SGLangRolloutEngine, parse_generate_response
from cache.scorers.sglang import SGLangTeacherScorer
from protocol.sglang_http import LAUNCH_WEIGHT_VERSION, PAUSE_MODES
from protocol.sglang_version import SGLANG_VERSION

REPO = Path(__file__).resolve().parents[2]
# What our parsers read (actors/engines/sglang.py, cache/scorers/sglang.py, protocol/sglang_http.py).
META_INFO_READ = {"finish_reason", "output_token_logprobs", "weight_version", "weight_versions",
                  "input_token_logprobs", "input_top_logprobs"}
MODEL_INFO_READ = {"model_path", "tokenizer_path", "weight_version"}
UPDATE_ANSWER_READ = {"success", "message"}


class ContractViolation(AssertionError):
    """A request body SGLang would refuse or silently ignore part of."""


@pytest.fixture(scope="session")
def sources() -> Path:
    cache = Path(os.environ.get("OPD_SGLANG_CONTRACT_CACHE", REPO / ".cache" / "sglang-contract"))
    try:
        root = ss.fetch_sources(cache)
        ss.ensure_msgspec(cache)
    except ss.FetchError as exc:
        pytest.skip(f"SGLang {SGLANG_VERSION}'s wheel is not reachable, contract not checked: {exc}")
    return root


@pytest.fixture(scope="session")
def api(sources: Path) -> ModuleType:
    return ss.load_api_types(sources)


@pytest.fixture(scope="session")
def trees(sources: Path) -> dict[str, Any]:
    return {key: ss.parse(sources, key) for key in ss.SOURCES if key != "api_types"}


def struct_fields(api: ModuleType, name: str) -> set[str]:
    return set(getattr(api, name).__struct_fields__)


# --------------------------------------------------------------------------- the checks


def check_generate(body: dict[str, Any], api: ModuleType, trees: dict[str, Any]) -> None:
    """`body` passes SGLang's `/generate` gate and every key is a field of both schemas."""
    try:
        api.GenerateRequest.from_json_value(copy.deepcopy(body))
    except api.JsonContractError as exc:
        raise ContractViolation(f"/generate refuses the body: {exc}") from exc
    for key in body:
        if key not in struct_fields(api, "GenerateRequest") or key not in ss.class_fields(trees["io_struct"], "GenerateReqInput"):
            raise ContractViolation(f"/generate: {key!r} is not a GenerateRequest / GenerateReqInput field (ignored)")
    sampling = body.get("sampling_params")
    for params in sampling if isinstance(sampling, list) else [sampling or {}]:
        for key in params:
            if key not in struct_fields(api, "SamplingParams") or key not in ss.class_fields(trees["sampling_params"], "SamplingParams"):
                raise ContractViolation(f"/generate: sampling_params.{key} is not a SamplingParams field")


def check_control(path: str, body: Any, trees: dict[str, Any]) -> None:
    """`body` of a control call: only fields of the struct its route parses, required ones present."""
    route = ss.routes(trees["http_server"])[("POST", path)]
    if route.body_class is None:
        raise ContractViolation(f"{path} takes no body struct")
    fields = ss.class_fields(trees["io_struct"], route.body_class)
    if not isinstance(body, dict):
        raise ContractViolation(f"{path}: body {body!r} is not an object")
    for key in body:
        if key not in fields:
            raise ContractViolation(f"{path}: {key!r} is not a field of {route.body_class} (ignored)")
    missing = [f.name for f in fields.values() if f.required and f.name not in body]
    if missing:
        raise ContractViolation(f"{path}: {route.body_class} requires {missing}")
    for key, value in body.items():
        annotation = fields[key].annotation
        if annotation.startswith("Literal") and value not in ss.literal_values(annotation):
            raise ContractViolation(f"{path}: {key}={value!r} not in {annotation}")
        if "str" in annotation and not isinstance(value, str):
            raise ContractViolation(f"{path}: {key}={value!r} is not a string ({annotation})")


# --------------------------------------------------------------------------- a server in SGLang's shapes


def generate_answer(body: dict[str, Any], version: str) -> list[dict[str, Any]]:
    """What `/generate` answers a batch, per `TokenizerManager._handle_batch_output` (non-streaming)."""
    params = body["sampling_params"]
    out = []
    for i, ids in enumerate(body["input_ids"]):
        p = params[i] if isinstance(params, list) else params
        meta: dict[str, Any] = {"id": f"rid{i}", "prompt_tokens": len(ids), "weight_version": version,
                                "num_retractions": 0, "reasoning_tokens": 0, "cached_tokens": 0, "e2e_latency": 0.01}
        if p["max_new_tokens"] == 0:  # scoring: prefill only, prompt logprobs from logprob_start_len
            start = body["logprob_start_len"][i]
            k = body.get("top_logprobs_num", 0)
            meta.update(finish_reason={"type": "length", "length": 0}, completion_tokens=0, output_token_logprobs=[],
                        input_token_logprobs=[[None if j == 0 else -0.5, t, None] for j, t in enumerate(ids[start:])],
                        output_top_logprobs=[])
            if k:
                meta["input_top_logprobs"] = [None] + [[[-0.1 * (r + 1), r, None] for r in range(k)]
                                                       for _ in ids[start + 1:]]
            tokens: list[int] = []
        else:
            tokens = [5 + j for j in range(p["max_new_tokens"])]
            meta.update(finish_reason={"type": "length", "length": len(tokens)}, completion_tokens=len(tokens),
                        output_token_logprobs=[[-0.25, t, None] for t in tokens])
        out.append({"text": "", "output_ids": tokens, "meta_info": meta, "index": i})
    return out


class SGLangShapedServer:
    """Loopback HTTP server: SGLang 0.5.23's answers to the calls we make; records every request."""

    def __init__(self) -> None:
        self.version = LAUNCH_WEIGHT_VERSION
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: list[tuple[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                server.requests.append((method, self.path, body))
                status, answer = server.answer(method, self.path, body)
                server.answers.append((self.path, answer))
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("POST", "/generate"):
            return 200, generate_answer(body, self.version)
        if (method, path) == ("GET", "/model_info"):
            return 200, {"model_path": "/data/assets/student", "served_model_name": "/data/assets/student",
                         "tokenizer_path": "/data/assets/student", "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": self.version, "load_format": "auto",
                         "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null"}
        if (method, path) == ("POST", "/update_weights_from_disk"):
            self.version = body.get("weight_version") or self.version
            return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        if (method, path) == ("POST", "/pause_generation"):
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if (method, path) == ("POST", "/continue_generation"):
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if (method, path) == ("GET", "/health"):
            return 200, None
        return 404, {"detail": "Not Found"}


@pytest.fixture(scope="module")
def traffic() -> Iterator[SGLangShapedServer]:
    """Every call the rollout engine and the teacher scorer make, against one SGLang-shaped server."""
    server = SGLangShapedServer()
    engine = SGLangRolloutEngine(server.url, num_parameters=1)
    engine.generate([[1, 2, 3], [4, 5], [6]], [3, 0, 2], temperature=0.7, top_p=1.0, seed=11)
    engine.generate([[1, 2, 3]], [2], temperature=1.0, top_p=1.0, seed=None)
    engine.load_weights("/data/learner/weights/v000001", 1)  # from "default": pause, update, continue
    gens = engine.generate([[1, 2]], [2], temperature=1.0, top_p=1.0, seed=None)
    assert engine.health() and gens[0].policy_version == 1
    scorer = SGLangTeacherScorer(server.url, num_parameters=1)
    seq = np.array([1, 5, 7, 9, 11], dtype=np.int32)
    scorer.score([seq, seq], [3, 1], 2)
    scorer.score([seq], [2], 0)
    assert scorer.identity
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


# --------------------------------------------------------------------------- tests


def test_every_endpoint_we_call_is_a_route(traffic: SGLangShapedServer, trees: dict[str, Any]) -> None:
    served = ss.routes(trees["http_server"])
    called = {(method, path) for method, path, _ in traffic.requests}
    assert called == {("POST", "/generate"), ("GET", "/model_info"), ("POST", "/pause_generation"),
                      ("POST", "/update_weights_from_disk"), ("POST", "/continue_generation"), ("GET", "/health")}
    assert called <= set(served), sorted(called - set(served))


def test_generate_bodies_pass_sglangs_gate(traffic: SGLangShapedServer, api: ModuleType, trees: dict[str, Any]) -> None:
    bodies = [body for _, path, body in traffic.requests if path == "/generate"]
    assert len(bodies) == 5  # 3 sampling batches, 2 scoring ones
    for body in bodies:
        check_generate(body, api, trees)
    sampled = api.GenerateRequest.from_json_value(bodies[0])
    assert [p.sampling_seed for p in sampled.sampling_params] == [11, 12] and sampled.return_logprob is True
    assert [p.top_k for p in sampled.sampling_params] == [-1, -1]  # the server maps -1 to the whole vocabulary
    gate = ss.routes(trees["http_server"])[("POST", "/generate")].handler
    assert "generate_contract_error" in ss.calls(gate)  # the gate runs the decoder we ran
    assert "GenerateRequest.from_json_value" in ss.calls(trees["api_contract"])


def test_control_bodies_match_their_structs(traffic: SGLangShapedServer, trees: dict[str, Any]) -> None:
    controls = [(path, body) for method, path, body in traffic.requests if method == "POST" and path != "/generate"]
    assert [path for path, _ in controls] == ["/pause_generation", "/update_weights_from_disk", "/continue_generation"]
    for path, body in controls:
        check_control(path, body, trees)
    for mode in PAUSE_MODES:  # every pause mode the engine accepts
        check_control("/pause_generation", {"mode": mode}, trees)
    with pytest.raises(ContractViolation, match=r"requires \['model_path'\]"):
        check_control("/update_weights_from_disk", {"weight_version": "1"}, trees)
    with pytest.raises(ContractViolation, match=r"mode='pause' not in Literal"):
        check_control("/pause_generation", {"mode": "pause"}, trees)
    with pytest.raises(ContractViolation, match="weight_version=1 is not a string"):
        check_control("/update_weights_from_disk", {"model_path": "/w", "weight_version": 1}, trees)


def test_answers_decode_under_sglangs_schema(traffic: SGLangShapedServer, api: ModuleType, trees: dict[str, Any]) -> None:
    for path, answer in traffic.answers:
        if path == "/generate":
            for item in answer:
                decoded = api.GenerateResponse.from_json_value(item)
                assert isinstance(decoded.meta_info.finish_reason, api.FinishLength)
        elif path == "/model_info":
            assert api.GetModelInfoResponse.from_json_value(answer).weight_version in (LAUNCH_WEIGHT_VERSION, "1")
    abort = {"meta_info": {"id": "r", "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                           "weight_version": "3", "weight_versions": [{"version": "2", "start": 0, "end": 1},
                                                                      {"version": "3", "start": 1, "end": 2}]}}
    decoded = api.GenerateResponse.from_json_value(abort)
    assert isinstance(decoded.meta_info.finish_reason, api.FinishAbort)
    assert [span.version for span in decoded.meta_info.weight_versions] == ["2", "3"]
    with pytest.raises(Exception, match="aborted: 'Abort in waiting queue'"):
        parse_generate_response([abort], [2])


def test_fields_we_read_exist(api: ModuleType, trees: dict[str, Any]) -> None:
    assert struct_fields(api, "GenerateMetaInfo") >= META_INFO_READ
    assert struct_fields(api, "WeightVersionSpan") >= {"version", "start", "end"}
    assert struct_fields(api, "GetModelInfoResponse") >= MODEL_INFO_READ
    served = ss.routes(trees["http_server"])
    assert ss.dict_keys(served[("GET", "/model_info")].handler) >= MODEL_INFO_READ
    assert ss.dict_keys(served[("POST", "/update_weights_from_disk")].handler) >= UPDATE_ANSWER_READ
    assert ss.string_default(trees["serving_args"], "weight_version") == LAUNCH_WEIGHT_VERSION


@pytest.mark.parametrize(
    ("kind", "rename"),
    [("generate", ("return_logprob", "return_logprobs")), ("generate", ("logprob_start_len", "logprob_start")),
     ("sampling", ("sampling_seed", "seed")), ("sampling", ("top_k", "topk")),
     ("/update_weights_from_disk", ("weight_version", "version")), ("/update_weights_from_disk", ("model_path", "path")),
     ("/pause_generation", ("mode", "pause_mode"))],
)
def test_a_renamed_key_fails(kind: str, rename: tuple[str, str], traffic: SGLangShapedServer, api: ModuleType,
                             trees: dict[str, Any]) -> None:
    old, new = rename
    path = "/generate" if kind in ("generate", "sampling") else kind
    body = copy.deepcopy(next(b for _, p, b in traffic.requests if p == path))
    target = body["sampling_params"][0] if kind == "sampling" else body
    target[new] = target.pop(old)
    with pytest.raises(ContractViolation, match=new):
        if path == "/generate":
            check_generate(body, api, trees)
        else:
            check_control(path, body, trees)
