"""Statistics, computed here and only here.

- Percentiles come from the probe's histograms (weighted by bin counts, bin middles as values).
- Confidence intervals for percentiles: a block bootstrap over histogram *intervals* (1 s of
  samples each), pooled over repetitions - resampling whole intervals keeps the strong
  correlation between neighbouring touches (one zap stalls many) instead of pretending
  every touch is independent.
- Baseline vs patched - the model: the unit is the boot (one cell: one variant, one repetition). Each boot
  gives one value per phase x level x metric (that boot's p99.9 over all its touches in the phase, its mean
  pass time), so touches, passes and guests inside a boot - strongly correlated - count once, and what
  varies between boots (where memory lands, when reclaim strikes) is the random effect the comparison
  must beat. Latency values are log-normal-ish and effects multiplicative, so the test works on logs:
  Welch's t on the per-boot log values (primary), the change is the ratio of geometric means - 1 with
  its Welch interval (the same test: p < 0.05 exactly when the interval excludes 0), and each row
  states the smallest fall it could detect (power 0.8, alpha 0.05) from its own spread and n - so a
  *no significant difference* says how large a change the run could have seen. Mann-Whitney U is a second opinion
  only: with 3 vs 3 boots its smallest two-sided p is 0.1, so it can never call a change there.
  tests/test_stats.py checks the model on synthetic boots: false positives <= 5 % with no effect, and
  the power against a 50 % fall at the default design (4 vs 4 boots) and the spread measured here.
- Verdict: *better* / *worse* (lower / higher with the patch), *no significant difference*, or
  *inconclusive: <statistical reason>* (fewer than MIN_REPS boots a side; the hypothesis's precondition
  failed, e.g. its mechanism never acted on the baseline); *not comparable* where the phase's mode does not
  exist on one side (a mode that needs what the variant removed).
- The platform is not a verdict: every row carries one `validity` label (VALIDITY), said once on
  the report. Under TCG the comparison is internally valid (one emulator, one host, interleaved
  repetitions); what does not transfer to hardware is the magnitude.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8  # for the detectable change each row states
MIN_REPS = 3
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p99.9": 0.999}
CI_QUANTILES = ("p50", "p99", "p99.9")
OUTSIDE = ("pre", "post")  # before the first phase (the probe populating its working set) and after the last
VALIDITY = {
    True: "emulated (TCG): the direction holds for this emulated machine; magnitudes do not transfer to hardware",
    False: "hardware virtualization (KVM)",
}
LEVEL_ORDER = ("l2", "l1", "kut")
CLOCK_STALL_NS = 2  # the probe's buckets below 2 ns hold 0 and 1 ns: its clock did not advance between touches


def clock_stalls(samples: pd.DataFrame) -> pd.DataFrame:
    """Touches per variant x level (in the phases) whose two clock reads were 0-1 ns apart: no latency can be
    that short (a touch plus the probe's loop); the guest's clock did not advance, and they are no latency."""
    s = in_phases(samples)
    if s.empty:
        return pd.DataFrame(columns=["variant", "level", "touches"])
    s = s[s["hi_ns"] <= CLOCK_STALL_NS]
    return s.groupby(["variant", "level"], sort=False)["count"].sum().rename("touches").reset_index()


def in_phases(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["phase"].isin(OUTSIDE)] if not df.empty else df


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: list[float]) -> np.ndarray:
    """Quantiles of a weighted sample (the smallest value whose cumulative weight reaches q)."""
    order = np.argsort(values)
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[order]
    cum = np.cumsum(w)
    if cum.size == 0 or cum[-1] <= 0:
        return np.full(len(qs), np.nan)
    idx = np.searchsorted(cum, np.asarray(qs) * cum[-1], side="left")
    return v[np.minimum(idx, len(v) - 1)]


def _interval_matrix(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(bin values, counts[interval, bin]) for one group of samples."""
    piv = df.pivot_table(
        index=["cell", "guest", "interval"], columns="latency_ns", values="count", aggfunc="sum", fill_value=0
    )
    return piv.columns.to_numpy(float), piv.to_numpy(float)


def bootstrap_quantile_ci(
    df: pd.DataFrame, qs: list[float], n_boot: int = 400, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    values, mat = _interval_matrix(df)
    n = mat.shape[0]
    if n < 2:
        return np.full(len(qs), np.nan), np.full(len(qs), np.nan)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(n_boot, n))
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.arange(n_boot)[:, None], picks), 1)
    boot_hist = weights @ mat  # n_boot x bins
    cum = np.cumsum(boot_hist, axis=1)
    est = np.empty((n_boot, len(qs)))
    for j, q in enumerate(qs):
        idx = (cum < q * cum[:, -1:]).sum(axis=1)
        est[:, j] = values[np.minimum(idx, len(values) - 1)]
    a = (1 - level) / 2
    return np.quantile(est, a, axis=0), np.quantile(est, 1 - a, axis=0)


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """count, mean, p50..p99.9, max per variant x phase x level, with bootstrap CIs (ns)."""
    rows = []
    samples = in_phases(samples)
    if samples.empty:
        return pd.DataFrame()
    for (variant, phase, level), g in samples.groupby(["variant", "phase", "level"], sort=False):
        n = g["count"].sum()
        qv = weighted_quantiles(g["latency_ns"].to_numpy(), g["count"].to_numpy(), list(QUANTILES.values()))
        lo, hi = bootstrap_quantile_ci(g, [QUANTILES[k] for k in CI_QUANTILES])
        row = {
            "variant": variant,
            "phase": phase,
            "level": level,
            "count": int(n),
            "mean_ns": float((g["latency_ns"] * g["count"]).sum() / n),
            "max_ns": float(g["hi_ns"].max()),
        }
        row.update({f"{k}_ns": float(v) for k, v in zip(QUANTILES, qv)})
        for k, l, h in zip(CI_QUANTILES, lo, hi):
            row[f"{k}_ci_lo_ns"], row[f"{k}_ci_hi_ns"] = float(l), float(h)
        rows.append(row)
    return pd.DataFrame(rows)


