"""Memory pressure modes, run inside the kernel under test. Standard library only.

Each pressure phase gets its own cgroup v2 group, /sys/fs/cgroup/nestpress-<run>-<mode>,
which the actor process joins before it does anything; the group is removed at the end
of the phase, also on failure (cgroup.kill, then rmdir).

Modes and why they do (or do not) reach the non-memcg-aware KVM shrinker:
  global        a hog grows until MemAvailable falls to a target, then past it into swap:
                kswapd and direct reclaim run for the whole machine -> shrink_slab() calls it.
                memory.max of its group bounds it, so the machine survives.
  drop-caches   vm.drop_caches=2 every period: drop_slab() calls every shrinker.
  root-reclaim  writes to the root cgroup's memory.reclaim: root reclaim calls it.
  shrinker-scan writes "0 0 N" to /sys/kernel/debug/shrinker/x86-mmu-*/scan: calls it directly.
  memcg-limit   the control: a hog over a tight memory.high reclaims only inside its group
                (and is throttled), where non-memcg-aware shrinkers are never called.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import signal
import subprocess
import sys
import time

try:
    from .contract import EventKind, GlobalHog, PressureJob, PressureMode, PressureParams  # as harness.guest.pressure
    from .sampler import ZAP_STATS, qemu_guests, vm_stats, zap_steps
except ImportError:  # run as a script in a guest: its directory is sys.path[0]
    from contract import EventKind, GlobalHog, PressureJob, PressureMode, PressureParams  # type: ignore[no-redef]
    from sampler import ZAP_STATS, qemu_guests, vm_stats, zap_steps  # type: ignore[no-redef]

CG = "/sys/fs/cgroup"
PAGE = 4096
READY_TIMEOUT_S = 120
CONTROL_SLACK_MB = 64  # the control hog's Python and page tables, above what it allocates


def meminfo_mb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) >> 10
    raise KeyError(key)


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Hog:
    """Anonymous memory taken in chunks and kept hot by re-touching it."""

    def __init__(self) -> None:
        self.chunks: list[mmap.mmap] = []

    @property
    def mb(self) -> int:
        return sum(len(c) for c in self.chunks) >> 20

    def grow(self, mb: int) -> None:
        """MAP_POPULATE faults the chunk in inside one syscall: a Python loop per page manages only
        ~50 MB/s under TCG, too slow to push a kernel into reclaim within a phase."""
        m = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
        if not getattr(mmap, "MAP_POPULATE", 0):
            for off in range(0, len(m), PAGE):
                m[off] = 1
        self.chunks.append(m)

    def touch(self) -> None:
        for m in self.chunks:
            for off in range(0, len(m), PAGE):
                m[off] = 2


def reclaim_scans() -> int:
    """Pages the whole machine's reclaim has scanned so far (kswapd and direct; memcg reclaim is not in these)."""
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k in ("pgscan_kswapd", "pgscan_direct"))


def global_hog(g: GlobalHog, ready, log) -> Hog:
    """Grow a hog into global reclaim, driven by what this kernel reports, not by a plan made up front.

    Before the phase starts (ready() is the phase's clock), the hog takes the memory that is free to take:
    until MemAvailable is headroom_mb above the target, which creates no pressure. In the phase it grows
    until both MemAvailable reached the target and reclaim scans started, then overshoot_mb further into
    swap. MemAvailable at the start differs a lot between kernels and configs (guest RAM that is
    preallocated counts as used on 6.1 and 6.12 alike; a larger kernel under test leaves more); growing a
    fixed plan from it took longer than the phase on 6.12 (2 GB under TCG), so the slow part now happens
    before the phase, and the grow rate is logged."""
    hog = Hog()
    avail0, total = meminfo_mb("MemAvailable"), meminfo_mb("MemTotal") + meminfo_mb("SwapTotal")
    log("hog_plan", mem_available_mb=avail0, target_mb=g.target_available_mb, headroom_mb=g.headroom_mb)
    t0 = time.monotonic()
    while meminfo_mb("MemAvailable") - g.chunk_mb > g.target_available_mb + g.headroom_mb:
        hog.grow(g.chunk_mb)
    pre_s = time.monotonic() - t0
    log("hog_ready", hog_mb=hog.mb, seconds=round(pre_s, 2), mem_available_mb=meminfo_mb("MemAvailable"))
    ready()
    t1, scans0 = time.monotonic(), reclaim_scans()
    pace = g.ramp_s * g.chunk_mb / max(g.chunk_mb, g.headroom_mb + g.overshoot_mb)
    # the bound: everything there is, RAM and swap (the group's memory.max keeps the machine alive anyway)
    while hog.mb < total and (meminfo_mb("MemAvailable") > g.target_available_mb or reclaim_scans() == scans0):
        hog.grow(g.chunk_mb)
        time.sleep(pace)
    reached_mb, reached_s = hog.mb, time.monotonic() - t1
    while hog.mb < min(total, reached_mb + g.overshoot_mb):
        hog.grow(min(g.chunk_mb, reached_mb + g.overshoot_mb - hog.mb))
        time.sleep(pace)
    grown_s = time.monotonic() - t1
    log(
        "hog_holding",
        hog_mb=hog.mb,
        reclaim_reached_at_mb=reached_mb,
        reclaim_reached_after_s=round(reached_s, 2),
        seconds=round(grown_s, 2),
        grow_mb_per_s=round(hog.mb / max(pre_s + grown_s, 1e-3), 1),
        mem_available_mb=meminfo_mb("MemAvailable"),
        reclaim_scans=reclaim_scans() - scans0,
    )
    return hog


