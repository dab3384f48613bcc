"""`protocol/components.py`: the union helper every component package builds its config slot with."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from actors.engines import EngineConfig
from actors.schedules import ScheduleConfig
from cache.scorers import ScorerConfig
from learner.losses import LossConfig
from protocol.components import adopt_flat_keys, component_union, union_default_kind, union_variants


class _A(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["a"] = "a"
    x: int = 1


class _B(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["b"] = "b"
    x: int = 2
    y: int = 3


def test_bare_name_kindless_options_and_order() -> None:
    union = component_union(_B, _A, default=_A)
    ta = TypeAdapter(union)
    assert ta.validate_python("b") == _B()
    assert ta.validate_python({"x": 5}) == _A(x=5)  # no kind: the default variant
    with pytest.raises(ValidationError, match="y"):
        ta.validate_python({"y": 5})  # ... which names the option it lacks
    assert list(union_variants(union)) == ["b", "a"]  # the order given (config docs list it)
    assert union_default_kind(union) == "a"


def test_kind_from_options_picks_the_variant_that_has_them_all() -> None:
    ta = TypeAdapter(component_union(_B, _A, default=_A, kind_from_options=True))
    assert ta.validate_python({"y": 5}) == _B(y=5)
    assert ta.validate_python({"x": 5}) == _A(x=5)  # both have it: the default first
    with pytest.raises(ValidationError, match="z"):
        ta.validate_python({"z": 1})


def test_default_must_be_a_variant() -> None:
    with pytest.raises(ValueError, match="_B is not one of the variants"):
        component_union(_A, default=_B)


def test_flat_keys_land_in_the_default_variant() -> None:
    union = component_union(_A, _B, default=_B)
    assert adopt_flat_keys({"old_y": 7}, field="c", flat_keys={"old_y": "y"}, union=union) == {"c": {"kind": "b", "y": 7}}


@pytest.mark.parametrize(("union", "default"), [(EngineConfig, "hf"), (ScorerConfig, "hf"), (ScheduleConfig, "fixed"),
                                                (LossConfig, "topk_kl")])
def test_the_role_unions_keep_their_defaults(union: object, default: str) -> None:
    assert union_default_kind(union) == default
