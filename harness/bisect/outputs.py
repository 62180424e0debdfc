"""A bisection's files, rewritten after every step (a crash leaves the steps so far): bisect.log in `git bisect log`
form (`git bisect replay` takes it), steps.csv, criterion.png (the criterion against the commits tried) and
report.txt, whose first line names the first commit that changed the criterion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from tabulate import tabulate

from ..util import atomic_file
from .history import Commit
from .search import Mark
from .steps import Measured, Plan

COLOURS = {"good": "#2ca02c", "bad": "#d62728", "skip": "#7f7f7f"}


@dataclass
class Step:
    n: int  # 0: an end, measured first
    position: int  # on the line from good (0) to bad
    mark: Mark
    why: str
    measured: Measured

    @property
    def commit(self) -> Commit:
        return self.measured.commit


@dataclass
class Answer:
    """Where the bisection stands: the first bad commit, the commits skipped ones leave open, or why it stopped."""

    first: list[Commit]
    stopped: str = ""  # the ends do not differ by the criterion: nothing to bisect

    def line(self, plan: Plan) -> str:
        if self.stopped:
            return f"no commit to find: good and bad do not differ by {plan.criterion.describe()} ({self.stopped})"
        if len(self.first) == 1:
            return f"first commit that changed {plan.criterion.describe()}: {self.first[0].said()}"
        return f"the first commit that changed {plan.criterion.describe()} is one of {len(self.first)} (skipped)"


def git_log(plan: Plan, steps: list[Step], answer: Answer | None) -> str:
    h = plan.history
    lines = [f"# nestpress bisect by {plan.criterion.describe()}", f"git bisect start '{h.bad.sha}' '{h.good.sha}'"]
    for s in sorted(steps, key=lambda s: (s.n, -s.position)):
        lines += [f"# {s.mark}: [{s.commit.sha}] {s.commit.subject}", f"git bisect {s.mark} {s.commit.sha}"]
    if answer is not None and not answer.stopped:
        lines += [f"# first bad commit: [{c.sha}] {c.subject}" for c in answer.first[:1]]
        lines += [f"# possible first bad commit: [{c.sha}] {c.subject}" for c in answer.first if len(answer.first) > 1]
    return "\n".join(lines) + "\n"


def table(steps: list[Step]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "step": s.n,
                "position": s.position,
                "commit": s.commit.sha,
                "subject": s.commit.subject,
                "mark": s.mark,
                "why": s.why,
                "boots": s.measured.reading.boots,
                "failed_boots": s.measured.reading.failed,
                "values": ";".join(f"{v:.6g}" for v in s.measured.reading.values),
                "crashes": " | ".join(s.measured.reading.crashes),
                "build_s": round(s.measured.build_s, 1),
                "run_s": round(s.measured.run_s, 1),
                "new_boots": s.measured.new_boots,
            }
            for s in steps
        ]
    )


def plot(plan: Plan, steps: list[Step], answer: Answer | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(plan.history.line)), 4))
    for s in steps:
        values = s.measured.reading.values
        ax.scatter([s.position] * len(values), values, color=COLOURS[s.mark], s=30, zorder=3)
    for mark, colour in COLOURS.items():
        ax.scatter([], [], color=colour, label=mark)
    if answer is not None and len(answer.first) == 1:
        at = plan.history.line.index(answer.first[0])
        ax.axvline(at - 0.5, color="black", ls="--", lw=1, label=f"first changed: {answer.first[0].short}")
    ax.set_xticks(range(len(plan.history.line)), [c.short[:8] for c in plan.history.line], rotation=60, fontsize=7)
    ax.set_xlim(-0.5, len(plan.history.line) - 0.5)
    ax.set_xlabel("commit (good end left, bad end right)")
    crit = plan.criterion
    ax.set_ylabel(str(crit.metric if crit.kind == "metric" else crit.counter or "mechanism acted (1) or not (0)"))
    ax.set_title(f"{plan.exp.name}: bisect by {crit.describe()}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def report(plan: Plan, steps: list[Step], answer: Answer | None, ends: str) -> str:
    h = plan.history
    between = [s for s in steps if s.n > 0]
    lines = [
        answer.line(plan) if answer else "bisecting (not finished)",
        "",
        f"range: {h.good.short} (good) .. {h.bad.short} (bad), {len(h.after)} commit(s) after good, first-parent line",
        f"criterion: {plan.criterion.describe()}; a crashed kernel under test: {plan.on_crash}",
        f"ends: {ends}",
        f"steps between the ends: {len(between)} (at most {max(0, (len(h.after) - 1).bit_length())} without skips)",
        "",
    ]
    rows = [
        [s.n or "end", s.commit.short, s.mark, s.measured.reading.summary(), s.why[:60], f"{s.measured.build_s:.0f}"]
        + [f"{s.measured.run_s:.0f}"]
        for s in steps
    ]
    head = ["step", "commit", "mark", "value", "why", "build s", "run s"]
    lines += tabulate(rows, head, tablefmt="simple").split("\n")
    boots = sum(s.measured.reading.boots + s.measured.reading.failed for s in steps)
    build, run = sum(s.measured.build_s for s in steps), sum(s.measured.run_s for s in steps)
    phases = sum(p.duration_s for p in (plan.exp.bisect.phases or plan.exp.phases))
    lines += ["", f"time: builds {build / 60:.1f} min, boots {run / 60:.1f} min for {boots} boot(s)"]
    lines += [f"  ({run / boots:.0f} s a boot, of which {phases:.0f} s its phases)" if boots else ""]
    if answer and len(answer.first) > 1:
        lines += ["", "could be any of:", *[f"  {c.said()}" for c in answer.first]]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _put(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write(plan: Plan, steps: list[Step], answer: Answer | None, ends: str) -> Path:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    _put(out / "bisect.log", git_log(plan, steps, answer))
    _put(out / "steps.csv", table(steps).to_csv(index=False))
    plot(plan, steps, answer, out / "criterion.png")
    _put(out / "report.txt", report(plan, steps, answer, ends))
    return out / "report.txt"
