"""Analysis -> PNG plots, report.md and one report.html; two runs side by side.

Everything is computed from the stored tables (harness.analysis), so `fab report --run DIR` regenerates a report
without rerunning anything. The pictures are in plots.py, the text in markdown.py and render.py; callers get the
Report's data (the CLI prints its verdict from there), not Markdown to parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import hypotheses
from ..analysis import Analysis, analyze
from ..errors import HarnessError
from ..results.manifest import Manifest
from . import plots, render
from .markdown import report_markdown
from .summary import summary_text

__all__ = ["Report", "compare_runs", "generate"]


@dataclass
class Report(Analysis):
    """An Analysis with its plots drawn and its report written."""

    plots: list[Path] = field(default_factory=list)

    @property
    def html(self) -> Path:
        return self.run_dir / "report.html"


def generate(run_dir: Path, rebuild_tables: bool = True, repetition: int | None = None) -> Report:
    """analyze(), then the plots, report.md and report.html. The timeline and the counters show every
    repetition (small multiples), or only `repetition`."""
    reps = sorted({c.repetition for c in Manifest.load(Path(run_dir) / "manifest.json").cells})
    if repetition is not None and repetition not in reps:
        raise HarnessError(f"{run_dir}: no repetition {repetition} (it has {', '.join(map(str, reps))})")
    report = Report(**vars(analyze(run_dir, rebuild_tables)))
    plots_dir = report.run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    probe = not report.frames["samples"].empty
    hypothesis = hypotheses.get(report.experiment.hypothesis)
    attributed = probe and hypothesis.attribution
    draw = [
        (probe, lambda: plots.plot_ccdf(report.frames, report.manifest, plots_dir / "latency_ccdf.png")),
        (
            probe,
            lambda: plots.plot_timeline(
                report.frames, report.manifest, hypothesis, plots_dir / "timeline.png", repetition
            ),
        ),
        (probe, lambda: plots.plot_percentiles(report.summary, report.manifest, plots_dir / "tail_percentiles.png")),
        (
            True,
            lambda: plots.plot_counters(
                report.frames, report.manifest, hypothesis, plots_dir / "counters.png", repetition
            ),
        ),
        (
            not report.frames["workload_metrics"].empty,
            lambda: plots.plot_workload_metrics(report.metrics, report.manifest, plots_dir / "workload_metrics.png"),
        ),
        (
            attributed,
            lambda: plots.plot_spikes(
                report.frames, report.manifest, report.attribution, hypothesis, plots_dir / "spikes.png", repetition
            ),
        ),
        (attributed, lambda: plots.plot_excess(report.attribution, report.manifest, plots_dir / "excess_by_cause.png")),
    ]
    report.plots = [make() for wanted, make in draw if wanted]
    (report.run_dir / "report.txt").write_text(summary_text(report, report.html))
    md = report_markdown(report, report.plots)
    (report.run_dir / "report.md").write_text(md)
    report.html.write_text(render.html(md, report.plots))
    return report


def _uncomparable(piv: pd.DataFrame, reports: list[tuple[str, Analysis]]) -> list[str]:
    """The rows of a comparison with a side missing, each with why (said, where a bare NaN would not)."""
    lines = []
    for key, row in piv.iterrows():
        variant, phase, level = (str(k) for k in key)  # type: ignore[attr-defined]
        for tag, r in reports:
            if pd.isna(row.get(f"{tag}: {r.run_dir.name}")):
                why = (
                    f"{render.code(variant)} has no latency samples in that run"
                    if variant in r.unmeasured
                    else f"that run has no {render.code(level)} samples of {render.code(variant)} in phase "
                    f"{render.code(phase)}"
                )
                lines.append(f"- {render.text(f'{variant} / {phase} / {level}')}: not in {tag} ({why})")
    for tag, r in reports:
        lines += [f"- {tag}: {render.text(why)}" for why in r.undelivered.values()]
    if not lines:
        return []
    return ["Rows that cannot be compared, and phases whose pressure was not delivered:", "", *lines, ""]


def compare_runs(run_a: Path, run_b: Path, out: Path) -> Path:
    """Two runs side by side: their verdict tables and p99s per variant x phase x level."""
    reports = [(tag, analyze(run)) for tag, run in (("A", run_a), ("B", run_b))]
    both = pd.concat([r.summary.assign(run=f"{tag}: {r.run_dir.name}") for tag, r in reports])
    piv = both.pivot_table(index=["variant", "phase", "level"], columns="run", values="p99_ns") / 1e3
    out.mkdir(parents=True, exist_ok=True)
    md = [
        f"# compare {run_a} vs {run_b}",
        "",
        "p99 touch latency (µs):",
        "",
        render.table(piv.round(1).reset_index().to_dict("records")),
        "",
        *_uncomparable(piv, reports),
    ]
    for tag, r in reports:
        md += [f"## {tag}: {r.run_dir}", "", render.verdict_markdown(r.ab), ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.html").write_text(render.html("\n".join(md)))
    return out / "compare.html"
