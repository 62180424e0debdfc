"""Crash reports in kernel logs: each kind found, the same crash given the same signature wherever its addresses,
CPUs and PIDs land, the top reliable frames kept, and a guest's control characters never passed on."""

import json

from harness.results.crashes import normalise, scan_log

PANIC = """[   93.120001] BUG: TASK stack guard page was hit at 00000000a1b2c3d4 (stack is 0000000011223344..0000556677)
[   93.120002] stack guard page: 0000 [#1] PREEMPT SMP NOPTI
[   93.120003] CPU: 1 PID: 1234 Comm: qemu-system-x86 Not tainted 6.1.192 #1
[   93.120004] RIP: 0010:asm_exc_page_fault+0x4/0x30
[   93.120005] Call Trace:
[   93.120006]  <#DF>
[   93.120007]  ? die+0x31/0x80
[   93.120008]  handle_stack_overflow+0x42/0x60
[   93.120009]  exc_double_fault+0x105/0x1a0
[   93.120010]  asm_exc_double_fault+0x1f/0x30
[   93.120011]  kvm_mmu_page_fault+0x22/0x90
[   93.200000] Kernel panic - not syncing: Fatal exception in interrupt
[   93.200001] Kernel Offset: disabled
[   93.200002] ---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---
"""
WARN = """[   50.100000] ------------[ cut here ]------------
[   50.100001] nestpress test: mmu_shrink_scan asked for 128
[   50.100002] WARNING: CPU: {cpu} PID: {pid} at arch/x86/kvm/mmu/mmu.c:{line} mmu_shrink_scan+0x2e/0x1a0
[   50.100003] Modules linked in:
[   50.100004] RIP: 0010:mmu_shrink_scan+0x2e/0x1a0
[   50.100005] Call Trace:
[   50.100006]  <TASK>
[   50.100007]  do_shrink_slab+0x13f/0x2c0
[   50.100008]  shrink_debugfs_scan_write+0x{off}/0x1c0
[   50.100009]  full_proxy_write+0x55/0x80
[   50.100010]  vfs_write+0xc8/0x3a0
"""
STALLS = """[  102.539474] rcu: INFO: rcu_sched self-detected stall on CPU
[  140.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [qemu-system-x86:412]
[  200.000000] INFO: task kworker/0:1:33 blocked for more than 120 seconds.
[  300.000000] Out of memory: Killed process 612 (python3) total-vm:1000kB
"""


def test_a_bug_and_the_panic_it_caused_are_both_kept_with_their_frames():
    bug, panic = scan_log(PANIC)
    assert (bug.kind, panic.kind) == ("bug", "panic") and panic.said == "Fatal exception in interrupt"
    assert bug.frames == "handle_stack_overflow < exc_double_fault < asm_exc_double_fault"  # `?` frames are guesses
    assert bug.uptime_s == 93.120001 and bug.said.startswith("TASK stack guard page was hit")


def test_the_same_warning_has_the_same_signature_wherever_it_lands():
    a = scan_log(WARN.format(cpu=0, pid=345, line=6584, off="1a"))
    b = scan_log(WARN.format(cpu=3, pid=9876, line=6590, off="2c"))
    assert [c.kind for c in a] == ["warn"] and a[0].signature == b[0].signature
    assert a[0].frames == "do_shrink_slab < shrink_debugfs_scan_write < full_proxy_write"
    other = scan_log(WARN.format(cpu=0, pid=345, line=6584, off="1a").replace("mmu_shrink_scan+", "mmu_other+"))
    assert other[0].signature != a[0].signature


def test_stalls_and_oom_kills_are_named():
    assert [c.kind for c in scan_log(STALLS)] == ["rcu-stall", "soft-lockup", "hung-task", "oom-kill"]
    assert normalise("CPU#0 stuck for 22s! [qemu:412]") == normalise("CPU#1 stuck for 23s! [qemu:97]")


def test_what_a_guest_printed_stays_text():
    (c,) = scan_log("[ 1.0] Kernel panic - not syncing: \x1b[31mred\x07\n")
    assert c.said == "?[31mred?" and c.line.isprintable()


