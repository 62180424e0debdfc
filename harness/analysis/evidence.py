"""Evidence, from the stored tables: per cell and phase, did the x86-mmu shrinker run and free shadow pages,
what did reclaim do, (nested) how many shadow pages of the VM that runs L2 were zapped, and did the phase
deliver the pressure its mode claims (delivery())."""

from __future__ import annotations

import json

import pandas as pd

from ..config import Experiment
from ..guest.contract import EventKind, PressureMode

# the modes whose reclaim calls a non-memcg-aware shrinker (guest/pressure.py says why), as the tables spell them
REACHES_SHRINKER = {
    m.value
    for m in (PressureMode.GLOBAL, PressureMode.DROP_CACHES, PressureMode.ROOT_RECLAIM, PressureMode.SHRINKER_SCAN)
}
DELTA_COUNTERS = {
    "kvm.mmu_recycled": "mmu_recycled",
    "kvm.mmu_shadow_zapped": "shadow_zapped",
    "vmstat.slabs_scanned": "slabs_scanned",
    "vmstat.pgscan_kswapd": "pgscan_kswapd",
    "vmstat.pgscan_direct": "pgscan_direct",
    "vmstat.pswpin": "pswpin",
    "vmstat.drop_slab": "drop_slab",
    "cgroup.pressure.events.max": "memcg_max_events",
    "cgroup.pressure.events.high": "memcg_high_events",
}
DELIVERED, NOT_DELIVERED, NOT_APPLICABLE = "delivered", "not delivered", "not applicable"
ACTOR_LEAD_S = 2.0
EAGAIN = "Resource temporarily unavailable"  # strerror, as guest/pressure.py logs a failed write


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
    runs_l2 = set(e.loc[(e["level"] == "l1") & (e["kind"] == EventKind.BOOT_START.value), "guest"])
    out = {}
    for d in e.loc[(e["level"] == "kut") & (e["kind"] == EventKind.BOOT_START.value), "detail"]:
        started = json.loads(d)
        if started.get("guest") in runs_l2 and started.get("pid"):
            out[f"{started['pid']}-"] = started["guest"]
    return out


def _vm_delta(c: pd.DataFrame, vms: dict[str, str], stat: str, t0: float, t1: float) -> float:
    names = [
        n
        for n in c["name"].unique()
        if n.startswith("kvm_vm.")
        and n.endswith("." + stat)
        and any(n.split(".")[1].startswith(prefix) for prefix in vms)
    ]
    return float(sum(_delta(c, n, t0, t1) for n in names)) if names else float("nan")


def _count_drop(c: pd.DataFrame, t0: float, t1: float) -> float:
    """How far the x86-mmu shrinker's count fell below its value at the start of the phase."""
    s = c[c["name"] == "shrinker.x86_mmu_count"].sort_values("t")
    before, inside = s[s["t"] <= t0].tail(1), s[(s["t"] > t0) & (s["t"] <= t1 + 1)]
    if before.empty or inside.empty:
        return float("nan")
    return float(max(0.0, before["value"].iloc[0] - inside["value"].min()))


def _min_mb(c: pd.DataFrame, name: str, t0: float, t1: float) -> float:
    s = c.loc[(c["name"] == name) & (c["t"] >= t0) & (c["t"] <= t1), "value"]
    return float(s.min()) / 1024 if len(s) else float("nan")


