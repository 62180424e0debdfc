"""The mission's own topology end to end: configs/shrinker-ab-nested.yaml, one repetition per variant, as a
user runs it (through `python -m harness experiment`). L1 runs on TDP, L2 inside it on the kernel under
test's nested (shadow) MMU; under TCG this needs QEMU >= 10 (harness/setup_qemu.sh installs it).
Asserts the science: L2 is measured on both kernels, the baseline's shrinker zaps the shadow pages of the
VM that runs L2, the patched kernel has no shrinker and zaps nothing."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import assert_every_phase_delivered, phase_row, require, sets

from harness import REPO_ROOT
from harness.analysis import analyze
from harness.machine.host import decide_accel, qemu_installs, topology_support
from harness.results.tables import load as load_tables

pytestmark = pytest.mark.kernel


# The config's sizes, smaller: what the evidence needs and no more. Measured: L2 2 GiB with a 1.5 GiB probe, 877 shadow
# pages of L2's VM zapped under global and 1049 under shrinker-scan, where the test asks for 100; the full size's cells
# took 8-9 min, most of it L2's boot and its probe's first pass; L2's RAM on demand: its boot 45 s instead of 114 s, the
# test 626 s instead of 833 s. A 768 MiB probe: 470 and 784 zapped, its first pass ~77 s (~0.1 s a MiB: each 4 KiB page
# L2 touches first is a shadow fault in the kernel under test), the test 617 s (L2's boot varies by 30 s); 512 MiB:
# 367 and 778 zapped, the test 510 s; its two cells side by side (auto, a host CPU each): 262 s for both.
SIZED_FOR_ITS_EVIDENCE = [
    "repetitions=1",
    "topology.kut.memory_mb=3072",
    "topology.l1.memory_mb=1664",
    "topology.l2.memory_mb=1024",
    "workload.probe.size_mb=512",
    "topology.l2.prealloc=false",  # L2's RAM faulted in by its probe, not by its QEMU before it boots: L1 is
    # mlocked in the kernel under test either way, and the shadow pages the shrinker zaps are the probe's
    # side by side, the baseline's L2 refaulting what global zapped once wrote one probe interval in recovery-1's
    # 10 s, where the check asks for two, and its cell was retried alone (+255 s). The evidence here is the shrinker's
    # and L2 measured in every phase: one interval does. (A 16 s recovery-1 instead took L2's refaults into the
    # undisturbed reference of the spikes: 36 spikes where 460-621, none while L2's VM was zapped.)
    "checks.min_intervals_per_phase=1",
    # the config's phases: shorter ones left L2's probe one interval where the check asks for two (seen: under
    # shrinker-scan and in a 4 s recovery after it, when the scan zaps L2's shadow pages)
]


@pytest.fixture(scope="session")
def nested(builds, qemu, tmp_path_factory):
    qemu_for_nested, why = topology_support(decide_accel("auto").accel, qemu_installs())["nested"]
    require(qemu_for_nested is not None, why)
    out = tmp_path_factory.mktemp("results")
    cmd = [sys.executable, "-m", "harness", *"experiment --config shrinker-ab-nested --run-id nested".split()]
    cmd += ["--output", str(out), *sets(SIZED_FOR_ITS_EVIDENCE)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2700)
    print(r.stdout[-4000:], r.stderr[-6000:])
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "shrinker-ab-nested" / "nested"
    frames = load_tables(run_dir)
    return {
        "run_dir": run_dir,
        "stderr": r.stderr,
        "frames": frames,
        "evidence": analyze(run_dir).evidence,
        "manifest": json.loads((run_dir / "manifest.json").read_text()),
    }


def test_every_level_is_where_it_should_be(nested):
    m = nested["manifest"]
    assert m["status"] == "complete" and m["topology"] == "nested"
    if m["accel"]["kut"] == "tcg":
        assert int(m["qemu"]["nested"]["version"].split(".")[0]) >= 10
    for variant in ("baseline", "patched"):
        cell = nested["run_dir"] / "cells" / f"{variant}.r1"
        kut = json.loads((cell / "facts.json").read_text())
        l1 = json.loads((cell / "l1-0" / "facts.json").read_text())
        l2 = json.loads((cell / "l1-0" / "l2-0" / "facts.json").read_text())
        assert kut["kvm_params"]["kvm_amd.npt"] == "Y"  # L1 on TDP
        assert kut["rootfs"] == l1["rootfs"] == m["rootfs"]["kind"]
        if m["accel"]["kut"] == "tcg":
            assert kut["rootfs"] == "9p"  # a host virtiofsd's writes would bypass TCG (README)
        assert l1["runs_on_kvm"] and l1["kvm_device"] and "svm" in l1["cpu_flags"]
        assert l2["runs_on_kvm"] and l2["rootfs"] == "rootfs"  # L2 from its initramfs
        assert "transparent_hugepage=always" in l1["cmdline"]
        assert "not_locked" not in (cell / "events.jsonl").read_text()  # the agent is out of reclaim


def test_the_pair_ran_side_by_side_where_the_host_has_a_cpu_for_each(nested):
    """`parallel: auto` (the config's): each kernel under test has one vCPU, so a host of 2 CPUs or more starts the
    baseline and the patched cell together, each pinned to a CPU of its own (measured: docs/how-a-run-works.md). A
    cell retried after its wave boots alone, so the first boot of each is what tells."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one host CPU: one cell at a time")
    assert nested["manifest"]["parallel"].startswith("parallel auto: 2 cell(s) at a time")
    first = {}
    for m in re.finditer(r"^(\d\d):(\d\d):(\d\d) cell \d/2 (\S+): booting guests", nested["stderr"], re.M):
        first.setdefault(m[4], int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]))
    assert set(first) == {"baseline.r1", "patched.r1"} and abs(first["baseline.r1"] - first["patched.r1"]) < 10


