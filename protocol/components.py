"""Helpers for pluggable components: config variants discriminated by `kind`, composed as unions.

A component (loss, truncation schedule, rollout engine, teacher scorer) is one file with a pydantic config
variant (`kind: Literal[...]`) and a `build()`; its role's config holds the union of the variants. What
every such union needs and no role owns lives here (roles never import one another).
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel


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


def adopt_flat_keys(section: Any, *, field: str, flat_keys: dict[str, str], union: Any, default_kind: str) -> Any:
    """Move keys that sat flat in a role's section before its component was one into the component.

    `flat_keys` maps `section.<old>` to `section.<field>.<new>`. WHY: configs and compose files written
    before the redesign keep working. A flat key the chosen variant has no field for is dropped, as the
    flat config ignored it (`actor.device` with SGLang); a key given both ways keeps the nested one.
    """
    if not isinstance(section, dict) or not any(old in section for old in flat_keys):
        return section
    component = kind_shorthand(section.get(field, {}), default_kind)
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
