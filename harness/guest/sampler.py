"""Counter sampler for the kernel under test. Standard library only; runs as its own process.

Every interval it appends one JSON line {"t": CLOCK_REALTIME ns, "v": {name: value}} to
counters.jsonl with: KVM stats (aggregate and per VM), the count of each shrinker the spec names (and
whether its debugfs directory exists), /proc/vmstat, /proc/meminfo, PSI memory, and the
memory.events/memory.stat of the run's cgroups. Each sample carries its own timestamp,
so a sampler stalled by thrashing leaves a gap, not a lie.

Per guest, its QEMU process's major faults and swapped-out size (qemu.<guest>.majflt, .swap_kb).

With `trace`, a thread follows vmscan tracepoints in a private tracefs instance and logs cause
events, timestamped, to trace.jsonl: every call of the spec's shrink functions (begin and end, with the
objects it was asked for and freed, and who called it), and every direct reclaim stall of a guest's QEMU
(begin and end, with the thread, its guest and the pages reclaimed).

With it, each VM's shadow-page zap counters (mmu_shadow_zapped, mmu_recycled) are read after every traced
shrink call, at most every zap_interval_s (ZapFollower): each rise since the read before goes to
zaps.jsonl as a step, with its guest and the interval it fell in - which VM those calls zapped, when. The
shrinker-scan actor (pressure.py) logs the steps around each of its debugfs writes, which bypass
the tracepoints, the same way (zap_steps).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import sys
import threading
import time

try:
    from .contract import SamplerJob  # imported by the host as harness.guest.*
    from .records import CounterSample, TraceCall, VmZap
    from .supervise import lock_in_memory
except ImportError:  # run as a script in a guest: its directory is sys.path[0]
    from contract import SamplerJob  # type: ignore[no-redef]
    from records import CounterSample, TraceCall, VmZap  # type: ignore[no-redef]
    from supervise import lock_in_memory  # type: ignore[no-redef]

KVM = "/sys/kernel/debug/kvm"
VMSTAT_KEYS = (
    "slabs_scanned",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pswpin",
    "pswpout",
    "allocstall_normal",
    "allocstall_movable",
    "pgmajfault",
    "drop_slab",
    "drop_pagecache",
    "oom_kill",
    "workingset_refault_anon",
    "kswapd_low_wmark_hit_quickly",
)
MEMINFO_KEYS = ("MemAvailable", "MemFree", "SecPageTables", "PageTables", "SwapFree", "AnonPages", "Shmem", "Cached")
KVM_KEYS = (
    "mmu_shadow_zapped",
    "mmu_recycled",
    "mmu_cache_miss",
    "mmu_pte_write",
    "mmu_flooded",
    "mmu_unsync",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "remote_tlb_flush",
    "nx_lpage_splits",
    "max_mmu_page_hash_collisions",
    # where the time goes under nesting: every exit of a guest vCPU into this kernel's KVM
    "exits",
    "nested_run",
    "halt_exits",
    "irq_exits",
    "io_exits",
    "mmio_exits",
    "pf_fixed",
    "insn_emulation",
)
CG_EVENTS = ("low", "high", "max", "oom", "oom_kill")
CG_STAT = ("anon", "sec_pagetables", "pgscan", "pgsteal")


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def kv_lines(text: str | None, keys: tuple[str, ...], sep: str | None = None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split() if sep is None else line.split(sep)
        if len(parts) >= 2 and parts[0] in keys:
            out[parts[0]] = int(parts[1])
    return out


VM_STATS = ("mmu_recycled", "mmu_shadow_zapped", "mmu_cache_miss", "pages_4k")


def vm_stats(names: tuple[str, ...] = VM_STATS) -> dict[str, dict[str, int]]:
    """Each VM's stats (those named): its debugfs directory's name (<its QEMU's pid>-<fd>) -> stat -> value."""
    out: dict[str, dict[str, int]] = {}
    for vm in glob.glob(f"{KVM}/*-*/"):
        stats = {k: int(s) for k in names if (s := read(vm + k)) is not None}
        if stats:
            out[os.path.basename(vm.rstrip("/"))] = stats
    return out


def shrinker_counts(name: str) -> dict[str, float]:
    """A shrinker's debugfs directories (<name>-<id>, CONFIG_SHRINKER_DEBUG): whether there is one, and the objects
    they count (summed over memcgs and nodes) as shrinker.<name>_present and shrinker.<name>_count."""
    key = "shrinker." + name.replace("-", "_")
    dirs = glob.glob(f"/sys/kernel/debug/shrinker/{glob.escape(name)}-*")
    v: dict[str, float] = {f"{key}_present": 1 if dirs else 0}
    for d in dirs:
        total = 0
        for line in (read(d + "/count") or "").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[-1].isdigit():
                total += int(parts[-1])
        v[f"{key}_count"] = v.get(f"{key}_count", 0) + total
    return v


def sample(vms: dict[str, dict[str, int]], shrinkers: tuple[str, ...] = ()) -> dict[str, float]:
    """One sample of the counters; vms: vm_stats() read for it; shrinkers: the names whose counts it reads."""
    v: dict[str, float] = {}
    for k in KVM_KEYS:
        if (s := read(f"{KVM}/{k}")) is not None:
            v[f"kvm.{k}"] = int(s)
    for vm_id, stats in vms.items():
        for k, n in stats.items():
            v[f"kvm_vm.{vm_id}.{k}"] = n
    for name in shrinkers:
        v.update(shrinker_counts(name))
    for k, n in kv_lines(read("/proc/vmstat"), VMSTAT_KEYS).items():
        v[f"vmstat.{k}"] = n
    for k, n in kv_lines(read("/proc/meminfo"), MEMINFO_KEYS).items():
        v[f"meminfo.{k}_kb"] = n
    for line in (read("/proc/pressure/memory") or "").splitlines():
        kind, *fields = line.split()
        for f in fields:
            name, _, val = f.partition("=")
            v[f"psi.memory_{kind}_{name}"] = float(val)
    for cg in glob.glob("/sys/fs/cgroup/nestpress-*/"):  # phases run one at a time: one pressure group
        name = "pressure"
        for k, n in kv_lines(read(cg + "memory.events"), CG_EVENTS).items():
            v[f"cgroup.{name}.events.{k}"] = n
        for k, n in kv_lines(read(cg + "memory.stat"), CG_STAT).items():
            v[f"cgroup.{name}.stat.{k}"] = n
        if (cur := read(cg + "memory.current")) is not None:
            v[f"cgroup.{name}.current"] = int(cur)
    return v


# a trace_pipe line with record-tgid: "<comm>-<pid> (<tgid>) [cpu] <flags> <seconds>: <event>: <fields>"
# (comm may hold spaces and dashes: QEMU's vCPU threads are "CPU 0/KVM"; tgid is "-------" when unknown)
TRACE_RE = re.compile(r"^\s*(.+)-(\d+)\s+(?:\(\s*([\d-]+)\)\s+)?\[\d+\]\s+(?:\S+\s+)?(\d+\.\d+): (\w+): (.*)$")
# the numbers the tracepoints print (include/trace/events/vmscan.h)
TRACE_FIELDS = {
    "cache_items": r"cache items (\d+)",
    "total_scan": r"total_scan (\d+)",
    "delta": r"delta (-?\d+)",
    "freed": r"last shrinker return val (-?\d+)",
    "nr_reclaimed": r"nr_reclaimed=(\d+)",
    "order": r"order=(\d+)",
}
TRACE_EVENTS = {  # tracepoint -> the kind its records get
    "mm_shrink_slab_start": "shrink_start",
    "mm_shrink_slab_end": "shrink_end",
    "mm_vmscan_direct_reclaim_begin": "direct_reclaim_begin",
    "mm_vmscan_direct_reclaim_end": "direct_reclaim_end",
}


def trace_record(
    line: str, guests: dict[int, str], offset_ns: int, functions: tuple[str, ...] = ()
) -> TraceCall | None:
    """A cause event from one trace line: every call of the shrink functions named (whoever made it), and direct
    reclaim by a guest's QEMU (guests: QEMU process id -> guest name); None for anything else."""
    m = TRACE_RE.match(line)
    if not m or m.group(5) not in TRACE_EVENTS:
        return None
    comm, pid, tgid, ts, event, rest = m.groups()
    kind = TRACE_EVENTS[event]
    process = int(tgid) if tgid and tgid.isdigit() else int(pid)
    if kind.startswith("shrink") and not (functions and rest.startswith(functions)):
        return None
    if kind.startswith("direct_reclaim") and process not in guests:
        return None
    fields = {k: int(hit.group(1)) for k, rx in TRACE_FIELDS.items() if (hit := re.search(rx, rest))}
    return TraceCall(
        t=int(float(ts) * 1e9) + offset_ns,
        kind=kind,
        pid=int(pid),
        comm=comm.strip()[:32],
        guest=guests.get(process),
        raw=rest.strip()[:300],
        fields=fields,
    )


def qemu_guests() -> dict[int, str]:
    """The guests' QEMU processes here: process id -> guest name (their -name nestpress-<guest>)."""
    out = {}
    for d in glob.glob("/proc/[0-9]*/cmdline"):
        argv = (read(d) or "").split("\0")
        if "-name" in argv[:-1] and (name := argv[argv.index("-name") + 1]).startswith("nestpress-"):
            out[int(d.split("/")[2])] = name.removeprefix("nestpress-")
    return out


def qemu_counters(guests: dict[int, str]) -> dict[str, float]:
    """Each guest's QEMU: major faults (swap-ins and file reads of guest RAM and of QEMU) and swapped-out size."""
    v: dict[str, float] = {}
    for pid, name in guests.items():
        stat = read(f"/proc/{pid}/stat")
        if stat:
            v[f"qemu.{name}.majflt"] = int(stat.rsplit(")", 1)[1].split()[9])
        for line in (read(f"/proc/{pid}/status") or "").splitlines():
            if line.startswith("VmSwap:"):
                v[f"qemu.{name}.swap_kb"] = int(line.split()[1])
    return v


def follow_trace(
    out_path: str, guests: dict[int, str], stop: threading.Event, zaps: ZapFollower, functions: tuple[str, ...]
) -> None:
    """Log cause events from the vmscan tracepoints (trace clock = CLOCK_MONOTONIC) to trace.jsonl; tell zaps
    whenever one of the shrink functions ran."""
    inst = "/sys/kernel/tracing/instances/nestpress"
    try:
        os.makedirs(inst, exist_ok=True)
        with open(inst + "/trace_clock", "w") as f:
            f.write("mono")
        try:
            with open(inst + "/options/record-tgid", "w") as f:
                f.write("1")
        except OSError:  # an older kernel: the pid alone (a vCPU thread's reclaim then goes unnamed)
            pass
        for ev in TRACE_EVENTS:
            with open(f"{inst}/events/vmscan/{ev}/enable", "w") as f:
                f.write("1")
    except OSError as e:
        with open(out_path, "a") as f:
            f.write(TraceCall(t=time.time_ns(), kind="trace_unavailable", raw=str(e)[:300]).to_json() + "\n")
        return
    # CLOCK_MONOTONIC -> CLOCK_REALTIME offset, so trace timestamps join the other series
    offset = time.time_ns() - time.monotonic_ns()
    with open(inst + "/trace_pipe") as pipe, open(out_path, "a", buffering=1) as out:
        for line in pipe:
            if (rec := trace_record(line, guests, offset, functions)) is not None:
                out.write(rec.to_json() + "\n")
                if rec.kind.startswith("shrink"):
                    zaps.shrink_ran()
            if stop.is_set():
                break


ZAP_KEYS = {"mmu_shadow_zapped": "zapped", "mmu_recycled": "recycled"}
ZAP_STATS = tuple(ZAP_KEYS)  # what a read for the zap steps alone needs of vm_stats()


def zap_steps(
    t0: int, before: dict[str, dict[str, int]], t1: int, after: dict[str, dict[str, int]], guests: dict[int, str]
) -> list[VmZap]:
    """The steps of the guests' VMs' zap counters between two vm_stats() reads, at t0 and t1 (ns): the counts that
    rose in (t0, t1], each a VmZap at t1. A VM seen first at t1 has no step yet."""
    steps = []
    for vm_id, now in after.items():
        pid, was = vm_id.split("-", 1)[0], before.get(vm_id)
        if was is None or not pid.isdigit() or int(pid) not in guests:
            continue
        rose = {key: now[stat] - was[stat] for stat, key in ZAP_KEYS.items() if stat in now and stat in was}
        if any(v > 0 for v in rose.values()):
            steps.append(VmZap(t=t1, guest=guests[int(pid)], since_ns=t1 - t0, **rose))
    return steps


class ZapFollower:
    """Each VM's zap counters, read after a traced shrink call (shrink_ran, from the trace follower) - at most every
    interval_s, or with the next sample where interval_s is 0 -, each rise since the read before logged as a step.
    Every sample's read (observe) refreshes the reference, so a step spans at most a sample's interval; it is
    logged only when a shrink call ran since the last read, so zaps for other reasons (the shrinker-scan actor's
    debugfs writes, which log their own steps; a guest rewriting its page tables) are not.

    Event-driven, not polled: while no shrink call runs, nothing but the samples wakes the kernel under
    test for it. (Polling every 0.1 s did, and in the nested topology under TCG slowed L2's probe loop from
    95 to 320 us a touch.)"""

    def __init__(self, out_path: str, guests: dict[int, str], interval_s: float):
        self.out = open(out_path, "a", buffering=1)
        self.guests, self.interval_s = guests, interval_s
        self.lock = threading.Lock()
        self.wanted = threading.Event()  # a shrink call ran since the last read
        self.t = 0  # when the last read was
        self.last: dict[str, dict[str, int]] = {}

    def observe(self, t: int, vms: dict[str, dict[str, int]]) -> None:
        """A read of vm_stats() at t: the steps since the last one, if a shrink call ran in between."""
        with self.lock:
            if self.wanted.is_set():
                self.wanted.clear()
                for step in zap_steps(self.t, self.last, t, vms, self.guests):
                    self.out.write(step.line())
            self.t, self.last = t, vms

    def shrink_ran(self) -> None:
        self.wanted.set()

    def run(self, stop: threading.Event) -> None:
        """Read once a shrink call ran, but not sooner than interval_s after the last read: in a burst of calls,
        every interval_s, and once more after its last."""
        while not stop.is_set():
            if not self.wanted.wait(0.5):
                continue
            if stop.wait(max(0.0, self.t / 1e9 + self.interval_s - time.time())):
                return
            self.observe(time.time_ns(), vm_stats(ZAP_STATS))


def main(job: SamplerJob) -> None:
    if (refused := lock_in_memory()) is not None:
        print(f"sampler: not locked in memory: {refused}", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    guests: dict[int, str] = {}  # kept current below, read by the trace follower and the zap steps
    zaps = ZapFollower(os.path.join(job.out, "zaps.jsonl"), guests, job.spec.zap_interval_s)
    shrinkers, functions = tuple(job.spec.shrinkers), tuple(job.spec.shrink_functions)
    if job.spec.trace:
        where = os.path.join(job.out, "trace.jsonl")
        threading.Thread(target=follow_trace, args=(where, guests, stop, zaps, functions), daemon=True).start()
        if job.spec.zap_interval_s > 0:
            threading.Thread(target=zaps.run, args=(stop,), daemon=True).start()
    interval = job.spec.interval_s
    with open(os.path.join(job.out, "counters.jsonl"), "a", buffering=1) as out:
        while not stop.is_set():
            t = time.time_ns()
            now = qemu_guests()
            guests.update(now)
            for gone in set(guests) - set(now):
                guests.pop(gone, None)
            vms = vm_stats()
            zaps.observe(t, vms)
            out.write(CounterSample(t=t, v={**sample(vms, shrinkers), **qemu_counters(now)}).to_json() + "\n")
            stop.wait(max(0.0, interval - (time.time_ns() - t) / 1e9))


if __name__ == "__main__":
    main(SamplerJob.from_dict(json.loads(sys.argv[1])))
