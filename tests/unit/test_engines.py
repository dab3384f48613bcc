"""Rollout engines and teacher scorers as components: one file each, one union member each.

Pins:
- every module of actors/engines/ and cache/scorers/ (but `base`) defines exactly one config variant with a
  `kind` and a `build()`, and `actor.engine` / `teacher.engine` hold exactly those: adding one is its file
  plus its union member, nothing else;
- a config with each variant survives a round trip (model dump -> validate, and YAML file -> `load_config`),
  and `--set actor.engine=sglang --set actor.engine.url=...` names a variant then sets its options;
- the flat keys of earlier configs (`actor.sglang_url`, `actor.device`, `teacher.sglang_url`, ...) still
  load, into the engine; the nested key wins; a flat key the chosen engine has no field for is dropped;
- what an engine cannot do is refused at load naming the key the user writes (`actor.top_p` with SGLang,
  `teacher.temperature` with the SGLang scorer, a missing `actor.engine.url`);
- `build()` returns the engine the variant names with its options; the config tree loads without torch,
  transformers or requests (`opd --help` stays fast).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import actors.engines
import cache.scorers
from actors.engines import EngineConfig, HFEngineConfig, SGLangEngineConfig
from actors.engines.sglang import SGLangRolloutEngine
from cache.scorers import HFScorerConfig, ScorerConfig, SGLangScorerConfig
from cache.scorers.sglang import SGLangTeacherScorer
from opd.config import ConfigError, OPDConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _variants_in_files(package: Any) -> set[type[BaseModel]]:
    """The config variants each module of `package` (but `base`) defines: exactly one per module."""
    found: set[type[BaseModel]] = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        mine = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                if issubclass(obj, BaseModel) and obj.__module__ == module.__name__ and "kind" in obj.model_fields]
        assert len(mine) == 1, f"{module.__name__} defines {len(mine)} config variants, not one"
        variant = mine[0]
        assert variant.model_fields["kind"].default == info.name, f"{variant.__name__}: kind is not the file name"
        assert callable(getattr(variant, "build", None)), f"{variant.__name__} has no build()"
        found.add(variant)
    return found


@pytest.mark.parametrize(("package", "union"), [(actors.engines, EngineConfig), (cache.scorers, ScorerConfig)],
                         ids=["engines", "scorers"])
def test_each_component_is_one_file_and_one_union_member(package: Any, union: Any) -> None:
    members = set(typing.get_args(typing.get_args(union)[0]))
    assert _variants_in_files(package) == members


SGLANG_ACTOR = {"kind": "sglang", "url": "http://student:30000", "timeout_s": 30.0, "max_failures": 2}
SGLANG_TEACHER = {"kind": "sglang", "url": "http://teacher:30000", "timeout_s": 60.0}


@pytest.mark.parametrize(("actor", "teacher"), [
    ({"kind": "hf", "device": "cpu"}, {"kind": "hf", "device": "cpu"}),
    (SGLANG_ACTOR, SGLANG_TEACHER),
], ids=["hf", "sglang"])
def test_config_round_trip(tmp_path: Path, actor: dict[str, Any], teacher: dict[str, Any]) -> None:
    cfg = OPDConfig.model_validate({"actor": {"engine": actor}, "teacher": {"engine": teacher}})
    assert cfg.actor.engine.model_dump() == actor and cfg.teacher.engine.model_dump() == teacher
    assert OPDConfig.model_validate(cfg.model_dump()) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg


def test_a_bare_kind_then_its_options_on_the_command_line() -> None:
    cfg = load_config(None, ["actor.engine=sglang", "actor.engine.url=http://s:1", "actor.engine.max_failures=0",
                             "teacher.engine=sglang", "teacher.engine.url=http://t:2"])
    assert cfg.actor.engine == SGLangEngineConfig(url="http://s:1", max_failures=0)
    assert cfg.teacher.engine == SGLangScorerConfig(url="http://t:2")
    assert load_config(None, ["actor.engine.device=cpu"]).actor.engine == HFEngineConfig(device="cpu")
    assert OPDConfig().actor.engine == HFEngineConfig() and OPDConfig().teacher.engine == HFScorerConfig()


def test_flat_keys_of_earlier_configs_still_load() -> None:
    """docker-compose.yml and older YAMLs write `actor.sglang_url`, `actor.device`, ...: same meaning."""
    cfg = load_config(None, ["actor.engine=sglang", "actor.sglang_url=http://s:1", "actor.sglang_timeout_s=9",
                             "actor.max_engine_failures=3", "actor.device=cuda",  # device: not SGLang's, dropped
                             "teacher.engine=sglang", "teacher.sglang_url=http://t:2", "teacher.device=cuda"])
    assert cfg.actor.engine == SGLangEngineConfig(url="http://s:1", timeout_s=9, max_failures=3)
    assert cfg.teacher.engine == SGLangScorerConfig(url="http://t:2")
    cfg = load_config(None, ["actor.device=cpu", "teacher.device=cpu", "teacher.sglang_url=http://unused:1"])
    assert cfg.actor.engine == HFEngineConfig(device="cpu") and cfg.teacher.engine == HFScorerConfig(device="cpu")
    # given both ways, the nested key wins
    assert load_config(None, ["actor.engine.device=cuda:1", "actor.device=cpu"]).actor.engine.device == "cuda:1"


@pytest.mark.parametrize(("overrides", "message"), [
    (["actor.engine=sglang"], r"actor\.engine\.url: Field required"),
    (["actor.engine=vllm"], r"actor\.engine\.kind: .*'hf', 'sglang'"),
    (["actor.engine.kind=sglang", "actor.engine.url=http://s:1", "actor.engine.device=cpu"],
     r"actor\.engine\.device: Extra inputs"),
    (["actor.engine=sglang", "actor.engine.url=http://s:1", "actor.top_p=0.9"],
     r"actor\.top_p=0\.9 is not supported with actor\.engine=sglang"),
    (["teacher.engine=sglang", "teacher.engine.url=http://t:1", "teacher.temperature=2"],
     r"teacher\.temperature=2\.0 is not supported with teacher\.engine=sglang"),
    (["teacher.engine=sglang"], r"teacher\.engine\.url: Field required"),
])
def test_what_an_engine_cannot_do_is_refused_at_load_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_what_each_engine_can_do_loads() -> None:
    assert load_config(None, ["actor.top_p=0.9", "teacher.temperature=2"]).actor.top_p == 0.9  # hf: anything
    cfg = load_config(None, ["actor.engine=sglang", "actor.engine.url=http://s:1", "actor.temperature=0.7"])
    assert cfg.actor.temperature == 0.7


def test_build_returns_the_named_engine_with_its_options(tmp_path: Path) -> None:
    """SGLang engines and scorers connect lazily: building one needs no server."""
    engine = SGLangEngineConfig(**{k: v for k, v in SGLANG_ACTOR.items() if k != "kind"}).build(str(tmp_path))
    assert isinstance(engine, SGLangRolloutEngine)
    assert (engine.base_url, engine.timeout_s, engine.max_failures) == ("http://student:30000", 30.0, 2)
    assert engine.is_transient(ConnectionError("reset")) and not engine.is_transient(ValueError("bad request"))
    scorer = SGLangScorerConfig(url="http://teacher:30000", timeout_s=60).build("", revision="r1", temperature=1.0)
    assert isinstance(scorer, SGLangTeacherScorer)
    assert (scorer.base_url, scorer.timeout_s, scorer.revision) == ("http://teacher:30000", 60.0, "r1")
    with pytest.raises(ValueError, match=r"teacher\.model_dir is required"):
        HFScorerConfig().build("", revision=None, temperature=1.0)


def test_the_config_tree_loads_without_torch_transformers_or_requests() -> None:
    code = ("import sys; from opd.config import load_config; "
            "load_config(None, ['actor.engine=sglang', 'actor.engine.url=http://s:1']); "
            "print(sorted(m for m in ('torch', 'transformers', 'requests') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
