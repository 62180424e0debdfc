"""What every level's agent does for itself before anything else (guest/agent.py): its mounts, its kernel log, its
clock set from the RTC, its swap, and the facts that make its numbers mean what they say. Standard library only."""

from __future__ import annotations

import calendar
import ctypes
import fcntl
import glob
import os
import re
import struct
import subprocess
import sys
import threading
import time

from contract import OUT, PATH, EventKind, GuestPlan
from records import LevelFacts
from supervise import read

_libc = ctypes.CDLL(None, use_errno=True)


def mount(src: str, target: str, fstype: str, data: str = "", flags: int = 0) -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        if err != 16:  # EBUSY: already mounted
            raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def early_mounts() -> None:
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    # writable scratch only where nothing of the host's is needed: the host's /tmp and /var/tmp stay
    # visible (read-only), since kernels, caches and results may live there
    for d in ("/run", "/dev/shm"):
        mount("tmpfs", d, "tmpfs", "mode=1777")
    os.makedirs("/run/tmp", exist_ok=True)
    for src, target, fstype in (
        ("debugfs", "/sys/kernel/debug", "debugfs"),
        ("tracefs", "/sys/kernel/tracing", "tracefs"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2"),
    ):
        try:
            mount(src, target, fstype)
        except OSError as e:
            print(f"agent: {e}", file=sys.stderr)
    mount("nestout", OUT, "9p", "trans=virtio,version=9p2000.L,msize=262144")


def copy_kmsg(dest: str) -> None:
    """The kernel log, line by line, into its own file (apart from the agent's stdout/stderr)."""

    def pump() -> None:
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY)
        except OSError:
            return
        with open(dest, "a", buffering=1) as f:
            while True:
                try:
                    rec = os.read(fd, 8192).decode(errors="replace")
                except OSError:  # EPIPE: a record was overwritten; keep going
                    continue
                meta, _, msg = rec.partition(";")
                usec = meta.split(",")[2] if meta.count(",") >= 2 else "0"
                f.write(f"[{int(usec) / 1e6:12.6f}] {msg.rstrip()}\n")

    threading.Thread(target=pump, daemon=True).start()


def level_facts(plan: GuestPlan) -> LevelFacts:
    """What makes this level's numbers mean what we say: KVM, nesting, TDP, and who runs us."""
    kmsg = read(os.path.join(OUT, "kmsg.log"))
    cpuinfo = read("/proc/cpuinfo")
    flags = sorted(
        {
            f
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
            for f in line.split(":", 1)[1].split()
            if f in ("vmx", "svm", "hypervisor")
        }
    )
    params = {}  # every KVM module parameter: the host checks a variant's module_params took effect
    for p in sorted(glob.glob("/sys/module/kvm*/parameters/*"))[:400]:
        mod, name = p.split("/")[3], os.path.basename(p)
        if os.access(p, os.R_OK):
            params[f"{mod}.{name}"] = read(p)[:200]
    shrinkers = sorted(glob.glob("/sys/kernel/debug/shrinker/*"))[:500]
    functions = plan.schedule.sampler.shrink_functions if plan.schedule else []
    kallsyms = read("/proc/kallsyms") if functions else ""  # formatted per read: slow in a guest, read where asked
    mem = dict(line.split(":", 1) for line in read("/proc/meminfo").splitlines() if ":" in line)
    return LevelFacts(
        name=plan.name,
        level=plan.level,
        uname=os.uname().release,
        cpu_flags=flags,
        kvm_device=os.path.exists("/dev/kvm"),
        kvm_vendor=next((v for v in ("kvm_amd", "kvm_intel") if os.path.exists(f"/sys/module/{v}/parameters")), None),
        kvm_params=params,
        runs_on_kvm="Hypervisor detected: KVM" in kmsg,
        hypervisor_line=next((l for l in kmsg.splitlines() if "Hypervisor detected" in l), None),
        shrinker_dirs=[os.path.basename(s) for s in shrinkers],
        functions_in_kallsyms=[f for f in functions if re.search(rf" {re.escape(f)}(\s|$)", kallsyms, re.M)],
        mem_total_kb=int(mem.get("MemTotal", "0 kB").split()[0]),
        swap_total_kb=int(mem.get("SwapTotal", "0 kB").split()[0]),
        memory_reclaim_root=os.path.exists("/sys/fs/cgroup/memory.reclaim"),
        cmdline=read("/proc/cmdline"),
        clocksource=read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        rootfs=next((l.split()[2] for l in read("/proc/self/mounts").splitlines() if l.split()[1] == "/"), None),
    )


RTC_RD_TIME = 0x80247009  # _IOR('p', 0x09, struct rtc_time)


def rtc_seconds(fd: int) -> int:
    """The RTC's time (QEMU's RTC follows the parent's clock) as seconds since the epoch, UTC."""
    buf = bytearray(36)
    fcntl.ioctl(fd, RTC_RD_TIME, buf)
    sec, minute, hour, mday, mon, year = struct.unpack("9i", buf)[:6]
    return calendar.timegm((year + 1900, mon + 1, mday, hour, minute, sec))


def set_clock(ev, limit_s: float = 3.0) -> None:
    """Align CLOCK_REALTIME with the parent's to a few ms: wait for the RTC's second to turn, then set it.

    Polled, not interrupt-driven: `hwclock --hctosys` waits for an RTC update interrupt, and in a nested
    guest under emulation those get lost (the kernel logs "hpet: Lost N RTC interrupts"); an L2 once never
    got past it. Bounded by limit_s of monotonic time; without a turn of the second the kernel's own
    setting at boot (CONFIG_RTC_HCTOSYS, to the second) stays."""
    t0 = time.monotonic()
    try:
        fd = os.open("/dev/rtc0", os.O_RDONLY)
    except OSError as e:
        ev(EventKind.CLOCK, ok=False, detail=f"/dev/rtc0: {e.strerror}")
        return
    try:
        first = now = rtc_seconds(fd)
        polls = 1
        while now == first and time.monotonic() - t0 < limit_s:
            now = rtc_seconds(fd)
            polls += 1
    finally:
        os.close(fd)
    if now == first:
        ev(EventKind.CLOCK, ok=False, detail=f"the RTC's second did not turn within {limit_s:g}s ({polls} reads)")
        return
    step = now - time.time()
    time.clock_settime(time.CLOCK_REALTIME, float(now))
    ev(EventKind.CLOCK, ok=True, step_s=round(step, 3), polls=polls, wait_s=round(time.monotonic() - t0, 3))


def enable_swap(dev: str, ev) -> None:
    env = {"PATH": PATH}
    for cmd in (["mkswap", dev], ["swapon", dev]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    ev(EventKind.SWAP, device=dev, total_kb=read("/proc/swaps"))
