"""Host readiness and the accelerator decision, stated with its reasons.

KVM is used only when /dev/kvm opens read-write *and* the CPU advertises vmx or svm:
a /dev/kvm without them (a software KVM) accepts KVM_CREATE_VM but never boots Linux.
Otherwise TCG with `-cpu max` (which offers SVM with nested paging). Forcing KVM where it
cannot work is an error, never a silent fallback.
"""
from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import AccelError
from .guest.rootfs import find_virtiofsd
from .util import TOOL_PACKAGES, HEADER_PACKAGES, run, which

KVM_GET_API_VERSION = 0xAE00


@dataclass
class AccelDecision:
    accel: str                     # "kvm" or "tcg"
    reasons: list[str]
    cpu_flags: list[str]
    forced: bool = False

    @property
    def banner(self) -> str:
        if self.accel == "kvm":
            return "ACCEL: KVM (hardware virtualization) - " + "; ".join(self.reasons)
        return ("ACCEL: TCG (software emulation, NOT KVM) - timings are emulated and ~10-100x slower than "
                "hardware; latency results show relative effects only. Why: " + "; ".join(self.reasons))


def cpu_virt_flags(cpuinfo: str | None = None) -> list[str]:
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(f for f in line.split(":", 1)[1].split() if f in ("vmx", "svm"))
    return sorted(flags)


def kvm_usable(dev: str = "/dev/kvm") -> tuple[bool, str]:
    if not os.path.exists(dev):
        return False, f"{dev} does not exist (kvm module not loaded?)"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{dev} cannot be opened read-write ({e.strerror}; add the user to the kvm group)"
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"{dev}: KVM_GET_API_VERSION failed ({e.strerror})"
    finally:
        os.close(fd)
    return True, f"{dev} opens read-write (KVM API {api})"


def decide_accel(requested: str = "auto", cpuinfo: str | None = None, dev: str = "/dev/kvm") -> AccelDecision:
    flags = cpu_virt_flags(cpuinfo)
    ok, why = kvm_usable(dev)
    reasons = [why, f"CPU virtualization flags: {' '.join(flags) if flags else 'none (no vmx/svm)'}"]
    works = ok and bool(flags)
    if requested == "kvm" and not works:
        raise AccelError("accel: kvm was requested but KVM cannot run guests here: " + "; ".join(reasons))
    if requested == "tcg":
        return AccelDecision("tcg", reasons + ["TCG forced by the config"], flags, forced=True)
    if works:
        return AccelDecision("kvm", reasons, flags, forced=requested == "kvm")
    if ok and not flags:
        reasons.append("a /dev/kvm without vmx/svm is a software KVM that cannot boot Linux guests")
    return AccelDecision("tcg", reasons + ["falling back to TCG with -cpu max (SVM + NPT emulated)"], flags)


@dataclass
class RootfsDecision:
    kind: str                      # "9p" or "virtiofs": how every level shares its root with its guests
    reasons: list[str]


def decide_rootfs(requested: str = "auto") -> RootfsDecision:
    """virtiofs where a virtiofsd exists and we are root (it needs a mount namespace), else virtio-9p."""
    daemon, root = find_virtiofsd(), os.geteuid() == 0
    reasons = [f"virtiofsd: {daemon}" if daemon else "no virtiofsd (Debian: qemu-system-common <= 7.2, "
               "or the virtiofsd package)",
               "running as root" if root else "not root: virtiofsd needs a mount namespace of its own"]
    works = bool(daemon) and root
    if requested == "virtiofs" and not works:
        raise AccelError("boot.rootfs: virtiofs was requested but cannot be served here: " + "; ".join(reasons))
    if requested == "9p":
        return RootfsDecision("9p", reasons + ["9p forced by the config"])
    return RootfsDecision("virtiofs" if works else "9p", reasons)


QEMU_NESTED_TCG = (10, 0)     # the first outer QEMU whose emulated SVM keeps an L1 alive under its L2 (README)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def topology_support(accel: str, qemu: str | None) -> dict[str, tuple[bool, str]]:
    """Per topology: does it work on this host, and why (doctor prints it, the runner enforces it)."""
    shadow = (True, "L1 shadow-paged by the kernel under test (npt=0/ept=0): works under KVM and TCG")
    if accel == "kvm":
        return {"shadow": shadow, "nested": (True, "hardware virtualization: L1 on TDP, L2 on the kernel under "
                                                   "test's nested (shadow) MMU")}
    version = parse_version(qemu)
    if version is not None and version >= QEMU_NESTED_TCG:
        return {"shadow": shadow, "nested": (True, f"QEMU {qemu} emulates SVM well enough for an L2 (slow: every L2 "
                                                   "exit passes through two emulated hypervisors; see README)")}
    return {"shadow": shadow, "nested": (False, f"QEMU {qemu or '(none)'} under TCG: its emulated SVM kills L1 "
                                                "minutes after its L2 starts; QEMU >= 10 works (bootstrap.sh or "
                                                "`fab setup` installs it from bookworm-backports)")}


@dataclass
class TopologyDecision:
    kind: str                      # "nested" or "shadow"
    reasons: list[str]


