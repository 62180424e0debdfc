"""Crashes are outcomes: a variant whose patch WARNs in the code a pressure phase reaches, and one that panics there,
beside the baseline - one run, the default experiment's config with a short schedule. The warning is on the first
screen and in the `crashes` table for its variant only; the panic is the cell's outcome, said at once on the
terminal and in the report, without a traceback. The same run has a control too weak to deliver its pressure
(its hog fits under its limit): the phase says so and its rows are inconclusive."""

import subprocess
import sys

import pytest
from conftest import L1_ON_DEMAND, mail_lines, sets

from harness import REPO_ROOT
from harness.analysis import analyze

pytestmark = pytest.mark.kernel

PATCHES = REPO_ROOT / "tests" / "data" / "patches"
VARIANTS = (
    f"variants=[{{name: baseline}}, {{name: warns, patches: ['{PATCHES / 'warn-in-shrink-scan.patch'}']}}, "
    f"{{name: panics, patches: ['{PATCHES / 'panic-in-shrink-scan.patch'}']}}]"
)
SHORT = [
    VARIANTS,
    "repetitions=1",
    "boot.retries=0",
    "workload.probe.size_mb=256",
    L1_ON_DEMAND,
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
    assert cells["panics"] == "failed" and cells["baseline"] == cells["warns"] == "complete"
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
