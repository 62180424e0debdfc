"""Attribution on synthetic tables whose causes are known: which spikes overlap which cause events, how the
excess is split, and how the A/B difference decomposes. The e2e tests check it on real runs."""

import numpy as np
import pandas as pd
import pytest

from harness import hypotheses
from harness.analysis import attribution as at
from harness.config import Experiment
from harness.results.tables import COLUMNS

EXP = Experiment.model_validate(
    {
        "name": "t",
        "source": {"kind": "local", "path": "/nonexistent"},
        "variants": [{"name": "baseline"}, {"name": "patched"}],
        "phases": [{"name": "steady", "duration_s": 10}, {"name": "global", "duration_s": 10, "pressure": "global"}],
    }
)


class Run:
    """Tables of a run being written: one call per fact, as the results stage would have produced them."""

    def __init__(self):
        self.rows = {t: [] for t in COLUMNS}

    def cell(self, variant, rep, l2=False):
        cell = f"{variant}.r{rep}"
        base = {"variant": variant, "repetition": rep, "cell": cell}
        self.rows["cells"].append({**base, "status": "complete"})
        self.rows["phases"] += [
            {**base, "phase": "steady", "mode": "none", "t_start": 0.0, "t_end": 10.0},
            {**base, "phase": "global", "mode": "global", "t_start": 10.0, "t_end": 20.0},
        ]
        for guest, level in [("l1-0", "l1")] + ([("l2-0", "l2")] if l2 else []):
            # undisturbed: 99.9 % at 20 us, 0.1 % at 500 us -> threshold max(p99.9, 1 ms) = 1 ms, p99 = 20 us
            for lat, n in ((20_000, 999), (500_000, 1)):
                self.rows["samples"].append(
                    {**base, "level": level, "guest": guest, "phase": "steady", "t": 5.0, "latency_ns": lat, "count": n}
                )
        if l2:
            self.rows["events"].append(
                {**base, "level": "l1", "guest": "l1-0", "kind": "boot_start", "t": 0.0, "subject": "l2-0"}
            )
        return cell

    @staticmethod
    def base(cell):
        variant, rep = cell.split(".r")
        return {"variant": variant, "repetition": int(rep), "cell": cell}

    def spike(self, cell, t_end, ms, guest="l1-0", level="l1"):
        self.rows["outliers"].append(
            {**self.base(cell), "level": level, "guest": guest, "t": t_end, "latency_ns": ms * 1e6}
        )

    def trace(self, cell, kind, t, **fields):
        self.rows["trace"].append({**self.base(cell), "kind": kind, "t": t, **fields})

    def zap(self, cell, t0, t1, freed=100, pid=7):
        self.trace(cell, "shrink_start", t0, cache_items=1, pid=pid)
        self.trace(cell, "shrink_end", t1, freed=freed, pid=pid)

    def stall(self, cell, t0, t1, guest="l1-0", pid=9):
        self.trace(cell, "direct_reclaim_begin", t0, pid=pid, guest=guest)
        self.trace(cell, "direct_reclaim_end", t1, pid=pid, guest=guest, nr_reclaimed=3)

    def vm_zap(self, cell, guest, t, since_s, zapped):
        step = {"source": "sampler", "guest": guest, "t0": t - since_s, "t1": t, "zapped": zapped, "recycled": 0}
        self.rows["vm_zaps"].append({**self.base(cell), **step})

    def scan(self, cell, t, seconds):
        self.rows["pressure"].append(
            {
                **self.base(cell),
                "mode": "shrinker-scan",
                "kind": "shrinker_scan",
                "t": t,
                "count": 1024,
                "seconds": seconds,
            }
        )

    def majflt(self, cell, guest, points):
        variant, rep = cell.split(".r")
        for t, v in points:
            self.rows["counters"].append(
                {
                    "variant": variant,
                    "repetition": int(rep),
                    "cell": cell,
                    "source": "qemu",
                    "name": f"qemu.{guest}.majflt",
                    "t": t,
                    "value": v,
                }
            )

    def frames(self):
        return {t: pd.DataFrame(r, columns=COLUMNS[t]) for t, r in self.rows.items()}


SHRINKER = hypotheses.get("kvm-mmu-shrinker")
CAUSES = {**SHRINKER.causes, **at.CORE_CAUSES}
SHRINKER_ZAP, ZAP_REFAULT = "shrinker-zap", "zap-refault"


