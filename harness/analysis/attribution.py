"""Attribution: which cause events each latency spike overlapped, and how much of the tail each cause explains.

- A spike is a raw touch the probe kept (>= its 1 ms floor) above the same guest's `spike_quantile` of the
  undisturbed (mode `none`) phases of the same cell. It lasted [t - latency, t].
- Causes, from the kernel under test (the sampler's trace and counters): the hypothesis's own cause events
  (harness/hypotheses/: for the shrinker experiment its calls that freed shadow pages and the guests' refaults
  after them), and two the core always has:
  `direct-reclaim` a direct-reclaim stall of the guest's QEMU (an L2 runs inside its L1's QEMU, so the L1's),
  `swap-in`        a sampler interval in which that QEMU's major faults rose (its guest RAM came back from
                   swap; resolution: the sampler's interval).
  Beside the causes, each spike says whether its own VM in the kernel under test (an L2's: its L1's) lost shadow
  pages while it lasted (`own_vm_zapped`: a step of that VM's mmu_shadow_zapped/mmu_recycled counters).
  A spike matches a cause whose window overlaps it within the matching window: the worst measured uncertainty
  of the guest's clock against the kernel under test's in that cell (results.py has the timestamps corrected
  by the measured offsets already); `none found` when nothing does. One spike may have several.
- Excess of a spike = its latency - the guest's undisturbed p99 in that cell (the tail it added). A spike's
  excess is split equally among its causes, so the shares of a row add up to its total.
- A/B: excess per repetition (0 where a repetition had no spike), baseline minus the other variant, per cause;
  the causes' differences add up to the total difference, and each one's share of it has a bootstrap CI over
  repetitions (resampled within each variant).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import hypotheses
from ..config import Experiment
from ..guest.probe import OUTLIER_NS
from ..hypotheses.base import ANY, OWN, OWNER, WINDOW_COLUMNS, Hypothesis, pairs
from ..results.tables import PhaseSpans
from .stats import weighted_quantiles

SWAP_IN, DIRECT_RECLAIM, NONE_FOUND = "swap-in", "direct-reclaim", "none found"
CORE_CAUSES = {SWAP_IN: OWNER, DIRECT_RECLAIM: OWNER}  # the core's causes: beside every hypothesis's own
REFERENCE_Q = 0.99  # the excess is measured above the undisturbed p99
N_BOOT = 2000


@dataclass
class Attribution:
    """What attribute() found: the tables it writes and what the plots and the first screen read."""

    spikes: pd.DataFrame  # one row per spike, with its causes
    windows: pd.DataFrame  # one row per cause event: cell, guest (None: every guest), cause, t0, t1
    table: pd.DataFrame  # per variant x phase x level x cause: spikes and excess
    by_repetition: pd.DataFrame  # excess per variant x repetition x phase x level x cause (0 filled)
    ab: pd.DataFrame  # per other variant x phase x level x cause: the difference and its share, with CIs
    vm_zaps: pd.DataFrame  # one row per step of a VM's zap counters: cell, guest (its L1), t0, t1, zapped, recycled
    causes: tuple[str, ...] = ()  # the hypothesis's causes, then the core's
    mechanism: tuple[str, ...] = ()  # the hypothesis's own causes: what the `mechanism` rows of `ab` add up

    @property
    def shares(self) -> tuple[str, ...]:
        return (*self.causes, NONE_FOUND)


def thresholds(samples: pd.DataFrame, phases: pd.DataFrame, quantile: float) -> pd.DataFrame:
    """Per cell x guest: the spike threshold and the excess reference, from its undisturbed phases."""
    calm = phases.loc[phases["mode"] == "none", ["cell", "phase"]]
    s = samples.merge(calm, on=["cell", "phase"])
    rows = []
    for (cell, guest), g in s.groupby(["cell", "guest"], sort=False):
        ref, q = weighted_quantiles(g["latency_ns"].to_numpy(), g["count"].to_numpy(), [REFERENCE_Q, quantile])
        rows.append({"cell": cell, "guest": guest, "threshold_ns": max(float(q), OUTLIER_NS), "reference_ns": ref})
    return pd.DataFrame(rows, columns=["cell", "guest", "threshold_ns", "reference_ns"])


def cause_windows(frames: dict[str, pd.DataFrame], hypothesis: Hypothesis) -> pd.DataFrame:
    """Every cause event of every cell as a time window (s since the cell's first phase): the hypothesis's, then
    the core's (its guests' QEMUs in direct reclaim, their major faults rising)."""
    trace, counters = frames["trace"], frames["counters"]
    parts = [hypothesis.cause_windows(frames)]
    stalls = pairs(trace, "direct_reclaim_begin", "direct_reclaim_end")
    parts.append(stalls[stalls["guest"].notna()].assign(cause=DIRECT_RECLAIM))
    faults = counters[counters["name"].str.startswith("qemu.") & counters["name"].str.endswith(".majflt")]
    for (cell, name), g in faults.groupby(["cell", "name"], sort=False):
        g = g.sort_values("t")
        rose = g["value"].diff().to_numpy() > 0
        t = g["t"].to_numpy()
        if rose.any():
            idx = np.flatnonzero(rose)
            guest = str(name)[len("qemu.") : -len(".majflt")]
            parts.append(pd.DataFrame({"cell": cell, "guest": guest, "cause": SWAP_IN, "t0": t[idx - 1], "t1": t[idx]}))
    parts = [p[WINDOW_COLUMNS] for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=WINDOW_COLUMNS)


def top_guests(events: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(cell, guest) -> the guest whose QEMU runs it in the kernel under test (itself for an L1; an L2's L1)."""
    boots = events[(events["kind"] == "boot_start") & (events["level"] == "l1")]
    return {(c, str(child)): g for c, g, child in zip(boots["cell"], boots["guest"], boots["subject"])}