def workload_label(workload: str, metric: str, unit: str) -> str:
    return f"{workload}: {metric} ({unit})" if unit else f"{workload}: {metric}"


def repetition_metrics(
    samples: pd.DataFrame, passes: pd.DataFrame, workload_metrics: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One value per variant x repetition x phase x level x metric: what the A/B compares. A workload's metric
    counts once per boot too: the median of its runs that lay inside the phase (better: which way is an
    improvement; the probe's latencies are better lower)."""
    rows = []
    samples, passes = in_phases(samples), in_phases(passes)
    if not samples.empty:
        for (variant, rep, phase, level), g in samples.groupby(["variant", "repetition", "phase", "level"]):
            p99, p999 = weighted_quantiles(g["latency_ns"].to_numpy(), g["count"].to_numpy(), [0.99, 0.999])
            for metric, val in (("touch p99 (us)", p99 / 1e3), ("touch p99.9 (us)", p999 / 1e3)):
                rows.append(
                    {
                        "variant": variant,
                        "repetition": rep,
                        "phase": phase,
                        "level": level,
                        "metric": metric,
                        "value": float(val),
                    }
                )
    if not passes.empty:
        for (variant, rep, phase, level), g in passes.groupby(["variant", "repetition", "phase", "level"]):
            rows.append(
                {
                    "variant": variant,
                    "repetition": rep,
                    "phase": phase,
                    "level": level,
                    "metric": "pass time mean (ms)",
                    "value": float(g["duration_ms"].mean()),
                }
            )
    wm = in_phases(workload_metrics) if workload_metrics is not None else pd.DataFrame()
    if not wm.empty:
        wm = wm[wm["phase"] != "across"]
        keys = ["variant", "repetition", "phase", "level", "workload", "metric", "unit", "better"]
        for (variant, rep, phase, level, workload, name, unit, better), g in wm.groupby(keys, sort=False):
            rows.append(
                {
                    "variant": variant,
                    "repetition": rep,
                    "phase": phase,
                    "level": level,
                    "metric": workload_label(str(workload), str(name), str(unit)),
                    "value": float(g["value"].median()),
                    "better": better,
                }
            )
    out = pd.DataFrame(rows)
    if not out.empty:
        out["better"] = out["better"].fillna("lower") if "better" in out else "lower"
    return out


def guest_view(passes: pd.DataFrame) -> pd.DataFrame:
    """Per variant x phase x level, what the guests' own kernels saw during the probe's passes: major faults
    per pass and steal time per second of passes (NaN where a guest could not read them)."""
    p = in_phases(passes)
    if p.empty:
        return pd.DataFrame(columns=["variant", "phase", "level", "passes", "majflt_per_pass", "steal_ms_per_s"])
    g = p.groupby(["variant", "phase", "level"], sort=False)
    return pd.DataFrame(
        {
            "passes": g.size(),
            "majflt_per_pass": g["majflt"].mean(),
            "steal_ms_per_s": g["steal_ms"].sum(min_count=1) / (g["duration_ms"].sum() / 1e3),
        }
    ).reset_index()


@dataclass
class Comparison:
    """Patched (b) against baseline (a): one value per boot on each side, on the log scale (the model above)."""

    n_baseline: int
    n_patched: int
    baseline_mean: float  # arithmetic means and spreads, for reading; the test uses the logs
    patched_mean: float
    baseline_sd_pct: float
    patched_sd_pct: float
    welch_p: float = np.nan  # the test: Welch's t on log values (the second opinion is mann_whitney_p())
    change_pct: float = np.nan  # ratio of geometric means - 1, with the Welch interval on the log scale
    change_ci_lo: float = np.nan
    change_ci_hi: float = np.nan
    detectable_pct: float = np.nan  # the smallest fall this spread and n detect with POWER at ALPHA
    note: str = ""  # why there is no test, when there is none

    @property
    def n_min(self) -> int:
        return min(self.n_baseline, self.n_patched)


def _mean_sd_pct(x: np.ndarray) -> tuple[float, float]:
    mean = float(x.mean()) if len(x) else np.nan
    return mean, float(x.std(ddof=1) / mean * 100) if len(x) > 1 and mean else np.nan


def welch_log(la: np.ndarray, lb: np.ndarray) -> tuple[float, float, float]:
    """(mean difference of logs, its standard error, Welch-Satterthwaite degrees of freedom)."""
    va, vb = la.var(ddof=1) / len(la), lb.var(ddof=1) / len(lb)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1)) if se > 0 else len(la) + len(lb) - 2
    return float(lb.mean() - la.mean()), se, float(df)


