"""The bisection: refuse what cannot work before anything builds, measure both ends, then step through the range
until the first commit that changed the criterion is found. Rerunning the same command resumes it: every commit
measured before is read back, not run again."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from ..commands import Request
from ..config import Experiment, load_raw
from ..config.bisect import Criterion
from ..config.matrix import expand
from ..errors import ConfigError, HarnessError
from ..run.run_dir import check_run_id, harness_commit
from ..util import log, write_json
from . import outputs
from .history import history
from .judge import Decision, Judge
from .outputs import Answer, Step
from .search import Search
from .steps import Measured, Plan, measure

PROBE_METRICS = ("touch p99", "touch p99.9", "pass time mean")


@dataclass
class Result:
    answer: Answer
    report: Path


def check_criterion(exp: Experiment, crit: Criterion) -> None:
    """A criterion the schedule can measure, or a refusal naming what it lacks."""
    phases = exp.bisect.phases or exp.phases
    names = [p.name for p in phases]
    if crit.kind == "hypothesis":
        if all(p.mode(exp.pressure.mode) == "none" for p in phases):
            raise ConfigError("bisect by the hypothesis needs a pressure phase in the schedule: it has none")
        return
    if crit.phase not in names:
        raise ConfigError(f"criterion: the schedule has no phase {crit.phase!r} (it has: {', '.join(names)})")
    if crit.kind != "metric":
        return
    probed = [str(level) for level in exp.workload.probe.levels]
    runs = [str(r.level) for r in exp.workload.runs]
    if crit.level not in probed + runs:
        measured = ", ".join(probed + runs) or "nothing"
        raise ConfigError(f"criterion: nothing is measured at level {crit.level} (measured: {measured})")
    if crit.level not in runs and crit.metric not in PROBE_METRICS:
        raise ConfigError(f"criterion: the probe has no metric {crit.metric!r} (it has: {', '.join(PROBE_METRICS)})")


def default_run_id(good: str, bad: str) -> str:
    return check_run_id(re.sub(r"[^A-Za-z0-9_.-]", "_", f"bisect-{good}-{bad}")[:100])


def make_plan(request: Request) -> Plan:
    """Everything checked that can be without building: the config, the criterion against its schedule, the refs."""
    config, good, bad, criterion = str(request.config), str(request.good), str(request.bad), request.criterion
    path, raw = load_raw(config, request.sets)
    exp = expand(path, raw).experiment
    crit = Criterion.parse(criterion) if criterion else exp.bisect.criterion
    if (crash := request.on_crash or exp.bisect.on_crash) not in ("skip", "bad"):
        raise ConfigError(f"--on-crash {request.on_crash!r}: skip or bad")
    check_criterion(exp, crit)
    first = exp.variants[0]
    if first.git is not None or first.source is not None:
        raise ConfigError(f"bisect builds the source at each commit: variant {first.name} may not name git or a source")
    h = history(exp, good, bad)
    run_id = check_run_id(request.run_id) if request.run_id else default_run_id(good, bad)
    root = Path(request.output or exp.output).resolve() / exp.name / run_id
    reproduce = shlex.join(["fab", *dataclasses.replace(request, run_id=run_id).argv()])
    return Plan(path, raw, exp, h, crit, crash, root, reproduce)


def _record(plan: Plan) -> None:
    """The bisection's manifest, written before anything runs; a rerun must be of the same range."""
    path = plan.out / "bisect.json"
    mine = {"good": plan.history.good.sha, "bad": plan.history.bad.sha}
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in mine} != mine:
            raise HarnessError(
                f"{plan.dir} bisects {old.get('good', '?')[:12]}..{old.get('bad', '?')[:12]}, not "
                f"{mine['good'][:12]}..{mine['bad'][:12]} (a ref moved?): give --run-id for a new bisection"
            )
        return
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json(
        path,
        {
            **mine,
            "config": str(plan.config_path),
            "criterion": plan.criterion.model_dump(),
            "on_crash": plan.on_crash,
            "settings": plan.exp.bisect.model_dump(),
            "commits": [c.sha for c in plan.history.line],
            "started": time.time(),
            "harness_commit": harness_commit(),
            "reproduce": plan.reproduce,
        },
    )


def decide(plan: Plan, judge: Judge, m: Measured) -> Decision:
    r = m.reading
    if r.problem:
        return Decision("skip", r.problem)
    if r.crashes:
        said = f"its kernel under test crashed ({r.crashes[0][:80]})"
        return Decision("bad" if plan.on_crash == "bad" else "skip", said)
    if not r.values:
        return Decision("skip", f"no boot measured the criterion ({r.failed} failed)")
    return judge.step(r)


def _end(plan: Plan, which: str, repetitions: int, cache: Path) -> Measured:
    """An end measured, or the reason the bisection cannot start."""
    end = measure(plan, plan.history.good if which == "good" else plan.history.bad, repetitions, cache)
    if end.reading.problem or not end.reading.values:
        why = end.reading.problem or f"no boot measured the criterion ({end.reading.failed} failed)"
        raise HarnessError(f"the {which} end {end.commit.said()} could not be measured: {why}")
    return end


def bisect(plan: Plan, cache: Path) -> Result:
    _record(plan)
    line, settings = plan.history.line, plan.exp.bisect
    first, most = settings.first_repetitions(), max(settings.first_repetitions(), settings.max_repetitions)
    reps = first
    good, bad = _end(plan, "good", reps, cache), _end(plan, "bad", reps, cache)
    judge = Judge(plan.criterion, good.reading, bad.reading)
    ends = judge.ends()
    while ends.mark is None and reps < most:  # a metric the ends' boots do not separate yet: more of each
        reps += 1
        good, bad = _end(plan, "good", reps, cache), _end(plan, "bad", reps, cache)
        judge = Judge(plan.criterion, good.reading, bad.reading)
        ends = judge.ends()
    steps = [Step(0, 0, "good", ends.said, good), Step(0, len(line) - 1, "bad", ends.said, bad)]
    if ends.mark != "bad":
        answer = Answer([], stopped=ends.said)
        return Result(answer, outputs.write(plan, steps, answer, ends.said))
    search = Search(len(line), {0: "good", len(line) - 1: "bad"})
    outputs.write(plan, steps, None, ends.said)
    while (i := search.next()) is not None:
        reps = first
        m = measure(plan, line[i], reps, cache)
        d = decide(plan, judge, m)
        while d.mark is None and reps < most:
            reps += 1
            m = measure(plan, line[i], reps, cache)
            d = decide(plan, judge, m)
        mark = d.mark or "skip"
        search.mark(i, mark)
        steps.append(Step(len(steps) - 1, i, mark, d.said if d.mark else f"undecided after {reps} boots: {d.said}", m))
        log(f"bisect step {len(steps) - 2}: {line[i].said()} is {mark} ({steps[-1].why})", style="bold")
        outputs.write(plan, steps, None, ends.said)
    answer = Answer([line[i] for i in search.first_bad()])
    return Result(answer, outputs.write(plan, steps, answer, ends.said))
