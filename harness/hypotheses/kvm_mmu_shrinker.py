"""`kvm-mmu-shrinker`: does removing (or changing) KVM's x86-mmu shrinker change what guests feel when the kernel
under test reclaims? The mechanism: the shrinker's calls and what they freed (vmscan tracepoints, and the
shrinker-scan actor's debugfs writes), the x86-mmu count in shrinker debugfs, KVM's recycled shadow pages, and in the
nested topology the shadow pages zapped in the VM that runs L2. A verdict needs the baseline's shrinker to have freed
shadow pages in a phase whose pressure reaches it; the probe's spikes are matched to its zaps (attribution)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pandas as pd

from ..guest import modes
from ..guest.modes.base import Counters
from ..guest.modes.shrinker_scan import kvm_shrinker_in
from ..guest.records import LevelFacts
from .base import ANY, OWN, WINDOW_COLUMNS, Hypothesis, Line, PhaseView, pairs, refault_windows

REACHES = {m.name for m in modes.MODES.values() if m.calls_global_shrinkers}  # modes whose reclaim calls it


def _vm_rise(c: Counters, vms: dict[str, str], stat: str) -> float:
    names = [n for n in c.series if n.startswith("kvm_vm.") and n.endswith("." + stat)]
    mine = [n for n in names if any(n.split(".")[1].startswith(prefix) for prefix in vms)]
    return float(sum(c.rise(n) for n in mine)) if mine else math.nan


def zapped(rows: pd.DataFrame) -> pd.Series:
    """Per phase: did the shrinker free shadow pages (not merely get called)? What it says it freed, the pages
    kvm_mmu_zap_oldest_mmu_pages() recycled, or its count falling (for an L2's nested pages the recursive
    zapping of their children is not in either number: mmu_recycled +13 while the count fell by 512, measured)."""
    return (
        (rows["shrinker_freed"] > 0) | (rows["mmu_recycled"].fillna(0) > 0) | (rows["x86_mmu_count_drop"].fillna(0) > 0)
    )


def ran(evidence: pd.DataFrame, variant: str) -> bool:
    """Did the variant's shrinker free shadow pages in some phase whose pressure reaches it?"""
    v = evidence[(evidence["variant"] == variant) & evidence["mode"].isin(REACHES)]
    return bool(zapped(v).any()) if not v.empty else False


SHRINKER_ZAP, ZAP_REFAULT = "shrinker-zap", "zap-refault"


