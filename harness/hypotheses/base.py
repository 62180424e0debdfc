"""What a hypothesis is, and what it sees of one cell's phase (PhaseView)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..guest.modes.base import Counters
from ..guest.records import LevelFacts


@dataclass
class PhaseView:
    """One cell's phase, as the evidence reads it: its pressure mode, the cell's counters seen from the phase, and
    the cell's rows of the tables that fall in it (trace, the pressure actors' records, workload metrics); facts: the
    kernel under test's LevelFacts; vms: KVM's per-VM debugfs prefixes ("<pid>-") of the L1s that run L2s."""

    mode: str
    counters: Counters
    trace: pd.DataFrame
    pressure: pd.DataFrame
    workload_metrics: pd.DataFrame
    facts: LevelFacts | None
    vms: dict[str, str]


# which spikes a cause event can explain: any guest's (a call that holds a global lock and picks any VM), the
# guest's own (its probe refaulting), or those of the guests its QEMU runs in the kernel under test (an L2's: its L1's)
ANY, OWN, OWNER = "any", "own", "owner"
WINDOW_COLUMNS = ["cell", "guest", "cause", "t0", "t1"]


def pairs(trace: pd.DataFrame, begin: str, end: str) -> pd.DataFrame:
    """Begin/end records of one thread paired in order: cell, pid, t0, t1, and the end's freed count and guest
    (a run recorded without thread ids pairs them per cell)."""
    sides = []
    for kind in (begin, end):
        d = trace.loc[trace["kind"] == kind, ["cell", "t", "pid", "freed", "guest"]]
        d = d.assign(pid=pd.to_numeric(d["pid"], errors="coerce").fillna(-1)).sort_values("t")
        sides.append(d.assign(n=d.groupby(["cell", "pid"]).cumcount()))
    m = sides[0].merge(sides[1], on=["cell", "pid", "n"], suffixes=("_begin", ""))
    m = m[m["t"] >= m["t_begin"]].rename(columns={"t_begin": "t0", "t": "t1"})
    return m.assign(guest=m["guest"].fillna(m["guest_begin"]))


def refault_windows(events: pd.DataFrame, passes: pd.DataFrame, cause: str) -> pd.DataFrame:
    """Per probing guest: from each event's end to the end of the probe pass after the one in progress then (every
    page touched once more: whatever the event took, the guest has faulted back by then)."""
    parts = []
    for (cell, guest), p in passes.groupby(["cell", "guest"], sort=False):
        z = events[events["cell"] == cell]
        ends = np.sort(p["t"].to_numpy())
        if z.empty or len(ends) < 2:
            continue
        t1 = z["t1"].to_numpy()
        nxt = np.minimum(np.searchsorted(ends, t1, side="left") + 1, len(ends) - 1)
        parts.append(pd.DataFrame({"cell": cell, "guest": guest, "cause": cause, "t0": t1, "t1": ends[nxt]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=WINDOW_COLUMNS)


@dataclass(frozen=True)
class Line:
    """A counter the timeline plots beside the latencies: as it is, or as a rate per second."""

    counter: str
    label: str
    rate: bool = False


class Hypothesis:
    name = ""
    question = ""  # what the report's first line asks
    mechanism = ""  # what is observed, in a few words ("the x86-mmu shrinker")
    attribution = False  # whether the probe's spikes are matched to this mechanism's cause events
    traces_reclaim = False  # whether the sampler follows vmscan tracepoints (sampler.trace's default)
    shrinkers: ClassVar[tuple[str, ...]] = ()  # shrinker debugfs names whose counts the sampler reads
    shrink_functions: ClassVar[tuple[str, ...]] = ()  # scan functions whose calls the trace keeps

    causes: ClassVar[dict[str, str]] = {}  # its cause events for attribution: name -> which spikes (ANY/OWN/OWNER)
    headline = ""  # what its causes add up to on the first screen ("shrinker zapping")
    cause_words = ""  # how the report's attribution section explains its causes

    timeline: ClassVar[tuple[Line, ...]] = ()  # its counters on the timeline's right axis
    timeline_marks: tuple[str, str] | None = None  # (trace kind, label): its events as ticks there
    timeline_axis = ""  # that axis's name

    def absent(self, facts: LevelFacts | None) -> str | None:
        """What a kernel under test lacks for this mechanism to act at all, said on its plots (None: it has it)."""
        return None

    def cause_windows(self, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Its cause events of every cell as time windows (WINDOW_COLUMNS; s since the cell's first phase)."""
        return pd.DataFrame(columns=WINDOW_COLUMNS)

    def columns(self, view: PhaseView) -> dict[str, Any]:
        """This mechanism's evidence columns for one cell x phase."""
        return {}

    def precondition(self, evidence: pd.DataFrame, baseline: str) -> str | None:
        """Why no verdict can be called (the mechanism never acted on the baseline), or None."""
        return None

    def section(self, evidence: pd.DataFrame, baseline: str, text: Callable[[str], str]) -> list[str]:
        """The report's evidence section as Markdown lines; text() escapes what a guest could have written."""
        return []

    primary = ""  # the metric (a part of its name) that answers the question, where the schedule has it

    def brief(self, evidence: pd.DataFrame, phase: str, baseline: str, variant: str) -> str:
        """The mechanism's evidence in one phase, baseline against the variant, in a few words."""
        return ""

    def beside_published(self, ab: pd.DataFrame) -> list[str]:
        """What this run's verdict rows say beside a published figure of the same mechanism, if there is one."""
        return []


def peak(c: Counters, name: str) -> float:
    """A gauge's highest sample within the phase (NaN without one)."""
    s = c.series.get(name)
    inside = [v for t, v in zip(s.t, s.v) if c.t0 <= t <= c.t1] if s else []
    return float(max(inside)) if inside else math.nan
