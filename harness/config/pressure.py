"""The `pressure:` section, made from the registry of pressure modes (harness/guest/modes/): `mode`, an axis, and
one section of knobs per mode, each knob with the bounds and meaning its mode declares. A mode added to the
registry is in the schema, the config reference and `validate` without a line here.

Older configs spelled some knobs flat (`pressure.drop_caches_period_s`, `checks.memcg_min_events`): each mode
says which (Mode.legacy), and upgrade() moves them into its section, so old configs and old runs' manifests load.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, WithJsonSchema, create_model

from ..guest.modes import MODES, Mode, get
from ..guest.modes.base import knob_fields
from .base import Strict, axis


def _known(name: str) -> str:
    get(name)  # ValueError naming the known modes
    return name


ModeName = Annotated[str, AfterValidator(_known), WithJsonSchema({"type": "string", "enum": list(MODES)})]


def field_name(mode: Mode) -> str:
    return mode.name.replace("-", "_")


class PressureBase(Strict):
    """What every `pressure:` section has; the modes' sections are added from the registry (Pressure)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    mode: ModeName = axis("global", description="what makes the kernel under test reclaim (the registry's modes)")

    def knobs(self, name: str) -> Any:
        """The knobs of mode `name` as its Knobs dataclass (None for a mode without knobs)."""
        mode = get(name)
        section = getattr(self, field_name(mode), None)
        return mode.params(section.model_dump() if section is not None else None)

    def knob_values(self, name: str) -> dict[str, Any]:
        """The same as a plain mapping: what the kernel under test's schedule carries."""
        section = getattr(self, field_name(get(name)), None)
        return section.model_dump() if section is not None else {}


def _section(mode: Mode) -> type[Strict]:
    hints = typing.get_type_hints(mode.knob_type)
    fields: dict[str, Any] = {}
    for f in knob_fields(mode):
        meta = dict(f.metadata)
        about = meta.pop("about", "")
        fields[f.name] = (hints[f.name], Field(f.default, description=about, **meta))
    return create_model(f"{type(mode).__name__}Knobs", __base__=Strict, __doc__=mode.about, **fields)


def _pressure() -> type[PressureBase]:
    sections: dict[str, Any] = {}
    for mode in MODES.values():
        if mode.knob_type is not None:
            model = _section(mode)
            sections[field_name(mode)] = (model, Field(default_factory=model, alias=mode.name))
    return create_model("Pressure", __base__=PressureBase, **sections)


if TYPE_CHECKING:
    Pressure = PressureBase
else:
    Pressure = _pressure()


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def upgrade(data: Any) -> Any:
    """An experiment's raw config with its modes' older flat knobs moved into their sections (an older spelling given
    beside the new one, as a --set over a new config, wins)."""
    if not isinstance(data, dict):
        return data
    for mode in MODES.values():
        for old, knob in mode.legacy.items():
            section, _, key = old.partition(".")
            holder = data.get(section)
            if not isinstance(holder, dict) or key not in holder:
                continue
            data = {**data, section: {k: v for k, v in holder.items() if k != key}}
            pressure = _mapping(data.get("pressure"))
            data["pressure"] = {**pressure, mode.name: {**_mapping(pressure.get(mode.name)), knob: holder[key]}}
    return data
