"""The on-policy importance ratio is 1 under every sampling setting (issue 8, defect 1).

End to end on the tiny student: the real `Actor` samples with the HF engine at a given temperature and
top-p and publishes `RolloutPrefix` messages on a real Redis stream; they are decoded, scored (the
teacher hop, `ScoredPrefix.from_rollout`, over the wire again) and collated by the learner's code into
ONE batch that mixes all settings; the learner's log pi (`policy_logprobs`, a fresh model at the same
weights, full right-padded forward) over the behaviour logprobs is 1 within 1e-4 for every token.

Why it fails on the old code: the learner computed log pi at temperature 1 over the full vocabulary,
whatever the actor sampled with (the test also shows that path is off by far more than 1e-4 here), and
the rollout did not carry the settings at all.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.actor import Actor
from actors.config import ActorConfig
from learner.batching import Sample, collate, gather_response_logprobs, policy_logprobs
from opd.tiny import asset_paths
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix, ScoredPrefix, decode, encode
from protocol.names import Names
from protocol.runtime import StopFlag

pytestmark = pytest.mark.integration

SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.7, 0.9)]  # (temperature, top_p)
PER_SETTING = 4
MAX_NEW_TOKENS = 12


def _actor_rollouts(redis_url: str, root: Path, temperature: float, top_p: float) -> list[RolloutPrefix]:
    """What a real actor publishes for one sampling setting, read back off the rollout stream."""
    paths = asset_paths(root)
    namespace = f"ratio-{uuid.uuid4().hex[:8]}"
    cfg = ActorConfig.model_validate({
        "model_dir": str(paths.student_dir), "prompts_file": str(paths.prompts_file), "engine": {"kind": "hf", "device": "cpu"},
        "batch_size": PER_SETTING, "max_prefixes": PER_SETTING, "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": temperature, "top_p": top_p, "admission_control": False, "schedule": {"kind": "full"},
        "seed": int(temperature * 10 + top_p * 100),
    })
    actor = Actor(cfg, TransportConfig(redis_url=redis_url, namespace=namespace), actor_id="ratio-actor",
                  stop=StopFlag())
    assert actor.step() == PER_SETTING
    entries = actor.client.xrange(Names(namespace).rollouts)
    return [decode(fields[b"m"], expect=RolloutPrefix) for _, fields in entries]


def _scored(rollout: RolloutPrefix) -> ScoredPrefix:
    """The teacher hop: every rollout field (sampling settings included) travels on, over the wire."""
    r = len(rollout.response_ids_R)
    scored = ScoredPrefix.from_rollout(
        rollout, teacher_logprobs_R=np.full(r, -1.0, np.float32), topk_ids_RK=np.zeros((r, 0), np.int32),
        topk_logprobs_RK=np.zeros((r, 0), np.float32), teacher_id="none",
    )
    back = decode(encode(scored), expect=ScoredPrefix)
    assert (back.temperature, back.top_p) == (rollout.temperature, rollout.top_p)
    return back


@pytest.fixture(scope="module")
def messages(redis_server: str, tiny_assets: Path) -> list[ScoredPrefix]:
    """PER_SETTING scored prefixes per setting, in SETTINGS order (each actor in its own namespace)."""
    torch.set_num_threads(1)
    out = []
    for temperature, top_p in SETTINGS:
        rollouts = _actor_rollouts(redis_server, tiny_assets, temperature, top_p)
        assert {(m.temperature, m.top_p) for m in rollouts} == {(temperature, top_p)}
        out += [_scored(m) for m in rollouts]
    return out


def test_on_policy_ratio_is_one_for_every_token_under_every_setting(
    tiny_assets: Path, messages: list[ScoredPrefix]
) -> None:
    student_dir = asset_paths(tiny_assets).student_dir
    pad_id = AutoTokenizer.from_pretrained(student_dir).pad_token_id
    batch = collate([Sample.from_record(m) for m in messages], pad_id)  # one batch, mixed settings
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        logpi_BT = policy_logprobs(batch, logits_BTV)
        old_BT = gather_response_logprobs(logits_BTV, batch.input_ids_BT)  # the pre-fix learner
    mask_BT = batch.response_mask_BT
    ratio_BT = torch.exp(logpi_BT - batch.behaviour_logprobs_BT)
    old_ratio_BT = torch.exp(old_BT - batch.behaviour_logprobs_BT)
    report = {}
    for i, (temperature, top_p) in enumerate(SETTINGS):
        rows = slice(i * PER_SETTING, (i + 1) * PER_SETTING)
        ratios = ratio_BT[rows][mask_BT[rows]]
        old = old_ratio_BT[rows][mask_BT[rows]]
        assert ratios.numel() >= PER_SETTING, f"T={temperature} top_p={top_p}: too few tokens to say anything"
        report[f"T={temperature},top_p={top_p}"] = {
            "tokens": ratios.numel(), "max_dev": float((ratios - 1).abs().max()),
            "old_max_dev": float((old - 1).abs().max()),
        }
        assert float((ratios - 1).abs().max()) < 1e-4, json.dumps(report)
        if (temperature, top_p) != (1.0, 1.0):
            assert float((old - 1).abs().max()) > 1e-2, json.dumps(report)  # the old path is really wrong here


def test_the_learners_step_sees_ratio_one_on_policy(
    redis_url: str, tiny_assets: Path, tmp_path: Path, messages: list[ScoredPrefix]
) -> None:
    """Through the learner's own train step and configured loss: the IS statistics say 1."""
    from learner.config import LearnerConfig
    from learner.loop import Learner

    cfg = LearnerConfig(model_dir=str(asset_paths(tiny_assets).student_dir), workdir=str(tmp_path / "learner"),
                        device="cpu", batch_size=len(messages), steps=1,
                        loss="sampled_reverse_kl")  # the loss with IS statistics (the default topk_kl has none)
    learner = Learner(cfg, TransportConfig(redis_url=redis_url, namespace=f"ratio-{uuid.uuid4().hex[:8]}"))
    stats = learner.train_step(messages)
    assert stats.tokens == sum(len(m.response_ids_R) for m in messages)
    assert abs(stats.ratio_mean - 1) < 1e-4 and abs(stats.ratio_max - 1) < 1e-4, stats
    assert stats.clip_fraction == 0.0


def test_a_token_outside_the_learners_nucleus_trains_with_a_finite_gradient(tiny_assets: Path) -> None:
    """The policy moved so the sampled token left the nucleus: log pi stays finite, so does the gradient."""
    student_dir = asset_paths(tiny_assets).student_dir
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    ids_BT = torch.tensor([[1, 5, 6, 7]])
    logits_BTV = model(input_ids=ids_BT).logits
    least_likely = int(logits_BTV[0, 2].argmin())  # surely outside a top_p=0.5 nucleus
    ids_BT = ids_BT.clone()  # the forward saved the original for its backward
    ids_BT[0, 3] = least_likely
    mask_BT = torch.tensor([[False, False, False, True]])
    logpi_BT = gather_response_logprobs(logits_BTV, ids_BT, temperature=0.7, top_p=0.5, mask_BT=mask_BT)
    assert torch.isfinite(logpi_BT).all() and logpi_BT[0, 3] < 0
    logpi_BT[0, 3].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
