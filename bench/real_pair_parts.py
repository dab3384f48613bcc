"""The measurements of bench/bench_real_pair.py, one function each (see that script's docstring for why).

Everything runs on real parts: the pair's HF directories, the HF rollout engine and teacher scorer the roles
run, a real Zarr cache opened as the teacher opens it, `learner.step.Trainer` and the held-out evaluator.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_cache import array_bytes_per_token, synthetic
from cache.layout import LOGPROBS, RECORDS, TOPK_IDS, TOPK_LOGPROBS
from protocol.messages import RolloutPrefix, ScoredPrefix

VOCAB = 49152


@dataclass
class Samples:
    """The sequences every part shares: the student's own samples and the teacher's greedy answers."""

    prompts: list[list[int]]
    student: list[np.ndarray]  # prompt + sampled answer
    behaviour: list[np.ndarray]  # the student's logprobs of its answer tokens
    teacher: list[np.ndarray]  # prompt + the teacher's greedy answer (opd.models.write_teacher_answers)


@dataclass
class FullK:
    """Teacher scores at the largest k for every position 0..T-1 of one sequence (position 0: NaN / id 0)."""

    logprobs_T: np.ndarray
    ids_TK: np.ndarray
    logprobs_TK: np.ndarray

    def at(self, k: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top-k of a sorted top-K is its first k columns: one forward gives every k."""
        return self.logprobs_T, self.ids_TK[:, :k].copy(), self.logprobs_TK[:, :k].astype(dtype)


def peak_rss_mb() -> float:
    """This process's peak resident set (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (VmRSS: resident now; VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loaded_rss_mb() -> float:
    """The resident set once the model is loaded, and the peak reset to it (clear_refs 5, Linux >= 4.0), so
    VmHWM afterwards is the peak of the work alone: loading a checkpoint briefly holds two copies."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


# ---------------------------------------------------------------------------------------------
# the shared samples, and the teacher's scores of them
# ---------------------------------------------------------------------------------------------


def make_samples(pair: Path, prompts_file: Path, n: int, new_tokens: int, tmp: Path) -> Samples:
    from transformers import AutoTokenizer

    from actors.engines.hf import HFRolloutEngine
    from opd.models import write_teacher_answers
    from protocol.prompts import PromptFormat, load_prompts

    lines = [x for x in prompts_file.read_text().splitlines() if x.strip()][:n]
    subset = tmp / "prompts.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    prompts = load_prompts(subset, AutoTokenizer.from_pretrained(pair / "student"), PromptFormat(use_chat_template=True))
    gens = HFRolloutEngine(pair / "student").generate(prompts, [new_tokens] * n, temperature=1.0, seed=0)
    answers = tmp / "answers.jsonl"
    write_teacher_answers(pair / "teacher", subset, answers, max_new_tokens=new_tokens, batch_size=n)
    import json

    teacher = [np.asarray(json.loads(x)["ids"], np.int32) for x in answers.read_text().splitlines()]
    return Samples(prompts, [np.asarray(p + g.response_ids, np.int32) for p, g in zip(prompts, gens, strict=True)],
                   [np.minimum(np.asarray(g.logprobs, np.float32), 0.0) for g in gens], teacher)


def score_full(scorer: Any, seqs: list[np.ndarray], k: int) -> tuple[list[FullK], float]:
    """Every position of `seqs` scored at top-k `k`, and the seconds it took (the no-cache baseline)."""
    t0 = time.perf_counter()
    out = scorer.score(seqs, [1] * len(seqs), k)
    seconds = time.perf_counter() - t0
    full = []
    for s in out:
        lp = np.concatenate([[np.nan], s.logprobs_R]).astype(np.float32)
        ids = np.concatenate([np.zeros((1, k), np.int32), s.topk_ids_RK])
        tlp = np.concatenate([np.zeros((1, k), np.float32), s.topk_logprobs_RK])
        full.append(FullK(lp, ids, tlp))
    return full, seconds


# ---------------------------------------------------------------------------------------------
# 1. bytes per token on real teacher distributions (and the synthetic Zipfian figure beside it)
# ---------------------------------------------------------------------------------------------


def open_cache(root: Path, url: str, identity: str, k: int, dtype: str, block_size: int, writer: str | None = "bench"):
    """The cache as `cache.teacher.open_cache` opens it: namespace = teacher identity + k + top-k dtype."""
    from cache.keys import cache_namespace
    from cache.store import TeacherCache

    return TeacherCache(root, url, k=k, namespace=cache_namespace(identity, k, np.dtype(dtype)), topk_dtype=dtype,
                        block_size=block_size, writer_id=writer, redis_prefix=f"bench:{root.name}")


