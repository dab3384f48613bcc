"""The config tree: YAML + overrides, validated at start, errors that name the bad key.

Pins: every shipped YAML in configs/ validates; unknown keys and bad values fail with their dotted
path; overrides parse YAML values and refuse malformed assignments; docs/config.md is up to date
with the code (regenerate with `opd config docs > docs/config.md`); component unions (loss, schedule)
name their keys and enforce rules across sections. Schedules themselves: tests/unit/test_schedules.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opd.commands import config_docs
from opd.config import ConfigError, OPDConfig, apply_override, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path, tmp_path: Path) -> None:
    if "rows" in (yaml.safe_load(path.read_text()) or {}):  # an experiment (opd experiment run): its own schema,
        from opd.experiment.config import load_experiment  # and every row's pipeline config validates
        from opd.experiment.runner import pipeline_config, plan

        base = load_experiment(path)
        for preset in (None, *base.all_presets()):
            cfg = load_experiment(path, preset=preset)
            for spec in plan(cfg, tmp_path / cfg.name):
                assert isinstance(pipeline_config(cfg, spec, vocab_size=64), OPDConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, OPDConfig)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"learner\.lrr"):
        load_config(None, ["learner.lrr=3"])


def test_bad_values_are_all_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.lr=-1", "actor.schedule.kind=sometimes", "teacher.topk=1000"])
    text = str(err.value)
    for key in ("learner.lr", "actor.schedule.kind", "teacher.topk"):
        assert key in text


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["learner.steps=7", "actor.use_chat_template=false", "actor.schedule.kind=progressive",
                             "actor.schedule.stages=[0.5, 1.0]",
                             "transport.redis_url=redis://:pw@127.0.0.1:1/0"])
    assert cfg.learner.steps == 7
    assert cfg.actor.use_chat_template is False
    assert cfg.actor.schedule.stages == [0.5, 1.0]
    assert cfg.transport.redis_url == "redis://:pw@127.0.0.1:1/0"


@pytest.mark.parametrize("assignment", ["learner.steps", "=3", "learner..steps=3"])
def test_malformed_overrides(assignment: str) -> None:
    with pytest.raises(ConfigError):
        apply_override({}, assignment)


def test_override_into_a_scalar_is_refused() -> None:
    tree = {"learner": {"steps": 3}}
    with pytest.raises(ConfigError, match=r"learner\.steps is not a section"):
        apply_override(tree, "learner.steps.x=1")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_config_docs_are_current() -> None:
    assert (REPO / "docs" / "config.md").read_text() == config_docs() + "\n", (
        "docs/config.md is stale: run `opd config docs > docs/config.md`"
    )


@pytest.mark.parametrize("loss", ["topk_kl", "gkd_jsd"])
def test_top_k_losses_need_teacher_top_k_at_start(loss: str) -> None:
    """A rule across sections (learner.loss needs teacher.topk) fails at load, naming both keys."""
    with pytest.raises(ConfigError, match=rf"learner\.loss\.kind={loss}.*teacher\.topk"):
        load_config(None, [f"learner.loss.kind={loss}", "teacher.topk=0"])
    assert load_config(None, ["learner.loss.kind=sampled_reverse_kl", "teacher.topk=0"]).teacher.topk == 0


def test_unset_loss_is_the_top_k_kl_or_sampled_without_top_k() -> None:
    """The default loss follows teacher.topk: exact top-k KL when the teacher sends top-k, else the sampled
    reverse KL (with its baseline and clip); a loss set explicitly is never replaced."""
    loss = load_config(None, []).learner.loss
    assert (loss.kind, loss.direction, loss.tail) == ("topk_kl", "reverse", "bucket")
    loss = load_config(None, ["teacher.topk=0"]).learner.loss
    assert (loss.kind, loss.baseline) == ("sampled_reverse_kl", "auto") and loss.advantage_clip is not None
    assert load_config(None, ["learner.loss.kind=sampled_reverse_kl"]).learner.loss.kind == "sampled_reverse_kl"
    assert load_config(None, ["learner.loss.is_cap=3", "teacher.topk=4"]).learner.loss.is_cap == 3


def test_component_options_are_named_by_their_key() -> None:
    """Errors inside a component union name `learner.loss.beta`, not pydantic's `learner.loss.gkd_jsd.beta`."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.loss.kind=gkd_jsd", "learner.loss.beta=3"])
    assert "learner.loss.beta:" in str(err.value) and "gkd_jsd.beta" not in str(err.value)
    with pytest.raises(ConfigError, match=r"learner\.loss\.kind:"):
        load_config(None, ["learner.loss.kind=forward_kl"])
    assert load_config(None, ["learner.loss=topk_kl"]).learner.loss.kind == "topk_kl"


def test_sglang_with_top_p_below_one_is_refused_naming_the_key() -> None:
    """SGLang reports log_softmax(logits / T) before top-p: the learner could not reproduce the nucleus."""
    with pytest.raises(ConfigError, match=r"actor\.top_p=0\.9 is not supported with actor\.engine=sglang"):
        load_config(None, ["actor.engine=sglang", "actor.engine.url=http://x:30000", "actor.top_p=0.9"])
    # what it can reproduce: any temperature over the full vocabulary; and top-p on the hf engine
    cfg = load_config(None, ["actor.engine=sglang", "actor.engine.url=http://x:30000", "actor.temperature=0.7"])
    assert (cfg.actor.temperature, cfg.actor.top_p) == (0.7, 1.0)
    assert load_config(None, ["actor.top_p=0.9"]).actor.top_p == 0.9


def test_sampled_loss_without_topk_is_advised_against() -> None:
    from opd.config import advisories

    assert advisories(load_config(None, [])) == []
    advice = advisories(load_config(None, ["teacher.topk=0"]))  # the default loss becomes sampled_reverse_kl
    assert len(advice) == 1 and "teacher.topk=0" in advice[0] and "--preset loss" in advice[0]


def test_adaptive_schedule_is_marked_experimental() -> None:
    """Issue 17: the adaptive schedule collapsed in one seed of two and shipped as a plain option. `opd config docs`
    tags it experimental and `opd learner` warns when it is chosen (fails on main: neither says so)."""
    from opd.config import advisories

    docs = config_docs()
    assert "`adaptive` (experimental)" in docs and "(adaptive, experimental) The horizon before" in docs
    advice = advisories(load_config(None, ["actor.schedule=adaptive", "actor.max_new_tokens=64"]))
    assert len(advice) == 1 and "experimental" in advice[0] and "docs/experiments.md" in advice[0]
    assert advisories(load_config(None, ["actor.schedule=random"])) == []


def test_own_models_template_defaults_to_the_supported_schedule() -> None:
    """Issue 17: the template users copy defaulted to TOPD rho=0.1, which drove exact match to 0% in the truncation
    experiment. It now trains on full rollouts and says why (fails on main: `fixed`, 0.1)."""
    path = REPO / "configs" / "own-models.yaml"
    assert load_config(path).actor.schedule.kind == "full"
    assert "docs/experiments.md" in path.read_text()


def test_no_schedule_key_means_full_rollouts_and_a_bare_fraction_means_fixed() -> None:
    """The code's default agrees with the template's: no truncation is assumed (which one pays depends on the pair,
    docs/experiments.md); `fraction` without a kind still means a fixed horizon (fails before: fixed 0.25)."""
    assert load_config(None, []).actor.schedule.kind == "full"
    fixed = load_config(None, ["actor.schedule.fraction=0.5"]).actor.schedule
    assert (fixed.kind, fixed.fraction) == ("fixed", 0.5)
