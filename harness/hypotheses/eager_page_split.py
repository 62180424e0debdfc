"""`eager-page-split`: does splitting huge page mappings when dirty logging is enabled (kvm.eager_page_split), rather
than on each write fault afterwards, make a guest's first pass of dirtying memory faster? The mechanism: the VM's
2 MiB mappings in the kernel under test's MMU (KVM's pages_2m / pages_4k stats) and the time the selftest spends
enabling dirty logging, where eager splitting does its work. A verdict needs the baseline's VM to have mapped huge
pages at all: without them there is nothing to split and both sides measure the same thing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pandas as pd

from .base import Hypothesis, Line, PhaseView, peak

FIRST_PASS = "Iteration 1 dirty memory time"
ENABLE = "Enabling dirty logging time"
# ada51a9de737 "KVM: x86/mmu: Extend Eager Page Splitting to nested MMUs" (Linux 6.0): dirty_log_perf_test, 1 GiB
# HugeTLB per vCPU, first-iteration dirty-memory time without -> with eager splitting
PUBLISHED = (
    "ada51a9de737 (Linux 6.0): first dirty-memory pass 20.4 s -> 17.9 s (-12 %) at 100 % writes, with eager splitting"
)


def _median(metrics: pd.DataFrame, name: str) -> float:
    m = metrics[metrics["metric"] == name]["value"] if not metrics.empty else pd.Series(dtype=float)
    return float(m.median()) if len(m) else math.nan


class EagerPageSplit(Hypothesis):
    name = "eager-page-split"
    question = "does splitting huge pages when dirty logging is enabled make the first pass of dirtying memory faster?"
    mechanism = "eager page splitting"
    timeline: ClassVar[tuple[Line, ...]] = (
        Line("kvm.pages_2m", "2 MiB mappings"),
        Line("kvm.pages_4k", "4 KiB mappings"),
    )
    timeline_axis = "the MMU's mappings"

    def columns(self, view: PhaseView) -> dict[str, Any]:
        c = view.counters
        return {
            "huge_mappings_peak": peak(c, "kvm.pages_2m"),
            "huge_mappings_fall": c.fall("kvm.pages_2m"),
            "small_mappings_rise": c.rise("kvm.pages_4k"),
            "enable_dirty_log_s": _median(view.workload_metrics, ENABLE),
            "first_pass_s": _median(view.workload_metrics, FIRST_PASS),
        }

    primary = FIRST_PASS

    def brief(self, evidence: pd.DataFrame, phase: str, baseline: str, variant: str) -> str:
        at = evidence[evidence["phase"] == phase].groupby("variant")["enable_dirty_log_s"].median() * 1e3
        return f"enabling dirty logging {at.get(baseline, math.nan):.1f} v {at.get(variant, math.nan):.1f} ms"

    def precondition(self, evidence: pd.DataFrame, baseline: str) -> str | None:
        base = evidence[evidence["variant"] == baseline]
        if base.empty or not (base["huge_mappings_peak"].fillna(0) > 0).any():
            return "the baseline's VM never mapped a huge page (kvm.pages_2m stayed 0): nothing to split"
        return None

    def section(self, evidence: pd.DataFrame, baseline: str, text: Callable[[str], str]) -> list[str]:
        lines = []
        for variant, g in evidence.groupby("variant", sort=False):
            lines.append(
                f"- **{variant}**: 2 MiB mappings peak {g['huge_mappings_peak'].max():.0f} (fell by "
                f"{g['huge_mappings_fall'].sum():.0f}, 4 KiB mappings +{g['small_mappings_rise'].sum():.0f}); "
                f"enabling dirty logging {g['enable_dirty_log_s'].median() * 1e3:.2f} ms, first dirty-memory pass "
                f"{g['first_pass_s'].median() * 1e3:.1f} ms (medians over phases and repetitions)"
            )
        if why := self.precondition(evidence, baseline):
            lines += ["", f"**INCONCLUSIVE**: {why}."]
        return lines

    def beside_published(self, ab: pd.DataFrame) -> list[str]:
        rows = ab[ab["metric"].str.contains(FIRST_PASS, regex=False)] if not ab.empty else ab
        if rows.empty:
            return [f"Published: {PUBLISHED}. This run has no `{FIRST_PASS}` row to set beside it."]
        out = [f"Published: {PUBLISHED}."]
        for r in rows.itertuples():
            said = f"{r.change_pct:+.1f} % [{r.change_ci_lo:+.1f}, {r.change_ci_hi:+.1f}]"
            if r.verdict == "better":
                how = "the published direction **is reproduced**"
            elif r.verdict == "worse":
                how = "the **opposite** of the published direction"
            elif float(r.change_pct) < 0:  # type: ignore[arg-type]
                how = f"the published direction, but not significant at {r.n_baseline} v {r.n_patched} repetitions"
            else:
                how = "the published direction is **not** seen"
            out.append(
                f"Here ({r.phase}, `{r.variant}` against the baseline): {said}, *{r.verdict}*: {how} "
                "(magnitudes under TCG do not transfer to hardware)."
            )
        return out


HYPOTHESIS = EagerPageSplit()
