"""The hypotheses, one module each, found by name (HYPOTHESES): what an experiment asks of its kernels.

A hypothesis says which mechanism the run observes and how: the columns of evidence it reads from each cell's phase
(counters, traces, the pressure actors' records, the workloads' own figures), what must have happened on the
baseline for a verdict to mean anything, and its own section and words in the report. Adding a hypothesis is adding
a module here; the core speaks of mechanism and evidence only. Each module defines HYPOTHESIS, a base.Hypothesis.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Hypothesis, PhaseView

__all__ = ["HYPOTHESES", "Hypothesis", "PhaseView", "get"]


def _discover() -> dict[str, Hypothesis]:
    found: dict[str, Hypothesis] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            h = importlib.import_module(f"{__name__}.{info.name}").HYPOTHESIS
            found[h.name] = h
    return found


HYPOTHESES = _discover()


def get(name: str) -> Hypothesis:
    """The hypothesis of that name; a ValueError naming the known ones otherwise."""
    try:
        return HYPOTHESES[name]
    except KeyError:
        raise ValueError(f"unknown hypothesis {name!r} (known: {', '.join(HYPOTHESES)})") from None
