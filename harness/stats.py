"""Statistics, computed here and only here.

- Percentiles come from the probe's histograms (weighted by bin counts, bin middles as values).
- Confidence intervals for percentiles: a block bootstrap over histogram *intervals* (1 s of
  samples each), pooled over repetitions - resampling whole intervals keeps the strong
  correlation between neighbouring touches (one zap stalls many) instead of pretending
  every touch is independent.
- Baseline vs patched: one value per repetition (e.g. that repetition's p99 in a phase),
  compared with Mann-Whitney U (primary) and Welch's t (second opinion); %change is
  mean(patched)/mean(baseline) - 1 with a bootstrap interval over repetitions.
- Verdict: *better* / *worse* (lower / higher latency with the patch), *no significant
  difference*, or *inconclusive: <statistical reason>*. A change is called when MWU p < 0.05, or -
  since with 3 vs 3 repetitions the smallest two-sided MWU p is 0.1 - when the two groups do
  not overlap at all and Welch's p < 0.05 (LKP's rule: >= 3 samples, non-overlapping ranges);
  and the %change interval must exclude 0. *not comparable* where the phase's mode does not
  exist on one side (shrinker-scan on a kernel without the shrinker).
- The platform is not a verdict: every row carries one `validity` label (VALIDITY), said once on
  the report. Under TCG the comparison is internally valid (one emulator, one host, interleaved
  repetitions); what does not transfer to hardware is the magnitude.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

ALPHA = 0.05
MIN_REPS = 3
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p99.9": 0.999}
CI_QUANTILES = ("p50", "p99", "p99.9")
OUTSIDE = ("pre", "post")  # before the first phase (the probe populating its working set) and after the last
VALIDITY = {
    True: "emulated (TCG): the direction holds for this emulated machine; magnitudes do not transfer to hardware",
    False: "hardware virtualization (KVM)",
}
LEVEL_ORDER = ("l2", "l1")
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


def repetition_metrics(samples: pd.DataFrame, passes: pd.DataFrame) -> pd.DataFrame:
    """One value per variant x repetition x phase x level x metric: what the A/B compares."""
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
    return pd.DataFrame(rows)


def separated(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a.max() < b.min() or b.max() < a.min())


def pct_change_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    est = (b.mean() / a.mean() - 1) * 100
    ra = rng.choice(a, size=(n_boot, len(a))).mean(axis=1)
    rb = rng.choice(b, size=(n_boot, len(b))).mean(axis=1)
    boot = (rb / ra - 1) * 100
    return float(est), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Statistics of patched (b) against baseline (a), without any context-dependent verdict."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {
        "n_baseline": len(a),
        "n_patched": len(b),
        "baseline_mean": float(a.mean()) if len(a) else np.nan,
        "patched_mean": float(b.mean()) if len(b) else np.nan,
        "baseline_sd_pct": float(a.std(ddof=1) / a.mean() * 100) if len(a) > 1 and a.mean() else np.nan,
        "patched_sd_pct": float(b.std(ddof=1) / b.mean() * 100) if len(b) > 1 and b.mean() else np.nan,
        "mwu_p": np.nan,
        "welch_p": np.nan,
        "change_pct": np.nan,
        "change_ci_lo": np.nan,
        "change_ci_hi": np.nan,
        "separated": False,
    }
    if len(a) and len(b) and a.mean() > 0:
        out["change_pct"], out["change_ci_lo"], out["change_ci_hi"] = pct_change_ci(a, b)
    if len(a) >= 2 and len(b) >= 2:
        out["mwu_p"] = float(sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        if a.std() > 0 or b.std() > 0:
            out["welch_p"] = float(sps.ttest_ind(a, b, equal_var=False).pvalue)
        else:
            out["welch_p"] = 1.0 if a.mean() == b.mean() else 0.0
        out["separated"] = separated(a, b)
    return out


def direction(c: dict) -> str:
    """What the numbers alone say: better / worse / no significant difference."""
    significant = (c["mwu_p"] < ALPHA) or (c["separated"] and c["welch_p"] < ALPHA)
    excludes_zero = c["change_ci_lo"] > 0 or c["change_ci_hi"] < 0
    if not (significant and excludes_zero):
        return "no significant difference"
    return "worse" if c["change_pct"] > 0 else "better"


def verdict(c: dict, *, baseline_shrinker_ran: bool) -> tuple[str, str]:
    """(verdict, reason). Inconclusive says which condition made it so, and what the numbers say."""
    reasons = []
    if min(c["n_baseline"], c["n_patched"]) < MIN_REPS:
        reasons.append(f"too few repetitions ({c['n_baseline']} vs {c['n_patched']}, need {MIN_REPS})")
    if not baseline_shrinker_ran:
        reasons.append("the baseline never ran the x86-mmu shrinker")
    if min(c["n_baseline"], c["n_patched"]) < 2:
        return "inconclusive", "; ".join(reasons)
    said = direction(c)
    if reasons:
        return "inconclusive", "; ".join(reasons) + f" (the numbers alone say: {said})"
    return said, ""


def ab_table(
    metrics: pd.DataFrame,
    baseline: str,
    tcg: bool,
    baseline_shrinker_ran: bool,
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
        a = g[g["variant"] == baseline]["value"].to_numpy()
        measured = sorted(set(g["variant"]) - {baseline} - set(order))
        for variant in [*order, *measured]:
            b = g[g["variant"] == variant]["value"].to_numpy()
            c = compare(a, b)
            v, why = verdict(c, baseline_shrinker_ran=baseline_shrinker_ran)
            blocked = [undelivered[k] for k in ((baseline, phase), (variant, phase)) if k in undelivered]
            blocked += [f"no samples from {name}" for name, x in ((baseline, a), (variant, b)) if len(x) == 0]
            if blocked:
                v, why = "inconclusive", "; ".join([*blocked, why] if why else blocked)
            facts = [inapplicable[k] for k in ((baseline, phase), (variant, phase)) if k in inapplicable]
            if facts:
                v, why = "not comparable", "; ".join(facts) + ": pressure on one side, none on the other"
            rows.append(
                {"phase": phase, "level": level, "metric": metric, "variant": variant, **c, "verdict": v, "reason": why}
            )
    if not rows:  # the baseline alone: nothing to compare
        return pd.DataFrame()
    out = pd.DataFrame(rows)
    out["validity"] = VALIDITY[tcg]
    rank = {p: i for i, p in enumerate(phases or [])}
    metric_rank = {m: i for i, m in enumerate(dict.fromkeys(metrics["metric"]))}
    key = out["phase"].map(lambda p: rank.get(p, len(rank))).astype(float) * 1e6
    key += out["level"].map(lambda lv: LEVEL_ORDER.index(lv) if lv in LEVEL_ORDER else len(LEVEL_ORDER)) * 1e3
    key += out["metric"].map(metric_rank).astype(float)
    return out.assign(_order=key).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
