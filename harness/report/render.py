"""Rendering only: a Report's data to Markdown (tables through tabulate), and Markdown to one HTML file
(markdown-it-py) with the PNGs inlined. Nothing here computes a number."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
    "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}blockquote{background:#fff3cd;padding:.5em}"
)


MARKUP = re.compile(r"([\\`*_\[\]|<>])")  # what can open a link or an image, emphasis, code, an autolink, a cell


def text(value) -> str:
    """Data as Markdown text that is never markup: what could start markup escaped (CommonMark lets any ASCII
    punctuation be), lines joined. Whatever a guest wrote (a reason, a name, a log line) reaches the report so."""
    return MARKUP.sub(r"\\\1", " ".join(str(value).split()))


def code(value) -> str:
    """Data as a code span: never anything but text inside it (a backtick in the data cannot close it)."""
    return "`" + " ".join(str(value).replace("`", "'").split()) + "`"


def fmt(v, nd: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def fmt_p(p) -> str:
    """A p-value to three places; below 0.001 it says so instead of printing 0."""
    return fmt(p, 3) if not (isinstance(p, float) and p < 0.001) else "<0.001"


def table(rows: list[dict], formatted: tuple[str, ...] = ()) -> str:
    """A Markdown table whose text cells are data (escaped), but for the `formatted` columns, which the caller made
    of escaped data and markup of its own."""
    safe = [{k: text(v) if isinstance(v, str) and k not in formatted else v for k, v in row.items()} for row in rows]
    return pd.DataFrame(safe).to_markdown(index=False, tablefmt="pipe")


def verdict_markdown(ab: pd.DataFrame) -> str:
    """The A/B rows in the schedule's order; the validity label is said once, above the table, not here."""
    if ab.empty:
        return "_No comparison possible: no latency samples from both variants._"

    def mean_sd(m, s) -> str:
        return f"{fmt(m, 2)} ±{fmt(s, 0)}%"

    return table(
        [
            {
                "phase": r["phase"],
                "level": r["level"],
                "metric": r["metric"],
                "variant": r["variant"],
                "baseline": mean_sd(r["baseline_mean"], r["baseline_sd_pct"]),
                "variant's": mean_sd(r["patched_mean"], r["patched_sd_pct"]),
                "%change [95% CI]": f"{fmt(r['change_pct'])}% [{fmt(r['change_ci_lo'])}, {fmt(r['change_ci_hi'])}]",
                "Welch p (logs)": fmt_p(r["welch_p"]),
                "MWU p": fmt_p(r["mwu_p"]),
                "detects a fall of": f"{fmt(r['detectable_pct'], 0)}%",
                "verdict": f"**{text(r['verdict'])}**" + (f" ({text(r['reason'])})" if r["reason"] else ""),
            }
            for _, r in ab.iterrows()
        ],
        formatted=("verdict",),
    )