def actor(mode: PressureMode, p: PressureParams, ready, log) -> None:
    """The body of a pressure phase; runs until SIGTERM. ready() says the pressure is on (the phase starts)."""
    if mode is PressureMode.GLOBAL:
        hog = global_hog(p.global_hog, ready, log)
        while True:
            hog.touch()
    ready()
    if mode is PressureMode.MEMCG_LIMIT:
        hog = Hog()
        while hog.mb < p.memcg_hog_mb:
            hog.grow(min(32, p.memcg_hog_mb - hog.mb))
        log("hog_holding", hog_mb=hog.mb)
        while True:
            hog.touch()
    elif mode is PressureMode.DROP_CACHES:
        while True:
            write("/proc/sys/vm/drop_caches", "2")
            log("drop_caches")
            time.sleep(p.drop_caches_period_s)
    elif mode is PressureMode.ROOT_RECLAIM:
        while True:
            log("root_reclaim_request", mb=p.root_reclaim_mb)  # the write may block for the whole phase
            try:
                write(f"{CG}/memory.reclaim", f"{p.root_reclaim_mb}M")
                log("root_reclaim", ok=True)
            except OSError as e:  # EAGAIN: could not reclaim all that was asked
                log("root_reclaim", ok=False, error=e.strerror)
            time.sleep(p.root_reclaim_period_s)
    elif mode is PressureMode.SHRINKER_SCAN:
        while True:
            for d in glob.glob("/sys/kernel/debug/shrinker/x86-mmu-*"):
                guests, t0, before = qemu_guests(), time.time_ns(), vm_stats(ZAP_STATS)
                began = time.monotonic()  # the call's span: a spike it caused overlaps it (report/attribution.py)
                write(d + "/scan", f"0 0 {p.shrinker_scan_objects}")
                took = round(time.monotonic() - began, 6)
                t1, after = time.time_ns(), vm_stats(ZAP_STATS)
                log("shrinker_scan", shrinker=os.path.basename(d), objects=p.shrinker_scan_objects, took_s=took)
                # which VM the call zapped, and how much, within its span: these calls bypass the tracepoints that
                # wake the sampler's zap steps (its own t: when the counters were read)
                for step in zap_steps(t0, before, t1, after, guests):
                    log("vm_zap", t=step["t"], guest=step["guest"], **step["fields"])
            time.sleep(p.shrinker_scan_period_s)
    else:
        raise ValueError(f"pressure mode {mode.value} has no actor")


def unavailable(mode: PressureMode) -> str | None:
    """Why this mode cannot act on this kernel (said clearly, recorded, and the phase goes on)."""
    if mode is PressureMode.ROOT_RECLAIM and not os.path.exists(f"{CG}/memory.reclaim"):
        return "root-reclaim: this kernel has no root memory.reclaim (needs 5.19+ and cgroup v2)"
    if mode is PressureMode.SHRINKER_SCAN and not glob.glob("/sys/kernel/debug/shrinker/x86-mmu-*"):
        return (
            "shrinker-scan: no /sys/kernel/debug/shrinker/x86-mmu-* here: the KVM MMU shrinker does "
            "not exist on this kernel (expected on the patched kernel) or CONFIG_SHRINKER_DEBUG is off"
        )
    if not os.path.exists(f"{CG}/cgroup.procs"):
        return f"{mode.value}: no cgroup v2 hierarchy at {CG}"
    return None


class PreflightError(RuntimeError):
    """The kernel under test cannot run this schedule: said before any guest starts, never retried."""


