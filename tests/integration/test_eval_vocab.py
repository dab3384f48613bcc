"""Padded vocabularies and the tokenizer checks (issue 8, defect 3).

Real checkpoints pad their embedding matrices to different widths for one tokenizer (Qwen2.5
0.5B: 151936 rows, 7B: 152064, tokenizer 151665). Pinned here with the tiny models padded the same
way (52 tokens; student 64 rows, teacher 80):
- held-out evaluation runs and equals the unpadded computation (logits sliced to the tokenizer);
- the start-up checks compare tokenizers for every engine pairing, an SGLang server through its
  `/get_model_info` (a real HTTP server on loopback answering in SGLang's documented shape), and a
  real tokenizer mismatch, or a model narrower than its tokenizer, fails naming the config keys.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.config import LearnerConfig
from learner.evaluate import HeldoutEvaluator, heldout_reverse_kl, load_heldout
from opd.config import load_config
from opd.launcher import _check_inputs
from opd.tiny import PAD_ID, asset_paths, build_tokenizer
from protocol.vocab import check_model_dirs, check_served_tokenizer

pytestmark = pytest.mark.integration

VOCAB = 52  # the tiny tokenizer
STUDENT_ROWS, TEACHER_ROWS = 64, 80


def padded_copy(src: Path, dst: Path, rows: int) -> Path:
    """`src` with its embedding and LM head padded to `rows` (the first rows unchanged), as HF saves it."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(rows)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def padded(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("padded")
    paths = asset_paths(tiny_assets)
    return (padded_copy(paths.student_dir, root / "student", STUDENT_ROWS),
            padded_copy(paths.teacher_dir, root / "teacher", TEACHER_ROWS))


def load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_padded_models_evaluate_like_unpadded_ones(tiny_assets: Path, padded: tuple[Path, Path]) -> None:
    paths = asset_paths(tiny_assets)
    tok = AutoTokenizer.from_pretrained(paths.student_dir)
    assert load(padded[0]).config.vocab_size == STUDENT_ROWS and load(padded[1]).config.vocab_size == TEACHER_ROWS
    prompts = load_heldout(str(paths.heldout_file), tok, 8)
    kwargs = {"max_new_tokens": 12, "pad_id": PAD_ID, "eos_id": tok.eos_token_id, "vocab_size": len(tok), "seed": 7}
    ref = heldout_reverse_kl(load(paths.student_dir), load(paths.teacher_dir), prompts, **kwargs)
    got = heldout_reverse_kl(load(padded[0]), load(padded[1]), prompts, **kwargs)
    assert got.tokens == ref.tokens > 0  # the same samples: the padded rows are never drawn
    assert got.reverse_kl == pytest.approx(ref.reverse_kl, rel=1e-5, abs=1e-6)
    assert ref.reverse_kl > 0.01


def test_the_learner_evaluator_checks_and_runs_on_padded_models(tiny_assets: Path, padded: tuple[Path, Path]) -> None:
    paths = asset_paths(tiny_assets)
    tok = AutoTokenizer.from_pretrained(padded[0])
    cfg = LearnerConfig(model_dir=str(padded[0]), eval={"heldout_file": str(paths.heldout_file),
                                                           "teacher_dir": str(padded[1]), "num_prompts": 4,
                                                           "max_new_tokens": 8})
    result = HeldoutEvaluator(cfg, tok, torch.device("cpu")).run(load(padded[0]))
    unpadded = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"teacher_dir": str(paths.teacher_dir)})})
    ref = HeldoutEvaluator(unpadded, tok, torch.device("cpu")).run(load(paths.student_dir))
    assert result.tokens == ref.tokens
    assert result.reverse_kl == pytest.approx(ref.reverse_kl, rel=1e-5, abs=1e-6)