def summary_markdown(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "_no samples_"

    def us(r, k) -> str:
        return fmt(r[k] / 1e3)

    return table(
        [
            {
                "variant": r["variant"],
                "phase": r["phase"],
                "level": r["level"],
                "touches": r["count"],
                "mean": us(r, "mean_ns"),
                "p50": us(r, "p50_ns"),
                "p90": us(r, "p90_ns"),
                "p99 [CI]": f"{us(r, 'p99_ns')} [{us(r, 'p99_ci_lo_ns')}, {us(r, 'p99_ci_hi_ns')}]",
                "p99.9 [CI]": f"{us(r, 'p99.9_ns')} [{us(r, 'p99.9_ci_lo_ns')}, {us(r, 'p99.9_ci_hi_ns')}]",
                "max": us(r, "max_ns"),
            }
            for _, r in summary.iterrows()
        ]
    )


def guest_view_markdown(view: pd.DataFrame) -> str:
    if view.empty:
        return "_no probe passes_"
    two = {"majflt_per_pass": "major faults / pass", "steal_ms_per_s": "steal (ms/s)"}
    shown = view.assign(**{k: view[k].map(lambda v: fmt(v, 2)) for k in two}).rename(columns=two)
    return table(shown.to_dict("records"))


def delivery_markdown(evidence: pd.DataFrame) -> str:
    """Per variant x phase: delivered in how many repetitions, and why not where it was not."""
    if evidence.empty:
        return "_no phase ran_"
    rows = []
    for (variant, phase, mode), g in evidence.groupby(["variant", "phase", "mode"], sort=False):
        status = g["delivery"].value_counts()
        rows.append(
            {
                "variant": variant,
                "phase": phase,
                "mode": mode,
                "repetitions": ", ".join(f"{k} {n}" for k, n in status.items()),
                "why not": "; ".join(sorted({w for w in g["delivery_reason"] if w})) or "",
            }
        )
    return table(rows)


def _pct(v) -> str:
    return f"{fmt(v * 100, 0)} %"


def _sides(row) -> str:
    """One attribution row's tail excess per repetition, baseline v variant, and their difference with its
    bootstrap interval (none with one repetition a side)."""
    ci = "" if np.isnan(row["diff_ci_lo"]) else f" [{fmt(row['diff_ci_lo'], 0)}, {fmt(row['diff_ci_hi'], 0)}]"
    return f"{fmt(row['baseline_excess_ms'], 0)} v {fmt(row['variant_excess_ms'], 0)} ms ({fmt(row['diff_ms'], 0)}{ci})"


def attribution_lines(ab: pd.DataFrame, baseline: str, shares: tuple[str, ...], headline: str) -> list[str]:
    """One sentence per pressure phase x level x variant, in milliseconds that add up: the tail excess per
    repetition of each side, in total, during the hypothesis's mechanism (`headline`) and per cause (`shares`:
    every cause's row), each with the baseline-minus-variant difference and its interval. No shares of a
    difference: a share of a difference whose interval holds 0 can be any number."""
    lines: list[str] = []
    if ab.empty:
        return lines
    pressured = ab[ab["mode"] != "none"]
    for (variant, phase, level), g in pressured.groupby(["variant", "phase", "level"], sort=False):
        by = g.set_index("cause")
        tot, mech = by.loc["total"], by.loc["mechanism"]
        causes = "; ".join(f"{c} {_sides(by.loc[c])}" for c in shares if c in by.index)
        lines.append(
            f"- **`{phase}`** ({tot['mode']}, {level}, {tot['n_baseline']} v {tot['n_variant']} repetitions), "
            f"tail excess per repetition, `{baseline}` v `{variant}` (difference [95 % interval]): total "
            f"{_sides(tot)}; **during {headline} {_sides(mech)}**; by cause: {causes}."
        )
    return lines


def clocks_line(summary: pd.DataFrame, unmeasured_ms: float) -> str:
    """How well each level's timestamps agree with the kernel under test's: what attribution can resolve."""
    if summary.empty:
        return (
            f"**Clocks: not measured** in this run (aligned at boot only); the matching window is {unmeasured_ms:g} ms "
            "by assumption."
        )
    levels = "; ".join(
        f"{r['level']} ({r['methods']}): median ±{fmt(r['median_uncertainty_ms'], 3)}, worst "
        f"±{fmt(r['worst_uncertainty_ms'], 3)} ms over {r['samples']} measurements "
        f"(offset {fmt(r['offset_min_ms'], 1)} to {fmt(r['offset_max_ms'], 1)} ms, corrected)"
        for _, r in summary.iterrows()
    )
    return (
        "**Clocks** against the kernel under test's, at start, every 10 s and at the end, each guest against its "
        "parent (an L2's chained through its L1) - by the guest itself with the KVM PTP clock (`ptp_kvm`: its "
        "parent's time by hypercall, between two readings of its own) where its parent's KVM pairs clocks, else by "
        f"round trips over its virtio-serial port (`virtio-serial`): {levels}. Each guest's worst uncertainty is "
        "its matching window."
    )


def attribution_markdown(table_: pd.DataFrame) -> str:
    """Spikes and excess per variant x phase x level, with each cause's share of the excess."""
    if table_.empty:
        return "_no spikes_"
    rows = []
    keys = ["variant", "phase", "level"]
    for (variant, phase, level), g in table_.groupby(keys, sort=False):
        by = g.set_index("cause")
        reps = max(int(by["repetitions"].max()), 1)
        total = by["excess_ms"].sum()
        rows.append(
            {
                "variant": variant,
                "phase": phase,
                "level": level,
                "spikes / rep": fmt(by["all_spikes"].iloc[0] / reps, 0),
                "excess ms / rep": fmt(total / reps, 0),
                **{
                    f"{c}: spikes / rep, share": f"{fmt(by.loc[c, 'spikes'] / reps, 0)}, {_pct(by.loc[c, 'share'])}"
                    for c in by.index
                },
            }
        )
    return table(rows)


def health_markdown(health: pd.DataFrame) -> str:
    if health.empty:
        return "_no figures_"
    return table(
        [
            {
                "variant": r["variant"],
                "level": r["level"],
                "figure": r["figure"],
                "n": r["n"],
                "median [min-max]": f"{fmt(r['median'])} [{fmt(r['min'])}-{fmt(r['max'])}]",
                "vs baseline": (fmt(r["vs_baseline"], 2) + "x" if not np.isnan(r["vs_baseline"]) else "–")
                + (" ⚠" if r["far"] else ""),
            }
            for _, r in health.iterrows()
        ]
    )


def html(md: str, plots: list[Path] | None = None) -> str:
    """One self-contained HTML file: the Markdown rendered, then each of the report's own plots (by its exact name,
    from the report's own list: never a path found in the text, which may hold what a guest wrote) inlined."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)  # raw HTML is text
    for plot in plots or []:
        data = base64.b64encode(plot.read_bytes()).decode()
        body = body.replace(f'src="plots/{plot.name}"', f'src="data:image/png;base64,{data}"')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>nestpress report</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def crash_lines(signatures: pd.DataFrame, outcomes: pd.DataFrame, plain: bool = False) -> list[str]:
    """A line per distinct crash, stall or warning: what, on which variant, in how many of its boots, where and
    when. The first screen's (Markdown, guest text escaped) adds its frames, signature and whether a retry went
    on after it; plain (report.txt) is the short one."""
    boots = dict(zip(outcomes["variant"], outcomes["boots"])) if not outcomes.empty else {}
    out = []
    for r in signatures.to_dict("records"):
        where = str(r["levels"]) + (f", during {r['phases']}" if r["phases"] else "")
        kind, n = str(r["kind"]).upper(), f"{r['boots']} of {boots.get(r['variant'], '?')} boots"
        if plain:
            out.append(f"{kind} on {r['variant']} in {n} ({where}): {r['said']}")
            continue
        again = "; the cell was retried: the latency comparison went on without it" if r["retried"] else ""
        at = f" (at {text(r['frames'])})" if r["frames"] else ""
        out.append(
            f"- **{kind}** on {code(r['variant'])} in {n} ({text(where)}): {text(r['said'])}{at} - signature "
            f"{code(r['signature'])}{again}"
        )
    return out


def outcomes_markdown(outcomes: pd.DataFrame) -> str:
    if outcomes.empty:
        return "_no boots_"
    rows = [
        {
            "variant": r.variant,
            "boots": r.boots,
            "crashed": r.crashed,
            "warned": r.warned,
            "stalled": r.stalled,
            "any kernel report": r.reported,
            "OOM kills": r.oom_kills,
            "Fisher p (reports vs baseline)": fmt_p(r.fisher_p),
        }
        for r in outcomes.itertuples()
    ]
    return table(rows)
