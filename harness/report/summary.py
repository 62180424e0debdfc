"""The answer first, in plain text: status and validity, crashes, then one line per pressure phase with its primary
metric's verdict, change and interval and the mechanism's evidence beside it, then the undisturbed phases. Written
as report.txt (at most 72 columns: a mail client shows it as is, like the regression reports kernel developers
receive) and printed last by `experiment` and `report`; the report's first screen has the same lines."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from .. import hypotheses
from ..analysis import Analysis, stats
from . import render

WIDTH = 72


def _change(row) -> str:
    if pd.isna(row["change_pct"]):
        return row["verdict"]
    return f"{row['verdict']}, {row['change_pct']:+.1f} % [{row['change_ci_lo']:+.1f}, {row['change_ci_hi']:+.1f}]"


def _primary(ab: pd.DataFrame, phase: str, variant: str, primary: str) -> pd.Series | None:
    rows = ab[(ab["phase"] == phase) & (ab["variant"] == variant)]
    if rows.empty:
        return None
    hit = rows[rows["metric"].str.contains(primary, regex=False)] if primary else rows
    return (hit if not hit.empty else rows).iloc[0]


def answer_lines(r: Analysis) -> list[str]:
    """Per pressure phase, then per undisturbed one: what its primary metric says, each variant against the
    baseline, with the mechanism's evidence beside it."""
    h, m, ab = hypotheses.get(r.experiment.hypothesis), r.manifest, r.ab
    out = []
    phases = [(p.name, p.mode(r.experiment.pressure.mode)) for p in r.experiment.phases]
    order = [p for p in phases if p[1] != "none"] + [p for p in phases if p[1] == "none"]
    variants = [v.name for v in r.experiment.variants if v.name != m.baseline]
    for phase, mode in order:
        for variant in variants:
            row = None if ab.empty else _primary(ab, phase, variant, h.primary)
            if row is None:
                said = "no verdict (nothing measured)"
            elif row["verdict"] == "not comparable":
                said = f"not comparable ({row['reason']})"
            else:
                said = f"{row['level']} {row['metric']}: {_change(row)}"
            brief = h.brief(r.evidence, phase, m.baseline, variant) if not r.evidence.empty else ""
            where = f"{phase} ({mode})" if mode != "none" else phase
            out.append(f"{where}, {variant}: {said}" + (f"; {brief}" if brief else ""))
    return out


def summary_text(r: Analysis, html: Path) -> str:
    """report.txt: the answer in at most WIDTH columns."""
    m, cells = r.manifest, r.cells
    h = hypotheses.get(r.experiment.hypothesis)
    done = int((cells["status"] == "complete").sum())
    head = [
        f"nestpress: {m.experiment}, run {m.run_id}",
        f"status: {'complete' if r.complete else 'INCOMPLETE'}, {done} of {len(cells)} cells",
        f"validity: {stats.VALIDITY[m.tcg]}",
        f"question: {h.question}",
        *(
            f"{'baseline' if v.name == m.baseline else 'variant'}: {v.name} ({m.builds[v.name].summary()})"
            for v in r.experiment.variants
            if v.name in m.builds
        ),
    ]
    crashes = render.crash_lines(r.crash_signatures, r.outcomes, plain=True)
    lines = [*head, "", "crashes, stalls, warnings:" if crashes else "crashes, stalls, warnings: none", *crashes]
    lines += ["", "answer, pressure phases first (each variant v the baseline):", *answer_lines(r)]
    lines += ["", f"details: {html.name} and tables/, beside this file"]
    return "\n".join(_wrap(line) for line in lines) + "\n"


def _wrap(line: str) -> str:
    return "\n".join(textwrap.wrap(line, WIDTH, subsequent_indent="    ", break_long_words=True)) if line else ""