class KvmMmuShrinker(Hypothesis):
    name = "kvm-mmu-shrinker"
    question = "what does this change to KVM's x86-mmu shrinker do to guests when the kernel under test reclaims?"
    mechanism = "the x86-mmu shrinker"
    attribution = True
    traces_reclaim = True
    shrinkers: ClassVar[tuple[str, ...]] = ("x86-mmu",)  # its debugfs directory: x86-mmu-<id> (CONFIG_SHRINKER_DEBUG)
    shrink_functions: ClassVar[tuple[str, ...]] = ("mmu_shrink_scan",)
    # a call holds kvm_lock and zaps whichever VM it picks: it can explain any guest's spike
    causes: ClassVar[dict[str, str]] = {SHRINKER_ZAP: ANY, ZAP_REFAULT: OWN}
    headline = "shrinker zapping"
    cause_words = (
        "a call of the x86-mmu shrinker that freed shadow pages, or a debugfs scan write of the shrinker-scan mode "
        "(`shrinker-zap`), the guest refaulting after one until its probe has touched every page once more "
        "(`zap-refault`)"
    )

    timeline: ClassVar[tuple[Line, ...]] = (
        Line("kvm.mmu_shadow_zapped", "shadow pages zapped /s", rate=True),
        Line("shrinker.x86_mmu_count", "x86-mmu count"),
    )
    timeline_marks = ("shrink_start", "shrinker call")
    timeline_axis = "shrinker activity"

    def absent(self, facts: LevelFacts | None) -> str | None:
        return "no x86-mmu shrinker in this kernel" if facts is not None and not kvm_shrinker_in(facts) else None

    def cause_windows(self, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Its calls that freed shadow pages (begin to end), every debugfs scan write (no tracepoints there, so no
        freed count), and each probing guest's refault after them."""
        trace, pressure = frames["trace"], frames["pressure"]
        zaps = pairs(trace, "shrink_start", "shrink_end")
        zaps = zaps[zaps["freed"].fillna(0) > 0].assign(guest=None, cause=SHRINKER_ZAP)
        scans = pressure[(pressure["kind"] == "shrinker_scan") & pressure["seconds"].notna()]
        scans = scans.assign(t0=scans["t"] - scans["seconds"], t1=scans["t"], guest=None, cause=SHRINKER_ZAP)
        parts = [p[WINDOW_COLUMNS] for p in (zaps, scans) if len(p)]
        if parts:
            refaults = refault_windows(pd.concat(parts), frames["passes"], ZAP_REFAULT)
            parts.append(refaults[refaults["t1"] > refaults["t0"]][WINDOW_COLUMNS])
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=WINDOW_COLUMNS)

    def columns(self, view: PhaseView) -> dict[str, Any]:
        trace, own, c, vms = view.trace, view.pressure, view.counters, view.vms
        return {
            "shrinker_present": kvm_shrinker_in(view.facts) if view.facts else None,
            # calls seen by the vmscan tracepoints, plus direct calls through the debugfs scan file (which bypasses
            # do_shrink_slab and so its tracepoints)
            "shrinker_calls": int((trace["kind"] == "shrink_start").sum() + (own["kind"] == "shrinker_scan").sum()),
            "shrinker_freed": int(trace.loc[trace["kind"] == "shrink_end", "freed"].fillna(0).sum()),
            "x86_mmu_count_drop": c.fall("shrinker.x86_mmu_count"),
            "l2_vm": ", ".join(sorted(set(vms.values()))) or None,
            "l2_vm_shadow_zapped": _vm_rise(c, vms, "mmu_shadow_zapped") if vms else math.nan,
            "l2_vm_recycled": _vm_rise(c, vms, "mmu_recycled") if vms else math.nan,
        }

    primary = "touch p99.9"

    def brief(self, evidence: pd.DataFrame, phase: str, baseline: str, variant: str) -> str:
        at = evidence[evidence["phase"] == phase]
        calls = [int(at.loc[at["variant"] == v, "shrinker_calls"].sum()) for v in (baseline, variant)]
        return f"shrinker calls {calls[0]} v {calls[1]}"

    def precondition(self, evidence: pd.DataFrame, baseline: str) -> str | None:
        return None if ran(evidence, baseline) else "the baseline never ran the x86-mmu shrinker"

    def section(self, evidence: pd.DataFrame, baseline: str, text: Callable[[str], str]) -> list[str]:
        lines = []
        for variant, g in evidence.groupby("variant", sort=False):
            present = list(g["shrinker_present"].dropna().unique())
            pres = "present" if present == [True] else "absent" if present == [False] else "mixed/unknown"
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
                count = (
                    f"x86-mmu count fell by {m['x86_mmu_count_drop'].sum():.0f}"
                    if m["x86_mmu_count_drop"].notna().any()
                    else "no x86-mmu count in debugfs"
                )
                lines.append(
                    f"- `{mode}` phases ({len(m)}): shrinker calls {int(m['shrinker_calls'].sum())}, "
                    f"objects freed {int(m['shrinker_freed'].sum())}, mmu_recycled +{m['mmu_recycled'].sum():.0f}, "
                    f"{count}{l2}"
                )
        return [*lines, "", *self._conclusions(evidence, baseline)]

    @staticmethod
    def _conclusions(evidence: pd.DataFrame, baseline: str) -> list[str]:
        lines = []
        reach = evidence[(evidence["variant"] == baseline) & evidence["mode"].isin(REACHES)]
        if not ran(evidence, baseline):
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
            quiet = (others["shrinker_calls"].sum() == 0) and not zapped(others).any()
            lines.append(
                "Patched: no shrinker calls and no mmu_recycled zapping."
                if quiet
                else f"Patched: shrinker activity seen ({int(others['shrinker_calls'].sum())} calls, mmu_recycled "
                f"+{others['mmu_recycled'].sum():.0f}) - check that the patch took effect."
            )
        ctrl = evidence[evidence["mode"] == "memcg-limit"]
        if not ctrl.empty:
            calls = int(ctrl["shrinker_calls"].sum())
            lines.append(
                "Control (memcg-limit): "
                + (
                    "no shrinker activity in any variant, as expected."
                    if calls == 0
                    else f"{calls} shrinker calls - the control caused global reclaim; tighten "
                    "pressure.memcg-limit.limit_mb."
                )
            )
        return lines


HYPOTHESIS = KvmMmuShrinker()