def test_l2_is_measured_on_both_kernels(nested):
    s = nested["frames"]["samples"]
    for variant in ("baseline", "patched"):
        l2 = s[(s["variant"] == variant) & (s["level"] == "l2") & ~s["phase"].isin(["pre", "post"])]
        assert l2["count"].sum() > 1000, f"{variant}: too few L2 touches inside the phases"
        assert set(l2["phase"]) >= {"steady", "global", "shrinker-scan"}


def test_baseline_shrinker_zaps_the_shadow_pages_of_the_vm_that_runs_l2(nested):
    evidence = nested["evidence"]
    glob = phase_row(evidence, "baseline", "global")
    assert glob["shrinker_calls"] > 0 and glob["pgscan_kswapd"] + glob["pgscan_direct"] > 0
    assert glob["l2_vm"] == "l1-0" and glob["l2_vm_shadow_zapped"] > 100 and glob["x86_mmu_count_drop"] > 100
    # shrinker-scan follows global: L2's probe re-faults its shadow pages while the scan zaps them, so the
    # count may end where it began (seen: +920 zapped, count unchanged); the VM's zap counter is the evidence
    scan = phase_row(evidence, "baseline", "shrinker-scan")
    assert scan["l2_vm"] == "l1-0" and scan["l2_vm_shadow_zapped"] > 100 and scan["shrinker_calls"] > 0
    ctrl = phase_row(evidence, "baseline", "memcg-limit")
    assert ctrl["shrinker_calls"] == 0 and ctrl["l2_vm_shadow_zapped"] == 0
    assert ctrl["memcg_max_events"] + ctrl["memcg_high_events"] > 0


def test_patched_has_no_shrinker_and_zaps_nothing_of_l2(nested):
    evidence = nested["evidence"]
    pat = evidence[evidence["variant"] == "patched"]
    assert not pat["shrinker_present"].any() and pat["shrinker_calls"].sum() == 0
    assert pat["l2_vm_shadow_zapped"].fillna(0).sum() == 0
    glob = phase_row(evidence, "patched", "global")
    assert glob["pgscan_kswapd"] + glob["pgscan_direct"] > 0  # as much pressure, no shrinker


def test_every_phase_delivered_its_pressure(nested):
    evidence = nested["evidence"]
    assert_every_phase_delivered(evidence)


def test_report_shows_the_l2_vm_evidence(nested):
    md = (nested["run_dir"] / "report.md").read_text()
    assert "in the VM that runs L2 (l1-0) shadow pages zapped" in md and "Status: complete" in md


def test_l2s_clock_is_measured_through_l1_within_a_millisecond_and_its_spikes_are_attributed(nested):
    """L2's clock against L1's by ptp_kvm (L1, which keeps its time on the TSC, answers the hypercall), chained
    to the kernel under test's through L1's own: within 1 ms at every measurement (the figures are printed;
    measured here: L2 against L1 0.17-0.28 ms, where round trips over its clock port gave 1.4-2.0 ms); no
    zapping on the patched side."""
    c = nested["frames"]["clocks"]
    l2 = c[c["level"] == "l2"]
    print(c.groupby(["level", "method"])[["uncertainty_ms", "uncertainty_kut_ms"]].describe().to_string())
    assert len(l2) >= 4 and (l2["parent"] == "l1-0").all()
    assert set(c.loc[c["level"].isin(["l1", "l2"]), "method"]) == {"ptp_kvm"}
    assert (l2["uncertainty_kut_ms"] >= l2["uncertainty_ms"]).all() and l2["uncertainty_kut_ms"].max() <= 1.0
    s = analyze(nested["run_dir"]).attribution.spikes
    assert set(s["level"]) == {"l2"} and not (s["shrinker-zap"] | s["zap-refault"])[s["variant"] == "patched"].any()
    # the VM that runs L2 zapped while L2's spikes lasted: read after the shrinker's calls, never polled
    own = s.groupby("variant")["own_vm_zapped"].sum()
    assert own.get("baseline", 0) > 0 and own.get("patched", 0) == 0
