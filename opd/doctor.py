"""`opd doctor --config FILE`: one page to read before spending GPU hours on a pair.

Users of every OPD framework report the same first failures: a padded vocabulary, an end-of-turn token the
engine does not stop on (every answer runs to the length limit and the student learns never to stop), a chat
template applied on one side only, logits shifted by one somewhere between engine, teacher and learner. Each
gives a run that trains and says nothing. The doctor runs the real parts once, on a few prompts, and says
what it found, one line a check:

- inputs: what `opd up` checks before it starts (model dirs, tokenizers, prompt file, top-k).
- vocabulary: the tokenizer's ids against each model's embedding rows (a padded embedding is fine: every role
  drops the extra rows).
- stops: the ids an answer ends on (`protocol/stops.py`), decoded; whether the chat template ends an
  assistant turn with one of them; the pad id.
- prompts: the first prompt as the actor encodes it, and whether the longest prompt + `actor.max_new_tokens`
  fits both models' context.
- self-distillation: the actor's engine samples, the teacher's scorer *pointed at the student* scores, the
  learner's loss is computed. Student = teacher, so the loss must be ~0 and the engine's logprobs must match
  the learner's; anything else is a misalignment between the roles.
- first batch: the same rollouts scored by the real teacher: the configured loss, the sampled-token KL by
  response position, how long the answers are and how many ended (a student that never ends an answer trains
  only on length-capped text).

Exit code 0 when no check failed (warnings may stand), 1 when one did. The roles are not run once a static
check has failed: they would fail on the same cause, less clearly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opd.config import OPDConfig

Level = Literal["ok", "info", "warn", "FAIL"]
SELF_LOSS_TOLERANCE = 1e-2  # nats/token: float16 top-k storage rounds a logprob by ~1e-3
# |log mu - log pi| between engine and learner, nats: (mean, max). bf16 engines differ by ~1e-2 on average and
# ~1 on a rare token; a max of 5 (a token 150x more likely on one side) is another model, not rounding.
LOGPROB_WARN, LOGPROB_FAIL = (0.01, 1.0), (0.1, 5.0)


@dataclass
class Report:
    """The findings, in order; `failed` once any check failed."""

    lines: list[tuple[str, Level, str]] = field(default_factory=list)

    def add(self, check: str, level: Level, text: str) -> None:
        self.lines.append((check, level, text))
        print(f"[{level:>4}] {check:<17} {text}", flush=True)

    @property
    def failed(self) -> bool:
        return any(level == "FAIL" for _c, level, _t in self.lines)


def run_doctor(cfg: OPDConfig, *, prompts: int = 4, seed: int = 0) -> Report:
    """Every check, printed as it finishes; stops after the inputs when they are unusable."""
    from opd.launcher import _check_inputs
    from protocol.vocab import load_tokenizer

    report = Report()
    try:
        _check_inputs(cfg)
    except (ValueError, OSError) as exc:
        report.add("inputs", "FAIL", str(exc))
        return report
    report.add("inputs", "ok", "model dirs, tokenizers, prompt file and teacher.topk as `opd up` checks them")
    tok = load_tokenizer(cfg.actor.model_dir)
    check_vocabulary(report, cfg, tok)
    stops = check_stops(report, cfg, tok)
    encoded = check_prompts(report, cfg, tok, prompts)
    if report.failed:  # the checks below run the roles, which would fail on the same cause, less clearly
        report.add("roles", "info", "not run: mend the failures above first")
        return report
    rollouts = sample(cfg, encoded, seed)
    model, device = _student(cfg)
    check_self_distillation(report, cfg, tok, model, device, rollouts)
    check_first_batch(report, cfg, tok, model, device, rollouts, stops)
    return report


def check_vocabulary(report: Report, cfg: OPDConfig, tok: Any) -> None:
    from protocol.vocab import config_vocab_size, shared_vocab_size

    ids = shared_vocab_size(tok)
    for key, path in (("actor.model_dir", cfg.actor.model_dir), ("teacher.model_dir", cfg.teacher.model_dir)):
        rows = config_vocab_size(path)
        if rows == ids:
            report.add("vocabulary", "ok", f"{key}: {rows} embedding rows for the tokenizer's {ids} ids")
        else:  # fewer rows than ids failed in the inputs already
            report.add("vocabulary", "info", f"{key}: {rows} embedding rows for {ids} ids: padded, the "
                       f"{rows - ids} extra rows are dropped by every role")


def check_stops(report: Report, cfg: OPDConfig, tok: Any) -> list[int]:
    """The stop ids, named; whether the chat template's end of an assistant turn is one of them."""
    from protocol.stops import stop_token_ids

    stops = stop_token_ids(cfg.actor.model_dir, tok)
    named = ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in stops) or "none"
    report.add("stops", "ok" if stops else "warn", f"an answer ends on: {named}"
               + ("" if stops else " (no EOS anywhere: every answer runs to actor.max_new_tokens)"))
    if tok.pad_token_id is None:
        report.add("stops", "info", "no pad token: the learner pads with EOS (masked, never trained on)")
    end = end_of_turn(tok)
    if end is None:
        report.add("stops", "info", "no chat template (or it has no assistant turn): answers end at the ids above")
    elif end in stops:
        report.add("stops", "ok", f"the chat template ends an assistant turn with {end} "
                   f"{tok.convert_ids_to_tokens(end)!r}, a stop id")
    else:
        report.add("stops", "FAIL", f"the chat template ends an assistant turn with {end} "
                   f"{tok.convert_ids_to_tokens(end)!r}, which is not a stop id: answers run past the end of "
                   "the turn (add it to generation_config.json's eos_token_id)")
    return stops