def spikes_of(run, **kw):
    frames = run.frames()
    windows = at.cause_windows(frames, SHRINKER)
    return at.find_spikes(frames, EXP, windows, kw.get("slack", {}), frames["vm_zaps"], CAUSES).set_index("t")


def test_each_spike_gets_the_causes_it_overlaps_and_none_found_otherwise():
    run = Run()
    c = run.cell("baseline", 1)
    run.zap(c, 11.000, 11.050)  # freed shadow pages
    run.zap(c, 12.000, 12.050, freed=0, pid=8)  # a call that freed nothing zapped nothing
    run.stall(c, 13.000, 13.020)
    run.stall(c, 14.000, 14.020, guest="other")  # another guest's QEMU stalled
    run.majflt(c, "l1-0", [(14.5, 10), (15.0, 10), (15.5, 25)])  # faults rose in (15.0, 15.5]
    run.spike(c, 11.060, 30)  # began 11.030: inside the zap
    run.spike(c, 12.060, 30)  # the empty call only
    run.spike(c, 13.010, 5)  # inside the stall
    run.spike(c, 14.010, 5)  # the other guest's stall
    run.spike(c, 15.200, 5)  # swap-in interval
    run.spike(c, 16.000, 0.9)  # below the 1 ms floor: not a spike
    run.spike(c, 11.045, 30)  # zap and (ended 11.045, began 11.015) - only the zap
    s = spikes_of(run)
    assert s.loc[11.060, "causes"] == SHRINKER_ZAP
    assert s.loc[12.060, "causes"] == at.NONE_FOUND
    assert s.loc[13.010, "causes"] == at.DIRECT_RECLAIM
    assert s.loc[14.010, "causes"] == at.NONE_FOUND
    assert s.loc[15.200, "causes"] == at.SWAP_IN
    assert 16.0 not in s.index
    assert (s["phase"] == "global").all()
    assert s.loc[11.060, "excess_ns"] == pytest.approx(30e6 - 20_000)


def test_a_spike_says_whether_its_own_vm_lost_shadow_pages_meanwhile():
    run = Run()
    c = run.cell("baseline", 1, l2=True)
    run.zap(c, 11.000, 11.300)
    run.vm_zap(c, "l1-0", 11.200, 0.1, zapped=40)  # the L1's VM lost 40 shadow pages in (11.1, 11.2]
    run.vm_zap(c, "other", 12.100, 0.1, zapped=9)  # another VM's step
    run.spike(c, 11.150, 20)  # L1, began 11.130: inside its VM's step
    run.spike(c, 11.160, 20, guest="l2-0", level="l2")  # L2 runs in the L1's VM
    run.spike(c, 11.290, 5)  # the call still ran, but this VM's step had passed: another VM's pages
    run.spike(c, 12.080, 5)  # only another VM zapped
    s = spikes_of(run)
    assert list(s.loc[[11.150, 11.160, 11.290, 12.080], "own_vm_zapped"]) == [True, True, False, False]
    assert (s.loc[[11.150, 11.290], "causes"] == SHRINKER_ZAP).all()  # the cause is the call, per-VM or not
    steps = run.frames()["vm_zaps"]
    assert list(steps["zapped"]) == [40, 9] and steps["t0"].iloc[0] == pytest.approx(11.1)


def test_the_matching_window_is_the_clock_uncertainty():
    run = Run()
    c = run.cell("baseline", 1)
    run.zap(c, 11.000, 11.010)
    run.spike(c, 11.015, 2)  # began 11.013: 3 ms after the zap ended
    assert spikes_of(run, slack={(c, "l1-0"): 0.002}).loc[11.015, "causes"] == at.NONE_FOUND
    assert spikes_of(run, slack={(c, "l1-0"): 0.004}).loc[11.015, "causes"] == SHRINKER_ZAP


def test_an_l2_spike_is_matched_to_its_l1s_qemu_and_several_causes_split_the_excess():
    run = Run()
    c = run.cell("baseline", 1, l2=True)
    run.zap(c, 11.000, 11.100)
    run.stall(c, 11.000, 11.100, guest="l1-0")
    run.spike(c, 11.050, 21, guest="l2-0", level="l2")
    s = spikes_of(run)
    assert s.loc[11.050, "causes"] == "shrinker-zap+direct-reclaim"
    reps = at.by_repetition(s.reset_index(), run.frames()["phases"], ["l2"], tuple(CAUSES))
    g = reps[(reps["phase"] == "global")].set_index("cause")["excess_ms"]
    assert g[SHRINKER_ZAP] == pytest.approx(g[at.DIRECT_RECLAIM]) == pytest.approx((21 - 0.02) / 2)
    assert g[at.NONE_FOUND] == 0 and g[at.SWAP_IN] == 0


