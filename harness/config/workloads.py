"""`workload.runs:`, made from the registry of workloads (harness/guest/workloads/): a list of entries, each one
`kind` of the registry with that kind's knobs (with the bounds and meaning its module declares) and what every
run has (name, level, timeout, pause). A workload added to the registry is in the schema, the config reference and
`validate` without a line here."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, create_model, model_validator

from ..guest.workloads import WORKLOADS, Workload, get
from ..guest.workloads.base import knob_fields
from .base import Strict

RunLevel = Literal["kut", "l1", "l2"]
RUN_NAME = r"^[a-z][a-z0-9_-]{0,39}$"


class RunBase(Strict):
    """What every workload entry has; the kinds' knobs are added from the registry (WorkloadRun)."""

    kind: str
    name: str | None = Field(None, pattern=RUN_NAME, description="its name in tables and plots (default: derived)")
    level: RunLevel = Field("kut", description="where it runs: the kernel under test (kut), an L1 or an L2")
    timeout_s: float = Field(600, gt=0, le=86400, description="a run longer than this failed")
    pause_s: float = Field(0, ge=0, le=3600, description="between two runs")

    @property
    def workload(self) -> Workload:
        return get(self.kind)

    @property
    def knobs(self) -> Any:
        return self.workload.params({f.name: getattr(self, f.name) for f in knob_fields(self.workload)})

    @property
    def label(self) -> str:
        """Its name, or one made from what it runs."""
        if self.name:
            return self.name
        test = getattr(self, "test", None) or self.kind
        return re.sub(r"[^a-z0-9-]+", "-", str(test).lower()).strip("-")[:40] or self.kind

    @model_validator(mode="after")
    def _checked(self) -> RunBase:
        w = self.workload
        if self.level not in w.levels:
            raise ValueError(f"{self.kind} runs at {', '.join(w.levels)}, not {self.level}")
        if problems := w.check(self.knobs):
            raise ValueError(f"{self.kind}: {'; '.join(problems)}")
        return self


def _entry(workload: Workload) -> type[RunBase]:
    fields: dict[str, Any] = {"kind": (Literal[workload.kind], Field(description=workload.about))}  # type: ignore[valid-type]
    if workload.knob_type is not None:
        hints = typing.get_type_hints(workload.knob_type)
        for f in knob_fields(workload):
            meta = dict(f.metadata)
            about = meta.pop("about", "")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            fields[f.name] = (hints[f.name], Field(default, description=about, **meta))
    name = "".join(part.title() for part in workload.kind.split("-"))
    return create_model(f"{name}Run", __base__=RunBase, __doc__=workload.about, **fields)


if TYPE_CHECKING:
    WorkloadRun = RunBase
else:
    _ENTRIES = tuple(_entry(w) for w in WORKLOADS.values())
    WorkloadRun = Annotated[Union[_ENTRIES], Field(discriminator="kind")]  # noqa: UP007 (made from the registry)
