"""Evidence, from the stored tables: per cell and phase, what the experiment's mechanism did (its hypothesis's own
columns, harness/hypotheses/), what reclaim did, and did the phase deliver the pressure its mode claims - judged by
that mode (guest/modes/), from a PhaseEvidence of typed values."""

from __future__ import annotations

import json
import math

import pandas as pd

from .. import hypotheses
from ..config import Experiment
from ..guest import modes
from ..guest.contract import EventKind
from ..guest.modes.base import Counters, PhaseEvidence, Series
from ..guest.records import LevelFacts, PressureRecord
from ..hypotheses import PhaseView
from ..results.crashes import ACTOR_LEAD_S

RISES = {
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


def series(counters: pd.DataFrame) -> dict[str, Series]:
    """One cell's counters, name -> its samples in time order."""
    out = {}
    for name, g in counters.sort_values("t").groupby("name", sort=False):
        out[str(name)] = Series(g["t"].tolist(), g["value"].astype(float).tolist())
    return out


def l2_vms(events: pd.DataFrame) -> dict[str, str]:
    """KVM's per-VM debugfs directories (<pid>-<fd>) in the kernel under test of the L1 guests that run L2s, for
    one cell's events: the shadow pages of a nested L2 belong to its L1's VM there. "<pid>-" -> L1 guest name."""
    boots = events[events["kind"] == EventKind.BOOT_START.value]
    runs_l2 = set(boots.loc[boots["level"] == "l1", "guest"])
    started = boots[(boots["level"] == "kut") & boots["subject"].isin(runs_l2) & boots["pid"].notna()]
    return {f"{int(pid)}-": str(guest) for pid, guest in zip(started["pid"], started["subject"])}


def _value(v):
    """A table's value as the record had it: None where the table holds NaN or None, numpy scalars as Python's."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v.item() if hasattr(v, "item") else v


def _records(pressure: pd.DataFrame) -> list[PressureRecord]:
    """A phase's PressureRecords back from its rows of the `pressure` table (t in seconds there; not needed)."""
    fields = ("mb", "count", "seconds", "ok", "error", "target")
    return [
        PressureRecord(t=0, mode=r["mode"], kind=r["kind"], **{f: _value(r[f]) for f in fields})
        for r in pressure.to_dict("records")
    ]


def delivery(ev: PhaseEvidence, unavailable: str | None, actor_status: int | None, exp: Experiment) -> tuple[str, str]:
    """(status, reason): did this phase of this cell deliver what its mode claims? A mode that does not exist on
    the kernel that ran it is not applicable; otherwise its actor must have started and lasted the phase, the
    sampler must have seen it, and the mode's own check (Mode.shortfalls) must find nothing missing."""
    mode = modes.get(ev.mode)
    if why := mode.inapplicable(ev):
        return NOT_APPLICABLE, why
    if unavailable:
        return NOT_DELIVERED, unavailable
    if math.isnan(ev.counters.scans()):
        return NOT_DELIVERED, "no counter samples around the phase"
    missing = []
    if mode.acts and actor_status is None:
        missing.append("its pressure actor never started")
    elif actor_status:  # a healthy actor ends on the agent's SIGTERM with status 0
        killed = " (killed: OOM in its group?)" if actor_status == -9 else ""
        missing.append(f"its pressure actor ended early with status {actor_status}{killed}")
    missing += mode.shortfalls(ev, exp.pressure.knobs(mode.name))
    return (NOT_DELIVERED, "; ".join(missing)) if missing else (DELIVERED, "")


def _phase_row(
    ph: dict, c: Counters, frames: dict[str, pd.DataFrame], facts: LevelFacts | None, exp: Experiment
) -> dict:
    """One cell x phase: frames are that cell's rows of the tables."""
    t0, t1 = ph["t_start"], ph["t_end"]
    trace, events, pressure = frames["trace"], frames["events"], frames["pressure"]
    inside = trace[(trace["t"] >= t0) & (trace["t"] < t1 + 1)]
    own = pressure[(pressure["mode"] == ph["mode"]) & (pressure["t"] >= t0 - ACTOR_LEAD_S) & (pressure["t"] < t1 + 1)]
    said = events[(events["mode"] == ph["mode"]) & (events["t"] >= t0 - ACTOR_LEAD_S) & (events["t"] < t1 + 1)]
    unavailable = "; ".join(said.loc[said["kind"] == EventKind.PRESSURE_UNAVAILABLE.value, "reason"].dropna())
    stops = said.loc[said["kind"] == EventKind.PRESSURE_STOP.value, "status"].dropna().astype(int).tolist()
    actor_status = next((s for s in stops if s != 0), 0 if stops else None)
    ev = PhaseEvidence(mode=ph["mode"], counters=c, records=_records(own), facts=facts)
    faults = [n for n in c.series if n.startswith("qemu.") and n.endswith(".majflt")]
    wm = frames["workload_metrics"]
    view = PhaseView(ph["mode"], c, inside, own, wm[wm["phase"] == ph["phase"]], facts, l2_vms(events))
    row = {
        "cell": ph["cell"],
        "variant": ph["variant"],
        "repetition": ph["repetition"],
        "phase": ph["phase"],
        "mode": ph["mode"],
        **hypotheses.get(exp.hypothesis).columns(view),
        # the other causes a guest's touch may wait on: its QEMU's threads stalled in direct reclaim (traced),
        # and its QEMU's major faults (swap-ins of guest RAM among them)
        "guest_reclaim_stalls": int((inside["kind"] == "direct_reclaim_begin").sum()),
        "guest_qemu_majflt": float(sum(c.rise(n) for n in faults)) if faults else math.nan,
        **{label: c.rise(name) for name, label in RISES.items()},
        "mem_available_min_mb": c.low("meminfo.MemAvailable_kb") / 1024,
        "unavailable": unavailable or None,
        "actor_status": actor_status,
        "delivered_on": modes.get(ph["mode"]).shown(ev),
    }
    row["delivery"], row["delivery_reason"] = delivery(ev, unavailable or None, actor_status, exp)
    return row


def kut_facts(cells: pd.DataFrame) -> dict[str, LevelFacts]:
    """Each cell's kernel under test's LevelFacts, from the cells table (stored as JSON, checked again here)."""
    out = {}
    for cell, text in zip(cells["cell"], cells.get("kut_facts", pd.Series(None, index=cells.index))):
        if isinstance(text, str):
            out[str(cell)] = LevelFacts.from_guest(json.loads(text))
    return out


def phase_evidence(frames: dict[str, pd.DataFrame], exp: Experiment) -> pd.DataFrame:
    """Per cell x phase: what the hypothesis's mechanism did (its columns), what reclaim did, and whether the phase
    delivered its pressure."""
    facts = kut_facts(frames["cells"])
    rows = []
    for cell, phases in frames["phases"].groupby("cell", sort=False):
        mine = {
            name: frames[name][frames[name]["cell"] == cell]
            for name in ("counters", "trace", "events", "pressure", "workload_metrics")
        }
        cell_series = series(mine["counters"])
        for ph in phases.to_dict("records"):
            c = Counters(cell_series, float(ph["t_start"]), float(ph["t_end"]))
            rows.append(_phase_row(ph, c, mine, facts.get(str(cell)), exp))
    return pd.DataFrame(rows)


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
    """(variant, phase) -> the fact, for a phase whose mode does not exist on that variant (a mode that needs what
    the variant removed): its A/B rows compare pressure with no pressure, not like with like."""
    if evidence.empty:
        return {}
    na = evidence[evidence["delivery"] == NOT_APPLICABLE].drop_duplicates(["variant", "phase"])
    return {
        (str(r.variant), str(r.phase)): f"`{r.mode}` does not exist on {r.variant} ({r.delivery_reason})"
        for r in na.itertuples()
    }
