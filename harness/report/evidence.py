"""The report's evidence section: per variant and mode, what the shrinker and reclaim did and what each phase's
delivery was judged on; then what the baseline, the other variants and the control show."""

from __future__ import annotations

import pandas as pd

from ..analysis.evidence import REACHES_SHRINKER, shrinker_ran, zapped
from .render import text


def _delivered_on(m: pd.DataFrame) -> str:
    """What each phase's delivery check read (its mode's figures), one per repetition."""
    shown = [s for s in m.get("delivered_on", pd.Series(dtype=object)).dropna() if s]
    return "delivered on: " + text("; ".join(dict.fromkeys(shown))) if shown else "delivery not judged"


def evidence_summary(evidence: pd.DataFrame, baseline: str) -> list[str]:
    lines = []
    if evidence.empty:
        return ["No phase completed: there is no evidence either way."]
    for variant, g in evidence.groupby("variant", sort=False):
        present = g["shrinker_present"].dropna().unique()
        pres = "present" if list(present) == [True] else "absent" if list(present) == [False] else "mixed/unknown"
        lines += ["", f"**{variant}**: x86-mmu shrinker {pres} in the kernel under test (debugfs + kallsyms).", ""]
        for mode, m in g.groupby("mode", sort=False):
            if mode == "none":
                continue
            l2 = (
                f", in the VM that runs L2 ({text(m['l2_vm'].dropna().iloc[0])}) shadow pages zapped "
                f"+{m['l2_vm_shadow_zapped'].sum():.0f}"
                if m["l2_vm"].notna().any()
                else ""
            )
            lines.append(
                f"- `{mode}` phases ({len(m)}): shrinker calls {int(m['shrinker_calls'].sum())}, "
                f"objects freed {int(m['shrinker_freed'].sum())}, "
                f"mmu_recycled +{m['mmu_recycled'].sum():.0f}, "
                + (
                    f"x86-mmu count fell by {m['x86_mmu_count_drop'].sum():.0f}"
                    if m["x86_mmu_count_drop"].notna().any()
                    else "no x86-mmu count in debugfs"
                )
                + f"{l2}, "
                f"slabs_scanned +{m['slabs_scanned'].sum():.0f}, pgscan kswapd/direct "
                f"+{m['pgscan_kswapd'].sum():.0f}/+{m['pgscan_direct'].sum():.0f}, "
                f"{_delivered_on(m)}; guests' QEMU: direct-reclaim stalls "
                f"{int(m['guest_reclaim_stalls'].sum())}, major faults +{m['guest_qemu_majflt'].sum():.0f}"
            )
    lines.append("")
    base_ran = shrinker_ran(evidence, baseline)
    reach = evidence[(evidence["variant"] == baseline) & evidence["mode"].isin(REACHES_SHRINKER)]
    if not base_ran:
        lines.append(
            "**INCONCLUSIVE**: the baseline's x86-mmu shrinker never freed a shadow page - pressure too weak "
            "or shadow footprint too small; this run cannot show what removing it changes."
        )
    elif not reach.empty:
        lines.append(
            f"Baseline: the shrinker freed shadow pages ({int(reach['shrinker_calls'].sum())} calls, "
            f"mmu_recycled +{reach['mmu_recycled'].sum():.0f}, count fell by "
            f"{reach['x86_mmu_count_drop'].sum():.0f} in phases that reach it); phases where it did: "
            + ", ".join(sorted(set(reach.loc[zapped(reach), "phase"])))
            + "."
        )
    others = evidence[evidence["variant"] != baseline]
    if not others.empty:
        ok = (others["shrinker_calls"].sum() == 0) and not zapped(others).any()
        lines.append(
            "Patched: no shrinker calls and no mmu_recycled zapping."
            if ok
            else f"Patched: shrinker activity seen ({int(others['shrinker_calls'].sum())} calls, mmu_recycled "
            f"+{others['mmu_recycled'].sum():.0f}) - check that the patch took effect."
        )
    ctrl = evidence[evidence["mode"] == "memcg-limit"]
    if not ctrl.empty:
        lines.append(
            "Control (memcg-limit): "
            + (
                "no shrinker activity in any variant, as expected."
                if ctrl["shrinker_calls"].sum() == 0
                else f"{int(ctrl['shrinker_calls'].sum())} shrinker calls - the "
                "control caused global reclaim; tighten pressure.memcg-limit.limit_mb."
            )
        )
    return lines