def end_of_turn(tok: Any) -> int | None:
    """The first token the chat template writes after an assistant message's text; None without a template."""
    if not getattr(tok, "chat_template", None):
        return None
    user = [{"role": "user", "content": "Hi"}]
    try:
        head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        whole = tok.apply_chat_template([*user, {"role": "assistant", "content": "OK"}], tokenize=False)
    except Exception:  # a template that refuses these roles: nothing to check
        return None
    if not whole.startswith(head) or not whole[len(head):].startswith("OK"):
        return None
    rest = tok(whole[len(head) + 2:], add_special_tokens=False)["input_ids"]
    return int(rest[0]) if rest else None


def check_prompts(report: Report, cfg: OPDConfig, tok: Any, n: int) -> list[list[int]]:
    """The first `n` prompts as the actor encodes them; the longest of the file against the context."""
    from transformers import AutoConfig

    from protocol.prompts import PromptFormat, load_prompts, uses_chat_template

    fmt = PromptFormat(use_chat_template=cfg.actor.use_chat_template, add_bos=cfg.actor.add_bos)
    every = load_prompts(cfg.actor.prompts_file, tok, fmt)
    text = tok.decode(every[0])
    report.add("prompts", "ok", f"{len(every)} prompts, chat template {'on' if uses_chat_template(tok, fmt) else 'off'}"
               f"; the first encodes as {text[:160]!r}{'...' if len(text) > 160 else ''}")
    longest = max(range(len(every)), key=lambda i: len(every[i]))
    need = len(every[longest]) + cfg.actor.max_new_tokens
    for key, path in (("actor.model_dir", cfg.actor.model_dir), ("teacher.model_dir", cfg.teacher.model_dir)):
        context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if context is not None and need > context:
            report.add("prompts", "FAIL", f"prompt {longest + 1} ({len(every[longest])} tokens) + actor.max_new_tokens "
                       f"({cfg.actor.max_new_tokens}) = {need} exceeds {key}'s context ({context})")
    return every[:n]


def sample(cfg: OPDConfig, prompts: list[list[int]], seed: int) -> list[Any]:
    """Full-length rollouts from the actor's own engine (whatever `actor.engine` says), as the wire carries them."""
    from protocol.messages import RolloutPrefix

    a = cfg.actor
    gens = a.engine.build(a.model_dir).generate(prompts, [a.max_new_tokens] * len(prompts), temperature=a.temperature,
                                                top_p=a.top_p, seed=seed)
    return [RolloutPrefix.from_sample(p, g.response_ids, g.logprobs, prompt_index=i, horizon=a.max_new_tokens,
                                      max_new_tokens=a.max_new_tokens, finished=g.finished, policy_version=0,
                                      actor_id="doctor", temperature=a.temperature, top_p=a.top_p)
            for i, (p, g) in enumerate(zip(prompts, gens, strict=True))]


def score(teacher_cfg: Any, rollouts: list[Any]) -> list[Any]:
    """The teacher's scorer on the rollouts (no cache), as `cache.teacher.Teacher.process` forwards them."""
    import numpy as np

    from cache.scoring import score_with_cache
    from cache.teacher import make_scorer, topk_storage_dtype
    from protocol.messages import ScoredPrefix

    seqs = [np.concatenate([r.prompt_ids_P, r.response_ids_R]).astype(np.int32) for r in rollouts]
    full, _ = score_with_cache(make_scorer(teacher_cfg), None, seqs, k=teacher_cfg.topk,
                               topk_dtype=topk_storage_dtype(teacher_cfg))
    return [ScoredPrefix.from_sequence_scores(r, f.logprobs_T, f.topk_ids_TK, f.topk_logprobs_TK, teacher_id="doctor",
                                              cached_upto=0)
            for r, f in zip(rollouts, full, strict=True)]


