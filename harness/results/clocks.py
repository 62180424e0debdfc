"""Each guest's clock against the kernel under test's, from the measurements in its clock.jsonl (guest/clock.py):
what puts every guest's timestamps on that one clock, chained through an L2's L1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..guest.contract import ClockSample
from .guest_files import Problems, json_lines


@dataclass
class GuestClock:
    """A guest's clock against the kernel under test's, sampled: at t (ns, the kernel under test's clock) it
    read offset ns ahead, give or take uncertainty ns. Empty for the kernel under test itself (the reference)
    and for a guest whose clock was not measured."""

    t: np.ndarray
    offset: np.ndarray
    uncertainty: np.ndarray

    @classmethod
    def reference(cls) -> GuestClock:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0))

    def offset_at(self, ns: float) -> float:
        return float(np.interp(ns, self.t, self.offset)) if len(self.t) else 0.0

    def uncertainty_at(self, ns: float) -> float:
        return float(np.interp(ns, self.t, self.uncertainty)) if len(self.t) else 0.0

    def below(self, samples: list[ClockSample]) -> GuestClock:
        """The clock of a child of this guest, from the child's samples against this guest's clock."""
        t = np.array([s.t - self.offset_at(s.t) for s in samples], float)
        off = np.array([s.offset_ns + self.offset_at(s.t) for s in samples], float)
        unc = np.array([s.uncertainty_ns + self.uncertainty_at(s.t) for s in samples], float)
        order = np.argsort(t)
        return GuestClock(t[order], off[order], unc[order])


def clock_samples(path: Path, problems: Problems, cell_dir: Path) -> list[ClockSample]:
    """A guest's clock.jsonl: its measurements, in time order; a failure to measure is said."""
    out, bad = [], ""
    for rec in json_lines(path, problems, cell_dir):
        if "ended" in rec:  # what closed the port (the guest's end, normally)
            continue
        if "error" in rec:
            problems.note(path, cell_dir, f"clock not measured: {str(rec['error'])[:200]}")
            continue
        try:
            out.append(ClockSample.from_guest(rec))
        except (ValueError, TypeError) as e:  # ContractError is a ValueError
            bad = bad or str(e)[:200]
    if bad:
        problems.note(path, cell_dir, bad)
    return sorted(out, key=lambda c: c.t)
