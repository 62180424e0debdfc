"""Tables -> evidence, verdicts, PNG plots, report.md and a self-contained report.html.

Everything here is computed from the stored tables, so `fab report --run DIR` regenerates
a report without rerunning anything, and a crashed run still gets a report of what it has
(marked incomplete).
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import results, stats  # noqa: E402
from .util import read_json  # noqa: E402

REACHES_SHRINKER = {"global", "drop-caches", "root-reclaim", "shrinker-scan"}
COLORS = {0: "#1f77b4", 1: "#d62728", 2: "#2ca02c", 3: "#9467bd"}
DELTA_COUNTERS = {"kvm.mmu_recycled": "mmu_recycled", "kvm.mmu_shadow_zapped": "shadow_zapped",
                  "vmstat.slabs_scanned": "slabs_scanned", "vmstat.pgscan_kswapd": "pgscan_kswapd",
                  "vmstat.pgscan_direct": "pgscan_direct", "vmstat.pswpin": "pswpin",
                  "cgroup.pressure.events.max": "memcg_max_events"}


# -- evidence -------------------------------------------------------------------------------------
def _delta(c: pd.DataFrame, name: str, t0: float, t1: float) -> float:
    """Rise of a cumulative counter over a phase: from the last sample before it to the first sample after
    it (which is when its last changes become visible). KVM stats restart at 0 when a VM exits, so only
    rises are summed."""
    s = c[c["name"] == name].sort_values("t")
    before, inside, after = s[s["t"] <= t0].tail(1), s[(s["t"] > t0) & (s["t"] <= t1)], s[s["t"] > t1].head(1)
    series = pd.concat([before, inside, after])["value"]
    if len(series) < 2:
        return float("nan")
    d = series.diff().dropna()
    return float(d[d > 0].sum())


def l2_vms(events: pd.DataFrame, cell: str) -> dict[str, str]:
    """KVM's per-VM debugfs directories (<pid>-<fd>) in the kernel under test of the L1 guests that run L2s:
    the shadow pages of a nested L2 belong to its L1's VM there. vm prefix ("<pid>-") -> L1 guest name."""
    e = events[events["cell"] == cell]
    runs_l2 = set(e.loc[(e["level"] == "l1") & (e["kind"] == "boot_start"), "guest"])
    out = {}
    for d in e.loc[(e["level"] == "kut") & (e["kind"] == "boot_start"), "detail"]:
        started = json.loads(d)
        if started.get("guest") in runs_l2 and started.get("pid"):
            out[f"{started['pid']}-"] = started["guest"]
    return out


def _vm_delta(c: pd.DataFrame, vms: dict[str, str], stat: str, t0: float, t1: float) -> float:
    names = [n for n in c["name"].unique() if n.startswith("kvm_vm.") and n.endswith("." + stat)
             and any(n.split(".")[1].startswith(prefix) for prefix in vms)]
    return float(sum(_delta(c, n, t0, t1) for n in names)) if names else float("nan")


def _count_drop(c: pd.DataFrame, t0: float, t1: float) -> float:
    """How far the x86-mmu shrinker's count fell below its value at the start of the phase."""
    s = c[c["name"] == "shrinker.x86_mmu_count"].sort_values("t")
    before, inside = s[s["t"] <= t0].tail(1), s[(s["t"] > t0) & (s["t"] <= t1 + 1)]
    if before.empty or inside.empty:
        return float("nan")
    return float(max(0.0, before["value"].iloc[0] - inside["value"].min()))


