"""Tables -> a Report (verdict rows, evidence, latency summary) -> PNG plots, report.md, one report.html.

Everything is computed from the stored tables, so `fab report --run DIR` regenerates a report without
rerunning anything, and a crashed run still gets a report of what it has (marked incomplete). The
analysis lives in evidence.py and stats.py, the pictures in plots.py, the text in render.py; callers
get the Report's data (the CLI prints its verdict from there), not Markdown to parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import health, results, stats
from ..config import Experiment, Sampler
from ..errors import HarnessError
from ..manifest import Manifest, cell_record
from . import plots, render
from .attribution import Attribution, attribute, clock_summary
from .evidence import evidence_summary, inapplicable, shrinker_evidence, shrinker_ran, undelivered, zapped

__all__ = ["Report", "analyze", "compare_runs", "generate", "shrinker_evidence", "shrinker_ran", "zapped"]


@dataclass
class Report:
    run_dir: Path
    manifest: Manifest
    experiment: Experiment  # the manifest's expanded config, validated once
    complete: bool
    cells: pd.DataFrame  # one row per cell of the matrix, with its status
    ab: pd.DataFrame  # verdict rows: phase x level x metric, patched against baseline
    evidence: pd.DataFrame  # per cell x phase: the shrinker and reclaim (evidence.shrinker_evidence)
    summary: pd.DataFrame  # latency percentiles per variant x phase x level
    health: pd.DataFrame  # boot, warm-up and cell times per variant x level (health.health_table)
    guest_view: pd.DataFrame  # major faults and steal the guests' own kernels saw, per variant x phase x level
    attribution: Attribution  # spikes, their causes, excess by cause (attribution.attribute)
    undelivered: dict[tuple[str, str], str]  # (variant, phase) -> why its pressure was not delivered
    unmeasured: list[str]  # variants of the plan without a single latency sample
    frames: dict[str, pd.DataFrame]  # the run's tables (results.TABLES)
    plots: list[Path]

    @property
    def conclusive(self) -> bool:
        """Every phase delivered its pressure and every variant was measured: what exit status 0 also says."""
        return not self.undelivered and not self.unmeasured

    @property
    def html(self) -> Path:
        return self.run_dir / "report.html"

    def verdict_markdown(self) -> str:
        return render.verdict_markdown(self.ab)


def analyze(run_dir: Path, rebuild_tables: bool = False) -> Report:
    """The Report's data from a run directory's tables (collected from the raw outputs when asked or missing);
    writes nothing but the tables."""
    run_dir = Path(run_dir)
    frames = results.collect(run_dir) if rebuild_tables or not (run_dir / "tables").exists() else results.load(run_dir)
    manifest = Manifest.load(run_dir / "manifest.json")
    exp = Experiment.model_validate(manifest.expanded)
    cells = frames["cells"]
    evidence = shrinker_evidence(frames, exp) if not frames["phases"].empty else pd.DataFrame()
    base_ran = shrinker_ran(evidence, manifest.baseline) if not evidence.empty else False
    not_delivered = undelivered(evidence)
    variants = [v.name for v in exp.variants if any(c.variant == v.name for c in manifest.cells)]  # a shard's own
    unmeasured = [v for v in variants if v not in set(frames["samples"]["variant"])]
    summary = stats.summarize(frames["samples"])
    metrics = stats.repetition_metrics(frames["samples"], frames["passes"])
    ab = stats.ab_table(
        metrics,
        manifest.baseline,
        tcg=manifest.tcg,
        baseline_shrinker_ran=base_ran,
        variants=variants,
        undelivered=not_delivered,
        inapplicable=inapplicable(evidence),
        phases=[p.name for p in exp.phases],
    )
    records = {c.id: r for c in manifest.cells if (r := cell_record(run_dir, c.id)) is not None}
    health_rows = health.health_table(frames, records, manifest.baseline)
    attr = attribute(frames, exp, manifest.baseline)
    guest_view = stats.guest_view(frames["passes"])
    for name, df in (("spikes", attr.spikes), ("attribution", attr.table)):
        df.to_parquet(run_dir / "tables" / f"{name}.parquet", index=False)
    for name, df in (
        ("summary", summary),
        ("ab", ab),
        ("evidence", evidence),
        ("repetition_metrics", metrics),
        ("health", health_rows),
        ("guest_view", guest_view),
        ("spikes", attr.spikes),
        ("attribution", attr.table),
        ("attribution_ab", attr.ab),
    ):
        df.to_csv(run_dir / "tables" / f"{name}.csv", index=False)
    return Report(
        run_dir,
        manifest,
        exp,
        manifest.status == "complete" and bool((cells["status"] == "complete").all()),
        cells,
        ab,
        evidence,
        summary,
        health_rows,
        guest_view,
        attr,
        not_delivered,
        unmeasured,
        frames,
        [],
    )


def generate(run_dir: Path, rebuild_tables: bool = True, repetition: int | None = None) -> Report:
    """analyze(), then the plots, report.md and report.html. The timeline and the counters show every
    repetition (small multiples), or only `repetition`."""
    report = analyze(run_dir, rebuild_tables)
    reps = sorted({c.repetition for c in report.manifest.cells})
    if repetition is not None and repetition not in reps:
        raise HarnessError(f"{run_dir}: no repetition {repetition} (it has {', '.join(map(str, reps))})")
    plots_dir = report.run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    report.plots = [
        plots.plot_ccdf(report.frames, report.manifest, plots_dir / "latency_ccdf.png"),
        plots.plot_timeline(report.frames, report.manifest, plots_dir / "timeline.png", repetition),
        plots.plot_percentiles(report.summary, report.manifest, plots_dir / "tail_percentiles.png"),
        plots.plot_counters(report.frames, report.manifest, plots_dir / "counters.png", repetition),
        plots.plot_spikes(report.frames, report.manifest, report.attribution, plots_dir / "spikes.png", repetition),
        plots.plot_excess(report.attribution, report.manifest, plots_dir / "excess_by_cause.png"),
    ]
    md = _markdown(report)
    (report.run_dir / "report.md").write_text(md)
    report.html.write_text(render.html(md, report.run_dir))
    return report


def _markdown(r: Report) -> str:
    m, cells = r.manifest, r.cells
    missing = cells[cells["status"] != "complete"]
    return "\n".join(
        [
            f"# {m.experiment} - run {m.run_id}",
            "",
            f"**Status: {'complete' if r.complete else 'INCOMPLETE'}** - "
            f"{int((cells['status'] == 'complete').sum())} of "
            f"{len(cells)} cells complete"
            + (f"; missing or failed: {', '.join(missing['cell'])}" if len(missing) else ""),
            "",
            f"> {m.accel.banner}",
            "",
            *_first_screen(r),
            *_attribution_screen(r),
            f"Topology `{m.topology}`; variants "
            + ", ".join(f"`{n}` ({b.summary()})" for n, b in m.builds.items())
            + f"; order {m.order}.",
            "",
            "## Verdict",
            "",
            "Latency of single page touches in the guests whose memory the kernel under test shadow-pages; "
            "one value per repetition, each variant against the baseline "
            f"(`{m.baseline}`). *worse* = higher latency than the baseline.",
            "",
            f"**Validity: {stats.VALIDITY[m.tcg]}.**",
            "",
            r.verdict_markdown(),
            "",
            "## Evidence: did the shrinker run?",
            "",
            *evidence_summary(r.evidence, m.baseline),
            "",
            "## The guests' own view",
            "",
            "What each guest's kernel counted during the probe's passes: its major faults (its own swap and "
            "file reads: none expected) and its vCPUs' steal time (what its hypervisor reports taking from them; "
            "under TCG, QEMU reports it too).",
            "",
            render.guest_view_markdown(r.guest_view),
            "",
            "## Attribution: what each spike overlapped",
            "",
            _attribution_method(r),
            "",
            render.attribution_markdown(r.attribution.table),
            "",
            "## Pressure delivered, per phase",
            "",
            render.delivery_markdown(r.evidence),
            "",
            "## Health: boots, warm-up, cells",
            "",
            "Medians over cells [min-max], seconds (attempts: how many tries a cell took). Boot = QEMU start to "
            "the agent ready; kernel = to the kernel's first log line of user space; warm-up = the probe's first "
            f"pass. ⚠ marks a median more than {health.FAR:g}x the baseline's (either way).",
            "",
            render.health_markdown(r.health),
            "",
            "## Plots",
            "",
            *[f"![{p.stem}](plots/{p.name})\n" for p in r.plots],
            "## Latency summary (all repetitions pooled, µs; 95% bootstrap CI over 1 s intervals)",
            "",
            render.summary_markdown(r.summary),
            "",
            "## Reproduce",
            "",
            f"```\n{m.reproduce or 'fab experiment --config ' + m.config_path}\n```",
            "",
            f"Regenerate this report: `fab report --run {r.run_dir}`. "
            "Tables: `tables/*.parquet` (CSV twins beside them).",
            "",
        ]
    )


def _own_vm_zapped_method(sampler: Sampler) -> str:
    """When this run read each VM's zap counters, i.e. what `own_vm_zapped` can see."""
    if not sampler.trace_shrinker:
        when = "around each debugfs scan write only (sampler.trace_shrinker is off: no other call is seen)"
    elif sampler.zap_interval_s > 0:
        when = (
            f"within {sampler.zap_interval_s:g} s after the shrinker's calls (at most that often) and around each "
            "debugfs scan write"
        )
    else:
        when = (
            f"with the first sample ({sampler.interval_s:g} s) after the shrinker's calls and around each debugfs "
            "scan write"
        )
    return f"`own_vm_zapped`: its VM lost shadow pages while it lasted (its zap counters read {when}). "