def test_after_a_zap_the_guest_refaulting_for_one_more_probe_pass_is_zap_refault():
    run = Run()
    c = run.cell("baseline", 1)
    for end in (11.0, 11.5, 12.0, 12.5, 13.0):  # the probe's passes take 0.5 s
        run.rows["passes"].append(
            {"variant": "baseline", "repetition": 1, "cell": c, "level": "l1", "guest": "l1-0", "t": end}
        )
    run.zap(c, 11.1, 11.2)  # in the pass that ends at 11.5: pages before its position refault in the next
    run.spike(c, 11.9, 3)  # in the next pass: refaulting
    run.spike(c, 12.3, 3)  # a pass later: not the zap's
    s = spikes_of(run)
    assert s.loc[11.9, "causes"] == ZAP_REFAULT and s.loc[12.3, "causes"] == at.NONE_FOUND


def test_debugfs_scans_are_shrinker_zaps_over_the_span_they_took():
    run = Run()
    c = run.cell("baseline", 1)
    run.scan(c, 11.100, seconds=0.08)
    run.spike(c, 11.050, 10)
    assert spikes_of(run).loc[11.050, "causes"] == SHRINKER_ZAP


def _ab_run(zap_ms_baseline, other_ms, reps=4):
    """baseline: per repetition one zap spike and one unexplained spike; patched: only the unexplained one."""
    run = Run()
    for rep in range(1, reps + 1):
        for variant in ("baseline", "patched"):
            c = run.cell(variant, rep)
            run.spike(c, 15.0, other_ms[rep - 1])
            if variant == "baseline":
                run.zap(c, 12.0, 12.2)
                run.spike(c, 12.1, zap_ms_baseline[rep - 1])
    return run


def test_ab_differences_add_up_and_the_zap_share_is_what_it_explains():
    run = _ab_run([40, 50, 60, 50], [5, 6, 5, 6])
    a = at.attribute(run.frames(), EXP, "baseline")
    ab = a.ab[(a.ab["phase"] == "global")].set_index("cause")
    assert ab.loc[list(a.shares), "diff_ms"].sum() == pytest.approx(ab.loc["total", "diff_ms"])
    assert ab.loc[SHRINKER_ZAP, "diff_ms"] == pytest.approx(50 - 0.02)
    assert ab.loc[SHRINKER_ZAP, "share_of_diff"] == pytest.approx(1.0)
    assert ab.loc["total", "diff_ci_lo"] > 0
    steady = a.ab[(a.ab["phase"] == "steady") & (a.ab["cause"] == "total")]
    assert steady["diff_ms"].iloc[0] == 0  # no spike in a repetition is a 0, not a missing value
    t = a.table[(a.table["variant"] == "baseline") & (a.table["phase"] == "global")].set_index("cause")
    assert t["all_spikes"].iloc[0] == 8 and t.loc[SHRINKER_ZAP, "spikes"] == 4
    assert t["share"].sum() == pytest.approx(1.0)


def test_no_effect_gives_a_difference_whose_interval_covers_zero():
    rng = np.random.default_rng(3)
    run = Run()
    for rep in range(1, 5):
        for variant in ("baseline", "patched"):
            c = run.cell(variant, rep)
            for t in 10.5 + np.sort(rng.uniform(0, 9, 20)):
                run.spike(c, float(t), float(rng.uniform(2, 8)))
    ab = at.attribute(run.frames(), EXP, "baseline").ab.set_index(["phase", "cause"])
    lo, hi = ab.loc[("global", "total"), ["diff_ci_lo", "diff_ci_hi"]]
    assert lo < 0 < hi


def test_a_run_that_measured_nothing_yet_has_empty_tables_not_an_error():
    """An interrupted run still gets its report: no samples, or not even a phase."""
    empty = Run().frames()
    a = at.attribute(empty, EXP, "baseline")
    assert a.spikes.empty and a.table.empty and a.ab.empty
    run = Run()
    run.cell("baseline", 1)
    frames = run.frames()
    frames["samples"] = frames["samples"].iloc[0:0]
    a = at.attribute(frames, EXP, "baseline")
    assert a.spikes.empty and a.ab.empty