def evidence(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per cell x phase: did the x86-mmu shrinker run (invocations, zaps), and what reclaim did. In the nested
    topology also the shadow pages zapped in the VM that runs L2 (its L1's VM in the kernel under test)."""
    phases, counters, events, cells = frames["phases"], frames["counters"], frames["events"], frames["cells"]
    rows = []
    for _, ph in phases.iterrows():
        c = counters[counters["cell"] == ph["cell"]] if not counters.empty else counters
        e = events[(events["cell"] == ph["cell"]) & (events["t"] >= ph["t_start"]) & (events["t"] < ph["t_end"] + 1)] \
            if not events.empty else events
        present = cells.loc[cells["cell"] == ph["cell"], "x86_mmu_shrinker_present"]
        row = {"cell": ph["cell"], "variant": ph["variant"], "repetition": ph["repetition"], "phase": ph["phase"],
               "mode": ph["mode"], "shrinker_present": bool(present.iloc[0]) if len(present) else None,
               # calls seen by the vmscan tracepoints, plus direct calls through the debugfs scan file
               # (which bypasses do_shrink_slab and so its tracepoints)
               "shrinker_calls": int(e["kind"].isin(["shrink_start", "pressure.shrinker_scan"]).sum())
               if not e.empty else 0,
               "shrinker_freed": int(sum(json.loads(d).get("freed", 0) for d in e.loc[e["kind"] == "shrink_end",
                                                                                       "detail"]))
               if not e.empty else 0}
        for name, label in DELTA_COUNTERS.items():
            row[label] = _delta(c, name, ph["t_start"], ph["t_end"]) if not c.empty else float("nan")
        row["x86_mmu_count_drop"] = _count_drop(c, ph["t_start"], ph["t_end"]) if not c.empty else float("nan")
        vms = l2_vms(events, ph["cell"]) if not events.empty else {}
        row["l2_vm"] = ", ".join(sorted(set(vms.values()))) or None
        for stat, label in (("mmu_shadow_zapped", "l2_vm_shadow_zapped"), ("mmu_recycled", "l2_vm_recycled")):
            row[label] = _vm_delta(c, vms, stat, ph["t_start"], ph["t_end"]) if vms and not c.empty else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def zapped(rows: pd.DataFrame) -> pd.Series:
    """Per phase: did the shrinker free shadow pages (not merely get called)? What it says it freed, the pages
    kvm_mmu_zap_oldest_mmu_pages() recycled, or its count falling (for an L2's nested pages the recursive
    zapping of their children is not in either number: mmu_recycled +13 while the count fell by 512, measured)."""
    return (rows["shrinker_freed"] > 0) | (rows["mmu_recycled"].fillna(0) > 0) | \
        (rows["x86_mmu_count_drop"].fillna(0) > 0)


def shrinker_ran(ev: pd.DataFrame, variant: str) -> bool:
    v = ev[(ev["variant"] == variant) & ev["mode"].isin(REACHES_SHRINKER)]
    return bool(zapped(v).any()) if not v.empty else False


def evidence_summary(ev: pd.DataFrame, baseline: str) -> list[str]:
    lines = []
    if ev.empty:
        return ["No phase completed: there is no evidence either way."]
    for variant, g in ev.groupby("variant", sort=False):
        present = g["shrinker_present"].dropna().unique()
        pres = "present" if list(present) == [True] else "absent" if list(present) == [False] else "mixed/unknown"
        lines += ["", f"**{variant}**: x86-mmu shrinker {pres} in the kernel under test (debugfs + kallsyms).", ""]
        for mode, m in g.groupby("mode", sort=False):
            if mode == "none":
                continue
            l2 = (f", in the VM that runs L2 ({m['l2_vm'].dropna().iloc[0]}) shadow pages zapped "
                  f"+{m['l2_vm_shadow_zapped'].sum():.0f}" if m["l2_vm"].notna().any() else "")
            lines.append(f"- `{mode}` phases ({len(m)}): shrinker calls {int(m['shrinker_calls'].sum())}, "
                         f"objects freed {int(m['shrinker_freed'].sum())}, "
                         f"mmu_recycled +{m['mmu_recycled'].sum():.0f}, "
                         f"x86-mmu count fell by {m['x86_mmu_count_drop'].sum():.0f}{l2}, "
                         f"slabs_scanned +{m['slabs_scanned'].sum():.0f}, pgscan kswapd/direct "
                         f"+{m['pgscan_kswapd'].sum():.0f}/+{m['pgscan_direct'].sum():.0f}, "
                         f"memcg max events +{m['memcg_max_events'].sum():.0f}")
    lines.append("")
    base_ran = shrinker_ran(ev, baseline)
    reach = ev[(ev["variant"] == baseline) & ev["mode"].isin(REACHES_SHRINKER)]
    if not base_ran:
        lines.append("**INCONCLUSIVE**: the baseline's x86-mmu shrinker never freed a shadow page - pressure too weak "
                     "or shadow footprint too small; this run cannot show what removing it changes.")
    elif not reach.empty:
        lines.append(f"Baseline: the shrinker freed shadow pages ({int(reach['shrinker_calls'].sum())} calls, "
                     f"mmu_recycled +{reach['mmu_recycled'].sum():.0f}, count fell by "
                     f"{reach['x86_mmu_count_drop'].sum():.0f} in phases that reach it); phases where it did: "
                     + ", ".join(sorted(set(reach.loc[zapped(reach), "phase"]))) + ".")
    others = ev[ev["variant"] != baseline]
    if not others.empty:
        ok = (others["shrinker_calls"].sum() == 0) and not zapped(others).any()
        lines.append("Patched: no shrinker calls and no mmu_recycled zapping." if ok else
                     f"Patched: shrinker activity seen ({int(others['shrinker_calls'].sum())} calls, mmu_recycled "
                     f"+{others['mmu_recycled'].sum():.0f}) - check that the patch took effect.")
    ctrl = ev[ev["mode"] == "memcg-limit"]
    if not ctrl.empty:
        lines.append("Control (memcg-limit): " + ("no shrinker activity in any variant, as expected."
                                                  if ctrl["shrinker_calls"].sum() == 0 else
                                                  f"{int(ctrl['shrinker_calls'].sum())} shrinker calls - the "
                                                  "control caused global reclaim; tighten memcg_limit_mb."))
    return lines


# -- plots ----------------------------------------------------------------------------------------
def _title(manifest: dict, what: str) -> str:
    vers = sorted({b.get("kernelrelease") or b.get("kernel_version") or "?" for b in manifest["builds"].values()})
    return f"{manifest['experiment']}: {what}\naccel {manifest['accel']['kut'].upper()}, kernel {', '.join(vers)}, " \
           f"topology {manifest['topology']}"


def _shade(ax, phases: pd.DataFrame) -> None:
    for i, (_, p) in enumerate(phases.drop_duplicates("phase").iterrows()):
        if p["mode"] != "none":
            ax.axvspan(p["t_start"], p["t_end"], color="orange", alpha=0.15, lw=0)
            ax.text((p["t_start"] + p["t_end"]) / 2, 1.0, p["phase"], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color="darkorange")


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
                ax.loglog(h.index / 1e3, ccdf.values, color=COLORS[i % 4], ls="-" if level == "l2" else "--",
                          label=f"{variant} {level}")
        ax.set_title(phase, fontsize=9)
        ax.set_xlabel("touch latency (µs)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(phases):]:
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
    fig, axes = plt.subplots(len(variants) or 1, 1, figsize=(12, 3.6 * max(1, len(variants))), squeeze=False,
                             sharex=True)
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
                err = np.vstack([(y - g[f"{q}_ci_lo_ns"] / 1e3).clip(lower=0), (g[f"{q}_ci_hi_ns"] / 1e3 - y).clip(lower=0)])
                ax.bar(np.arange(len(labels)) + i * width, y, width, yerr=np.nan_to_num(err), capsize=3,
                       color=COLORS[i % 4], label=v)
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
    panels = [("shrinker.x86_mmu_count", "x86-mmu shadow pages (count)", False),
              ("meminfo.SecPageTables_kb", "SecPageTables (kB)", False),
              ("vmstat.pgscan_kswapd+vmstat.pgscan_direct", "reclaim scans /s (kswapd+direct)", True),
              ("psi.memory_some_avg10", "PSI memory some avg10 (%)", False)]
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


# -- report ---------------------------------------------------------------------------------------
def _fmt(v, nd=1) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def verdict_markdown(ab: pd.DataFrame) -> str:
    if ab.empty:
        return "_No comparison possible: no latency samples from both variants._"
    lines = ["| phase | level | metric | baseline | patched | %change [95% CI] | MWU p | Welch p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in ab.iterrows():
        sd = lambda m, s: f"{_fmt(m, 2)} ±{_fmt(s, 0)}%"  # noqa: E731
        verdict = f"**{r['verdict']}**" + (f" ({r['reason']})" if r["reason"] else "")
        lines.append(f"| {r['phase']} | {r['level']} | {r['metric']} | {sd(r['baseline_mean'], r['baseline_sd_pct'])} "
                     f"| {sd(r['patched_mean'], r['patched_sd_pct'])} | {_fmt(r['change_pct'])}% "
                     f"[{_fmt(r['change_ci_lo'])}, {_fmt(r['change_ci_hi'])}] | {_fmt(r['mwu_p'], 3)} | "
                     f"{_fmt(r['welch_p'], 3)} | {verdict} |")
    return "\n".join(lines)


def generate(run_dir: Path, rebuild_tables: bool = True) -> Path:
    """Write tables (from raw outputs unless rebuild_tables=False), plots, report.md and report.html."""
    run_dir = Path(run_dir)
    frames = results.collect(run_dir) if rebuild_tables or not (run_dir / "tables").exists() \
        else results.load(run_dir)
    manifest = read_json(run_dir / "manifest.json")
    baseline = next((v["name"] for v in manifest["expanded"]["variants"] if not v.get("series")),
                    manifest["expanded"]["variants"][0]["name"])
    cells = frames["cells"]
    complete = manifest.get("status") == "complete" and (cells["status"] == "complete").all()
    ev = evidence(frames) if not frames["phases"].empty else pd.DataFrame()
    base_ran = shrinker_ran(ev, baseline) if not ev.empty else False
    summary = stats.summarize(frames["samples"])
    metrics = stats.repetition_metrics(frames["samples"], frames["passes"])
    ab = stats.ab_table(metrics, baseline, tcg=manifest["accel"]["kut"] == "tcg", baseline_shrinker_ran=base_ran)
    for name, df in (("summary", summary), ("ab", ab), ("evidence", ev), ("repetition_metrics", metrics)):
        df.to_csv(run_dir / "tables" / f"{name}.csv", index=False)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = [plot_ccdf(frames, manifest, plots_dir / "latency_ccdf.png"),
             plot_timeline(frames, manifest, plots_dir / "timeline.png"),
             plot_percentiles(summary, manifest, plots_dir / "tail_percentiles.png"),
             plot_counters(frames, manifest, plots_dir / "counters.png")]
    missing = cells[cells["status"] != "complete"]
    md = [f"# {manifest['experiment']} - run {manifest['run_id']}",
          "",
          f"**Status: {'complete' if complete else 'INCOMPLETE'}** - {int((cells['status'] == 'complete').sum())} of "
          f"{len(cells)} cells complete" + (f"; missing or failed: {', '.join(missing['cell'])}" if len(missing) else ""),
          "",
          f"> {manifest['accel']['banner']}",
          "",
          f"Topology `{manifest['topology']}`; variants " + ", ".join(
              f"`{n}` ({b.get('kernelrelease') or b['kernel_version']}"
              + (f", patch {b['patch_variant']}" if b.get("patch_variant") else ", no patches") + ")"
              for n, b in manifest["builds"].items()) + f"; order {manifest['order']}.",
          "",
          "## Verdict",
          "",
          "Latency of single page touches in the guests whose memory the kernel under test shadow-pages; "
          "one value per repetition, patched against baseline. *worse* = higher latency with the patch.",
          "",
          verdict_markdown(ab),
          "",
          "## Evidence: did the shrinker run?",
          "",
          *evidence_summary(ev, baseline),
          "",
          "## Plots",
          "",
          *[f"![{p.stem}](plots/{p.name})\n" for p in plots],
          "## Latency summary (all repetitions pooled, µs; 95% bootstrap CI over 1 s intervals)",
          "",
          _summary_markdown(summary),
          "",
          "## Reproduce",
          "",
          f"```\n{manifest.get('reproduce') or 'fab experiment --config ' + manifest['config_path']}\n```",
          "",
          f"Regenerate this report: `fab report --run {run_dir}`. Tables: `tables/*.parquet` (CSV twins beside them).",
          ""]
    (run_dir / "report.md").write_text("\n".join(md))
    (run_dir / "report.html").write_text(_html("\n".join(md), run_dir))
    return run_dir / "report.html"


def _summary_markdown(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "_no samples_"
    lines = ["| variant | phase | level | touches | mean | p50 | p90 | p99 [CI] | p99.9 [CI] | max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        us = lambda k: _fmt(r[k] / 1e3)  # noqa: E731
        lines.append(f"| {r['variant']} | {r['phase']} | {r['level']} | {r['count']} | {us('mean_ns')} | {us('p50_ns')} "
                     f"| {us('p90_ns')} | {us('p99_ns')} [{us('p99_ci_lo_ns')}, {us('p99_ci_hi_ns')}] | {us('p99.9_ns')} "
                     f"[{us('p99.9_ci_lo_ns')}, {us('p99.9_ci_hi_ns')}] | {us('max_ns')} |")
    return "\n".join(lines)


def _html(md: str, run_dir: Path) -> str:
    """A small Markdown subset to HTML with the PNGs inlined, so the report is one file."""
    out, table, in_code = [], [], False
    for line in md.splitlines() + [""]:
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = [r for r in table if not all(re.fullmatch(r"-+", c) for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body) +
                       "</table>")
            table = []
        if m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((run_dir / m.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{m.group(1)}" src="data:image/png;base64,{data}" style="max-width:100%"></p>')
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            out.append(f"<h{n}>{_inline(line[n:].strip())}</h{n}>")
        elif line.startswith("> "):
            out.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}blockquote{background:#fff3cd;padding:.5em}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>nestpress report</title><style>{style}</style>" \
           f"</head><body>{''.join(out)}</body></html>\n"


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"\*(.+?)\*", r"<i>\1</i>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def compare_runs(run_a: Path, run_b: Path, out: Path) -> Path:
    """Two runs side by side: their verdict tables and p99s per variant x phase x level."""
    sums = []
    for tag, run in (("A", run_a), ("B", run_b)):
        if not (run / "tables" / "summary.csv").exists():
            generate(run)
        s = pd.read_csv(run / "tables" / "summary.csv")
        s["run"] = f"{tag}: {run.name}"
        sums.append(s)
    both = pd.concat(sums)
    piv = both.pivot_table(index=["variant", "phase", "level"], columns="run", values="p99_ns") / 1e3
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# compare {run_a} vs {run_b}", "", "p99 touch latency (µs):", "",
          "```\n" + piv.round(1).to_string() + "\n```", ""]
    for tag, run in (("A", run_a), ("B", run_b)):
        md += [f"## {tag}: {run}", "", (run / "report.md").read_text().split("## Verdict", 1)[-1]
               .split("## Evidence", 1)[0].strip(), ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.html").write_text(_html("\n".join(md), out))
    return out / "compare.html"

