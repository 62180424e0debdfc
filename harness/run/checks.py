"""Did a cell measure what it was for? The host's check when a cell ends (runner.py).

shortfalls(): every probing level wrote latency histograms in every phase, no probe fell silent for long during
the phases, the sampler covered every phase, and no guest's kernel logged a stall (RCU stall, soft lockup, hung
task, a timer that did not fire). A cell that falls short failed, with the reason, and is retried like a boot
failure: a guest that stalled for minutes measured its stall, not the patch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Checks
from ..results import crashes
from ..results.guest_files import GuestFileError, Problems, read_text
from ..results.tables import guest_dirs, level_facts


def stalls(cell_dir: Path) -> list[str]:
    """The stall reports (results/crashes.py: RCU stalls, soft lockups, hung tasks) in every level's kernel log of
    a cell, 'guest-dir: [time] line' (at most 3 per log)."""
    out = []
    for _, _, d in guest_dirs(cell_dir, Problems()):
        try:
            text = read_text(d / "kmsg.log", limit=crashes.LOG_LIMIT, tail=crashes.LOG_LIMIT)
        except GuestFileError:
            continue
        hits = [c for c in crashes.scan_log(text) if c.kind in crashes.STALLS]
        where = d.relative_to(cell_dir).as_posix()
        out += [f"{'kut' if where == '.' else where}: {c.line[:200]}" for c in hits[:3]]
    return out


BOOLEAN = {"y": "Y", "1": "Y", "true": "Y", "on": "Y", "n": "N", "0": "N", "false": "N", "off": "N"}


def param_mismatches(cell_dir: Path, module_params: dict[str, dict[str, str]]) -> list[str]:
    """The variant's module parameters the kernel under test does not show in sysfs as asked (a typo, a
    parameter this kernel lacks, or one the harness's own overrode), read as soon as it is ready (cell.py).
    Only KVM modules are recorded."""
    kut = level_facts(cell_dir, Problems(), complete=False).get("kut")
    if kut is None:
        return (
            ["the kernel under test's facts.json (its module parameters) is missing or torn"] if module_params else []
        )
    have = kut.kvm_params
    out = []
    for mod, params in module_params.items():
        if not mod.startswith("kvm") or not any(k.startswith(f"{mod}.") for k in have):
            continue  # not recorded, or a vendor module this CPU does not load
        for name, asked in params.items():
            got = str(have.get(f"{mod}.{name}", "(no such parameter)")).strip()
            if BOOLEAN.get(got.lower(), got) != BOOLEAN.get(asked.lower(), asked):
                out.append(f"module parameter {mod}.{name}: asked {asked}, the kernel under test has {got}")
    return out


def _intervals(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per probe histogram interval: guest, level, phase, t."""
    return samples.drop_duplicates(["guest", "interval"])[["guest", "level", "phase", "t"]]


def shortfalls(
    frames: dict[str, pd.DataFrame],
    cell_dir: Path,
    checks: Checks,
    phases: list[str],
    probe_levels: set[str],
    sampler_interval_s: float,
) -> list[str]:
    """Why one cell's measurement is not whole (empty: it is). frames are that cell's tables."""
    out = []
    ph = frames["phases"]
    missing = [p for p in phases if p not in set(ph["phase"])]
    if missing:
        out.append(f"phases that never started: {', '.join(missing)}")
    iv = _intervals(frames["samples"]) if not frames["samples"].empty else pd.DataFrame(columns=["guest", "level"])
    for level in sorted(probe_levels):
        at = iv[iv["level"] == level]
        short = [
            f"{p} {n}" for p in ph["phase"] if (n := int((at["phase"] == p).sum())) < checks.min_intervals_per_phase
        ]
        if short:
            out.append(
                f"{level}: too few probe intervals (need {checks.min_intervals_per_phase} per phase): "
                + ", ".join(short)
            )
    if not ph.empty:
        t0, t1 = float(ph["t_start"].min()), float(ph["t_end"].max())
        for guest, g in iv.groupby("guest"):
            ts = np.sort(g["t"].to_numpy(float))
            ts = np.concatenate([[t0], ts[(ts > t0) & (ts < t1)], [t1]])
            gap = np.diff(ts)
            if gap.max() > checks.max_probe_gap_s:
                i = int(gap.argmax())
                out.append(
                    f"{guest}: probe silent for {gap[i]:.0f} s during the phases (from {ts[i]:.0f} s to "
                    f"{ts[i + 1]:.0f} s; limit {checks.max_probe_gap_s:g} s)"
                )
        c = frames["counters"]
        times = np.sort(c["t"].unique()) if not c.empty else np.array([])
        blind = [
            r["phase"]
            for _, r in ph.iterrows()
            if not ((times >= r["t_start"] - sampler_interval_s) & (times <= r["t_end"] + sampler_interval_s)).any()
        ]
        if blind:
            out.append(f"the sampler has no counters in phase(s) {', '.join(blind)}")
    out += [f"stall: {s}" for s in stalls(cell_dir)]
    return out


def workload_shortfalls(runs: pd.DataFrame, metrics: pd.DataFrame, expected: Mapping[str, str]) -> list[str]:
    """Why the cell's workloads (expected: name -> level) measured nothing usable: a run that failed (named, with
    its output's last lines), or no run with metrics inside a phase."""
    out = []
    for r in runs[runs["error"].notna()].drop_duplicates(["workload", "guest"]).itertuples():
        tail = str(r.tail or "").strip().replace("\n", "\n    ")
        out.append(
            f"workload {r.workload} ({r.level} {r.guest}, run {r.run}): {r.error}"
            + (f"; its output ended:\n    {tail}" if tail else "")
        )
    inside = set(metrics.loc[~metrics["phase"].isin(["pre", "post", "across"]), "workload"])
    failed = set(runs.loc[runs["error"].notna(), "workload"])
    for name, level in expected.items():
        if name not in inside and name not in failed:
            ran = int((runs["workload"] == name).sum())
            out.append(
                f"workload {name} ({level}): no run gave metrics inside a phase ({ran} run(s) in all; "
                "a phase must be longer than one run)"
            )
    return out
