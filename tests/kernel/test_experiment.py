"""The default experiment end to end, exactly as a user runs it, with shorter phases and one
repetition set through --set (the same config). Asserts the science, not just that files exist."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from conftest import assert_every_phase_delivered, mail_lines, phase_row, sets

from harness import REPO_ROOT
from harness.analysis import analyze
from harness.errors import ResultsError
from harness.guest.contract import OUT
from harness.machine.host import decide_accel, decide_topology, qemu_installs
from harness.report import generate
from harness.results.tables import load as load_tables

pytestmark = pytest.mark.kernel

HOSTILE_GUEST = "![x](plots/../../../../etc/hostname) <script>"
PLANTS = [
    "uname -r",
    f"cd {OUT} && ln -s /etc/hostname planted && cp /bin/true suid && chmod 6755 suid",
    "{ printf %.0s[ $(seq 3000); echo; } >> events.jsonl",
    "echo " + shlex.quote(json.dumps({"t": 10**400, "kind": "ready"})) + " >> events.jsonl",
    "echo " + shlex.quote(json.dumps({"t": 1, "kind": "guest_died", "guest": HOSTILE_GUEST})) + " >> events.jsonl",
]
QUICK = [
    "repetitions=1",
    "phases.steady.duration_s=6",
    "phases.memcg-limit.duration_s=10",
    "phases.gap-1.duration_s=5",
    "phases.global.duration_s=25",
    "phases.recovery-1.duration_s=8",
    "phases.shrinker-scan.duration_s=9",
    "phases.recovery-2.duration_s=5",
    # L1 also plants a link and a setuid file in its export: the host must keep neither in results/; and it writes
    # records no reader should take (nested 3000 deep, a number past any measurement, markup that would inline a
    # host file) into its own events: the run goes on, the report names them and never renders them
    "workload.command=" + json.dumps(["sh", "-c", "; ".join(PLANTS)]),
]


@pytest.fixture(scope="session")
def e2e(builds, qemu, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "harness", *"experiment --config shrinker-ab --run-id e2e".split()]
    cmd += ["--output", str(out), *sets(QUICK)]
    env = dict(os.environ, COLUMNS="400")  # terminal lines unfolded, to be read back whole
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400, env=env)
    print(r.stdout[-5000:], r.stderr[-5000:])
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "shrinker-ab" / "e2e"
    frames = load_tables(run_dir)
    return {
        "run_dir": run_dir,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "frames": frames,
        "evidence": analyze(run_dir).evidence,
        "cmd": cmd,
    }


def test_run_is_complete_and_states_what_it_ran_on(e2e):
    m = json.loads((e2e["run_dir"] / "manifest.json").read_text())
    accel = decide_accel("auto").accel
    assert m["status"] == "complete" and m["accel"]["kut"] == accel
    assert m["topology"] == decide_topology("auto", accel, qemu_installs(), 2).kind  # what auto chose here
    if accel == "tcg":
        assert "TCG" in e2e["stderr"] and "NOT KVM" in m["accel"]["banner"]
    assert m["builds"]["patched"]["patch_variant"] == "v6.0-6.6" and m["builds"]["patched"]["patches"]
    assert e2e["frames"]["cells"]["status"].eq("complete").all()


def test_l1_runs_on_kvm_with_the_paging_its_topology_asks_for_and_its_command_output_comes_back(e2e):
    cell = e2e["run_dir"] / "cells" / "baseline.r1"
    kut = json.loads((cell / "facts.json").read_text())
    tdp = kut["kvm_params"].get("kvm_amd.npt", kut["kvm_params"].get("kvm_intel.ept"))
    shadow = json.loads((e2e["run_dir"] / "manifest.json").read_text())["topology"] == "shadow"
    assert tdp == ("N" if shadow else "Y")
    l1 = json.loads((cell / "l1-0" / "facts.json").read_text())
    assert l1["runs_on_kvm"], l1["hypervisor_line"]
    assert (cell / "l1-0" / "command.stdout").read_text().startswith("6.1.")
    assert (cell / "l1-0" / "command.exit").read_text().strip() == "0"
    assert not (cell / "l1-0" / "planted").is_symlink() and not (cell / "l1-0" / "suid").stat().st_mode & 0o7022
    assert "results export: 9p security_model=mapped-xattr" in e2e["stderr"]  # this host's ext4 has user xattrs
    c = e2e["frames"]["counters"]
    assert c[(c["cell"] == "baseline.r1") & (c["name"] == "kvm.pages_4k")]["value"].max() > 0
    assert c[(c["cell"] == "baseline.r1") & (c["name"] == "kvm.mmu_cache_miss")]["value"].max() > 0


def test_baseline_shrinker_runs_under_pressure_that_reaches_it(e2e):
    evidence = e2e["evidence"]
    scan = phase_row(evidence, "baseline", "shrinker-scan")
    assert scan["shrinker_present"] and scan["shrinker_calls"] > 0 and scan["mmu_recycled"] > 0
    glob = phase_row(evidence, "baseline", "global")
    assert glob["pgscan_kswapd"] + glob["pgscan_direct"] > 0  # global reclaim really happened


def test_patched_has_no_shrinker_and_no_shrinker_zapping(e2e):
    evidence = e2e["evidence"]
    pat = evidence[evidence["variant"] == "patched"]
    assert not pat["shrinker_present"].any()
    assert pat["shrinker_calls"].sum() == 0 and pat["mmu_recycled"].fillna(0).sum() == 0
    facts = json.loads((e2e["run_dir"] / "cells" / "patched.r1" / "facts.json").read_text())
    assert not any(d.startswith("x86-mmu-") for d in facts["shrinker_dirs"]) and facts["functions_in_kallsyms"] == []
    base = json.loads((e2e["run_dir"] / "cells" / "baseline.r1" / "facts.json").read_text())
    assert base["functions_in_kallsyms"] == ["mmu_shrink_scan"]  # the hypothesis's scan function, looked up
    e = e2e["frames"]["events"]
    assert ((e["cell"] == "patched.r1") & (e["kind"] == "pressure_unavailable")).any()
    glob = phase_row(evidence, "patched", "global")
    assert glob["pgscan_kswapd"] + glob["pgscan_direct"] > 0


def test_spikes_coincide_with_shrinker_zapping_only_where_it_ran_and_mostly_where_it_was_forced(e2e):
    """Section 3's sanity, on the real run: none on the patched kernel (no shrinker) nor under the memcg control
    (a memcg's reclaim does not call it); on the baseline's shrinker-scan, most of the tail excess is zapping. Most
    of what is not swap-in: 8 s after global here, L1 still swaps back in what global pushed out (measured: zapping
    54 % and swap-in 42 % of the excess in one run, zapping 92 % of the rest)."""
    a = analyze(e2e["run_dir"]).attribution
    s = a.spikes
    zapping = s["shrinker-zap"] | s["zap-refault"]
    assert len(s[s["variant"] == "patched"]) and not zapping[s["variant"] == "patched"].any()
    assert len(s[s["mode"] == "memcg-limit"]) and not zapping[s["mode"] == "memcg-limit"].any()
    scan = a.table[(a.table["variant"] == "baseline") & (a.table["phase"] == "shrinker-scan")].set_index("cause")
    print(a.table[a.table["phase"] == "shrinker-scan"].to_string())
    zapped = scan.loc[["shrinker-zap", "zap-refault"], "share"].sum()
    assert zapped > 0.5 * (1 - scan.loc["swap-in", "share"])


def test_each_vms_shadow_page_zaps_are_stepped_when_the_shrinker_runs_not_polled(e2e):
    """Each VM's zap counters are read within 0.1 s after a shrinker call - never polled. On the baseline the L1's
    VM lost shadow pages in steps of about 0.1 s while the shrinker ran (global: after its calls; shrinker-scan:
    around each debugfs write); the patched kernel, which has no shrinker, has no step at all; and the baseline's
    spikes say when their own VM was zapped."""
    a = analyze(e2e["run_dir"]).attribution
    ph = e2e["frames"]["phases"].set_index(["cell", "phase"])
    z = a.vm_zaps.assign(window=a.vm_zaps["t1"] - a.vm_zaps["t0"])

    def during(cell: str, phase: str):
        t0, t1 = ph.loc[(cell, phase), ["t_start", "t_end"]]
        mine = z[z["cell"] == cell]
        return mine[(mine["t1"] > t0) & (mine["t0"] < t1)]

    for phase in ("global", "shrinker-scan"):
        steps = during("baseline.r1", phase)
        print(phase, steps.to_string())
        assert steps["recycled"].sum() > 0 and set(steps["guest"]) == {"l1-0"}
        assert steps.loc[steps["recycled"] > 0, "window"].median() <= 0.15
    assert z[z["cell"] == "patched.r1"].empty  # its VM's counters rose too (74 zapped in one run), for other reasons
    s = a.spikes[a.spikes["cell"] == "baseline.r1"]
    assert s["own_vm_zapped"].any()  # (under global and shrinker-scan; here: 64 and 2 spikes)


def test_each_pass_carries_the_guests_own_view(e2e):
    """The probe reads its kernel's major faults and steal time between passes: every pass after the first has
    both, and the report's guest view has every phase of both variants."""
    p = e2e["frames"]["passes"]
    later = p[p["pass"] > 1]
    assert len(later) and (later["majflt"] >= 0).all() and (later["steal_ms"] >= 0).all()
    view = analyze(e2e["run_dir"]).guest_view
    assert len(view) == 2 * 7 and view["majflt_per_pass"].notna().all()


def test_l1s_clock_is_measured_against_the_kernel_under_test_within_a_millisecond(e2e):
    """L1 measures its own clock by ptp_kvm (the kernel under test's time by hypercall, between two readings of its
    own) all along - at start, every 10 s, at the end, under pressure too -; the kernel under test, under TCG,
    by round trips from the host. The goal, <= 1 ms, holds for every measurement. (Measured here: L1 median
    0.017-0.025 ms, worst 0.032 ms; by round trips it was 0.74-0.91 ms median, 1.16 ms worst.)"""
    c = e2e["frames"]["clocks"]
    l1 = c[c["level"] == "l1"]
    print(l1.to_string())
    for cell in ("baseline.r1", "patched.r1"):
        assert len(l1[l1["cell"] == cell]) >= 5 and len(c[(c["cell"] == cell) & (c["level"] == "kut")]) >= 5
    assert set(l1["method"]) == {"ptp_kvm"} and l1["uncertainty_kut_ms"].max() <= 1.0
    if decide_accel("auto").accel == "tcg":  # no KVM below the kernel under test to ask: the host measures it
        assert set(c.loc[c["level"] == "kut", "method"]) == {"virtio-serial"}


def test_memcg_limit_control_reclaims_in_its_cgroup_without_the_shrinker(e2e):
    evidence = e2e["evidence"]
    for variant in ("baseline", "patched"):
        ctrl = phase_row(evidence, variant, "memcg-limit")
        assert ctrl["shrinker_calls"] == 0 and ctrl["memcg_max_events"] + ctrl["memcg_high_events"] > 0


def test_every_phase_delivered_its_pressure_and_every_cell_measured_what_it_was_for(e2e):
    evidence = e2e["evidence"]
    assert_every_phase_delivered(evidence)
    assert len(evidence) == 2 * 7
    glob = evidence[evidence["phase"] == "global"]
    assert (glob["mem_available_min_mb"] <= 96).all()  # the hog reached its target on both kernels
    md = (e2e["run_dir"] / "report.md").read_text()
    assert "## Pressure delivered, per phase" in md and "## Health" in md and "INCONCLUSIVE where" not in e2e["stdout"]
    health = pd.read_csv(e2e["run_dir"] / "tables" / "health.csv")
    assert {("kut", "ready_s"), ("l1", "ready_s"), ("l1", "warmup_s"), ("cell", "wall_s")} <= set(
        zip(health["level"], health["figure"])
    )


def test_report_verdict_rows_and_valid_pngs(e2e):
    run = e2e["run_dir"]
    md = (run / "report.md").read_text()
    tcg = json.loads((run / "manifest.json").read_text())["accel"]["kut"] == "tcg"
    assert "Status: complete" in md and "## Verdict" in md and "## Evidence" in md and ("TCG" in md or not tcg)
    ab = pd.read_csv(run / "tables" / "ab.csv")
    metrics = pd.read_csv(run / "tables" / "repetition_metrics.csv")
    assert len(ab) == len(metrics[["phase", "level", "metric"]].drop_duplicates())
    # shrinker-scan does not exist on the patched kernel, and what follows it is its aftermath on one side only
    one_sided = ab["phase"].isin(["shrinker-scan", "recovery-2"]) & (ab["variant"] == "patched")
    assert ab.loc[one_sided, "verdict"].eq("not comparable").all()
    assert ab.loc[one_sided & (ab["phase"] == "recovery-2"), "reason"].str.contains("follows shrinker-scan").all()
    assert set(ab.loc[~one_sided, "verdict"]) <= {"better", "worse", "no significant difference", "inconclusive"}
    assert ab["validity"].str.startswith("emulated (TCG)").all() or not tcg
    schedule = ["steady", "memcg-limit", "gap-1", "global", "recovery-1", "shrinker-scan", "recovery-2"]
    assert list(dict.fromkeys(ab["phase"])) == [p for p in schedule if p in set(ab["phase"])]
    html = (run / "report.html").read_text()
    pngs = sorted((run / "plots").glob("*.png"))
    assert len(pngs) == 6 and html.count("data:image/png;base64,") == 6
    for p in pngs:
        img = mpimg.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 600 and np.std(img[..., :3]) > 0.02, p.name
    assert "report.html" in e2e["stdout"] and (run / "report.txt").read_text() in e2e["stdout"]  # the answer last
    mail_lines(run)


def test_each_kernel_under_test_ran_in_a_host_memory_group_removed_after_it(e2e):
    said = re.search(r"host memory group for each kernel under test: (\S+), capped at (\d+) MiB", e2e["stderr"])
    assert said, e2e["stderr"][-3000:]
    group = Path(said.group(1))
    assert group.name.startswith("nestpress-e2e-") and int(said.group(2)) > 1536
    assert not list(group.parent.glob("nestpress-e2e-*"))  # every cell's group is gone


def test_report_regenerates_from_tables_and_truncated_run_is_incomplete(e2e, tmp_path):
    run = e2e["run_dir"]
    r = subprocess.run(
        [sys.executable, "-m", "harness", "report", "--run", str(run)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "report.html" in r.stdout
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "cells" / "patched.r1")
    (broken / "cells" / "baseline.r1" / "l1-0" / "probe.jsonl").write_text(
        (run / "cells" / "baseline.r1" / "l1-0" / "probe.jsonl").read_text()[:5000]
    )  # torn mid-line
    generate(broken)
    md = (broken / "report.md").read_text()
    assert "INCOMPLETE" in md and "patched.r1" in md
    bare = tmp_path / "bare"  # interrupted before any cell measured anything
    bare.mkdir()
    shutil.copy(run / "manifest.json", bare / "manifest.json")
    generate(bare)
    assert "INCOMPLETE" in (bare / "report.md").read_text() and "0 of 2 cells" in (bare / "report.md").read_text()
    (broken / "tables" / "samples.parquet").write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="samples"):
        load_tables(broken)


def test_rerun_into_the_same_run_id_resumes_without_redoing_cells(e2e):
    r = subprocess.run(e2e["cmd"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 cell(s) already complete, 0 to run" in r.stderr


def test_compare_puts_two_runs_side_by_side(e2e, tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run(
        [sys.executable, "-m", "harness", "compare", str(e2e["run_dir"]), str(e2e["run_dir"]), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    md = (out / "compare.md").read_text()
    assert "p99 touch latency" in md and "baseline" in md and (out / "compare.html").exists()


def test_records_a_real_guest_should_not_have_written_are_named_and_never_rendered(e2e):
    """L1's command wrote into its own events what no reader should take (see PLANTS): the run completed, the
    lines are named as problems of its cell, and the report shows the guest's text as text, never markup."""
    cells = e2e["frames"]["cells"].set_index("cell")
    problems = " | ".join(json.loads(cells.loc["baseline.r1", "problems"]))
    assert cells.loc["baseline.r1", "status"] == "complete"
    assert "l1-0/events.jsonl: 1 torn or malformed line(s) skipped" in problems  # the 3000-deep line
    assert "l1-0/events.jsonl: 1 record(s) without the fields their kind has" in problems  # the 400-digit t
    html = (e2e["run_dir"] / "report.html").read_text()
    assert "<script>" not in html and '<img src="plots/..' not in html
    assert json.loads((e2e["run_dir"] / "manifest.json").read_text())["status"] == "complete"