def preflight(modes: set[PressureMode], run_id: str) -> list[str]:
    """Raise PreflightError for what would make the run meaningless; return notes for modes that will idle."""
    from supervise import read  # the agent's helper; the pressure actors themselves never load it

    problems = []
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        problems.append(
            "no /sys/kernel/debug/kvm: debugfs is not mounted or not in this kernel "
            "(CONFIG_DEBUG_FS, and no debugfs=off on the command line); the sampler needs KVM's stats"
        )
    if modes - {PressureMode.NONE}:
        controllers = read(f"{CG}/cgroup.controllers", None)
        if controllers is None:
            problems.append(f"no cgroup v2 hierarchy at {CG} (CONFIG_CGROUPS/CONFIG_MEMCG, cgroup2 mount)")
        elif "memory" not in controllers.split():
            problems.append(
                f"the cgroup v2 memory controller is not available at {CG} (controllers: "
                f"{controllers or 'none'}; CONFIG_MEMCG off or cgroup_disable=memory)"
            )
        else:
            probe = f"{CG}/nestpress-{run_id}-preflight"
            try:
                os.mkdir(probe)
                os.rmdir(probe)
            except OSError as e:
                problems.append(f"cannot create a cgroup under {CG}: {e.strerror}")
    if PressureMode.SHRINKER_SCAN in modes and not os.path.isdir("/sys/kernel/debug/shrinker"):
        problems.append("shrinker-scan needs /sys/kernel/debug/shrinker (CONFIG_SHRINKER_DEBUG, 6.0+)")
    if problems:
        raise PreflightError("the kernel under test cannot run this schedule: " + "; ".join(problems))
    return [why for mode in sorted(modes) if (why := unavailable(mode))]


class PressureRun:
    """One phase's pressure: cgroup created, actor started in it; stop() undoes both."""

    def __init__(self, mode: PressureMode, params: PressureParams, name: str, out: str, events):
        self.mode, self.params, self.events = mode, params, events
        self.cgroup = f"{CG}/nestpress-{name}-{mode.value}"
        self.out = out
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.mode is PressureMode.NONE:
            return
        why = unavailable(self.mode)
        if why:
            self.events(EventKind.PRESSURE_UNAVAILABLE, mode=self.mode.value, reason=why)
            return
        os.makedirs(self.cgroup)
        if self.mode is PressureMode.GLOBAL:
            # the bound that keeps the machine alive: never more than the memory there is, less a reserve
            write(self.cgroup + "/memory.max", str(max(64, meminfo_mb("MemTotal") - 128) << 20))
        elif self.mode is PressureMode.MEMCG_LIMIT:
            # memory.high, not memory.max, at the limit: over it the group reclaims and its tasks are throttled,
            # never OOM-killed. With memory.max at the limit 6.12's memcg OOM killer took the hog within its
            # first second (20 max events, then no pressure for the rest of the phase). memory.max stays a
            # bound the hog (and its Python) never reaches.
            limit, hog = self.params.memcg_limit_mb, self.params.memcg_hog_mb
            write(self.cgroup + "/memory.high", str(limit << 20))
            write(self.cgroup + "/memory.max", str((limit + hog + CONTROL_SLACK_MB) << 20))
        job = PressureJob(
            mode=self.mode, params=self.params, cgroup=self.cgroup, log=os.path.join(self.out, "pressure.jsonl")
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-S", os.path.abspath(__file__), job.to_json()],
            stdout=open(os.path.join(self.out, "pressure.stdout"), "a"),
            stderr=open(os.path.join(self.out, "pressure.stderr"), "a"),
        )
        # the phase clock starts when the pressure is on, not when a (slow, under TCG) Python starts
        ready = os.path.join(self.out, f"pressure.ready.{self.proc.pid}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"pressure actor for {self.mode.value} did not start (status {self.proc.poll()}): "
                    + open(os.path.join(self.out, "pressure.stderr")).read()[-500:]
                )
            time.sleep(0.1)
        os.unlink(ready)
        self.events(EventKind.PRESSURE_START, mode=self.mode.value, cgroup=self.cgroup, pid=self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.events(EventKind.PRESSURE_STOP, mode=self.mode.value, status=self.proc.returncode)
        if os.path.isdir(self.cgroup):
            try:
                write(self.cgroup + "/cgroup.kill", "1")
            except OSError:
                pass
            for _ in range(100):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)
            self.events(EventKind.CGROUP_REMOVED, cgroup=self.cgroup, removed=not os.path.exists(self.cgroup))


def _main(arg: str) -> None:
    job = PressureJob.from_dict(json.loads(arg))
    write(job.cgroup + "/cgroup.procs", str(os.getpid()))  # join the group before allocating anything
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    out = open(job.log, "a", buffering=1)

    def ready() -> None:
        open(os.path.join(os.path.dirname(job.log), f"pressure.ready.{os.getpid()}"), "w").close()

    def log(kind: str, **fields) -> None:
        out.write(json.dumps({"t": time.time_ns(), "kind": kind, "mode": job.mode.value, **fields}) + "\n")

    actor(job.mode, job.params, ready, log)


if __name__ == "__main__":
    _main(sys.argv[1])