def _overlaps(w: pd.DataFrame, a: np.ndarray, b: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """For each interval [a, b]: does any window of w overlap it, each side widened by slack?"""
    if w.empty or not len(a):
        return np.zeros(len(a), bool)
    w = w.sort_values("t0")
    starts, ends = w["t0"].to_numpy(), np.maximum.accumulate(w["t1"].to_numpy())
    idx = np.searchsorted(starts, b + slack, side="right")
    hit = idx > 0
    hit[hit] = ends[idx[hit] - 1] >= a[hit] - slack[hit]
    return hit


def _overlaps_per_guest(
    w: pd.DataFrame, who: np.ndarray, a: np.ndarray, b: np.ndarray, slack: np.ndarray
) -> np.ndarray:
    """_overlaps, each interval against the windows of its own guest (who: the guest of each interval)."""
    hit = np.zeros(len(who), bool)
    for guest in set(who):
        mine = who == guest
        hit[mine] = _overlaps(w[w["guest"] == guest], a[mine], b[mine], slack[mine])
    return hit


def find_spikes(
    frames: dict[str, pd.DataFrame],
    exp: Experiment,
    windows: pd.DataFrame,
    slack_s: dict[tuple[str, str], float],
    vm_zaps: pd.DataFrame,
    causes: dict[str, str],
) -> pd.DataFrame:
    """Every spike in the phases with its latency, excess, causes and whether its own VM lost shadow pages
    meanwhile (slack_s: (cell, guest) -> matching window; causes: name -> which spikes it can explain)."""
    events, phases = frames["events"], frames["phases"]
    cols = ["variant", "repetition", "cell", "phase", "mode", "level", "guest", "t", "latency_ns", "excess_ns"]
    cols += [*causes, "causes", "own_vm_zapped", "window_ms"]
    raw = frames["outliers"]
    if raw.empty or phases.empty:
        return pd.DataFrame(columns=cols)
    raw = raw.merge(thresholds(frames["samples"], phases, exp.attribution.spike_quantile), on=["cell", "guest"])
    raw = raw[raw["latency_ns"] > raw["threshold_ns"]]
    out = []
    top = top_guests(events)
    default = exp.attribution.unmeasured_window_ms / 1e3
    for cell, g in raw.groupby("cell", sort=False):
        cell = str(cell)
        ph = phases[phases["cell"] == cell].sort_values("t_start")
        i = PhaseSpans.of(ph).index(g["t"].to_numpy())
        inside = i >= 0
        g = g[inside].assign(phase=ph["phase"].to_numpy()[i[inside]], mode=ph["mode"].to_numpy()[i[inside]])
        if g.empty:
            continue
        end = g["t"].to_numpy()
        begin = end - g["latency_ns"].to_numpy() / 1e9
        slack = np.array([slack_s.get((cell, guest), default) for guest in g["guest"]])
        w = windows[windows["cell"] == cell]
        own = g["guest"].to_numpy()
        owner = np.array([top.get((cell, guest), guest) for guest in own])  # whose QEMU runs it
        hits = {}
        for cause, scope in causes.items():
            mine = w[w["cause"] == cause]
            hits[cause] = (
                _overlaps(mine, begin, end, slack)
                if scope == ANY
                else _overlaps_per_guest(mine, own if scope == OWN else owner, begin, end, slack)
            )
        zapped = _overlaps_per_guest(vm_zaps[vm_zaps["cell"] == cell], owner, begin, end, slack)
        g = g.assign(
            excess_ns=(g["latency_ns"] - g["reference_ns"]).clip(lower=0),
            window_ms=slack * 1e3,
            own_vm_zapped=zapped,
            **hits,
        )
        out.append(g)
    if not out:
        return pd.DataFrame(columns=cols)
    s = pd.concat(out, ignore_index=True)
    names = list(causes)
    s["causes"] = ["+".join(c for c, on in zip(names, row) if on) or NONE_FOUND for row in s[names].to_numpy()]
    return s[cols]


def _split(spikes: pd.DataFrame, causes: tuple[str, ...]) -> pd.DataFrame:
    """Each spike's excess split equally among its causes (all to `none found` where it has none): long rows."""
    n = spikes[list(causes)].sum(axis=1).to_numpy()
    parts = []
    for cause in (*causes, NONE_FOUND):
        has = spikes[cause].to_numpy() if cause != NONE_FOUND else n == 0
        share = np.where(has, spikes["excess_ns"].to_numpy() / np.maximum(n, 1), 0.0)
        parts.append(spikes.assign(cause=cause, has=has, excess_ms=share / 1e6))
    return pd.concat(parts, ignore_index=True)


def by_repetition(
    spikes: pd.DataFrame, phases: pd.DataFrame, levels: list[str], causes: tuple[str, ...]
) -> pd.DataFrame:
    """Excess (ms) and spikes per variant x repetition x phase x level x cause; every phase a repetition ran
    has a row per level and cause, 0 where it had no spike."""
    keys = ["variant", "repetition", "phase", "level", "cause"]
    grid = phases[["variant", "repetition", "phase", "mode"]].drop_duplicates()
    grid = grid.merge(pd.DataFrame({"level": pd.Series(levels, dtype=object)}), how="cross")
    grid = grid.merge(pd.DataFrame({"cause": [*causes, NONE_FOUND]}), how="cross")
    if spikes.empty:
        return grid.assign(spikes=0, excess_ms=0.0)
    long = _split(spikes, causes)
    agg = long.groupby(keys, sort=False).agg(spikes=("has", "sum"), excess_ms=("excess_ms", "sum")).reset_index()
    out = grid.merge(agg, on=keys, how="left")
    return out.fillna({"spikes": 0, "excess_ms": 0.0}).astype({"spikes": int})


def summary_table(reps: pd.DataFrame, spikes: pd.DataFrame) -> pd.DataFrame:
    """Per variant x phase x level x cause: spikes that had the cause (all_spikes: of any cause), excess (ms,
    summed over repetitions) and its share of the row's excess."""
    keys = ["variant", "phase", "mode", "level"]
    t = reps.groupby([*keys, "cause"], sort=False).agg(
        repetitions=("repetition", "nunique"), spikes=("spikes", "sum"), excess_ms=("excess_ms", "sum")
    )
    t = t.reset_index()
    keys4 = ["variant", "repetition", "phase", "level"]
    counted = reps[keys4].drop_duplicates().astype({"level": object}).merge(spikes[keys4].astype({"level": object}))
    n = counted.groupby(["variant", "phase", "level"]).size().rename("all_spikes").reset_index()
    t = t.merge(n, on=["variant", "phase", "level"], how="left").fillna({"all_spikes": 0}).astype({"all_spikes": int})
    total = t.groupby(keys, sort=False)["excess_ms"].transform("sum")
    return t.assign(share=np.where(total > 0, t["excess_ms"] / total.where(total > 0, 1), np.nan))


MECHANISM_ROW, TOTAL_ROW = "mechanism", "total"  # ab rows beside the causes: the hypothesis's own together, and all


def ab_decomposition(
    reps: pd.DataFrame, baseline: str, causes: tuple[str, ...], mechanism: tuple[str, ...], seed: int = 0
) -> pd.DataFrame:
    """Per other variant x phase x level: mean excess per repetition, baseline minus variant, per cause, for the
    mechanism (the hypothesis's causes together) and in total, with each one's share of the total difference;
    bootstrap CIs over repetitions (none with fewer than 2 repetitions a side)."""
    rng = np.random.default_rng(seed)
    rows = []
    shares = (*causes, NONE_FOUND)
    groups = [(c, [i]) for i, c in enumerate(shares)]
    groups += [(MECHANISM_ROW, [shares.index(c) for c in mechanism]), (TOTAL_ROW, list(range(len(shares))))]
    for (phase, level), g in reps.groupby(["phase", "level"], sort=False):
        piv = g.pivot_table(index=["variant", "repetition"], columns="cause", values="excess_ms", aggfunc="sum")
        piv = piv.reindex(columns=list(shares), fill_value=0.0)
        if baseline not in piv.index.get_level_values(0):
            continue
        a = piv.loc[baseline].to_numpy()
        for variant in dict.fromkeys(g["variant"]):
            if variant == baseline:
                continue
            b = piv.loc[variant].to_numpy()
            ia = rng.integers(0, len(a), size=(N_BOOT, len(a)))
            ib = rng.integers(0, len(b), size=(N_BOOT, len(b)))
            boot = a[ia].mean(axis=1) - b[ib].mean(axis=1)  # N_BOOT x cause
            total, boot_total = a.mean(axis=0).sum() - b.mean(axis=0).sum(), boot.sum(axis=1)
            ci = min(len(a), len(b)) >= 2
            for name, cols in groups:
                d = float(a[:, cols].sum(axis=1).mean() - b[:, cols].sum(axis=1).mean())
                bd = boot[:, cols].sum(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    bs = bd / boot_total
                bs = bs[np.isfinite(bs) & (boot_total > 0)]
                rows.append(
                    {
                        "variant": variant,
                        "phase": phase,
                        "mode": g["mode"].iloc[0],
                        "level": level,
                        "cause": name,
                        "baseline_excess_ms": float(a[:, cols].sum(axis=1).mean()),
                        "variant_excess_ms": float(b[:, cols].sum(axis=1).mean()),
                        "diff_ms": d,
                        "diff_ci_lo": float(np.quantile(bd, 0.025)) if ci else np.nan,
                        "diff_ci_hi": float(np.quantile(bd, 0.975)) if ci else np.nan,
                        "share_of_diff": d / total if total > 0 else np.nan,
                        "share_ci_lo": float(np.quantile(bs, 0.025)) if ci and total > 0 and len(bs) else np.nan,
                        "share_ci_hi": float(np.quantile(bs, 0.975)) if ci and total > 0 and len(bs) else np.nan,
                        "n_baseline": len(a),
                        "n_variant": len(b),
                    }
                )
    return pd.DataFrame(rows)


def matching_windows(clocks: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(cell, guest) -> seconds: the worst measured uncertainty of the guest's clock against the kernel under
    test's in that cell (guests without a measurement get the configured window)."""
    c = clocks.dropna(subset=["uncertainty_kut_ms"])
    worst = c.groupby(["cell", "guest"])["uncertainty_kut_ms"].max() / 1e3
    return {(str(k[0]), str(k[1])): float(v) for k, v in zip(worst.index, worst.to_numpy())}


def clock_summary(clocks: pd.DataFrame) -> pd.DataFrame:
    """Per level below the kernel under test: how it was measured, measurements, median and worst uncertainty and
    offset range against it (ms)."""
    c = clocks.dropna(subset=["uncertainty_kut_ms"])
    return (
        c.groupby("level", sort=False)
        .agg(
            methods=("method", lambda m: ", ".join(dict.fromkeys(m))),
            samples=("t", "size"),
            median_uncertainty_ms=("uncertainty_kut_ms", "median"),
            worst_uncertainty_ms=("uncertainty_kut_ms", "max"),
            offset_min_ms=("offset_kut_ms", "min"),
            offset_max_ms=("offset_kut_ms", "max"),
        )
        .reset_index()
    )


def attribute(frames: dict[str, pd.DataFrame], exp: Experiment, baseline: str) -> Attribution:
    """Spikes, their causes, and the tables: from the run's tables alone."""
    hypothesis = hypotheses.get(exp.hypothesis)
    causes = {**hypothesis.causes, **CORE_CAUSES}
    names, mechanism = tuple(causes), tuple(hypothesis.causes)
    windows = cause_windows(frames, hypothesis)
    vm_zaps = frames["vm_zaps"]
    spikes = find_spikes(frames, exp, windows, matching_windows(frames["clocks"]), vm_zaps, causes)
    levels = list(dict.fromkeys(frames["samples"]["level"])) if len(frames["samples"]) else []
    phases = frames["phases"].merge(frames["cells"].loc[frames["cells"]["status"] == "complete", ["cell"]], on="cell")
    reps = by_repetition(spikes, phases, levels, names)
    ab = ab_decomposition(reps, baseline, names, mechanism)
    return Attribution(spikes, windows, summary_table(reps, spikes), reps, ab, vm_zaps, names, mechanism)