def _attribution_method(r: Report) -> str:
    a = r.experiment.attribution
    windows = r.attribution.spikes["window_ms"]
    return (
        f"A spike is a touch above its guest's p{a.spike_quantile * 100:g} of the undisturbed phases of the same "
        "cell (and at least 1 ms, the probe's raw-record floor); its excess is its latency above that guest's "
        "undisturbed p99. Each spike is matched to the cause events of the kernel under test it overlaps: a call "
        "of the x86-mmu shrinker that freed shadow pages (`shrinker-zap`), the guest refaulting after one until its "
        "probe has touched every page once more (`zap-refault`), a direct-reclaim stall of the guest's "
        "QEMU (`direct-reclaim`), a rise of that QEMU's major faults within the sampler's interval (`swap-in`); "
        "`none found` when none overlaps. A spike with several causes has its excess split equally among them. "
        + _own_vm_zapped_method(r.experiment.sampler)
        + f"Matching window: up to {render.fmt(windows.max() if len(windows) else a.unmeasured_window_ms, 2)} ms. "
        "Tables: `tables/spikes.*`, `tables/attribution.*`, `tables/attribution_ab.csv`, `tables/clocks.*`.\n\n"
        + render.clocks_line(clock_summary(r.frames["clocks"]), a.unmeasured_window_ms)
    )


