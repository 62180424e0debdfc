"""Crashes are outcomes: a variant whose patch WARNs in the code a pressure phase reaches, one that panics there and
one that deadlocks there, beside the baseline - one run, the default experiment's config with a short schedule. The
warning is on the first screen and in the `crashes` table for its variant only; the panic is the cell's outcome,
said at once on the terminal and in the report, without a traceback; the deadlock is given up when its phase should
have ended, not at the cell's budget, and is a freeze in that phase. The same run has a control too weak to deliver
its pressure (its hog fits under its limit): the phase says so and its rows are inconclusive."""

import json
import subprocess
import sys

import pytest
from conftest import KUT_ONE_CPU, L1_ON_DEMAND, mail_lines, sets

from harness import REPO_ROOT
from harness.analysis import analyze

pytestmark = pytest.mark.kernel

PATCHES = REPO_ROOT / "tests" / "data" / "patches"
VARIANTS = (
    f"variants=[{{name: baseline}}, {{name: warns, patches: ['{PATCHES / 'warn-in-shrink-scan.patch'}']}}, "
    f"{{name: panics, patches: ['{PATCHES / 'panic-in-shrink-scan.patch'}']}}, "
    f"{{name: deadlocks, patches: ['{PATCHES / 'deadlock-in-shrink-scan.patch'}']}}]"
)
OVERRUN_S = 30  # how long past a phase's length the host waits for its end (checks.max_phase_overrun_s)
SHORT = [
    VARIANTS,
    "repetitions=1",
    "boot.retries=0",
    f"checks.max_phase_overrun_s={OVERRUN_S}",
    "workload.probe.size_mb=256",
    L1_ON_DEMAND,
    KUT_ONE_CPU,  # two cells at a time; with two CPUs its kernel under test froze in 2 of 2 runs, once the baseline's
    "pressure.memcg-limit.hog_mb=16",  # fits under its limit_mb (64): the control never reaches its limit
    "phases=[{name: steady, duration_s: 5}, {name: weak-control, duration_s: 6, pressure: memcg-limit}, "
    "{name: shrinker-scan, duration_s: 8, pressure: shrinker-scan}, {name: recovery, duration_s: 4}]",
]


@pytest.fixture(scope="module")
def crashed(builds, qemu, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "harness", *"experiment --config shrinker-ab --run-id crash".split()]
    cmd += ["--output", str(out), *sets(SHORT)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-4000:])
    run_dir = out / "shrinker-ab" / "crash"
    return {"r": r, "run_dir": run_dir, "analysis": analyze(run_dir)}


def test_a_panic_is_the_cells_outcome_said_at_once_and_never_a_traceback(crashed):
    r, a = crashed["r"], crashed["analysis"]
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout  # a cell failed: the run says so, cleanly
    assert "cell panics.r1 attempt 1: kut logged a panic" in r.stderr
    cells = a.cells.set_index("variant")["status"]
    assert cells["panics"] == cells["deadlocks"] == "failed" and cells["baseline"] == cells["warns"] == "complete"
    c = a.frames["crashes"]
    panic = c[(c["variant"] == "panics") & (c["kind"] == "panic")]
    assert len(panic) == 1 and "nestpress test: mmu_shrink_scan asked for" in panic["said"].iloc[0]
    assert panic["level"].iloc[0] == "kut" and panic["phase"].iloc[0] == "shrinker-scan"
    outcomes = a.outcomes.set_index("variant")
    assert outcomes.loc["panics", "crashed"] == outcomes.loc["panics", "boots"] == 1
    assert any("PANIC" in line for line in mail_lines(crashed["run_dir"]))  # a failed run has its mail too


def test_a_warning_is_on_the_first_screen_for_its_variant_only(crashed):
    a = crashed["analysis"]
    c = a.frames["crashes"]
    ours = c[c["said"].str.contains("arch/x86/kvm/mmu/mmu.c", regex=False)]  # (L1's boot may WARN on its own)
    assert set(ours["variant"]) == {"warns"} and set(ours["kind"]) == {"warn"}, c[["variant", "kind", "said"]]
    assert set(ours["level"]) == {"kut"} and ours["frames"].iloc[0] and ours["phase"].iloc[0] == "shrinker-scan"
    assert not c[c["variant"] == "baseline"]["said"].str.contains("nestpress test|mmu.c", regex=True).any()
    first = (crashed["run_dir"] / "report.md").read_text().split("## Verdict")[0]
    assert "**WARN** on `warns` in 1 of 1 boots" in first and "**PANIC** on `panics` in 1 of 1 boots" in first
    assert a.outcomes.set_index("variant").loc["warns", "warned"] == 1


def test_pressure_not_delivered_is_said_and_its_rows_are_inconclusive(crashed):
    report = crashed["analysis"]
    weak = report.evidence[report.evidence["phase"] == "weak-control"]
    assert len(weak) and weak["delivery"].eq("not delivered").all()
    assert weak["delivery_reason"].str.contains("max\\+high \\+0").all()
    others = report.evidence[~report.evidence["phase"].isin(["weak-control", "shrinker-scan"])]
    assert others["delivery"].eq("delivered").all(), others[["cell", "phase", "delivery_reason"]]
    rows = report.ab[(report.ab["phase"] == "weak-control") & (report.ab["variant"] == "warns")]
    assert len(rows) and rows["verdict"].eq("inconclusive").all()
    assert rows["reason"].str.contains("pressure not delivered on baseline").all()
    assert not report.ab[report.ab["phase"] == "steady"]["reason"].str.contains("not delivered").any()
    first_screen = (crashed["run_dir"] / "report.md").read_text().split("## Verdict")[0]
    assert "Phase `weak-control`: pressure not delivered on baseline" in first_screen


def test_a_deadlock_is_given_up_when_its_phase_should_have_ended_and_is_a_freeze_in_it(crashed):
    """mmu_lock taken twice in the shrinker's scan: the kernel under test records nothing after shrinker-scan starts.
    The host gives its cell up the overrun after the phase's length (its budget is minutes longer) and says so."""
    r, a, run_dir = crashed["r"], crashed["analysis"], crashed["run_dir"]
    stage = "phase shrinker-scan (shrinker-scan, 8s)"
    assert f"went silent (its phase not ended {OVERRUN_S} s after its length; last stage: {stage})" in r.stderr
    c = a.frames["crashes"]
    froze = c[(c["variant"] == "deadlocks") & (c["kind"] == "freeze")]
    assert len(froze) == 1 and froze["phase"].iloc[0] == "shrinker-scan" and froze["level"].iloc[0] == "kut"
    assert a.outcomes.set_index("variant").loc["deadlocks", "stalled"] == 1
    cell_dir = run_dir / "cells" / "deadlocks.r1"
    events = [json.loads(line) for line in (cell_dir / "events.jsonl").read_text().splitlines()]
    started = next(e["t"] for e in events if e["kind"] == "phase_start" and e["phase"] == "shrinker-scan") / 1e9
    assert not any(e["kind"] == "phase_end" and e["phase"] == "shrinker-scan" for e in events)
    given_up = (cell_dir / "host-freeze.json").stat().st_mtime  # written once its QEMU is off
    assert 8 + OVERRUN_S - 2 <= given_up - started < 8 + OVERRUN_S + 20  # the guest's clock within 2 s of the host's
