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


def fmt(v, nd: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, tablefmt="pipe")


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
                "MWU p": fmt(r["mwu_p"], 3),
                "Welch p": fmt(r["welch_p"], 3),
                "verdict": f"**{r['verdict']}**" + (f" ({r['reason']})" if r["reason"] else ""),
            }
            for _, r in ab.iterrows()
        ]
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


def html(md: str, base: Path) -> str:
    """One self-contained HTML file: the Markdown rendered, every image relative to base inlined."""

    def inline(m: re.Match) -> str:
        data = base64.b64encode((base / m.group(2)).read_bytes()).decode()
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    body = MarkdownIt("commonmark").enable("table").render(re.sub(r"!\[(.*?)\]\((plots/[^)]+)\)", inline, md))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>nestpress report</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
