"""What a bisection judges each commit by (`bisect.criterion`, or `--criterion` on the command line)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from ..errors import ConfigError
from .base import Strict

NAME = r"^[a-z][a-z0-9_-]*$"
COUNTER = r"^[a-z][a-z0-9_]*$"
SPELLINGS = (
    "hypothesis | metric:PHASE:LEVEL:METRIC (e.g. metric:global:l1:touch p99.9) | "
    "evidence:PHASE:COUNTER[>N] (e.g. evidence:global:shrinker_calls>0)"
)


class Criterion(Strict):
    """hypothesis: whether the experiment's mechanism acts in the schedule's pressure phases (for the shrinker
    experiment: whether the shrinker frees shadow pages); metric: a verdict row (phase, level, metric), a commit bad
    where it differs from the good end the way the bad end does; evidence: a mechanism's counter in a phase above a
    threshold (present: above 0) or not."""

    kind: Literal["hypothesis", "metric", "evidence"] = Field("hypothesis", description="what a step is judged by")
    phase: str | None = Field(None, pattern=NAME, description="the phase it is read in (metric, evidence)")
    level: str | None = Field(None, pattern=r"^(l1|l2|kut)$", description="the guest level (metric)")
    metric: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w .,/()%-]{0,80}$", description="a verdict row's metric, e.g. touch p99.9"
    )
    counter: str | None = Field(None, pattern=COUNTER, description="an evidence column, e.g. shrinker_calls")
    above: float = Field(0, ge=0, description="evidence: the counter counts as present above this value")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> Criterion:
        need = {"hypothesis": (), "metric": ("phase", "level", "metric"), "evidence": ("phase", "counter")}[self.kind]
        if missing := [f for f in need if getattr(self, f) is None]:
            raise ValueError(f"a {self.kind} criterion needs {', '.join(missing)}")
        extra = [f for f in ("phase", "level", "metric", "counter") if f not in need and getattr(self, f) is not None]
        if extra:
            raise ValueError(f"a {self.kind} criterion takes no {', '.join(extra)}")
        return self

    @classmethod
    def parse(cls, text: str) -> Criterion:
        """The command line's spelling (SPELLINGS)."""
        kind, _, rest = text.strip().partition(":")
        try:
            if kind == "hypothesis" and not rest:
                return cls()
            if kind == "metric" and len(parts := rest.split(":")) == 3:
                return cls(kind="metric", phase=parts[0], level=parts[1], metric=parts[2].strip())
            m = re.fullmatch(r"([^:]+):([^:>]+)(?:>(\d+(?:\.\d+)?))?", rest)
            if kind == "evidence" and m:
                return cls(kind="evidence", phase=m[1], counter=m[2], above=float(m[3] or 0))
        except ValueError as e:
            raise ConfigError(f"--criterion {text!r}: {e}") from None
        raise ConfigError(f"--criterion {text!r}: one of {SPELLINGS}")

    def describe(self) -> str:
        if self.kind == "metric":
            return f"{self.metric} of {self.level} in {self.phase}"
        if self.kind == "evidence":
            return f"{self.counter} > {self.above:g} in {self.phase}"
        return "the hypothesis: its mechanism acts in the pressure phases"

    def slug(self) -> str:
        """A directory name for this criterion's outputs."""
        words = [self.kind, self.phase, self.level, self.metric, self.counter]
        words += [f"above-{self.above:g}"] if self.kind == "evidence" and self.above else []
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(w) for w in words if w)).strip("-")