def shrinker_evidence(frames: dict[str, pd.DataFrame], exp: Experiment) -> pd.DataFrame:
    """Per cell x phase: did the x86-mmu shrinker run (invocations, zaps), what reclaim did, and whether the phase
    delivered its pressure. In the nested topology also the shadow pages zapped in the VM that runs L2 (its L1's
    VM in the kernel under test)."""
    phases, counters, events, cells = frames["phases"], frames["counters"], frames["events"], frames["cells"]
    rows = []
    for _, ph in phases.iterrows():
        c = counters[counters["cell"] == ph["cell"]] if not counters.empty else counters
        e = (
            events[(events["cell"] == ph["cell"]) & (events["t"] >= ph["t_start"]) & (events["t"] < ph["t_end"] + 1)]
            if not events.empty
            else events
        )
        # what the phase's own pressure actor and the agent said of it, from its start: the actor is ready,
        # and may already act, a moment before the agent logs phase_start
        own = (
            events[
                (events["cell"] == ph["cell"])
                & (events["t"] >= ph["t_start"] - ACTOR_LEAD_S)
                & (events["t"] < ph["t_end"] + 1)
                & events["detail"].str.contains(f'"mode": "{ph["mode"]}"', regex=False)
            ]
            if not events.empty
            else events
        )
        present = cells.loc[cells["cell"] == ph["cell"], "x86_mmu_shrinker_present"]
        row = {
            "cell": ph["cell"],
            "variant": ph["variant"],
            "repetition": ph["repetition"],
            "phase": ph["phase"],
            "mode": ph["mode"],
            "shrinker_present": bool(present.iloc[0]) if len(present) else None,
            # calls seen by the vmscan tracepoints, plus direct calls through the debugfs scan file
            # (which bypasses do_shrink_slab and so its tracepoints)
            "shrinker_calls": int((e["kind"] == "shrink_start").sum() + (own["kind"] == "pressure.shrinker_scan").sum())
            if not e.empty
            else 0,
            "shrinker_freed": int(
                sum(json.loads(d).get("freed", 0) for d in e.loc[e["kind"] == "shrink_end", "detail"])
            )
            if not e.empty
            else 0,
            # the other causes a guest's touch may wait on: its QEMU's threads stalled in direct reclaim (traced),
            # and its QEMU's major faults (swap-ins of guest RAM among them)
            "guest_reclaim_stalls": int((e["kind"] == "direct_reclaim_begin").sum()) if not e.empty else 0,
        }
        faults = [n for n in c["name"].unique() if n.startswith("qemu.") and n.endswith(".majflt")] if len(c) else []
        row["guest_qemu_majflt"] = (
            float(sum(_delta(c, n, ph["t_start"], ph["t_end"]) for n in faults)) if faults else float("nan")
        )
        for name, label in DELTA_COUNTERS.items():
            row[label] = _delta(c, name, ph["t_start"], ph["t_end"]) if not c.empty else float("nan")
        row["x86_mmu_count_drop"] = _count_drop(c, ph["t_start"], ph["t_end"]) if not c.empty else float("nan")
        row["mem_available_min_mb"] = (
            _min_mb(c, "meminfo.MemAvailable_kb", ph["t_start"], ph["t_end"]) if not c.empty else float("nan")
        )
        writes = [json.loads(d) for d in own.loc[own["kind"] == "pressure.root_reclaim", "detail"]]
        row["root_reclaim_requests"] = int((own["kind"] == "pressure.root_reclaim_request").sum())
        # EAGAIN: less was reclaimable than asked, after reclaiming what was; any other error is a refusal
        row["root_reclaim_refused"] = "; ".join(
            sorted({str(w.get("error")) for w in writes if w.get("ok") is False and w.get("error") != EAGAIN})
        )
        said = own.loc[own["kind"] == EventKind.PRESSURE_UNAVAILABLE.value, "detail"]
        row["unavailable"] = "; ".join(json.loads(d).get("reason", "") for d in said) or None
        stops = own.loc[own["kind"] == EventKind.PRESSURE_STOP.value, "detail"]
        ended = [json.loads(d).get("status") for d in stops]
        row["actor_status"] = next((s for s in ended if s != 0), 0 if ended else None)
        vms = l2_vms(events, ph["cell"]) if not events.empty else {}
        row["l2_vm"] = ", ".join(sorted(set(vms.values()))) or None
        for stat, label in (("mmu_shadow_zapped", "l2_vm_shadow_zapped"), ("mmu_recycled", "l2_vm_recycled")):
            row[label] = _vm_delta(c, vms, stat, ph["t_start"], ph["t_end"]) if vms and not c.empty else float("nan")
        row["delivery"], row["delivery_reason"] = delivery(row, exp)
        rows.append(row)
    return pd.DataFrame(rows)