def other_tokenizer(root: Path, like: Path) -> Path:
    """A copy of model dir `like` whose tokenizer swaps the ids of 'a' and 'b' (same size, other ids)."""
    dst = root / "swapped"
    shutil.copytree(like, dst)
    tok = build_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_a_real_tokenizer_mismatch_fails_naming_the_keys(tiny_assets: Path, padded: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    paths = asset_paths(tiny_assets)
    swapped = other_tokenizer(tmp_path, paths.teacher_dir)
    tok = AutoTokenizer.from_pretrained(paths.student_dir)
    cfg = LearnerConfig(model_dir=str(paths.student_dir),
                        eval={"heldout_file": str(paths.heldout_file), "teacher_dir": str(swapped)})
    with pytest.raises(ValueError, match=r"learner.eval.teacher_dir .* must share the student's tokenizer: "
                                         r"tokenizer token ids differ for 2 tokens"):
        HeldoutEvaluator(cfg, tok, torch.device("cpu"))
    check_model_dirs({"actor.model_dir": padded[0], "teacher.model_dir": padded[1]})  # padding is no mismatch
    with pytest.raises(ValueError, match=r"actor.model_dir .* and teacher.model_dir .* must share a tokenizer: "
                                         r"tokenizer token ids differ for 2 tokens \(actor.model_dir vs teacher"):
        check_model_dirs({"actor.model_dir": paths.student_dir, "teacher.model_dir": swapped})


def test_a_model_narrower_than_its_tokenizer_is_refused(tiny_assets: Path, tmp_path: Path) -> None:
    narrow = padded_copy(asset_paths(tiny_assets).teacher_dir, tmp_path / "narrow", VOCAB - 4)
    with pytest.raises(ValueError, match=r"teacher.model_dir .*: config.vocab_size 48 is smaller than its "
                                         r"tokenizer's 52 tokens"):
        check_model_dirs({"actor.model_dir": asset_paths(tiny_assets).student_dir, "teacher.model_dir": narrow})


class ModelInfoServer:
    """A loopback HTTP server answering `/get_model_info` as SGLang documents it."""

    def __init__(self, tokenizer_path: str) -> None:
        body = json.dumps({"model_path": tokenizer_path, "tokenizer_path": tokenizer_path, "is_generation": True,
                           "preferred_sampling_params": None, "weight_version": "default"}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/get_model_info"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if ok else b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve() -> Iterator:
    servers: list[ModelInfoServer] = []

    def start(tokenizer_path: str) -> str:
        servers.append(ModelInfoServer(tokenizer_path))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


def test_an_sglang_server_tokenizer_is_checked_where_it_can_be(tiny_assets: Path, tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    paths = asset_paths(tiny_assets)
    same = check_served_tokenizer(serve(str(paths.teacher_dir)), paths.student_dir, "teacher.engine.url",
                                  "actor.model_dir")
    assert "same as actor.model_dir" in same
    swapped = other_tokenizer(tmp_path, paths.teacher_dir)
    with pytest.raises(ValueError, match=r"actor.model_dir .* and the model teacher.engine.url serves .* must share"):
        check_served_tokenizer(serve(str(swapped)), paths.student_dir, "teacher.engine.url", "actor.model_dir")
    hub = check_served_tokenizer(serve("Qwen/Qwen2.5-7B-Instruct"), paths.student_dir, "teacher.engine.url",
                                 "actor.model_dir")
    assert "not checked" in hub and "not a local directory" in hub
    assert "did not answer" in check_served_tokenizer("http://127.0.0.1:9", paths.student_dir, "teacher.engine.url",
                                                      "actor.model_dir")


@pytest.mark.parametrize(("actor_engine", "teacher_engine"), [("hf", "sglang"), ("sglang", "hf"), ("sglang", "sglang")])
def test_launcher_checks_tokenizers_for_every_engine_pairing(
    tiny_assets: Path, tmp_path: Path, actor_engine: str, teacher_engine: str, serve  # type: ignore[no-untyped-def]
) -> None:
    paths = asset_paths(tiny_assets)
    swapped = other_tokenizer(tmp_path, paths.teacher_dir)

    def cfg(teacher_dir: Path, served: Path) -> list[str]:
        url = serve(str(served))
        return [f"actor.model_dir={paths.student_dir}", f"learner.model_dir={paths.student_dir}",
                f"teacher.model_dir={teacher_dir}", f"actor.prompts_file={paths.prompts_file}",
                f"actor.engine={actor_engine}", f"teacher.engine={teacher_engine}",
                *(f"{role}.engine.url={url}" for role, kind in (("actor", actor_engine), ("teacher", teacher_engine))
                  if kind == "sglang")]

    _check_inputs(load_config(None, cfg(paths.teacher_dir, paths.teacher_dir)))
    with pytest.raises(ValueError, match="must share a tokenizer"):
        _check_inputs(load_config(None, cfg(swapped, paths.teacher_dir)))  # the local dirs disagree
    with pytest.raises(ValueError, match=r"the model (actor|teacher)\.engine\.url serves .* must share"):
        _check_inputs(load_config(None, cfg(paths.teacher_dir, swapped)))  # a server serves another tokenizer
