"""One commit measured: an experiment run of one variant - the config's first, at that commit - in the bisection's
commits/ folder. The good end is the source at good; every other commit is the diff from good to it, built
incrementally in the shared tree like any variant. More boots of a commit are the same run resumed, and another
criterion over the same range and schedule reads the same runs."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..analysis import analyze
from ..config import Experiment, Matrix
from ..config.bisect import Criterion
from ..config.matrix import expand
from ..errors import BuildError, KconfigError, PatchError, PressureError, SourceError
from ..kernel.build import Builder, BuildMetadata
from ..results.manifest import Manifest, cell_complete
from ..run.runner import Runner
from ..util import log
from .history import Commit, History
from .judge import Reading, read

# what stops a commit from being measured at all: `git bisect skip`
UNMEASURABLE = (BuildError, KconfigError, PatchError, SourceError, PressureError)


@dataclass(frozen=True)
class Plan:
    """What a bisection was asked: the config (as written, --set applied), its range, its criterion, its folder."""

    config_path: Path
    raw: dict
    exp: Experiment
    history: History
    criterion: Criterion
    on_crash: str
    dir: Path  # <output>/<name>/<run-id>: commits/ and each criterion's outputs
    reproduce: str

    @property
    def out(self) -> Path:
        """This criterion's log, table, plot and report."""
        return self.dir / self.criterion.slug()

    def raw_for(self, commit: Commit, repetitions: int) -> dict:
        """The config of one commit's run: the first variant at that commit, the bisection's schedule."""
        raw = copy.deepcopy(self.raw)
        raw.pop("bisect", None)
        variant = {k: v for k, v in raw["variants"][0].items() if k not in ("name", "git", "source")}
        variant["name"] = commit.short
        if commit != self.history.good:
            variant["git"] = {"ref": commit.sha}
        raw["variants"] = [variant]
        raw["source"] = {**raw["source"], "ref": self.history.good.sha}
        if self.exp.bisect.phases:
            raw["phases"] = [p.model_dump() for p in self.exp.bisect.phases]
        raw["repetitions"] = repetitions
        return raw

    def schedule_key(self) -> str:
        """What a commit's boots measure, besides the commit: a run of another schedule is another folder."""
        raw = self.raw_for(self.history.good, 1)
        raw.pop("repetitions"), raw.pop("parallel", None)
        return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass
class Measured:
    commit: Commit
    run_dir: Path
    repetitions: int
    reading: Reading
    build_s: float = 0.0  # what its kernel's build took, when it was built
    run_s: float = 0.0  # what its boots took, every run of them
    new_boots: int = 0  # boots run this time (the others were measured before)


def matrix(plan: Plan, commit: Commit, repetitions: int) -> Matrix:
    return expand(plan.config_path, plan.raw_for(commit, repetitions))


def measure(plan: Plan, commit: Commit, repetitions: int, cache: Path) -> Measured:
    """The commit's first `repetitions` boots (those measured before are kept), read by the criterion."""
    run_dir = plan.dir / "commits" / f"{commit.short}.{plan.schedule_key()}"
    m = matrix(plan, commit, repetitions)
    todo = [c for c in m.cells if not cell_complete(run_dir, c.id)]
    out = Measured(commit, run_dir, repetitions, Reading(), new_boots=len(todo))
    if todo:
        log(f"bisect: {commit.said()}: {len(todo)} boot(s) to measure ({repetitions} in all)", style="bold")
        stage = "does not build"
        try:
            Builder(m.experiment, cache).build_all()
            stage = "cannot run the schedule"
            Runner(m, run_dir, cache, plan.reproduce).run()
        except UNMEASURABLE as e:
            out.reading.problem = f"{stage}: {e}"
            return out
    if not (run_dir / "manifest.json").exists():
        out.reading.problem = "nothing was measured"
        return out
    out.reading = read(analyze(run_dir, rebuild_tables=True), plan.criterion)
    manifest = Manifest.load(run_dir / "manifest.json")
    out.run_s = manifest.duration_s
    built = [Path(b.dir) / "metadata.json" for b in manifest.builds.values()]
    out.build_s = sum(BuildMetadata.load(p).duration_s or 0.0 for p in built if p.exists())
    return out