def _attribution_screen(r: Report) -> list[str]:
    """Per pressure phase: what share of the baseline's extra tail latency coincided with shrinker zapping."""
    lines = render.attribution_lines(r.attribution.ab, r.manifest.baseline)
    if not lines:
        return []
    return ["**What the baseline's extra tail latency coincided with** (see Attribution):", "", *lines, ""]


def _uncomparable(piv: pd.DataFrame, reports: list[tuple[str, Report]]) -> list[str]:
    """The rows of a comparison with a side missing, each with why (said, where a bare NaN would not)."""
    lines = []
    for key, row in piv.iterrows():
        variant, phase, level = (str(k) for k in key)  # type: ignore[attr-defined]
        for tag, r in reports:
            if pd.isna(row.get(f"{tag}: {r.run_dir.name}")):
                why = (
                    f"`{variant}` has no latency samples in that run"
                    if variant in r.unmeasured
                    else f"that run has no `{level}` samples of `{variant}` in phase `{phase}`"
                )
                lines.append(f"- {variant} / {phase} / {level}: not in {tag} ({why})")
    for tag, r in reports:
        lines += [f"- {tag}: {why}" for why in r.undelivered.values()]
    if not lines:
        return []
    return ["Rows that cannot be compared, and phases whose pressure was not delivered:", "", *lines, ""]


def _first_screen(r: Report) -> list[str]:
    """What makes this run's comparison weaker than it looks: said before the verdict."""
    lines = []
    for v in r.unmeasured:
        lines.append(f"- **No latency samples from `{v}`**: the A/B table cannot compare it (see Health and cells).")
    for (_variant, phase), why in r.undelivered.items():
        lines.append(f"- **Phase `{phase}`: {why}**; its A/B rows are inconclusive.")
    for _, st in stats.clock_stalls(r.frames["samples"]).iterrows():
        lines.append(
            f"- Probe clock: {st['touches']} touches of `{st['variant']}` {st['level']} read 0-1 ns (the guest's "
            "clock did not advance between two reads): no latency, left out of the CCDF; see its clocksource "
            "in the level's facts.json."
        )
    for _, h in health.far_from_baseline(r.health).iterrows():
        lines.append(
            f"- Health: `{h['variant']}` {h['level']} {h['figure']} median {h['median']:.1f} is "
            f"{h['vs_baseline']:.1f}x the baseline's."
        )
    return [*lines, ""] if lines else []


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
        piv.round(1).reset_index().to_markdown(index=False, tablefmt="pipe"),
        "",
        *_uncomparable(piv, reports),
    ]
    for tag, r in reports:
        md += [f"## {tag}: {r.run_dir}", "", r.verdict_markdown(), ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.html").write_text(render.html("\n".join(md), out))
    return out / "compare.html"