def decide_topology(requested: str, accel: str, qemu: str | None) -> TopologyDecision:
    """auto: nested with hardware virtualization, shadow under TCG (a nested cell there costs ~10x the time);
    a topology that cannot work here is an error, never a fallback."""
    support = topology_support(accel, qemu)
    kind = ("nested" if accel == "kvm" else "shadow") if requested == "auto" else requested
    works, why = support[kind]
    if not works:
        raise AccelError(f"topology.kind: {kind} cannot work here: {why}")
    reasons = [why] + (["auto: nested only with hardware virtualization; under TCG an L2 boots in minutes, "
                        "so shadow keeps the default experiment short"] if requested == "auto" and kind == "shadow"
                       else [])
    return TopologyDecision(kind, reasons)


def nested_support() -> dict[str, str]:
    out = {}
    for mod in ("kvm_intel", "kvm_amd"):
        for param in ("nested", "ept", "npt"):
            p = Path(f"/sys/module/{mod}/parameters/{param}")
            if p.exists():
                out[f"{mod}.{param}"] = p.read_text().strip()
    return out


def qemu_version() -> str | None:
    q = which("qemu-system-x86_64")
    if not q:
        return None
    m = re.search(r"version (\S+)", run([q, "--version"], capture=True, check=False).stdout)
    return m.group(1) if m else "unknown"


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])
    return out


@dataclass
class Doctor:
    accel: str
    reasons: list[str]
    cpu_flags: list[str]
    nested: dict[str, str]
    rootfs: str
    rootfs_reasons: list[str]
    qemu: str | None
    topologies: dict[str, str]     # kind -> "works: why" / "does not work: why" on this host
    cgroup_v2: bool
    mem_total_mb: int
    mem_available_mb: int
    disk_free_mb: int
    cpus: int
    kernel: str
    python: str
    tools: dict[str, str | None]
    missing_packages: list[str] = field(default_factory=list)
    ready: bool = True
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [f"host: {platform.node()} ({self.kernel}, {self.cpus} CPUs, {self.mem_total_mb} MiB RAM, "
                 f"{self.mem_available_mb} MiB available, {self.disk_free_mb} MiB free disk for the cache)",
                 f"accel: {self.accel.upper()}" + ("" if self.accel == "kvm" else "  <-- software emulation"),
                 *[f"  - {r}" for r in self.reasons],
                 f"nested KVM on this host: {self.nested or 'kvm_intel/kvm_amd not loaded'}",
                 f"guest root filesystem: {self.rootfs} ({'; '.join(self.rootfs_reasons)})",
                 f"qemu-system-x86_64: {self.qemu or 'MISSING'}",
                 *[f"topology {kind}: {what}" for kind, what in self.topologies.items()],
                 f"cgroup v2 on this host: {'yes' if self.cgroup_v2 else 'no'} "
                 "(pressure runs inside the kernel under test, which mounts its own)",
                 f"python: {self.python}",
                 "tools: " + ", ".join(f"{t}{'' if p else ' (MISSING)'}" for t, p in self.tools.items())]
        if self.missing_packages:
            lines.append("install: apt-get install " + " ".join(self.missing_packages) + "   (or: fab setup)")
        lines.append("ready: yes" if self.ready else "ready: NO - " + "; ".join(self.problems))
        return "\n".join(lines)


def doctor(cache_dir: Path | None = None) -> Doctor:
    d = decide_accel("auto")
    rootfs = decide_rootfs("auto")
    tools = {t: which(t) for t in TOOL_PACKAGES}
    missing = sorted({TOOL_PACKAGES[t] for t, p in tools.items() if not p}
                     | {pkg for h, pkg in HEADER_PACKAGES.items() if not Path(h).exists()})
    mi = meminfo()
    disk_path = cache_dir or Path.home()
    while not disk_path.exists():
        disk_path = disk_path.parent
    problems = []
    if missing:
        problems.append("missing packages: " + " ".join(missing))
    if shutil.disk_usage(disk_path).free < 8 << 30:
        problems.append(f"less than 8 GiB free under {disk_path} (a kernel build needs ~4 GiB)")
    if mi["MemAvailable"] < 6 << 20:
        problems.append("less than 6 GiB memory available (the kernel under test alone uses 4 GiB)")
    qemu = qemu_version()
    topologies = {kind: ("works: " if ok else "does not work: ") + why
                  for kind, (ok, why) in topology_support(d.accel, qemu).items()}
    return Doctor(accel=d.accel, reasons=d.reasons, cpu_flags=d.cpu_flags, nested=nested_support(),
                  rootfs=rootfs.kind, rootfs_reasons=rootfs.reasons, qemu=qemu, topologies=topologies, cgroup_v2=Path("/sys/fs/cgroup/cgroup.controllers").exists(),
                  mem_total_mb=mi["MemTotal"] >> 10, mem_available_mb=mi["MemAvailable"] >> 10,
                  disk_free_mb=shutil.disk_usage(disk_path).free >> 20, cpus=os.cpu_count() or 1,
                  kernel=platform.release(), python=platform.python_version(), tools=tools,
                  missing_packages=missing, ready=not problems, problems=problems)
