"""Config paths expand like a shell's, and the declared dependencies match the APIs used (issue 8, defect 6).

- every path option (`*_dir`, `*_file`, `workdir`, `run.tiny_assets`, `run.warm_cache`) expands `~`
  and `$VAR`: a YAML file or `--set` value never passes through a shell, so
  `actor.model_dir: ~/models/student` used to be a directory literally named `~`; URLs are left alone;
- pyproject's transformers bound is met by the installed version and that version has the APIs the
  code calls (`forward(cache=)`, `DynamicCache(config=)`), and no product code passes the deprecated
  `torch_dtype=` (it warns; `dtype=` replaces it).
"""

from __future__ import annotations

import ast
import inspect
import os
import tomllib
from pathlib import Path

import pytest

from opd.config import OPDConfig, describe, load_config

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("protocol", "actors", "cache", "learner", "opd")
PATH_KEYS = ("actor.model_dir", "actor.prompts_file", "teacher.model_dir", "teacher.cache_dir", "learner.model_dir",
             "learner.workdir", "learner.eval.heldout_file", "learner.eval.teacher_dir", "run.workdir",
             "run.tiny_assets", "run.warm_cache")


def get(cfg: OPDConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_path_option_is_listed() -> None:
    """A new path option must be a UserPath (and listed here), or `~` silently stops working for it."""
    pathlike = {k for k, _d, _t in describe(OPDConfig) if k.endswith(("_dir", "_file", "workdir", "tiny_assets",
                                                                       "warm_cache"))}
    assert pathlike == set(PATH_KEYS)


@pytest.mark.parametrize("key", PATH_KEYS)
def test_home_and_variables_expand(key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OPD_TEST_ROOT", "/data/opd")
    assert get(load_config(None, [f"{key}=~/models/student"]), key) == f"{tmp_path}/models/student"
    assert get(load_config(None, [f"{key}=$OPD_TEST_ROOT/x"]), key) == "/data/opd/x"
    assert get(load_config(None, [f"{key}=${{OPD_TEST_ROOT}}/y"]), key) == "/data/opd/y"
    assert get(load_config(None, [f"{key}=relative/~x"]), key) == "relative/~x"


def test_a_home_relative_model_dir_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "student").mkdir(parents=True)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("actor:\n  model_dir: ~/models/student\n")
    assert Path(load_config(cfg_file).actor.model_dir).is_dir()


def test_urls_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_config(None, ["teacher.cache_dir=s3://bucket/~cache"]).teacher.cache_dir == "s3://bucket/~cache"


def test_the_declared_transformers_has_the_apis_used() -> None:
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from transformers import DynamicCache, LlamaForCausalLM

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "transformers"]
    assert req.specifier.contains(version("transformers")), (str(req), version("transformers"))
    assert "cache" in inspect.signature(LlamaForCausalLM.forward).parameters  # the HF engine's KV cache kwarg
    assert "config" in inspect.signature(DynamicCache.__init__).parameters


def test_no_product_code_passes_the_deprecated_torch_dtype() -> None:
    offenders = []
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and any(k.arg == "torch_dtype" for k in node.keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"pass dtype= (torch_dtype= is deprecated and warns): {offenders}"


def test_expansion_is_idempotent_for_a_re_read_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The launcher hands roles the resolved config: expanding twice must not change it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["actor.model_dir=~/m"])
    assert OPDConfig.model_validate(cfg.model_dump(mode="json")).actor.model_dir == os.path.join(str(tmp_path), "m")