def compare(a: np.ndarray, b: np.ndarray) -> Comparison:
    """Statistics of patched (b) against baseline (a), without any context-dependent verdict."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    (mean_a, sd_a), (mean_b, sd_b) = _mean_sd_pct(a), _mean_sd_pct(b)
    c = Comparison(len(a), len(b), mean_a, mean_b, sd_a, sd_b)
    if c.n_min < 2:
        return c
    if (a <= 0).any() or (b <= 0).any():
        c.note = "values <= 0 have no log scale"
        return c
    diff, se, df = welch_log(np.log(a), np.log(b))
    if se == 0:  # both sides constant: identical means no change, different means a certain one
        c.welch_p, half = (1.0 if diff == 0 else 0.0), 0.0
    else:
        critical = float(sps.t.ppf(1 - ALPHA / 2, df))
        half = critical * se
        c.welch_p = float(2 * sps.t.sf(abs(diff) / se, df))
        c.detectable_pct = float(-np.expm1(-(critical + sps.t.ppf(POWER, df)) * se) * 100)
    c.change_pct, c.change_ci_lo, c.change_ci_hi = (float(np.expm1(x) * 100) for x in (diff, diff - half, diff + half))
    return c


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float:
    """The verdict table's second opinion, rank-based (it cannot reach 0.05 below 4 vs 4); no verdict reads it, so
    compare() leaves it out (two thirds of its time: the power simulations call compare() thousands of times)."""
    if min(len(a), len(b)) < 2:
        return np.nan
    return float(sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def direction(c: Comparison, better: str = "lower") -> str:
    """What the numbers alone say: better / worse / no significant difference. (Welch p < ALPHA is the same
    as its interval excluding no change: one test, one interval.)"""
    if not c.welch_p < ALPHA:
        return "no significant difference"
    return "worse" if (c.change_pct > 0) == (better == "lower") else "better"


def verdict(c: Comparison, *, precondition: str | None = None, better: str = "lower") -> tuple[str, str]:
    """(verdict, reason). Inconclusive says which condition made it so (precondition: why the hypothesis's
    mechanism makes no comparison meaningful), and what the numbers say."""
    reasons = []
    if c.n_min < MIN_REPS:
        reasons.append(f"too few repetitions ({c.n_baseline} vs {c.n_patched}, need {MIN_REPS})")
    if precondition:
        reasons.append(precondition)
    if c.note:
        reasons.append(c.note)
    if c.n_min < 2 or c.note:
        return "inconclusive", "; ".join(reasons)
    said = direction(c, better)
    if reasons:
        return "inconclusive", "; ".join(reasons) + f" (the numbers alone say: {said})"
    return said, ""


def _after_uncomparable(out: pd.DataFrame, phases: list[str]) -> pd.DataFrame:
    """A phase right after one that is not comparable (pressure on one side only) measures that pressure's
    aftermath on one side only: it says so instead of giving a verdict of its own."""
    for before, phase in itertools.pairwise(phases):
        for variant in out.loc[(out["phase"] == before) & (out["verdict"] == "not comparable"), "variant"].unique():
            mine = (out["phase"] == phase) & (out["variant"] == variant) & (out["verdict"] != "not comparable")
            out.loc[mine, "reason"] = f"follows {before}, which is not comparable: its aftermath is on one side only"
            out.loc[mine, "verdict"] = "not comparable"
    return out


def ab_table(
    metrics: pd.DataFrame,
    baseline: str,
    tcg: bool,
    precondition: str | None = None,
    variants: list[str] | None = None,
    undelivered: dict[tuple[str, str], str] | None = None,
    inapplicable: dict[tuple[str, str], str] | None = None,
    phases: list[str] | None = None,
) -> pd.DataFrame:
    """One row per metric x phase x level x non-baseline variant (every one of `variants`, measured or not),
    in the schedule's order (phases as run, L2 before L1, variants as listed). A row whose phase did not
    deliver its pressure on either side (undelivered: (variant, phase) -> why), or that lacks one side's
    samples, is inconclusive and says so; a row whose phase's mode does not exist on a side (inapplicable)
    is not comparable and says why."""
    rows = []
    if metrics.empty:
        return pd.DataFrame()
    undelivered, inapplicable = undelivered or {}, inapplicable or {}
    order = [v for v in variants or [] if v != baseline]
    for (phase, level, metric), g in metrics.groupby(["phase", "level", "metric"], sort=False):
        better = str(g["better"].iloc[0]) if "better" in g else "lower"
        a = g[g["variant"] == baseline]["value"].to_numpy()
        measured = sorted(set(g["variant"]) - {baseline} - set(order))
        for variant in [*order, *measured]:
            b = g[g["variant"] == variant]["value"].to_numpy()
            c = compare(a, b)
            v, why = verdict(c, precondition=precondition, better=better)
            blocked = [undelivered[k] for k in ((baseline, phase), (variant, phase)) if k in undelivered]
            blocked += [f"no samples from {name}" for name, x in ((baseline, a), (variant, b)) if len(x) == 0]
            if blocked:
                v, why = "inconclusive", "; ".join([*blocked, why] if why else blocked)
            facts = [inapplicable[k] for k in ((baseline, phase), (variant, phase)) if k in inapplicable]
            if facts:
                v, why = "not comparable", "; ".join(facts) + ": pressure on one side, none on the other"
            rows.append(
                {
                    "phase": phase,
                    "level": level,
                    "metric": metric,
                    "variant": variant,
                    **asdict(c),
                    "mwu_p": mann_whitney_p(a, b),
                    "verdict": v,
                    "reason": why,
                }
            )
    if not rows:  # the baseline alone: nothing to compare
        return pd.DataFrame()
    out = _after_uncomparable(pd.DataFrame(rows), phases or [])
    out["validity"] = VALIDITY[tcg]
    rank = {p: i for i, p in enumerate(phases or [])}
    metric_rank = {m: i for i, m in enumerate(dict.fromkeys(metrics["metric"]))}
    key = out["phase"].map(lambda p: rank.get(p, len(rank))).astype(float) * 1e6
    key += out["level"].map(lambda lv: LEVEL_ORDER.index(lv) if lv in LEVEL_ORDER else len(LEVEL_ORDER)) * 1e3
    key += out["metric"].map(metric_rank).astype(float)
    return out.assign(_order=key).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
