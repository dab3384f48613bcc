"""`actor.probe_truth`: the probes' savings estimate checked against the truth in the same run (issue 17, item 3).

A real actor on the tiny student and a real redis-server. With probe_truth on, every rollout the schedule
truncates is sampled to the whole budget; pins:
- what the learner receives is exactly a truncated rollout: a non-probe message holds at most `horizon`
  response tokens (finished only if EOS came within them), a probe is full length as always;
- every truncated non-probe rollout's true saving is recorded (`truth_rollouts` == `actor_truncated`,
  `truth_saving_sum` = the tokens generated past each one's horizon), and the tokens past the horizon are not
  charged: `flops_generation` is 2 N x (prompt + sent response tokens + probes), as in a plain run;
- the experiment's report turns those stats into estimate, stated standard error, truth and z.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from actors.actor import truncated_view
from protocol.streams import PAYLOAD

pytestmark = pytest.mark.integration

MAX_NEW, HORIZON = 24, 6


def test_truncated_view_is_the_truncated_rollout() -> None:
    assert truncated_view([5, 6, 7, 2], [-0.1, -0.2, -0.3, -0.4], True, 2) == ([5, 6], [-0.1, -0.2], False)
    assert truncated_view([5, 2], [-0.1, -0.4], True, 3) == ([5, 2], [-0.1, -0.4], True)  # EOS within the horizon
    assert truncated_view([5, 6, 7], [-0.1, -0.2, -0.3], False, 3) == ([5, 6, 7], [-0.1, -0.2, -0.3], False)


def test_probe_truth_records_the_truth_and_charges_the_truncated_rollout(redis_server: str, tiny_assets: Path,
                                                                          tmp_path: Path) -> None:
    from actors.actor import Actor
    from actors.config import ActorConfig
    from opd.experiment.report import probe_truth
    from opd.tiny import asset_paths
    from protocol import ledger
    from protocol.compute import forward_flops
    from protocol.config import TransportConfig
    from protocol.messages import RolloutPrefix, decode
    from protocol.names import Names

    paths = asset_paths(tiny_assets)
    cfg = ActorConfig(model_dir=str(paths.student_dir), prompts_file=str(paths.prompts_file), max_new_tokens=MAX_NEW,
                      batch_size=16, admission_control=False, probe_fraction=0.3, probe_truth=True,
                      schedule={"kind": "fixed", "fraction": HORIZON / MAX_NEW}, engine={"kind": "hf", "device": "cpu"})
    names = Names(f"truth-{uuid.uuid4().hex[:8]}")
    actor = Actor(cfg, TransportConfig(redis_url=redis_server, namespace=names.namespace), actor_id="actor-truth")
    try:
        for _ in range(3):
            actor.step()
        rollouts = [decode(fields[PAYLOAD], expect=RolloutPrefix) for _e, fields in actor.client.xrange(actor.names.rollouts)]
        probes = [r for r in rollouts if r.probe]
        sent = [r for r in rollouts if not r.probe]
        assert probes and sent and len(rollouts) == 48
        assert all(r.horizon == HORIZON and len(r.response_ids_R) <= HORIZON for r in sent)
        assert all(r.horizon == MAX_NEW for r in probes)
        stats = ledger.stats(actor.client, actor.names)
        assert stats["truth_rollouts"] == stats["actor_truncated"] == len(sent)
        assert 0 <= stats["truth_saving_sum"] <= len(sent) * (MAX_NEW - HORIZON)
        tokens = sum(len(r.prompt_ids_P) + len(r.response_ids_R) for r in rollouts)
        assert stats["flops_generation"] == forward_flops(actor.params, tokens)  # the tail past the horizon: free
        check = probe_truth(stats)
        assert check is not None and check["truth"] == stats["truth_saving_sum"]
        assert check["rollouts"] == len(sent) and check["probes"] == len(probes)
        json.dumps(check)  # goes into results.json
    finally:
        keys = actor.client.keys(f"{actor.names.namespace}:*")
        if keys:
            actor.client.delete(*keys)
        actor.client.close()
