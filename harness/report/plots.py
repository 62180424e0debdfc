"""PNG plots of a run, from its tables: latency CCDF per phase, the timeline with pressure and shrinker
activity, tail percentiles with CIs, the kernel under test's counters."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import stats
from ..manifest import Manifest

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
        for i, (variant, g) in enumerate(s[s["phase"] == phase].groupby("variant", sort=False)):
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
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(phases) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("P(latency ≥ x)")
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


def plot_timeline(frames, manifest, path: Path) -> Path:
    """Per variant (first repetition): latency per interval, pressure shaded, shrinker activity beside it."""
    s, c, e, ph = frames["samples"], frames["counters"], frames["events"], frames["phases"]
    variants = list(dict.fromkeys(ph["variant"])) or list(dict.fromkeys(s["variant"]))
    fig, axes = plt.subplots(
        len(variants) or 1, 1, figsize=(12, 3.6 * max(1, len(variants))), squeeze=False, sharex=True
    )
    for ax, variant in zip(axes[:, 0], variants):
        cell = sorted(ph.loc[ph["variant"] == variant, "cell"].unique())[0]
        _shade(ax, ph[ph["cell"] == cell])
        q = _interval_quantiles(s[s["cell"] == cell])
        for guest, g in q.groupby("guest") if not q.empty else []:
            ax.semilogy(g["t"], g["p99"], "-", lw=1.2, label=f"{guest} p99")
            ax.semilogy(g["t"], g["p50"], ":", lw=1, label=f"{guest} p50")
        ax.set_ylabel("touch latency (µs)")
        ax2 = ax.twinx()
        zaps = c[(c["cell"] == cell) & (c["name"] == "kvm.mmu_shadow_zapped")].sort_values("t")
        if len(zaps) > 1:
            rate = zaps["value"].diff().clip(lower=0) / zaps["t"].diff()
            ax2.plot(zaps["t"], rate, color="red", lw=1, label="shadow pages zapped /s")
        cnt = c[(c["cell"] == cell) & (c["name"] == "shrinker.x86_mmu_count")].sort_values("t")
        if len(cnt):
            ax2.plot(cnt["t"], cnt["value"], color="purple", lw=1, alpha=0.7, label="x86-mmu count")
        calls = e[(e["cell"] == cell) & (e["kind"] == "shrink_start")]
        if len(calls):
            ax2.plot(calls["t"], np.zeros(len(calls)), "|", color="black", ms=14, label="shrinker call")
        ax2.set_ylabel("shrinker activity")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", ncol=3)
        ax.set_title(f"{variant} ({cell})", fontsize=9)
    axes[-1, 0].set_xlabel("time since first phase (s)")
    fig.suptitle(_title(manifest, "latency over time with pressure (shaded) and shrinker activity"), fontsize=10)
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


def plot_counters(frames, manifest, path: Path) -> Path:
    c, ph = frames["counters"], frames["phases"]
    panels = [
        ("shrinker.x86_mmu_count", "x86-mmu shadow pages (count)", False),
        ("meminfo.SecPageTables_kb", "SecPageTables (kB)", False),
        ("vmstat.pgscan_kswapd+vmstat.pgscan_direct", "reclaim scans /s (kswapd+direct)", True),
        ("psi.memory_some_avg10", "PSI memory some avg10 (%)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), squeeze=False, sharex=True)
    for ax, (names, label, rate) in zip(axes.flat, panels):
        for i, (variant, g) in enumerate(c.groupby("variant", sort=False) if not c.empty else []):
            cell = sorted(g["cell"].unique())[0]
            parts = [g[(g["cell"] == cell) & (g["name"] == n)].set_index("t")["value"] for n in names.split("+")]
            parts = [p for p in parts if len(p)]
            if not parts:
                continue
            series = sum(parts[1:], parts[0]).sort_index()
            if rate:
                series = (series.diff().clip(lower=0) / series.index.to_series().diff()).dropna()
            ax.plot(series.index, series.values, color=COLORS[i % 4], lw=1.2, label=variant)
        if not ph.empty:
            _shade(ax, ph[ph["cell"] == sorted(ph["cell"].unique())[0]])
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("time since first phase (s)")
    fig.suptitle(_title(manifest, "kernel under test counters (first repetition)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
