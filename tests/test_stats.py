import numpy as np
import pandas as pd

from harness import stats
from harness.guest.probe import bucket, bucket_bounds


def test_bucket_roundtrip_and_relative_error():
    for v in list(range(0, 300)) + [10**k + 7 for k in range(3, 10)]:
        lo, hi = bucket_bounds(bucket(v))
        assert lo <= v < hi
        if v >= 32:
            assert (hi - lo) / lo <= 1 / 16 + 1e-9


def test_weighted_quantiles_match_numpy_on_unit_weights():
    rng = np.random.default_rng(1)
    x = rng.lognormal(3, 1, 5001)
    got = stats.weighted_quantiles(x, np.ones_like(x), [0.5, 0.99])
    want = np.quantile(x, [0.5, 0.99], method="inverted_cdf")
    assert np.allclose(got, want)


def _hist_samples(rng, variant, rep, scale, n_intervals=30, per=2000):
    rows = []
    for i in range(n_intervals):
        x = rng.exponential(scale, per).astype(int) + 1000
        b = pd.Series([bucket(int(v)) for v in x]).value_counts()
        for k, cnt in b.items():
            lo, hi = bucket_bounds(k)
            rows.append(
                {
                    "variant": variant,
                    "repetition": rep,
                    "cell": f"{variant}{rep}",
                    "guest": "l1-0",
                    "interval": i,
                    "phase": "p",
                    "level": "l1",
                    "latency_ns": (lo + hi) / 2,
                    "lo_ns": lo,
                    "hi_ns": hi,
                    "count": cnt,
                }
            )
    return rows


def test_bootstrap_ci_covers_the_true_percentile():
    rng = np.random.default_rng(2)
    df = pd.DataFrame(_hist_samples(rng, "a", 1, 5000))
    true_p99 = 1000 + 5000 * -np.log(0.01)  # exponential quantile
    lo, hi = stats.bootstrap_quantile_ci(df, [0.99])
    assert lo[0] * 0.94 <= true_p99 <= hi[0] * 1.07  # interval (with bin error) holds the truth


def test_known_shift_is_worse_and_identical_is_no_difference():
    rng = np.random.default_rng(3)
    rows = []
    for rep in range(1, 6):
        rows += _hist_samples(rng, "baseline", rep, 5000, n_intervals=5)
        rows += _hist_samples(rng, "patched", rep, 10000, n_intervals=5)
    samples = pd.DataFrame(rows)
    m = stats.repetition_metrics(samples, pd.DataFrame())
    ab = stats.ab_table(m, "baseline", tcg=False, baseline_shrinker_ran=True)
    p99 = ab[ab["metric"] == "touch p99 (us)"].iloc[0]
    assert p99["verdict"] == "worse"
    assert p99["change_ci_lo"] > 50  # true change ~ +90% (p99 of scale 10000 vs 5000, +1000 offset)
    same = m[m["variant"] == "baseline"].copy()
    same2 = same.copy()
    same2["variant"] = "patched"
    ab2 = stats.ab_table(pd.concat([same, same2]), "baseline", tcg=False, baseline_shrinker_ran=True)
    assert set(ab2["verdict"]) == {"no significant difference"}
    assert stats.ab_table(same, "baseline", tcg=False, baseline_shrinker_ran=True).empty  # the baseline alone


def test_inconclusive_says_why():
    c = stats.compare(np.array([1.0, 1.1, 0.9]), np.array([2.0, 2.1, 1.9]))
    v, why = stats.verdict(c, baseline_shrinker_ran=False)
    assert v == "inconclusive" and "never ran" in why and "worse" in why
    v, why = stats.verdict(stats.compare(np.array([1.0]), np.array([2.0])), baseline_shrinker_ran=True)
    assert v == "inconclusive" and "too few repetitions" in why
    v, _ = stats.verdict(c, baseline_shrinker_ran=True)
    assert v == "worse"  # 3 vs 3, fully separated, Welch p < 0.05: the platform is no reason (it is a label)