def test_a_kernel_under_test_that_went_silent_is_a_freeze_in_the_phase_it_was_in(tmp_path):
    """Nothing in any log, and its budget ran out: the host's note (written once its QEMU is off) is a row of
    its own; the same file left by a guest in an attempt that did not freeze is removed, never read."""
    from types import SimpleNamespace

    from harness.results.crashes import FREEZE_NOTE, scan_attempt
    from harness.results.guest_files import Problems
    from harness.run.cell import Attempt

    d = tmp_path / "cell"
    d.mkdir()
    started = {"t": 5, "kind": "phase_start", "phase": "memcg-limit", "mode": "memcg-limit", "duration_s": 12}
    (d / "events.jsonl").write_text(json.dumps(started) + "\n")
    said = "no progress until its 775 s budget ran out"
    froze = SimpleNamespace(cell_dir=d, froze=("phase memcg-limit (memcg-limit, 12s)", said))
    Attempt.note_freeze(froze)  # type: ignore[arg-type]
    (row,) = scan_attempt(d, [], Problems())
    assert row["kind"] == "freeze" and row["level"] == "kut" and row["phase"] == "memcg-limit"
    assert (
        row["said"] == "no progress until its 775 s budget ran out (last stage: phase memcg-limit (memcg-limit, 12s))"
    )
    (d / FREEZE_NOTE).write_text(json.dumps({"stage": "planted", "said": "planted"}))  # a guest's, in a good attempt
    Attempt.note_freeze(SimpleNamespace(cell_dir=d, froze=None))  # type: ignore[arg-type]
    assert scan_attempt(d, [], Problems()) == [] and not (d / FREEZE_NOTE).exists()


def test_what_a_pressure_phases_actor_caused_before_the_phase_was_logged_is_that_phases(tmp_path):
    """The actor acts a moment before the agent logs the phase's start: a WARN at its first scan write (seen 0.3 s
    before) belongs to that phase, not 'between'; an undisturbed phase gets no such lead."""
    from harness.results.crashes import scan_attempt
    from harness.results.guest_files import Problems

    d = tmp_path / "cell"
    d.mkdir()
    phases = [
        ("steady", "none", 10, 20),
        ("weak-control", "memcg-limit", 20, 26),
        ("shrinker-scan", "shrinker-scan", 28, 36),
    ]
    events = []
    for name, mode, t0, t1 in phases:
        events.append({"t": t0 * 10**9, "kind": "phase_start", "phase": name, "mode": mode, "duration_s": t1 - t0})
        events.append({"t": t1 * 10**9, "kind": "phase_end", "phase": name, "mode": mode})
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (d / "ready.json").write_text(json.dumps({"t": 0, "uptime_s": 0.0}))
    warn = WARN.format(cpu=0, pid=1, line=6584, off="1c")
    (d / "kmsg.log").write_text(
        warn.replace("[   50.1", "[   27.7") + "[    9.500000] WARNING: CPU: 0 PID: 1 at x.c:1 f\n"
    )
    rows = scan_attempt(d, [("kut", "kut", d)], Problems())
    assert [(r["said"][:13], r["phase"]) for r in rows] == [("arch/x86/kvm/", "shrinker-scan"), ("x.c:1 f", "boot")]


def test_the_host_times_each_phase_from_when_it_reads_its_start(tmp_path):
    """A phase's end is due its length plus the overrun after the host first reads its start; read again, the same
    start does not move it; its end clears it; the next start is timed anew, and the end before it does not clear
    it; a torn line is nothing. The last phase's end starts the wind-down: power-off is due SHUTDOWN_S later."""
    from harness.run.cell import SHUTDOWN_S, Watch

    events = tmp_path / "events.jsonl"

    def say(**e) -> None:
        with open(events, "a") as f:
            f.write(json.dumps({"t": len(events.read_text()) if events.exists() else 0, **e}) + "\n")

    w = Watch(overrun_s=30, last_phase="global")
    say(kind="probes_warm", count=1)
    w.read(events, now=100)
    assert w.stage == "probes warm" and w.due is None
    say(kind="phase_start", phase="steady", mode="none", duration_s=3)
    w.read(events, now=101)
    assert w.stage == "phase steady (none, 3s)" and w.due == 134
    w.read(events, now=120)
    assert w.due == 134
    say(kind="phase_end", phase="steady", mode="none")
    w.read(events, now=121)
    assert w.due is None
    say(kind="phase_start", phase="global", mode="global", duration_s=26)
    with open(events, "a") as f:
        f.write('{"t": 9, "kind": "phase_end", "pha')  # being written
    w.read(events, now=125)
    assert w.stage == "phase global (global, 26s)" and w.due == 181
    w.read(events, now=126)  # the end of the phase before it, still in the lines read, is not this one's
    assert w.due == 181
    assert w.missed == "its phase not ended 30 s after its length"
    with open(events, "a") as f:
        f.write('se": "steady"}\n')  # the line above, written whole at last
    say(kind="phase_end", phase="global", mode="global")
    w.read(events, now=150)
    assert w.stage == "winding down after phase global" and w.due == 150 + SHUTDOWN_S
    w.read(events, now=160)  # read again, the same end does not move it
    assert w.due == 150 + SHUTDOWN_S and w.missed == f"not powered off {SHUTDOWN_S} s after its last phase ended"
