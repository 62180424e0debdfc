"""The report's evidence section: the hypothesis's own (what its mechanism did, per variant; harness/hypotheses/),
then, per variant and pressure mode, what reclaim did and what each phase's delivery was judged on."""

from __future__ import annotations

import pandas as pd

from ..hypotheses import Hypothesis
from .render import text


def _delivered_on(m: pd.DataFrame) -> str:
    """What each phase's delivery check read (its mode's figures), one per repetition."""
    shown = [s for s in m.get("delivered_on", pd.Series(dtype=object)).dropna() if s]
    return "delivered on: " + text("; ".join(dict.fromkeys(shown))) if shown else "delivery not judged"


def reclaim_lines(evidence: pd.DataFrame) -> list[str]:
    """Per variant and pressure mode: what reclaim did, what delivery was judged on, what the guests' QEMUs met."""
    lines = []
    for variant, g in evidence.groupby("variant", sort=False):
        for mode, m in g.groupby("mode", sort=False):
            if mode == "none":
                continue
            lines.append(
                f"- **{variant}**, `{mode}` phases ({len(m)}): slabs_scanned +{m['slabs_scanned'].sum():.0f}, "
                f"pgscan kswapd/direct +{m['pgscan_kswapd'].sum():.0f}/+{m['pgscan_direct'].sum():.0f}, "
                f"{_delivered_on(m)}; guests' QEMU: direct-reclaim stalls "
                f"{int(m['guest_reclaim_stalls'].sum())}, major faults +{m['guest_qemu_majflt'].sum():.0f}"
            )
    return lines


def evidence_summary(evidence: pd.DataFrame, baseline: str, hypothesis: Hypothesis, ab: pd.DataFrame) -> list[str]:
    if evidence.empty:
        return ["No phase completed: there is no evidence either way."]
    lines = hypothesis.section(evidence, baseline, text)
    if published := hypothesis.beside_published(ab):
        lines += ["", *published]
    if reclaim := reclaim_lines(evidence):
        lines += ["", "Reclaim, per variant and pressure mode:", "", *reclaim]
    return lines
