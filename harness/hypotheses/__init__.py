"""The hypotheses, one module each, found by name (HYPOTHESES): what an experiment asks of its kernels.

A hypothesis says which mechanism the run observes and how: the columns of evidence it reads from each cell's phase
(counters, traces, the pressure actors' records, the workloads' own figures), what must have happened on the
baseline for a verdict to mean anything, and its own section and words in the report. Adding a hypothesis is adding
a module here; the core speaks of mechanism and evidence only. Each module defines HYPOTHESIS, a base.Hypothesis.
"""

from __future__ import annotations

from ..guest.registry import discover, lookup
from .base import Hypothesis, PhaseView

__all__ = ["HYPOTHESES", "Hypothesis", "PhaseView", "get"]


HYPOTHESES = discover(__name__, __path__, "HYPOTHESIS", "name")


def get(name: str) -> Hypothesis:
    """The hypothesis of that name; a ValueError naming the known ones otherwise."""
    return lookup(HYPOTHESES, name, "hypothesis")
