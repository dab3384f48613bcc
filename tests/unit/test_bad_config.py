"""Bad config through the command line: one line per problem naming the full dotted key, exit 2, no traceback.

tests/unit/test_config.py pins `load_config` itself (unknown key, several bad values at once, malformed
overrides, component options); this file pins what a user sees from `opd` for each kind of mistake,
in a YAML file as well as in `--set`, and the impossible values the issue lists (negative lr, top-k past
the vocabulary, an empty response budget, a horizon fraction over 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def config_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `opd config show` with `args`; it must exit 2 and print the error on stderr only (no traceback)."""
    assert main(["config", "show", "--config", str(CONFIG), *args]) == 2
    out = capsys.readouterr()
    assert out.out == "", "nothing on stdout when the config is refused"
    assert "Traceback" not in out.err
    return out.err


@pytest.mark.parametrize(("override", "key", "says"), [
    ("learner.lr=-0.001", "learner.lr", "greater than 0"),
    ("learner.lr=0", "learner.lr", "greater than 0"),
    ("teacher.topk=100000", "teacher.topk", "less than or equal to 256"),
    ("teacher.topk=-1", "teacher.topk", "greater than or equal to 0"),
    ("actor.max_new_tokens=0", "actor.max_new_tokens", "greater than or equal to 1"),
    ("actor.max_new_tokens=-5", "actor.max_new_tokens", "greater than or equal to 1"),
    ("actor.schedule.start=1.5", "actor.schedule.start", "less than or equal to 1"),
    ("learner.batch_size=0", "learner.batch_size", "greater than or equal to 1"),
    ("transport.max_message_bytes=10", "transport.max_message_bytes", "greater than or equal to 1024"),
    ("actor.probe_fraction=1", "actor.probe_fraction", "less than 1"),
])
def test_impossible_value_is_one_line_naming_the_key(capsys: pytest.CaptureFixture[str], override: str, key: str,
                                                     says: str) -> None:
    err = config_error(capsys, "--set", override)
    problems = [line.strip() for line in err.splitlines()[1:] if line.strip()]
    assert len(problems) == 1, err
    assert problems[0].startswith(f"{key}: ") and says in problems[0], err


def test_fixed_horizon_fraction_over_one_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    err = config_error(capsys, "--set", "actor.schedule=fixed", "--set", "actor.schedule.fraction=1.5")
    assert "actor.schedule.fraction: Input should be less than or equal to 1" in err


@pytest.mark.parametrize(("override", "key"), [
    ("learner.steps=abc", "learner.steps"),
    ("actor.batch_size=[4]", "actor.batch_size"),
    ("learner.lr=fast", "learner.lr"),
    ("actor.use_chat_template=maybe", "actor.use_chat_template"),
    ("learner.eval={every: often}", "learner.eval.every"),
])
def test_wrong_type_names_the_key_and_the_value(capsys: pytest.CaptureFixture[str], override: str, key: str) -> None:
    err = config_error(capsys, "--set", override)
    assert f"{key}: " in err and "(got " in err, err


@pytest.mark.parametrize(("override", "key"), [
    ("learner.lrr=1", "learner.lrr"), ("actor.schedule.bogus=1", "actor.schedule.bogus"),
    ("transport.redis=x", "transport.redis"), ("learner.loss.temperature_x=2", "learner.loss.temperature_x"),
    ("nosection.x=1", "nosection"),  # an unknown section is the unknown key
])
def test_unknown_key_names_its_full_dotted_path(capsys: pytest.CaptureFixture[str], override: str, key: str) -> None:
    err = config_error(capsys, "--set", override)
    assert f"{key}: Extra inputs are not permitted" in err, err


def test_unknown_key_in_a_yaml_file_names_the_file_and_the_key(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("learner:\n  steps: 3\n  eval:\n    evrey: 5\nactor:\n  max_new_tokens: -1\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config in {path}" in err
    assert "learner.eval.evrey: Extra inputs are not permitted" in err
    assert "actor.max_new_tokens: Input should be greater than or equal to 1" in err
    assert "Traceback" not in err


def test_a_role_refuses_a_bad_config_before_it_needs_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """`opd actor|teacher|learner` validate the config first: exit 2, not a connection error."""
    for role in ("actor", "teacher", "learner"):
        assert main([role, "--config", str(CONFIG), "--set", "learner.lr=-1"]) == 2
        assert "learner.lr: Input should be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize(("publish_every", "max_staleness"), [(4, 2), (2, 0), (10, 8)])
def test_publications_rarer_than_the_staleness_bound_are_refused(capsys: pytest.CaptureFixture[str], publish_every: int,
                                                                 max_staleness: int) -> None:
    """Issue 16, defect 5: `learner.publish_every > learner.max_staleness + 1` makes every sample stale from
    step max_staleness + 1 after a publication on, so the learner never reaches the next one; refused at load,
    naming both keys. Loaded without a word before the fix."""
    err = config_error(capsys, "--set", f"learner.publish_every={publish_every}",
                       "--set", f"learner.max_staleness={max_staleness}")
    problems = [line.strip() for line in err.splitlines()[1:] if line.strip()]
    assert len(problems) == 1 and problems[0].startswith("learner.publish_every: "), err
    assert "learner.max_staleness" in problems[0] and f"({max_staleness + 1})" in problems[0], err


def test_publications_within_the_staleness_bound_load() -> None:
    """The boundary, publish_every = max_staleness + 1, trains at every version up to the next publication."""
    from opd.config import load_config

    cfg = load_config(CONFIG, ["learner.publish_every=3", "learner.max_staleness=2"])
    assert (cfg.learner.publish_every, cfg.learner.max_staleness) == (3, 2)


def test_pairs_that_depend_on_the_deployment_are_advised_against() -> None:
    """Issue 16, defect 5: a claim shorter than a teacher batch can take (work dead-lettered after
    max_deliveries) and a learner batch above the scored stream's high-water mark (a step waits
    read_timeout_s) load, with a warning naming the keys; the shipped tiny config gets none."""
    from opd.config import advisories, load_config

    assert advisories(load_config(CONFIG, [])) == []
    [claim] = advisories(load_config(CONFIG, ["transport.claim_idle_ms=1000"]))
    assert "transport.claim_idle_ms=1000" in claim and "transport.max_deliveries" in claim and "dead-lettered" in claim
    [water] = advisories(load_config(CONFIG, ["learner.batch_size=200", "transport.high_water=64"]))
    assert "learner.batch_size=200" in water and "transport.high_water=64" in water