def delivery(row: dict, exp: Experiment) -> tuple[str, str]:
    """(status, reason): did this phase of this cell deliver what its mode claims, by the sampler's counters?
    `none` claims quiet (no global reclaim); shrinker-scan on a kernel without the shrinker is not applicable."""
    mode = row["mode"]
    scans = row["pgscan_kswapd"] + row["pgscan_direct"]
    if mode == PressureMode.SHRINKER_SCAN.value and row["shrinker_present"] is False:
        return NOT_APPLICABLE, "no x86-mmu shrinker in this kernel: nothing to scan"
    if row["unavailable"]:
        return NOT_DELIVERED, row["unavailable"]
    if pd.isna(scans):
        return NOT_DELIVERED, "no counter samples around the phase"
    missing = []
    if mode != PressureMode.NONE.value and row["actor_status"] is None:
        missing.append("its pressure actor never started")
    elif row["actor_status"]:  # a healthy actor ends on the agent's SIGTERM with status 0
        missing.append(
            f"its pressure actor ended early with status {row['actor_status']}"
            + (" (killed: OOM in its group?)" if row["actor_status"] == -9 else "")
        )
    if mode == PressureMode.GLOBAL.value:
        target = exp.pressure.global_.target_available_mb
        if scans <= 0:
            missing.append("global reclaim never scanned (pgscan kswapd+direct +0)")
        if not row["mem_available_min_mb"] <= target:
            missing.append(f"MemAvailable stayed at {row['mem_available_min_mb']:.0f} MB or more (target {target} MB)")
    elif mode == PressureMode.DROP_CACHES.value:
        if not row["drop_slab"] > 0:
            missing.append("drop_slab did not rise")
    elif mode == PressureMode.ROOT_RECLAIM.value:
        if row["root_reclaim_requests"] == 0:
            missing.append("no write to the root memory.reclaim was made")
        if row["root_reclaim_refused"]:
            missing.append(f"writes to the root memory.reclaim were refused: {row['root_reclaim_refused']}")
        if not scans + row["slabs_scanned"] > 0:
            missing.append("no reclaim scan")
    elif mode == PressureMode.SHRINKER_SCAN.value:
        if not zapped(pd.DataFrame([row])).iloc[0]:
            missing.append("the x86-mmu shrinker freed nothing (count did not fall, mmu_recycled +0)")
    elif mode == PressureMode.MEMCG_LIMIT.value:
        events = (0 if pd.isna(row["memcg_max_events"]) else row["memcg_max_events"]) + (
            0 if pd.isna(row["memcg_high_events"]) else row["memcg_high_events"]
        )
        if events < exp.checks.memcg_min_events:
            missing.append(
                f"memory.events max+high +{events:.0f} in the hog's group (need {exp.checks.memcg_min_events})"
            )
        if scans > 0:
            missing.append(f"global reclaim ran (+{scans:.0f} pages scanned): not a memcg-confined control")
    elif mode == PressureMode.NONE.value and scans > 0:
        missing.append(f"global reclaim ran (+{scans:.0f} pages scanned) in a phase without pressure")
    return (NOT_DELIVERED, "; ".join(missing)) if missing else (DELIVERED, "")


def undelivered(evidence: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(variant, phase) -> why, for every phase that did not deliver in some repetition of that variant."""
    out: dict[tuple[str, str], str] = {}
    if evidence.empty:
        return out
    for (variant, phase), g in evidence.groupby(["variant", "phase"], sort=False):
        bad = g[g["delivery"] == NOT_DELIVERED]
        if len(bad):
            reps = ", ".join(f"r{r}: {why}" for r, why in zip(bad["repetition"], bad["delivery_reason"]))
            out[(str(variant), str(phase))] = (
                f"pressure not delivered on {variant} ({len(bad)} of {len(g)} repetitions; {reps})"
            )
    return out


def inapplicable(evidence: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(variant, phase) -> the fact, for a phase whose mode does not exist on that variant (shrinker-scan on a
    kernel without the shrinker): its A/B rows compare pressure with no pressure, not like with like."""
    if evidence.empty:
        return {}
    na = evidence[evidence["delivery"] == NOT_APPLICABLE].drop_duplicates(["variant", "phase"])
    return {
        (str(r.variant), str(r.phase)): f"`{r.mode}` does not exist on {r.variant} ({r.delivery_reason})"
        for r in na.itertuples()
    }


def zapped(rows: pd.DataFrame) -> pd.Series:
    """Per phase: did the shrinker free shadow pages (not merely get called)? What it says it freed, the pages
    kvm_mmu_zap_oldest_mmu_pages() recycled, or its count falling (for an L2's nested pages the recursive
    zapping of their children is not in either number: mmu_recycled +13 while the count fell by 512, measured)."""
    return (
        (rows["shrinker_freed"] > 0) | (rows["mmu_recycled"].fillna(0) > 0) | (rows["x86_mmu_count_drop"].fillna(0) > 0)
    )


def shrinker_ran(evidence: pd.DataFrame, variant: str) -> bool:
    v = evidence[(evidence["variant"] == variant) & evidence["mode"].isin(REACHES_SHRINKER)]
    return bool(zapped(v).any()) if not v.empty else False


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
                f", in the VM that runs L2 ({m['l2_vm'].dropna().iloc[0]}) shadow pages zapped "
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
                f"memcg max events +{m['memcg_max_events'].sum():.0f}; guests' QEMU: direct-reclaim stalls "
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
    ctrl = evidence[evidence["mode"] == PressureMode.MEMCG_LIMIT.value]
    if not ctrl.empty:
        lines.append(
            "Control (memcg-limit): "
            + (
                "no shrinker activity in any variant, as expected."
                if ctrl["shrinker_calls"].sum() == 0
                else f"{int(ctrl['shrinker_calls'].sum())} shrinker calls - the "
                "control caused global reclaim; tighten memcg_limit_mb."
            )
        )
    return lines
