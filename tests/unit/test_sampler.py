"""The sampler's cause events and per-guest QEMU counters (harness/guest/sampler.py): trace lines as the kernel
prints them, and this host's own /proc."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time

from harness.guest import sampler
from harness.guest.sampler import qemu_counters, qemu_guests, trace_record

KVM = ("mmu_shrink_scan",)  # the shrink function the kvm-mmu-shrinker hypothesis names

GUESTS = {340: "l1-0"}
SHRINK = (
    "mmu_shrink_scan+0x0/0x2a0 [kvm] 00000000c0ffee00: nid: 0 objects to shrink 0 gfp_flags GFP_KERNEL "
    "cache items 912 delta 12 total_scan 12 priority 12"
)


def test_shrinker_calls_are_kept_with_who_made_them_and_other_shrinkers_are_not():
    line = f"       kswapd0-31      (     31) [001] .....   12.500000: mm_shrink_slab_start: {SHRINK}"
    rec = trace_record(line, GUESTS, 0, KVM)
    assert rec is not None and rec.kind == "shrink_start" and rec.comm == "kswapd0" and rec.pid == 31
    assert rec.t == 12_500_000_000 and rec.fields["cache_items"] == 912 and rec.fields["total_scan"] == 12
    end = "mmu_shrink_scan+0x0/0x2a0 [kvm] 00000000c0ffee00: nid: 0 unused scan count 0 new scan count 0 total_scan 0 last shrinker return val 12"  # noqa: E501
    rec = trace_record(f"sh-77 [000] ..... 13.000001: mm_shrink_slab_end: {end}", GUESTS, 1_000, KVM)  # no tgid column
    assert rec is not None and rec.kind == "shrink_end" and rec.fields["freed"] == 12
    assert rec.t == 13_000_002_000
    other = SHRINK.replace("mmu_shrink_scan+0x0/0x2a0 [kvm]", "super_cache_scan+0x0/0x1f0")
    assert trace_record(f"kswapd0-31 (31) [001] ..... 12.6: mm_shrink_slab_start: {other}", GUESTS, 0, KVM) is None


def test_direct_reclaim_is_kept_for_a_guests_qemu_threads_only():
    begin = "CPU 0/KVM-345     (    340) [000] d..1.   20.250000: mm_vmscan_direct_reclaim_begin: order=0 gfp_flags=GFP_HIGHUSER_MOVABLE"  # noqa: E501
    rec = trace_record(begin, GUESTS, 0)
    assert rec is not None and rec.kind == "direct_reclaim_begin" and rec.guest == "l1-0"
    assert rec.comm == "CPU 0/KVM" and rec.pid == 345 and rec.fields["order"] == 0
    end = "CPU 0/KVM-345 (340) [000] ..... 20.260000: mm_vmscan_direct_reclaim_end: nr_reclaimed=32"
    assert trace_record(end, GUESTS, 0).fields["nr_reclaimed"] == 32  # type: ignore[union-attr]
    hog = "python3-500 (500) [001] ..... 20.3: mm_vmscan_direct_reclaim_begin: order=0 gfp_flags=GFP_HIGHUSER"
    assert trace_record(hog, GUESTS, 0) is None  # the hog's own stalls are not a guest's
    assert trace_record("# tracer: nop", GUESTS, 0) is None


def test_a_guests_qemu_is_found_by_its_name_and_its_faults_and_swap_are_read():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", "nestpress-l1-7"])
    try:
        deadline = time.monotonic() + 10  # the interpreter may be a launcher that execs the real one
        while qemu_guests().get(proc.pid) != "l1-7" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu_guests().get(proc.pid) == "l1-7"
        v = qemu_counters({proc.pid: "l1-7"})
        assert v["qemu.l1-7.majflt"] >= 0 and v["qemu.l1-7.swap_kb"] >= 0
    finally:
        proc.kill()
        proc.wait()


def fake_vms(tmp_path, monkeypatch, zapped: int, recycled: int):
    """Two VMs in a made-up debugfs: ours (QEMU 340, a guest) and one whose QEMU is no guest of ours."""
    monkeypatch.setattr(sampler, "KVM", str(tmp_path))
    for vm in (tmp_path / "340-11", tmp_path / "999-12"):
        vm.mkdir(exist_ok=True)
        (vm / "mmu_shadow_zapped").write_text(f"{zapped}\n")
        (vm / "mmu_recycled").write_text(f"{recycled}\n")


def test_each_vms_zap_steps_are_logged_with_its_guest_and_interval(tmp_path, monkeypatch):
    """A VM's debugfs directory is <QEMU pid>-<fd>: a rise of its counters between two reads, with a shrinker call
    in between, is one step of that guest over the interval between the reads; a VM whose QEMU is no guest of
    ours, a VM seen for the first time, a read with no rise and a rise without a shrinker call log nothing."""
    fake_vms(tmp_path, monkeypatch, 5, 0)
    out = tmp_path / "zaps.jsonl"
    zaps = sampler.ZapFollower(str(out), GUESTS, 0.1)
    zaps.observe(1_000, sampler.vm_stats())  # first sight
    zaps.shrink_ran()
    zaps.observe(2_000, sampler.vm_stats())  # no rise
    fake_vms(tmp_path, monkeypatch, 9, 0)
    zaps.observe(3_000, sampler.vm_stats())  # a rise, no call: a guest's own page-table writes, say
    fake_vms(tmp_path, monkeypatch, 49, 3)
    zaps.shrink_ran()
    zaps.observe(500_003_000, sampler.vm_stats())
    steps = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["guest"] == "l1-0" and steps[0]["kind"] == "vm_zap"
    assert (steps[0]["zapped"], steps[0]["recycled"], steps[0]["since_ns"]) == (40, 3, 500_000_000)
    assert steps[0]["t"] == 500_003_000


def test_zap_counters_are_read_when_a_shrink_call_ran_not_polled(tmp_path, monkeypatch):
    """Between shrinker calls nothing is read (the samples aside); after one, a read within interval_s; in a burst
    of calls, no more often than interval_s."""
    fake_vms(tmp_path, monkeypatch, 5, 0)
    reads: list[float] = []
    real = sampler.vm_stats

    def counted(*names: tuple[str, ...]) -> dict:
        reads.append(time.monotonic())
        return real(*names)

    monkeypatch.setattr(sampler, "vm_stats", counted)
    out, stop = tmp_path / "zaps.jsonl", threading.Event()
    zaps = sampler.ZapFollower(str(out), GUESTS, 0.1)
    zaps.observe(time.time_ns(), real())  # a sample's read
    thread = threading.Thread(target=zaps.run, args=(stop,))
    thread.start()
    time.sleep(0.4)
    assert reads == []  # the shrinker did not run: no read
    fake_vms(tmp_path, monkeypatch, 45, 3)
    t0 = time.monotonic()
    for _ in range(50):  # a burst of calls over 0.5 s
        zaps.shrink_ran()
        time.sleep(0.01)
    time.sleep(0.3)
    stop.set()
    thread.join(5)
    assert reads and reads[0] - t0 < 0.15 and 3 <= len(reads) <= 8
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(reads))
    steps = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["zapped"] == 40
