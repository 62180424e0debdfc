"""Did a cell measure what it was for, and how healthy were its guests?

shortfalls() is the host's check when a cell ends (run.py): every probing level wrote latency histograms in
every phase, no probe fell silent for long during the phases, the sampler covered every phase, and no
guest's kernel logged a stall (RCU stall, soft lockup, hung task, a timer that did not fire). A cell that
falls short failed, with the reason, and is retried like a boot failure: a guest that stalled for minutes
measured its stall, not the patch. health_table() gives the report's health section: boot, warm-up and
cell times per variant and level, with a variant far from the baseline called out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Checks
from .guest.contract import EventKind
from .manifest import CellRecord
from .util import GuestFileError, read_guest_file

# what a guest kernel prints when it stopped making progress (kernel/rcu/tree_stall.h, kernel/watchdog.c,
# kernel/hung_task.c); under TCG a vCPU starved by its host thread shows the same way
STALL = re.compile(
    r"rcu: INFO: rcu_\w+ (?:self-)?detected stalls?|rcu_\w+ kthread timer wakeup didn't happen|"
    r"Possible timer handling issue|watchdog: BUG: soft lockup|INFO: task \S+ blocked for more than"
)
KMSG_LIMIT = 8 << 20
FAR = 2.0  # a variant's median this many times the baseline's (or its inverse) is called out
CHILD_LEVEL = {"kut": "l1", "l1": "l2"}  # a boot_ready event names a child of the level that logged it


def stalls(cell_dir: Path) -> list[str]:
    """The stall reports in every level's kernel log of a cell, 'guest-dir: [time] line' (at most 3 per log)."""
    out = []
    for log in sorted(cell_dir.rglob("kmsg.log")):
        try:
            text = read_guest_file(log, limit=KMSG_LIMIT, tail=KMSG_LIMIT)
        except GuestFileError:
            continue
        hits = [line.strip() for line in text.splitlines() if STALL.search(line)]
        where = log.parent.relative_to(cell_dir).as_posix()
        out += [f"{'kut' if where == '.' else where}: {line[:200]}" for line in hits[:3]]
    return out


BOOLEAN = {"y": "Y", "1": "Y", "true": "Y", "on": "Y", "n": "N", "0": "N", "false": "N", "off": "N"}


def param_mismatches(cell_dir: Path, module_params: dict[str, dict[str, str]]) -> list[str]:
    """The variant's module parameters the kernel under test does not show in sysfs as asked (a typo, a
    parameter this kernel lacks, or one the harness's own overrode). Only KVM modules are recorded."""
    try:
        facts = json.loads(read_guest_file(cell_dir / "facts.json", limit=1 << 20))
        have = facts.get("kvm_params") if isinstance(facts, dict) else None
    except (GuestFileError, ValueError):
        have = None
    if not isinstance(have, dict):
        return (
            ["the kernel under test's facts.json (its module parameters) is missing or torn"] if module_params else []
        )
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


def boot_times(events: pd.DataFrame, cells: pd.DataFrame, records: dict[str, CellRecord]) -> pd.DataFrame:
    """One row per cell x guest: variant, level, guest, ready_s (QEMU start to agent ready), kernel_s."""
    rows = []
    for _, c in cells.iterrows():
        r = records.get(c["cell"])
        if r is not None and r.kut_ready_s is not None:
            rows.append(
                {
                    "cell": c["cell"],
                    "variant": c["variant"],
                    "level": "kut",
                    "guest": "kut",
                    "ready_s": r.kut_ready_s,
                    "kernel_s": r.kut_kernel_s,
                }
            )
    ready = events[events["kind"] == EventKind.BOOT_READY.value] if not events.empty else events
    for _, e in ready.iterrows():
        d = json.loads(e["detail"])
        rows.append(
            {
                "cell": e["cell"],
                "variant": e["variant"],
                "level": CHILD_LEVEL.get(e["level"], "?"),
                "guest": d.get("guest"),
                "ready_s": d.get("seconds"),
                "kernel_s": d.get("kernel_s"),
            }
        )
    return pd.DataFrame(rows, columns=["cell", "variant", "level", "guest", "ready_s", "kernel_s"])


def health_table(frames: dict[str, pd.DataFrame], records: dict[str, CellRecord], baseline: str) -> pd.DataFrame:
    """Per variant x level x figure: median [min-max] over cells, and whether it is far from the baseline's."""
    cells = frames["cells"]
    long = []
    boots = boot_times(frames["events"], cells, records)
    for fig in ("ready_s", "kernel_s"):
        for _, b in boots.dropna(subset=[fig]).iterrows():
            long.append({"variant": b["variant"], "level": b["level"], "figure": fig, "value": float(b[fig])})
    passes = frames["passes"]
    for _, p in passes[passes["pass"] == 1].iterrows() if not passes.empty else []:
        long.append(
            {"variant": p["variant"], "level": p["level"], "figure": "warmup_s", "value": p["duration_ms"] / 1e3}
        )
    for _, c in cells.iterrows():
        r = records.get(c["cell"])
        if r is not None and r.started and r.finished:
            long.append({"variant": c["variant"], "level": "cell", "figure": "wall_s", "value": r.finished - r.started})
        if r is not None:
            long.append({"variant": c["variant"], "level": "cell", "figure": "attempts", "value": float(r.attempt)})
    df = pd.DataFrame(long, columns=["variant", "level", "figure", "value"])
    if df.empty:
        return pd.DataFrame(columns=["variant", "level", "figure", "n", "median", "min", "max", "vs_baseline", "far"])
    out = (
        df.groupby(["variant", "level", "figure"], sort=False)["value"]
        .agg(n="count", median="median", min="min", max="max")
        .reset_index()
    )
    rank = {
        k: i for i, k in enumerate(("kut", "l1", "l2", "cell", "ready_s", "kernel_s", "warmup_s", "wall_s", "attempts"))
    }
    out = out.sort_values(["level", "figure"], key=lambda col: col.map(rank), kind="stable").reset_index(drop=True)
    base = out[out["variant"] == baseline].set_index(["level", "figure"])["median"]

    def versus(r) -> float:
        b = base.get((r["level"], r["figure"]), np.nan)
        return float(r["median"] / b) if b and not np.isnan(b) else np.nan

    out["vs_baseline"] = out.apply(versus, axis=1)
    out["far"] = (out["vs_baseline"] > FAR) | (out["vs_baseline"] < 1 / FAR)
    return out


def far_from_baseline(health: pd.DataFrame) -> pd.DataFrame:
    """Rows whose median is more than FAR times off the baseline's (either way)."""
    return health[health["far"].astype(bool)] if not health.empty else health
