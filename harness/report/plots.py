"""PNG plots of a run, from its tables: latency CCDF per phase, the timeline with pressure and the mechanism's
activity, tail percentiles with CIs, the kernel under test's counters."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..analysis import attribution, stats
from ..analysis.evidence import kut_facts
from ..hypotheses import Hypothesis
from ..results.manifest import Manifest

COLORS = {0: "#1f77b4", 1: "#d62728", 2: "#2ca02c", 3: "#9467bd"}


def _title(manifest: Manifest, what: str) -> str:
    vers = sorted({b.kernelrelease or b.kernel_version for b in manifest.builds.values()})
    return (
        f"{manifest.experiment}: {what}\naccel {manifest.accel.kut.upper()}, kernel {', '.join(vers)}, "
        f"topology {manifest.topology}"
    )


def _shade(ax, phases: pd.DataFrame) -> None:
    for _, p in phases.drop_duplicates("phase").iterrows():
        if p["mode"] != "none":
            ax.axvspan(p["t_start"], p["t_end"], color="orange", alpha=0.15, lw=0)
            ax.text(
                (p["t_start"] + p["t_end"]) / 2,
                1.0,
                p["phase"],
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
                color="darkorange",
            )


def plot_ccdf(frames, manifest, path: Path) -> Path:
    s = frames["samples"]
    phases = list(frames["phases"].drop_duplicates("phase")["phase"]) or ["(none)"]
    cols = min(4, len(phases))
    rows = int(np.ceil(len(phases) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, phase in zip(axes.flat, phases):
        at = s[s["phase"] == phase]
        stalled = int(at.loc[at["hi_ns"] <= stats.CLOCK_STALL_NS, "count"].sum())
        if stalled:  # no latency: the clock read the same twice (log axes would draw them at 1e-3 µs)
            ax.text(
                0.02,
                0.02,
                f"{stalled} touches of 0-1 ns (the clock did not advance): not drawn",
                transform=ax.transAxes,
                fontsize=7,
                color="dimgray",
            )
        for i, (variant, g) in enumerate(at[at["hi_ns"] > stats.CLOCK_STALL_NS].groupby("variant", sort=False)):
            for level, gl in g.groupby("level"):
                h = gl.groupby("latency_ns")["count"].sum().sort_index()
                ccdf = 1 - h.cumsum() / h.sum() + h / h.sum()
                ax.loglog(
                    h.index / 1e3,
                    ccdf.values,
                    color=COLORS[i % 4],
                    ls="-" if level == "l2" else "--",
                    label=f"{variant} {level}",
                )
        ax.set_title(phase, fontsize=9)
        ax.set_xlabel("touch latency (µs)")
        ax.minorticks_off()  # decades suffice on both log axes: minor ticks took 2/3 of this plot's time (1.7 s)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(phases) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("P(latency ≥ x)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(manifest, "latency CCDF per phase"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _interval_quantiles(s: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (t, guest), g in s.groupby(["t", "guest"]):
        p50, p99 = stats.weighted_quantiles(g["latency_ns"].to_numpy(), g["count"].to_numpy(), [0.5, 0.99])
        rows.append({"t": t, "guest": guest, "p50": p50 / 1e3, "p99": p99 / 1e3})
    return pd.DataFrame(rows)


def _cells(frames, variant: str, repetition: int | None) -> list[tuple[int, str]]:
    """(repetition, cell) of a variant that ran phases: the one asked for, or every one in order."""
    ph = frames["phases"]
    got = ph[ph["variant"] == variant].drop_duplicates("cell").sort_values(["repetition", "cell"])
    pairs = [(int(r), str(c)) for r, c in zip(got["repetition"], got["cell"])]
    return [x for x in pairs if repetition is None or x[0] == repetition]


def _absent(frames, cell: str, hypothesis: Hypothesis) -> str | None:
    """What the cell's kernel lacks for the mechanism to act, if anything (from its facts)."""
    return hypothesis.absent(kut_facts(frames["cells"]).get(cell))


