"""What every config model shares: unknown keys refused, no infinite or NaN numbers, and the axis marker."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def axis(default: Any = ..., **kw: Any) -> Any:
    """A field that may be given as a list, expanding the matrix of cells."""
    return Field(default, json_schema_extra={"axis": True}, **kw)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no infinite phase or NaN timeout
