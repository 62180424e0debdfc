"""The report's Markdown: the first screen, the verdict, evidence, the guests' view, attribution, delivery, health,
plots, latency summary and how to reproduce - assembled from an Analysis (render.py formats the tables)."""

from __future__ import annotations

from pathlib import Path

from .. import hypotheses
from ..analysis import Analysis, health, stats
from ..analysis.attribution import clock_summary
from . import render
from .evidence import evidence_summary
from .summary import answer_lines


def report_markdown(r: Analysis, plots: list[Path]) -> str:
    m, cells = r.manifest, r.cells
    hypothesis = hypotheses.get(r.experiment.hypothesis)
    probe = not r.frames["samples"].empty
    missing = cells[cells["status"] != "complete"]
    return "\n".join(
        [
            f"# {m.experiment} - run {m.run_id}",
            "",
            f"**Status: {'complete' if r.complete else 'INCOMPLETE'}** - "
            f"{int((cells['status'] == 'complete').sum())} of "
            f"{len(cells)} cells complete"
            + (f"; missing or failed: {render.text(', '.join(missing['cell']))}" if len(missing) else ""),
            "",
            f"> {m.accel.banner}",
            "",
            f"**Validity: {stats.VALIDITY[m.tcg]}.** The answer, pressure phases first (each variant against the "
            f"baseline `{m.baseline}`; `report.txt` has it in plain text):",
            "",
            *[f"- {render.text(line)}" for line in answer_lines(r)],
            "",
            *_first_screen(r),
            *(_attribution_screen(r) if probe and hypothesis.attribution else []),
            f"Topology `{m.topology}`; variants "
            + ", ".join(
                f"`{v.name}` ({m.builds[v.name].summary()})" for v in r.experiment.variants if v.name in m.builds
            )
            + f"; order {m.order}; {render.text(m.parallel)}.",
            "",
            "## Verdict",
            "",
            f"The question: {hypothesis.question} "
            "Each metric - the probe's touch latencies in the guests, each workload's own figures - gives one value "
            f"per repetition; each variant against the baseline (`{m.baseline}`). *worse* = a change the metric's "
            "own way of being better says is for the worse.",
            "",
            render.verdict_markdown(r.ab),
            "",
            f"## Evidence: what {hypothesis.mechanism} did",
            "",
            *evidence_summary(r.evidence, m.baseline, hypothesis, r.ab),
            "",
            *(_probe_sections(r) if probe else []),
            "## Crashes, stalls and warnings",
            "",
            "Every boot (every attempt at a cell, retried or not) whose kernels - under test, L1 or L2 - logged a "
            "panic, oops, BUG, WARN, RCU stall, soft lockup or hung task, against the baseline's boots (Fisher's "
            "exact test); each distinct one by its signature (its kind, first line and top frames, normalised). "
            "Table: `tables/crashes.*`.",
            "",
            render.outcomes_markdown(r.outcomes),
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
            *[f"![{p.stem}](plots/{p.name})\n" for p in plots],
            *(_summary_section(r) if probe else []),
            "## Reproduce",
            "",
            f"```\n{m.reproduce or 'fab experiment --config ' + m.config_path}\n```",
            "",
            f"Regenerate this report: `fab report --run {r.run_dir}`. "
            "Tables: `tables/*.parquet` (CSV twins beside them).",
            "",
        ]
    )


def _probe_sections(r: Analysis) -> list[str]:
    """What only the probe measures: the guests' own view, and (where the hypothesis has cause events) attribution."""
    lines = [
        "## The guests' own view",
        "",
        "What each guest's kernel counted during the probe's passes: its major faults (its own swap and "
        "file reads: none expected) and its vCPUs' steal time (what its hypervisor reports taking from them; "
        "under TCG, QEMU reports it too).",
        "",
        render.guest_view_markdown(r.guest_view),
        "",
    ]
    if not hypotheses.get(r.experiment.hypothesis).attribution:
        return lines
    return [
        *lines,
        "## Attribution: what each spike overlapped",
        "",
        _attribution_method(r),
        "",
        render.attribution_markdown(r.attribution.table),
        "",
    ]


def _summary_section(r: Analysis) -> list[str]:
    return [
        "## Latency summary (all repetitions pooled, µs; 95% bootstrap CI over 1 s intervals)",
        "",
        render.summary_markdown(r.summary),
        "",
    ]


def _attribution_method(r: Analysis) -> str:
    a = r.experiment.attribution
    windows = r.attribution.spikes["window_ms"]
    return (
        f"A spike is a touch above its guest's p{a.spike_quantile * 100:g} of the undisturbed phases of the same "
        "cell (and at least 1 ms, the probe's raw-record floor); its excess is its latency above that guest's "
        "undisturbed p99. Each spike is matched to the cause events of the kernel under test it overlaps: "
        + hypotheses.get(r.experiment.hypothesis).cause_words
        + ", a direct-reclaim stall of the guest's QEMU (`direct-reclaim`), a rise of that QEMU's major faults "
        "within the sampler's interval (`swap-in`); `none found` when none overlaps. A spike with several causes "
        "has its excess split equally among them. Beside the causes, `own_vm_zapped` says whether the spike's own "
        "VM in the kernel under test (an L2's: its L1's) lost shadow pages meanwhile (its zap counters, read with "
        "every sample and around the mechanism's events). "
        f"Matching window: up to {render.fmt(windows.max() if len(windows) else a.unmeasured_window_ms, 2)} ms. "
        "Tables: `tables/spikes.*`, `tables/attribution.*`, `tables/attribution_ab.csv`, `tables/clocks.*`.\n\n"
        + render.clocks_line(clock_summary(r.frames["clocks"]), a.unmeasured_window_ms)
    )


def _attribution_screen(r: Analysis) -> list[str]:
    """Per pressure phase: each side's tail excess in total, during the mechanism and per cause, with the
    differences and their intervals."""
    headline = hypotheses.get(r.experiment.hypothesis).headline
    lines = render.attribution_lines(r.attribution.ab, r.manifest.baseline, r.attribution.shares, headline)
    if not lines:
        return []
    return ["**What the baseline's extra tail latency coincided with** (ms; see Attribution):", "", *lines, ""]


def _first_screen(r: Analysis) -> list[str]:
    """Crashes first (a crash of a kernel under test is a result), then what makes this run's comparison weaker
    than it looks: said before the verdict."""
    lines = render.crash_lines(r.crash_signatures, r.outcomes)
    for v in r.unmeasured:
        lines.append(
            f"- **No latency samples from {render.code(v)}**: the A/B table cannot compare it (see Health and cells)."
        )
    for (_variant, phase), why in r.undelivered.items():
        lines.append(f"- **Phase {render.code(phase)}: {render.text(why)}**; its A/B rows are inconclusive.")
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