def plot_timeline(frames, manifest, hypothesis: Hypothesis, path: Path, repetition: int | None = None) -> Path:
    """Per variant (rows) and repetition (columns, or the one asked for): latency per interval, pressure
    shaded, the mechanism's counters beside it; a kernel without the mechanism says so instead of a flat line."""
    s, c, tr, ph = frames["samples"], frames["counters"], frames["trace"], frames["phases"]
    variants = list(dict.fromkeys(ph["variant"])) or list(dict.fromkeys(s["variant"]))
    grid = {v: _cells(frames, v, repetition) for v in variants}
    cols = max([len(x) for x in grid.values()] + [1])
    fig, axes = plt.subplots(
        max(1, len(variants)), cols, figsize=(max(12, 6 * cols), 3.6 * max(1, len(variants))), squeeze=False
    )
    for row, variant in enumerate(variants):
        for col in range(cols):
            ax = axes[row, col]
            if col >= len(grid[variant]):
                ax.set_visible(False)
                continue
            rep, cell = grid[variant][col]
            _shade(ax, ph[ph["cell"] == cell])
            q = _interval_quantiles(s[s["cell"] == cell])
            for guest, g in q.groupby("guest") if not q.empty else []:
                ax.semilogy(g["t"], g["p99"], "-", lw=1.2, label=f"{guest} p99")
                ax.semilogy(g["t"], g["p50"], ":", lw=1, label=f"{guest} p50")
            ax.set_ylabel("touch latency (µs)")
            ax.set_title(f"{variant} r{rep} ({cell})", fontsize=9)
            ax.set_xlabel("time since first phase (s)")
            if absent := _absent(frames, cell, hypothesis):
                ax.text(0.99, 0.97, absent, transform=ax.transAxes, ha="right", va="top", fontsize=8, color="dimgray")
                if ax.get_legend_handles_labels()[0]:  # a cell without latency samples has no lines to name
                    ax.legend(fontsize=7, loc="upper left", ncol=2)
                continue
            ax2 = ax.twinx()
            for line, color in zip(hypothesis.timeline, ("red", "purple", "green")):
                g = c[(c["cell"] == cell) & (c["name"] == line.counter)].sort_values("t")
                y = g["value"].diff().clip(lower=0) / g["t"].diff() if line.rate else g["value"]
                if len(g) > line.rate:
                    ax2.plot(g["t"], y, color=color, lw=1, alpha=0.8, label=line.label)
            if hypothesis.timeline_marks:
                kind, label = hypothesis.timeline_marks
                marks = tr[(tr["cell"] == cell) & (tr["kind"] == kind)]
                if len(marks):
                    ax2.plot(marks["t"], np.zeros(len(marks)), "|", color="black", ms=14, label=label)
            ax2.set_ylabel(hypothesis.timeline_axis)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", ncol=3)
    which = f"repetition {repetition}" if repetition is not None else "every repetition"
    fig.suptitle(
        _title(manifest, f"latency over time with pressure (shaded) and {hypothesis.timeline_axis}, {which}"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_percentiles(summary: pd.DataFrame, manifest, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    if not summary.empty:
        labels = list(dict.fromkeys(summary["phase"] + " " + summary["level"]))
        variants = list(dict.fromkeys(summary["variant"]))
        width = 0.8 / max(1, len(variants))
        for ax, q in zip(axes[0], ("p99", "p99.9")):
            for i, v in enumerate(variants):
                sub = summary[summary["variant"] == v]
                g = sub.set_index(sub["phase"] + " " + sub["level"]).reindex(labels)
                y = g[f"{q}_ns"] / 1e3
                err = np.vstack(
                    [(y - g[f"{q}_ci_lo_ns"] / 1e3).clip(lower=0), (g[f"{q}_ci_hi_ns"] / 1e3 - y).clip(lower=0)]
                )
                ax.bar(
                    np.arange(len(labels)) + i * width,
                    y,
                    width,
                    yerr=np.nan_to_num(err),
                    capsize=3,
                    color=COLORS[i % 4],
                    label=v,
                )
            ax.set_xticks(np.arange(len(labels)) + width * (len(variants) - 1) / 2)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel(f"{q} touch latency (µs), 95% CI")
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(manifest, "tail latency per phase with bootstrap CIs"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_counters(frames, manifest, hypothesis: Hypothesis, path: Path, repetition: int | None = None) -> Path:
    """The kernel under test's counters over time - the mechanism's (its hypothesis's timeline), then reclaim's -:
    every repetition (line style) of every variant (colour), or the one repetition asked for."""
    c, ph = frames["counters"], frames["phases"]
    panels = [(line.counter, line.label, line.rate) for line in hypothesis.timeline[:2]]
    panels += [
        ("meminfo.SecPageTables_kb", "SecPageTables (kB)", False),
        ("vmstat.pgscan_kswapd+vmstat.pgscan_direct", "reclaim scans /s (kswapd+direct)", True),
        ("psi.memory_some_avg10", "PSI memory some avg10 (%)", False),
        ("meminfo.MemAvailable_kb", "MemAvailable (kB)", False),
    ]
    panels = panels[:6]
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 3, figsize=(16, 6.5), squeeze=False, sharex=True)
    variants = list(dict.fromkeys(ph["variant"]))
    for ax, (names, label, rate) in zip(axes.flat, panels):
        for i, variant in enumerate(variants):
            for k, (rep, cell) in enumerate(_cells(frames, variant, repetition)):
                g = c[c["cell"] == cell]
                parts = [g[g["name"] == n].set_index("t")["value"] for n in names.split("+")]
                parts = [p for p in parts if len(p)]
                if not parts:
                    continue
                series = sum(parts[1:], parts[0]).sort_index()
                if rate:
                    series = (series.diff().clip(lower=0) / series.index.to_series().diff()).dropna()
                ax.plot(
                    series.index,
                    series.values,
                    color=COLORS[i % 4],
                    ls=styles[k % len(styles)],
                    lw=1.1,
                    label=f"{variant} r{rep}",
                )
        if not ph.empty:
            _shade(ax, ph[ph["cell"] == sorted(ph["cell"].unique())[0]])
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("time since first phase (s)")
    which = f"repetition {repetition}" if repetition is not None else "every repetition"
    fig.suptitle(_title(manifest, f"kernel under test counters, {which}"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


MECHANISM_COLORS = ("#d62728", "#e377c2", "#8c564b", "#bcbd22")  # the hypothesis's causes, in its order
CORE_COLORS = {
    attribution.SWAP_IN: "#1f77b4",
    attribution.DIRECT_RECLAIM: "#ff7f0e",
    attribution.NONE_FOUND: "#7f7f7f",
    "several": "#9467bd",
}


def cause_colors(attr: attribution.Attribution) -> dict[str, str]:
    return {**dict(zip(attr.mechanism, MECHANISM_COLORS)), **CORE_COLORS}


HATCHES = ("", "//", "..", "xx")


def plot_spikes(
    frames, manifest, attr: attribution.Attribution, hypothesis: Hypothesis, path: Path, repetition: int | None = None
) -> Path:
    """Per variant (rows) and repetition (columns, or the one asked for): every spike over time, colored by
    the cause it overlapped ("several" where more than one), above the cause events as bars."""
    ph, spikes, win = frames["phases"], attr.spikes, attr.windows
    colors = cause_colors(attr)
    variants = list(dict.fromkeys(ph["variant"]))
    grid = {v: _cells(frames, v, repetition) for v in variants}
    cols = max([len(x) for x in grid.values()] + [1])
    fig, axes = plt.subplots(
        2 * max(1, len(variants)),
        cols,
        figsize=(max(12, 6 * cols), 4.4 * max(1, len(variants))),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1] * max(1, len(variants))},
    )
    for row, variant in enumerate(variants):
        for col in range(cols):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            if col >= len(grid[variant]):
                top.set_visible(False)
                bottom.set_visible(False)
                continue
            rep, cell = grid[variant][col]
            _shade(top, ph[ph["cell"] == cell])
            s = spikes[spikes["cell"] == cell]
            label = s["causes"].where(~s["causes"].str.contains("+", regex=False), "several")
            for cause, color in colors.items():
                mine = s[label == cause]
                if len(mine):
                    top.semilogy(
                        mine["t"], mine["latency_ns"] / 1e3, ".", ms=3, color=color, label=f"{cause} ({len(mine)})"
                    )
            top.set_ylabel("spike latency (µs)")
            top.set_title(f"{variant} r{rep} ({cell}): {len(s)} spikes", fontsize=9)
            if len(s):
                top.legend(fontsize=6, loc="upper left", ncol=3, markerscale=2)
            w = win[win["cell"] == cell]
            for y, cause in enumerate(attr.causes):
                mine = w[w["cause"] == cause]
                bottom.broken_barh(
                    list(zip(mine["t0"], (mine["t1"] - mine["t0"]).clip(lower=0.05))),
                    (y - 0.4, 0.8),
                    color=colors[cause],
                )
            steps = attr.vm_zaps[attr.vm_zaps["cell"] == cell]
            lanes = [*attr.causes, "VM zap steps"]
            bottom.broken_barh(
                list(zip(steps["t0"], (steps["t1"] - steps["t0"]).clip(lower=0.05))),
                (len(lanes) - 1.4, 0.8),
                color="dimgray",
            )
            bottom.set_yticks(range(len(lanes)), lanes, fontsize=7)
            bottom.set_ylim(-0.6, len(lanes) - 0.4)
            bottom.set_xlim(top.get_xlim())
            bottom.set_xlabel("time since first phase (s)", fontsize=8)
            if absent := _absent(frames, cell, hypothesis):
                where = bottom.get_yaxis_transform()
                bottom.text(0.5, 0, absent, transform=where, fontsize=7, color="dimgray", va="center")
    which = f"repetition {repetition}" if repetition is not None else "every repetition"
    what = (
        "latency spikes by the cause they overlapped (bars: the causes, swap-in per sampler interval; "
        f"each VM's zap counter steps), {which}"
    )
    fig.suptitle(_title(manifest, what), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_excess(attr: attribution.Attribution, manifest, path: Path) -> Path:
    """Tail excess (ms per repetition) by cause, stacked, per phase x level, one bar per variant."""
    t = attr.table
    fig, ax = plt.subplots(figsize=(12, 4.5))
    if not t.empty:
        t = t.assign(label=t["phase"] + " " + t["level"], per_rep=t["excess_ms"] / t["repetitions"].clip(lower=1))
        labels = list(dict.fromkeys(t["label"]))
        variants = list(dict.fromkeys(t["variant"]))
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            x = np.arange(len(labels)) + i * width
            bottom = np.zeros(len(labels))
            for cause in attr.shares:
                g = t[(t["variant"] == v) & (t["cause"] == cause)].set_index("label").reindex(labels)
                y = g["per_rep"].fillna(0).to_numpy()
                ax.bar(
                    x,
                    y,
                    width,
                    bottom=bottom,
                    color=cause_colors(attr)[cause],
                    hatch=HATCHES[i % len(HATCHES)],
                    label=cause if i == 0 else None,
                    edgecolor="white",
                    lw=0.5,
                )
                bottom += y
            ax.bar(
                x,
                np.zeros(len(labels)),
                width,
                color="white",
                edgecolor="black",
                hatch=HATCHES[i % len(HATCHES)],
                label=f"variant {v}",
            )
        ax.set_xticks(np.arange(len(labels)) + width * (len(variants) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("tail excess per repetition (ms)")
    what = "tail excess (latency above the undisturbed p99, summed over spikes) by cause"
    fig.suptitle(_title(manifest, what if not t.empty else what + ": no spikes"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_workload_metrics(metrics: pd.DataFrame, manifest, path: Path) -> Path:
    """Each workload metric (one panel each, at most 9): its value per repetition, by phase and variant - the
    numbers its verdict rows compare."""
    wm = (
        metrics[metrics["better"].notna() & metrics["metric"].str.contains(": ", regex=False)]
        if len(metrics)
        else metrics
    )
    names = list(dict.fromkeys(wm["metric"]))[:9] if len(wm) else []
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    variants = list(dict.fromkeys(wm["variant"])) if len(wm) else []
    for ax, name in zip(axes.flat, names):
        g = wm[wm["metric"] == name]
        phases = list(dict.fromkeys(g["phase"]))
        for i, v in enumerate(variants):
            for j, phase in enumerate(phases):
                y = g[(g["variant"] == v) & (g["phase"] == phase)]["value"].to_numpy(float)
                x = j + (i - (len(variants) - 1) / 2) * 0.2
                ax.plot(np.full(len(y), x), y, "o", color=COLORS[i % 4], alpha=0.8, label=v if j == 0 else None)
                if len(y):
                    ax.hlines(np.median(y), x - 0.08, x + 0.08, color=COLORS[i % 4])
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases, fontsize=8)
        ax.set_title(name, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(_title(manifest, "workload metrics per repetition (line: median)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