def _student(cfg: OPDConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from protocol.runtime import resolve_device

    device = torch.device(resolve_device(cfg.learner.device))
    model = AutoModelForCausalLM.from_pretrained(cfg.learner.model_dir, dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval(), device


def learner_view(cfg: OPDConfig, tok: Any, model: Any, device: Any, scored: list[Any]) -> dict[str, Any]:
    """The learner's loss on the scored prefixes, its log pi against the engine's, and the per-token
    sampled-token KL estimate log mu(y) - log p_T(y) with each token's response position."""
    import torch

    from learner.batching import Sample, collate, pad_id_of, policy_logprobs

    batch = collate([Sample.from_record(s) for s in scored], pad_id_of(tok)).to(device)
    with torch.no_grad():
        logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits.float()
        out = cfg.learner.loss.build()(batch, logits_BTV, weights_BT=None, normalizer=max(batch.num_response_tokens, 1))
        mask_BT = batch.response_mask_BT
        gap_BT = (policy_logprobs(batch, logits_BTV) - batch.behaviour_logprobs_BT).abs()
    kl_BT = batch.behaviour_logprobs_BT - batch.teacher_logprobs_BT
    position_BT = mask_BT.long().cumsum(-1) - 1
    return {"loss": float(out.loss), "logprob_gap_mean": float(gap_BT[mask_BT].mean()) if mask_BT.any() else 0.0,
            "logprob_gap_max": float(gap_BT[mask_BT].max()) if mask_BT.any() else 0.0,
            "kl": kl_BT[mask_BT].cpu().tolist(), "position": position_BT[mask_BT].cpu().tolist()}


def check_self_distillation(report: Report, cfg: OPDConfig, tok: Any, model: Any, device: Any, rollouts: list[Any]) -> None:
    """The student as its own teacher (the embedded scorer on actor.model_dir, whatever serves the real teacher)."""
    from cache.scorers.hf import HFScorerConfig

    engine = cfg.teacher.engine if cfg.teacher.engine.kind == "hf" else HFScorerConfig()
    scored = score(cfg.teacher.model_copy(update={"model_dir": cfg.actor.model_dir, "engine": engine}), rollouts)
    view = learner_view(cfg, tok, model, device, scored)
    loss = view["loss"]
    if (cfg.actor.temperature, cfg.actor.top_p, cfg.teacher.temperature) != (1.0, 1.0, 1.0):
        report.add("self-distillation", "info", f"learner.loss of the student against itself: {loss:.2e} (not "
                   "expected 0: actor.temperature, actor.top_p or teacher.temperature is not 1)")
    else:
        report.add("self-distillation", "ok" if abs(loss) < SELF_LOSS_TOLERANCE else "FAIL",
                   f"learner.loss ({cfg.learner.loss.kind}) of the student against itself: {loss:.2e} nats/token"
                   + ("" if abs(loss) < SELF_LOSS_TOLERANCE else " (expected ~0: engine, scorer and learner do not "
                      "see the same tokens at the same positions)"))
    gap, worst = view["logprob_gap_mean"], view["logprob_gap_max"]
    level: Level = ("FAIL" if gap >= LOGPROB_FAIL[0] or worst >= LOGPROB_FAIL[1] else
                    "warn" if gap >= LOGPROB_WARN[0] or worst >= LOGPROB_WARN[1] else "ok")
    report.add("self-distillation", level, f"the engine's logprobs against the learner's: mean |diff| {gap:.2e}, "
               f"max {worst:.2e} nats" + ("" if level == "ok" else
               " (the importance ratio starts away from 1: another precision, sampling transform or model)"))


def check_first_batch(report: Report, cfg: OPDConfig, tok: Any, model: Any, device: Any, rollouts: list[Any],
                      stops: list[int]) -> None:
    import numpy as np

    view = learner_view(cfg, tok, model, device, score(cfg.teacher, rollouts))
    lengths = [len(r.response_ids_R) for r in rollouts]
    ended = sum(r.finished for r in rollouts)
    max_new = cfg.actor.max_new_tokens
    report.add("first batch", "ok" if ended else "warn",
               f"{ended} of {len(rollouts)} answers ended on a stop id; lengths {min(lengths)}-{max(lengths)} of "
               f"actor.max_new_tokens={max_new}" + ("" if ended else ": every answer is length-capped (the student "
               "has not learned to stop yet, or a stop id is missing); full rollouts train on its late tokens"))
    report.add("first batch", "info", f"learner.loss ({cfg.learner.loss.kind}) against the teacher: {view['loss']:.3f}")
    kl, pos = np.asarray(view["kl"]), np.asarray(view["position"])
    edges = sorted({0, *(max_new * q // 4 for q in (1, 2, 3))})
    cells = []
    for lo, hi in zip(edges, [*edges[1:], max_new], strict=True):
        sel = (pos >= lo) & (pos < hi)
        cells.append(f"{lo}-{hi - 1}: {kl[sel].mean():.2f}" if sel.any() else f"{lo}-{hi - 1}: -")
    report.add("first batch", "info", "sampled-token KL log mu(y) - log p_T(y) by response position: " + ", ".join(cells))
