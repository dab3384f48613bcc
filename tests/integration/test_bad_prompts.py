"""Bad prompt files and settings that do not fit the model: refused at start, or left out and counted.

`opd up` must refuse a bad prompt file (empty, a malformed line) and a `teacher.topk` past the teacher's
vocabulary before it starts Redis or any role (exit 2, the file and line or the key named); `opd actor`
names the bad line the same way; an actor leaves out prompts with no room for `actor.max_new_tokens` in
the student's context (counted in `opd_actor_prompts_skipped_total{reason="too_long"}`) and samples the
others, and refuses a file where none fits. Real tiny models, a real redis-server. Bad messages on the
streams: tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from roles import CONFIG, REPO

from protocol.names import Names
from protocol.streams import PAYLOAD


def up_args(tiny_assets: Path, tmp: Path, prompts: Path, *extra: str) -> list[str]:
    """`opd up` on the tiny models with `prompts`; it must stop before starting Redis or any role."""
    from opd.tiny import asset_paths

    paths = asset_paths(tiny_assets)
    sets = {"run.tiny_assets": "null", "run.warm_cache": "null", "run.workdir": tmp / "run",
            "actor.model_dir": paths.student_dir, "teacher.model_dir": paths.teacher_dir,
            "learner.model_dir": paths.student_dir, "learner.workdir": tmp / "learner",
            "teacher.cache_dir": tmp / "cache", "learner.eval.heldout_file": "''", "actor.prompts_file": prompts}
    return ["up", "--config", str(CONFIG), "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            *extra]


def up_refuses(capsys: pytest.CaptureFixture[str], args: list[str], tmp: Path) -> str:
    """`opd up` (in this process: its signal handlers are restored) exits 2 with no role started; its stderr."""
    from opd.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not list((tmp / "run" / "logs").glob("*.log")), "a role was started"
    return err


@pytest.mark.parametrize(("content", "says"), [
    ("", ": no prompts found"),
    ("\n  \n", ": no prompts found"),
    ('{"prompt": "up a b:"}\n{"prompt": oops}\n', ":2: invalid JSON"),
    ('{"prompt": "up a b:"}\n\n["up a b:"]\n', ":3: expected a JSON object"),
    ('{"text": "up a b:"}\n', ":1: missing 'prompt'"),
], ids=["empty", "blank-lines", "invalid-json", "not-an-object", "no-prompt-key"])
def test_up_refuses_a_bad_prompt_file_before_starting_anything(tiny_assets: Path, tmp_path: Path, content: str,
                                                               says: str, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    err = up_refuses(capsys, up_args(tiny_assets, tmp_path, prompts), tmp_path)
    assert f"{prompts}{says}" in err, err


def test_up_refuses_teacher_topk_past_the_vocabulary(tiny_assets: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`teacher.topk` within its config bound (256) but past the tiny teacher's vocabulary: named at start."""
    from opd.tiny import asset_paths

    args = up_args(tiny_assets, tmp_path, asset_paths(tiny_assets).prompts_file, "--set", "teacher.topk=200")
    assert "teacher.topk=200 exceeds the vocabulary of teacher.model_dir" in up_refuses(capsys, args, tmp_path)


def make_actor(redis_server: str, tiny_assets: Path, prompts: Path) -> Any:
    from actors.actor import Actor
    from actors.config import ActorConfig
    from opd.tiny import asset_paths
    from protocol.config import TransportConfig

    cfg = ActorConfig(model_dir=str(asset_paths(tiny_assets).student_dir), prompts_file=str(prompts), max_new_tokens=8,
                      batch_size=6, admission_control=False, probe_fraction=0, engine={"kind": "hf", "device": "cpu"})
    names = Names(f"long-{uuid.uuid4().hex[:8]}")
    return Actor(cfg, TransportConfig(redis_url=redis_server, namespace=names.namespace), actor_id="actor-long")


def test_actor_skips_prompts_too_long_for_the_context(redis_server: str, tiny_assets: Path, tmp_path: Path) -> None:
    """A prompt with no room for max_new_tokens in the student's context is left out at start and counted; the
    actor samples the others (the engine would refuse it mid-run and stop the actor)."""
    from opd.tiny import MAX_POSITIONS
    from protocol.messages import RolloutPrefix, decode

    prompts = tmp_path / "prompts.jsonl"
    texts = ["up a b:", "a " * MAX_POSITIONS, "down c b a:"]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in texts) + "\n")
    actor = make_actor(redis_server, tiny_assets, prompts)
    try:
        assert actor.registry.get_sample_value("opd_actor_prompts_skipped_total", {"reason": "too_long"}) == 1
        assert actor.step() == 6
        rollouts = [decode(fields[PAYLOAD], expect=RolloutPrefix) for _e, fields in actor.client.xrange(actor.names.rollouts)]
        assert {r.prompt_index for r in rollouts} == {0, 2}, "only the prompts that fit are sampled"
    finally:
        keys = actor.client.keys(f"{actor.names.namespace}:*")
        if keys:
            actor.client.delete(*keys)
        actor.client.close()


def test_actor_refuses_a_prompt_file_with_no_prompt_that_fits(redis_server: str, tiny_assets: Path,
                                                              tmp_path: Path) -> None:
    from opd.tiny import MAX_POSITIONS
    from protocol.errors import InputError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a " * MAX_POSITIONS}) + "\n")
    with pytest.raises(InputError, match=rf"{prompts}: no prompt fits the model's context of {MAX_POSITIONS} tokens "
                       r"with actor\.max_new_tokens=8"):
        make_actor(redis_server, tiny_assets, prompts)


def test_opd_actor_names_the_bad_line_of_its_prompt_file(redis_server: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Through the command line: exit 2, the file and line named, no traceback."""
    from opd.tiny import asset_paths

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "up a b:"}\n{"prompt": 3}\n')
    out = subprocess.run(
        [sys.executable, "-m", "opd.cli", "actor", "--config", str(CONFIG), "--set", f"transport.redis_url={redis_server}",
         "--set", f"transport.namespace=badline-{uuid.uuid4().hex[:8]}", "--set",
         f"actor.model_dir={asset_paths(tiny_assets).student_dir}", "--set", f"actor.prompts_file={prompts}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{prompts}:2: 'prompt' must be a string, got int" in out.stderr
    assert "Traceback" not in out.stderr
