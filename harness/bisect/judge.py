"""A commit's boots as the criterion reads them (Reading), and what they decide against the two ends (Judge).

A metric is judged by the A/B's own statistics (analysis.stats: Welch's t on the boots' log values): a commit is bad
where it differs from the good end the way the bad end does and not from the bad end the other way, good in the
mirror case; anything else is undecided, and more boots are measured. Evidence and the hypothesis are read per boot
(the counter above its threshold, the mechanism acted) and decided by most boots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import hypotheses
from ..analysis import Analysis, stats
from ..config.bisect import Criterion
from ..results.crashes import CRASHES
from .search import Mark

FATAL = (*CRASHES, "freeze")  # a kernel under test that died, was corrupted or went silent


@dataclass
class Reading:
    """One commit's measurement: one value per complete boot (the metric, the counter, or 1/0: the mechanism
    acted), and what else happened to its boots."""

    boots: int = 0
    failed: int = 0
    values: list[float] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # what its kernel under test said when it crashed
    problem: str = ""  # why there are no values (it did not build, a counter the evidence lacks)

    def summary(self) -> str:
        if not self.values:
            return "-"
        v = np.asarray(self.values, float)
        centre = float(np.exp(np.log(v).mean())) if (v > 0).all() else float(v.mean())
        return f"{centre:.4g} ({len(v)} boot{'s' if len(v) != 1 else ''})"


def label_matches(label: str, metric: str) -> bool:
    """`touch p99.9` names the row `touch p99.9 (us)`; `touch p99` does not."""
    return label == metric or label.startswith(metric + " (")


def read(a: Analysis, crit: Criterion) -> Reading:
    cells = a.cells
    crashes = a.frames["crashes"]
    fatal = crashes[(crashes["level"] == "kut") & crashes["kind"].isin(FATAL)] if not crashes.empty else crashes
    r = Reading(
        boots=int((cells["status"] == "complete").sum()),
        failed=int((cells["status"] != "complete").sum()),
        crashes=[f"{k}: {s}" for k, s in zip(fatal.get("kind", []), fatal.get("said", []))],
    )
    if crit.kind == "metric":
        m = a.metrics
        if not m.empty:
            m = m[(m["phase"] == crit.phase) & (m["level"] == crit.level)]
            m = m[m["metric"].map(lambda x: label_matches(str(x), str(crit.metric)))].sort_values("repetition")
        r.values = [float(v) for v in m["value"]] if not m.empty else []
        return r
    ev = a.evidence
    if ev.empty:
        return r
    if crit.kind == "evidence":
        if crit.counter not in ev.columns:
            known = ", ".join(c for c in ev.columns if ev[c].dtype.kind in "iuf" and c != "repetition")
            r.problem = f"the evidence has no counter {crit.counter!r} (it has: {known})"
            return r
        at = ev[ev["phase"] == crit.phase]
        r.values = [float(g[crit.counter].fillna(0).sum()) for _, g in at.groupby("cell", sort=False)]
        return r
    hypothesis = hypotheses.get(a.experiment.hypothesis)
    r.values = [0.0 if hypothesis.precondition(g, str(v)) else 1.0 for (_, v), g in ev.groupby(["cell", "variant"])]
    return r


@dataclass(frozen=True)
class Decision:
    mark: Mark | None  # None: undecided, more boots may decide
    said: str


class Judge:
    """Decides a commit against the ends, once the ends differ (ends())."""

    def __init__(self, crit: Criterion, good: Reading, bad: Reading):
        self.crit, self.good, self.bad = crit, good, bad
        self.sign = 0  # metric: +1 when the bad end is higher, -1 lower

    def _state(self, values: list[float]) -> bool | None:
        """Evidence and hypothesis: present in most boots (None: as many boots each way, or none)."""
        above = sum(v > self.crit.above for v in values)
        return None if 2 * above == len(values) else 2 * above > len(values)

    def ends(self) -> Decision:
        """bad: the ends differ by the criterion; good: they do not; None: undecided yet."""
        if self.crit.kind == "metric":
            c = stats.compare(np.asarray(self.good.values), np.asarray(self.bad.values))
            if c.n_min < 2 or math.isnan(c.welch_p):
                return Decision(None, f"too few boots to compare ({c.n_baseline} v {c.n_patched})")
            said = f"bad v good {c.change_pct:+.1f} % [{c.change_ci_lo:+.1f}, {c.change_ci_hi:+.1f}], p {c.welch_p:.2g}"
            if c.welch_p < stats.ALPHA:
                self.sign = 1 if c.change_pct > 0 else -1
                return Decision("bad", said)
            return Decision(None, said)
        g, b = self._state(self.good.values), self._state(self.bad.values)
        said = f"good {self._words(g)}, bad {self._words(b)}"
        if g is None or b is None:
            return Decision(None, said)
        return Decision("bad" if g != b else "good", said)

    def _words(self, state: bool | None) -> str:
        if self.crit.kind == "hypothesis":
            return {True: "acted", False: "did not act", None: "undecided"}[state]
        return {True: "present", False: "absent", None: "undecided"}[state]

    def step(self, r: Reading) -> Decision:
        if self.crit.kind != "metric":
            s = self._state(r.values)
            if s is None:
                return Decision(None, self._words(s))
            return Decision("bad" if s == self._state(self.bad.values) else "good", self._words(s))
        vs_good = stats.compare(np.asarray(self.good.values), np.asarray(r.values))
        vs_bad = stats.compare(np.asarray(self.bad.values), np.asarray(r.values))
        toward_bad = vs_good.welch_p < stats.ALPHA and (vs_good.change_pct > 0) == (self.sign > 0)
        toward_good = vs_bad.welch_p < stats.ALPHA and (vs_bad.change_pct > 0) == (self.sign < 0)
        sides = (("good", vs_good), ("bad", vs_bad))
        said = ", ".join(f"v {end} {c.change_pct:+.1f} % (p {c.welch_p:.2g})" for end, c in sides)
        if toward_bad != toward_good:
            return Decision("bad" if toward_bad else "good", said)
        return Decision(None, said)