def cache_bytes(root: Path, url: str, identity: str, seqs: list[np.ndarray], scores: list[tuple[np.ndarray, ...]],
                k: int, dtype: str, block_size: int) -> dict[str, Any]:
    """Store `seqs` with their scores in a fresh cache; bytes on disk per stored token, whole and per array.

    WHY a marginal figure too: a run here stores ~1k tokens (a real teacher scores ~20 tokens/s on this CPU),
    where the fixed cost of a shard (zarr metadata, chunk headers, the unfilled part of a chunk) still weighs
    per token. The first half is stored, then the second; (bytes after - bytes between) / tokens added is the
    cost of a token once that fixed cost is paid: what a cache of millions of tokens takes per token."""
    from cache import ops

    half = max(1, len(seqs) // 2)
    with open_cache(root, url, identity, k, dtype, block_size) as cache:
        cache.put_many([(s, *sc, 0) for s, sc in zip(seqs[:half], scores[:half], strict=True)])
        mid = ops.stats(root, url, redis_prefix=f"bench:{root.name}")
        cache.put_many([(s, *sc, 0) for s, sc in zip(seqs[half:], scores[half:], strict=True)])
    st = ops.stats(root, url, redis_prefix=f"bench:{root.name}")
    added = st.stored_tokens - mid.stored_tokens
    marginal = ((st.bytes_per_token * st.stored_tokens - mid.bytes_per_token * mid.stored_tokens) / added
                if added > 0 else float("nan"))
    raw = array_bytes_per_token(root, st.stored_tokens)
    parts = {"logprobs": raw[LOGPROBS], "topk_ids": raw[TOPK_IDS], "topk_logprobs": raw[TOPK_LOGPROBS],
             "records+meta": raw[RECORDS] + raw["rest"]}
    return {"bytes_per_token": st.bytes_per_token, "marginal": marginal, "stored_tokens": st.stored_tokens,
            "payload": 4 + k * (4 + np.dtype(dtype).itemsize), "parts": parts}


def bytes_rows(tmp: Path, url: str, identity: str, samples: Samples, full: dict[str, list[FullK]], ks: list[int],
               dtypes: list[str], block_size: int) -> list[dict[str, Any]]:
    """One row per (source, k, dtype): the student's samples, the teacher's answers, and synthetic Zipfian
    outputs over the same vocabulary and token count (bench/bench_cache.py's model of a real teacher)."""
    rows = []
    seqs = {"student samples": samples.student, "teacher answers": samples.teacher}
    for k in ks:
        for dtype in dtypes:
            for source, fk in full.items():
                root = tmp / f"bytes-{source.split()[0]}-k{k}-{dtype}"
                got = cache_bytes(root, url, identity, seqs[source], [f.at(k, dtype) for f in fk], k, dtype, block_size)
                rows.append({"source": source, "k": k, "dtype": dtype, **got})
            n_tok = sum(len(s) for s in samples.student)
            length = max(block_size, n_tok // len(samples.student) // block_size * block_size)
            syn_seqs, syn_scores = synthetic(VOCAB, k, len(samples.student), length, seed=k)
            syn_scores = [(a, b, c.astype(dtype)) for a, b, c in syn_scores]
            got = cache_bytes(tmp / f"bytes-zipf-k{k}-{dtype}", url, identity, syn_seqs, syn_scores, k, dtype, block_size)
            rows.append({"source": "synthetic Zipfian", "k": k, "dtype": dtype, **got})
    return rows


# ---------------------------------------------------------------------------------------------
# 2. a cache warmed with the teacher's answers: hit rate and teacher FLOPs saved
# ---------------------------------------------------------------------------------------------


def warm_hits(scorer: Any, root: Path, url: str, k: int, block_size: int, samples: Samples,
              baseline_s: dict[str, float]) -> list[dict[str, Any]]:
    """Re-score through `cache.scoring.score_with_cache` (the teacher's own path) with a cache that holds the
    teacher's answers at top-k `k` (already written into `root` by `bytes_rows`): the answers again (a student
    that reproduces them) and the student's own samples. FLOPs = 2 x parameters x tokens forwarded."""
    from cache.scoring import score_with_cache

    params = scorer.num_parameters()
    rows = []
    with open_cache(root, url, scorer.identity, k, "float32", block_size, writer="bench-warm") as cache:
        for source, seqs in (("teacher answers (reproduced)", samples.teacher), ("student samples", samples.student)):
            before, t0 = scorer.tokens_forwarded, time.perf_counter()
            full, _ = score_with_cache(scorer, cache, seqs, k=k, topk_dtype=np.dtype(np.float32))
            seconds = time.perf_counter() - t0
            forwarded = scorer.tokens_forwarded - before
            total = sum(len(s) for s in seqs)
            prompt = sum(len(p) for p in samples.prompts)
            hit = sum(min(f.cached_upto, len(s)) for f, s in zip(full, seqs, strict=True))
            resp_hit = sum(max(0, min(f.cached_upto, len(s)) - len(p))
                           for f, s, p in zip(full, seqs, samples.prompts, strict=True))
            rows.append({"source": source, "tokens": total, "hit_rate": hit / total,
                         "response_hit_rate": resp_hit / max(total - prompt, 1),
                         "full_hits": sum(f.cached_upto >= len(s) for f, s in zip(full, seqs, strict=True)),
                         "sequences": len(seqs), "tokens_forwarded": forwarded,
                         "teacher_gflops": 2 * params * forwarded / 1e9, "flops_saved": 1 - forwarded / total,
                         "seconds": seconds, "no_cache_seconds": baseline_s[source.split(" (")[0]]})
    return rows


# ---------------------------------------------------------------------------------------------
# 3. each role in its own process: tokens/s and peak RSS
# ---------------------------------------------------------------------------------------------


def scored_messages(samples: Samples, full: list[FullK], k: int, repeat: int = 1) -> list[ScoredPrefix]:
    """The student's samples as the learner receives them (teacher scores at top-k `k`), `repeat` times over."""
    out = []
    for i, (seq, prompt, beh, f) in enumerate(zip(samples.student, samples.prompts, samples.behaviour, full, strict=True)):
        lp, ids, tlp = f.at(k, "float32")
        P = len(prompt)
        rollout = RolloutPrefix(prompt_ids_P=seq[:P], response_ids_R=seq[P:], behaviour_logprobs_R=beh, prompt_index=i,
                                horizon=len(seq) - P, max_new_tokens=len(seq) - P, finished=False, policy_version=0,
                                actor_id="bench")
        out.append(ScoredPrefix.from_rollout(rollout, teacher_logprobs_R=lp[P:], topk_ids_RK=ids[P:],
                                             topk_logprobs_RK=tlp[P:], teacher_id="bench"))
    return out * repeat


def make_trainer(pair: Path, *, lr: float, micro_batch_tokens: int, max_logits_mb: int) -> tuple[Any, Any]:
    """(Trainer, student) as the learner builds them, single process, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.config import LearnerConfig
    from learner.distributed import Distributed, TrainModel
    from learner.step import Trainer

    cfg = LearnerConfig(model_dir=str(pair / "student"), lr=lr, micro_batch_tokens=micro_batch_tokens,
                        max_logits_mb=max_logits_mb, warmup_steps=0)
    student = AutoModelForCausalLM.from_pretrained(pair / "student", dtype=torch.float32, use_safetensors=True)
    student.train()
    dist = Distributed()
    return Trainer(cfg, TrainModel(student, dist, fsdp=False), dist, torch.device("cpu"), pad_id=2), student


def _role(role: str, pair: Path, payload: dict[str, Any], threads: int, out: Any) -> None:
    """Child process body: load the role's model, run its unit of work once after a small warm-up, report."""
    import torch

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    result: dict[str, Any] = {}
    if role == "actor":
        from actors.engines.hf import HFRolloutEngine

        engine = HFRolloutEngine(pair / "student")
        loaded, t_load = loaded_rss_mb(), time.perf_counter() - t_load
        engine.generate(payload["prompts"][:1], [2], seed=1)
        t0 = time.perf_counter()
        gens = engine.generate(payload["prompts"], [payload["new_tokens"]] * len(payload["prompts"]), seed=2)
        seconds, tokens = time.perf_counter() - t0, sum(len(g.response_ids) for g in gens)
    elif role == "teacher":
        from cache.scorers.hf import HFTeacherScorer

        scorer = HFTeacherScorer(pair / "teacher")
        loaded, t_load = loaded_rss_mb(), time.perf_counter() - t_load
        scorer.score(payload["seqs"][:1], [len(payload["seqs"][0]) - 2], payload["k"])
        t0 = time.perf_counter()
        scorer.score(payload["seqs"], payload["starts"], payload["k"])
        seconds = time.perf_counter() - t0
        tokens = sum(len(s) - st for s, st in zip(payload["seqs"], payload["starts"], strict=True))
        result["sequence_tokens"] = sum(len(s) for s in payload["seqs"])
    else:
        trainer, _ = make_trainer(pair, lr=1e-4, micro_batch_tokens=payload["micro_batch_tokens"],
                                  max_logits_mb=payload["max_logits_mb"])
        loaded, t_load = loaded_rss_mb(), time.perf_counter() - t_load
        stats = trainer.step(payload["messages"])
        seconds, tokens = stats.seconds, stats.tokens
        result |= {"sequence_tokens": stats.sequence_tokens, "micro_batch_tokens": trainer.micro_batch_tokens,
                   "max_logits_mb": payload["max_logits_mb"]}
    out.put({**result, "role": role, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
             "rss_loaded_mb": loaded, "peak_rss_mb": status_mb("VmHWM"), "process_peak_rss_mb": peak_rss_mb(),
             "load_s": t_load})


def run_role(role: str, pair: Path, payload: dict[str, Any], threads: int) -> dict[str, Any]:
    """`_role` in a fresh (spawned) process, so its peak RSS is that role's alone."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_role, args=(role, pair, payload, threads, queue))
    proc.start()
    try:
        result = queue.get(timeout=900)
    finally:
        proc.join(timeout=60)
    if proc.exitcode != 0:
        raise RuntimeError(f"bench: the {role} process exited {proc.exitcode}")
    return result


# ---------------------------------------------------------------------------------------------
# 5. which teacher.topk: held-out KL after the same synchronous steps
# ---------------------------------------------------------------------------------------------


@dataclass
class TopKRun:
    k: int
    seed: int
    heldout_kl: float
    train_reverse_kl: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_topk(pair: Path, scorer: Any, prompts: list[list[int]], heldout: list[list[int]], *, k: int, seed: int,
               steps: int, batch: int, new_tokens: int, lr: float, eval_tokens: int) -> TopKRun:
    """`steps` on-policy steps (generate -> score at top-k `k` -> `Trainer.step`, new weights copied into the
    engine) from the pruned student, then the full-vocabulary held-out reverse KL. The prompts drawn and the
    generation seed of each step depend on `seed` and the step only, so every k starts from the same samples."""
    import torch

    from actors.engines.hf import HFRolloutEngine

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    trainer, student = make_trainer(pair, lr=lr, micro_batch_tokens=4096, max_logits_mb=1024)
    engine = HFRolloutEngine(pair / "student")
    rng = random.Random(seed)
    run = TopKRun(k, seed, float("nan"))
    for step in range(steps):
        idx = [rng.randrange(len(prompts)) for _ in range(batch)]
        chosen = [prompts[i] for i in idx]
        gens = engine.generate(chosen, [new_tokens] * batch, temperature=1.0, seed=seed * 1000 + step)
        seqs = [np.asarray(p + g.response_ids, np.int32) for p, g in zip(chosen, gens, strict=True)]
        scores = scorer.score(seqs, [len(p) for p in chosen], k)
        messages = []
        for i, (p, g, s) in enumerate(zip(chosen, gens, scores, strict=True)):
            rollout = RolloutPrefix(prompt_ids_P=np.asarray(p, np.int32), response_ids_R=np.asarray(g.response_ids, np.int32),
                                    behaviour_logprobs_R=np.minimum(np.asarray(g.logprobs, np.float32), 0.0),
                                    prompt_index=idx[i], horizon=new_tokens, max_new_tokens=new_tokens,
                                    finished=g.finished, policy_version=step, actor_id="bench")
            messages.append(ScoredPrefix.from_rollout(rollout, teacher_logprobs_R=s.logprobs_R, topk_ids_RK=s.topk_ids_RK,
                                                      topk_logprobs_RK=s.topk_logprobs_RK, teacher_id="bench"))
        run.train_reverse_kl.append(trainer.step(messages).reverse_kl)
        engine.model.load_state_dict(student.state_dict())
    run.heldout_kl = heldout_kl(student, scorer.model, heldout, eval_tokens)
    run.seconds = time.perf_counter() - t0
    return run


def heldout_kl(student: Any, teacher: Any, heldout: list[list[int]], max_new_tokens: int) -> float:
    """`learner.evaluate.heldout_reverse_kl` as the learner runs it on this pair (stops: <|im_end|>)."""
    from learner.evaluate import heldout_reverse_kl

    return heldout_reverse_kl(student, teacher, heldout, max_new_tokens=max_new_tokens, pad_id=2, eos_id=[2],
                              vocab_size=VOCAB, seed=1234, batch_size=8).reverse_kl
