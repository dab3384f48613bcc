"""Helpers for pluggable components: config variants discriminated by `kind`, composed as unions.

A component (loss, truncation schedule, rollout engine, teacher scorer) is one file with a pydantic config
variant (`kind: Literal[...]`) and a `build()`; its role's config holds the union of the variants. What
every such union needs and no role owns lives here (roles never import one another).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, Field


@dataclass(frozen=True)
class _DefaultKind:
    """Annotated metadata of a `component_union`: the variant a kind-less value belongs to (pydantic ignores it)."""

    kind: str


def component_union(*variants: type[BaseModel], default: type[BaseModel], kind_from_options: bool = False) -> Any:
    """The config type of a component slot: `Annotated[Union[variants], discriminated by kind, shorthand]`.

    WHY here: every role's union is built the same way (a discriminated union plus the bare-name
    shorthand of `kind_shorthand`), so adding a component stays one new file plus one member here.
    `variants` keep their order (`opd config docs` lists them in it). A value without `kind` belongs
    to `default`; with `kind_from_options`, to the first variant (`default` first, then the others in
    order) that has every option given, so `--set learner.loss.is_cap=3` picks the loss with `is_cap`.
    """
    if default not in variants:
        raise ValueError(f"the default {default.__name__} is not one of the variants")
    default_kind = default.model_fields["kind"].default
    owners = (default, *(v for v in variants if v is not default))

    def shorthand(value: Any) -> Any:
        if kind_from_options and isinstance(value, dict) and "kind" not in value:
            owner = next((v for v in owners if set(value) <= set(v.model_fields)), default)
            return kind_shorthand(value, owner.model_fields["kind"].default)
        return kind_shorthand(value, default_kind)

    return Annotated[
        Union[variants],  # noqa: UP007 (a discriminated union, built at runtime)
        Field(discriminator="kind"),
        BeforeValidator(shorthand),
        _DefaultKind(default_kind),
    ]


def union_default_kind(union: Any) -> str:
    """The `kind` a `component_union` gives a value that names none."""
    return next(m.kind for m in typing.get_args(union)[1:] if isinstance(m, _DefaultKind))


def union_variants(union: Any) -> dict[str, type[BaseModel]]:
    """`kind -> variant` of an `Annotated[Union[...], Field(discriminator="kind"), ...]` config union."""
    members = typing.get_args(typing.get_args(union)[0])
    return {m.model_fields["kind"].default: m for m in members}


def kind_shorthand(value: Any, default_kind: str) -> Any:
    """A bare name (`sglang`, as `--set actor.engine=sglang` writes it) is that variant with its defaults;
    options without a kind belong to the default variant."""
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": default_kind, **value}
    return value


def adopt_flat_keys(section: Any, *, field: str, flat_keys: dict[str, str], union: Any) -> Any:
    """Move keys that sat flat in a role's section before its component was one into the component.

    `flat_keys` maps `section.<old>` to `section.<field>.<new>`. WHY: configs and compose files written
    before the redesign keep working. A flat key the chosen variant has no field for is dropped, as the
    flat config ignored it (`actor.device` with SGLang); a key given both ways keeps the nested one.
    """
    if not isinstance(section, dict) or not any(old in section for old in flat_keys):
        return section
    component = kind_shorthand(section.get(field, {}), union_default_kind(union))
    if not isinstance(component, dict):
        return section  # not a component at all: validation names it
    variant = union_variants(union).get(component.get("kind"))
    section, component = dict(section), dict(component)
    for old, new in flat_keys.items():
        if old in section:
            value = section.pop(old)
            if variant is not None and new in variant.model_fields:
                component.setdefault(new, value)
    section[field] = component
    return section
