"""Host readiness and the accelerator decision, stated with its reasons.

KVM is used only when /dev/kvm opens read-write *and* the CPU advertises vmx or svm:
a /dev/kvm without them (a software KVM) accepts KVM_CREATE_VM but never boots Linux.
Otherwise TCG with `-cpu max` (which offers SVM with nested paging). Forcing KVM where it
cannot work is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import Cell, Matrix
from ..errors import AccelError, HarnessError, HostResourceError
from ..guest.rootfs import find_virtiofsd
from ..util import atomic_file, default_cache, own_cache, run, which

KVM_GET_API_VERSION = 0xAE00


@dataclass
class AccelDecision:
    accel: str  # "kvm" or "tcg"
    reasons: list[str]
    cpu_flags: list[str]
    forced: bool = False
    tsc_khz: int | None = None  # under TCG: the host's TSC rate, which the kernel under test is told (host_tsc_khz)

    @property
    def banner(self) -> str:
        if self.accel == "kvm":
            return "ACCEL: KVM (hardware virtualization) - " + "; ".join(self.reasons)
        return (
            "ACCEL: TCG (software emulation, NOT KVM) - timings are emulated and ~10-100x slower than "
            "hardware; latency results show relative effects only. Why: " + "; ".join(self.reasons)
        )


def cpu_virt_flags(cpuinfo: str | None = None) -> list[str]:
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    flags: set[str] = set()
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


TSC_LINES = (r"Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz", r"tsc: Detected (\d+)\.(\d{3}) MHz processor")


def host_tsc_khz(kernel_log: str | None = None, cpuinfo: str | None = None, kept: Path | None = None) -> int | None:
    """This host's TSC rate as its kernel found it (the last refinement, else its boot estimate); None unknown.

    Under TCG a guest's TSC is the host's (QEMU reads it with rdtsc), so the kernel under test is told this rate
    (tsc_early_khz) instead of calibrating it against emulated timers: that calibration failed in some boots (no
    PIT, an HPET estimate 650 ppm off), KVM in the kernel under test then kept the wrong rate, and its L1 could not
    start (QEMU: "TSC frequency mismatch ... TSC scaling unavailable"). The kernel's log wraps (a host memory
    group's OOM report is ~100 lines), so the rate is kept per boot the first time it is read (`kept`: a file
    under the cache named by this boot's id); a hypervisor that gave the rate (flag tsc_known_freq) also shows it
    as /proc/cpuinfo's `cpu MHz`, when no aperfmperf makes that the current clock instead."""
    if kernel_log is None:
        kernel_log = run(["dmesg"], capture=True, check=False).stdout or ""
    if kept is None:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        kept = default_cache() / "host" / f"tsc-khz.{re.sub(r'[^0-9a-f-]', '', boot_id)}"
        with contextlib.suppress(HarnessError):
            own_cache(default_cache())
    for line in TSC_LINES:
        if found := re.findall(line, kernel_log):
            khz = int(found[-1][0]) * 1000 + int(found[-1][1])
            with contextlib.suppress(OSError), atomic_file(kept) as tmp:
                tmp.write_text(f"{khz}\n")
            return khz
    with contextlib.suppress(OSError, ValueError):
        return int(kept.read_text().strip())
    cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    flags_line = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    mhz = re.search(r"^cpu MHz\s*:\s*(\d+)\.(\d{3})", cpuinfo, re.M)
    if mhz and "tsc_known_freq" in flags and "aperfmperf" not in flags:
        return int(mhz.group(1)) * 1000 + int(mhz.group(2))
    return None


@dataclass
class RootfsDecision:
    kind: str  # "9p" or "virtiofs": how every level shares its root with its guests
    reasons: list[str]


TCG_VIRTIOFS_WHY = (
    "auto under TCG: virtio-9p, since the host's virtiofsd writes file data straight into the kernel "
    "under test's shared RAM, behind TCG's back: translated code of a reused page frame is not "
    "invalidated, and after global reclaim re-read code pages the kernel under test's programs ran "
    "stale code (segfaults of PID 1 and of the pressure actor); 9p reads go through QEMU, which "
    "invalidates"
)


def decide_rootfs(requested: str, accel: str) -> RootfsDecision:
    """virtiofs where a virtiofsd exists, we are root (it needs a mount namespace) and guests run on KVM;
    else virtio-9p (TCG_VIRTIOFS_WHY)."""
    daemon, root = find_virtiofsd(), os.geteuid() == 0
    reasons = [
        f"virtiofsd: {daemon}"
        if daemon
        else "no virtiofsd (Debian: qemu-system-common <= 7.2, or the virtiofsd package)",
        "running as root" if root else "not root: virtiofsd needs a mount namespace of its own",
    ]
    works = bool(daemon) and root
    if requested == "virtiofs" and not works:
        raise AccelError("boot.rootfs: virtiofs was requested but cannot be served here: " + "; ".join(reasons))
    if requested == "9p":
        return RootfsDecision("9p", reasons + ["9p forced by the config"])
    if requested == "virtiofs":
        return RootfsDecision(
            "virtiofs",
            reasons
            + ["virtiofs forced by the config"]
            + (
                ["under TCG the kernel under test may run stale code after reclaim (auto avoids it)"]
                if accel == "tcg"
                else []
            ),
        )
    if works and accel == "tcg":
        return RootfsDecision("9p", reasons + [TCG_VIRTIOFS_WHY])
    return RootfsDecision("virtiofs" if works else "9p", reasons)


PRIVATE_QEMUS = Path("/usr/local/lib/nestpress")  # where harness/setup_qemu.sh keeps bookworm's QEMU 7.2 tree
# Under TCG each topology works with one generation of QEMU's emulated SVM (measured; docs/qemu-and-tcg.md):
# nested needs >= 10 (7.2 kills L1 minutes after its L2 starts), shadow needs < 10 (10.0.2 triple-faults an
# L1 with npt=0 at its first switch of paging mode).
TCG_QEMU = {"nested": lambda v: v >= (10, 0), "shadow": lambda v: v < (10, 0)}
TCG_QEMU_WHY = {
    "nested": "needs QEMU >= 10 under TCG (QEMU 7.2's emulated SVM kills L1 minutes after its L2 "
    "starts); bootstrap.sh or `fab setup` installs it from bookworm-backports",
    "shadow": "needs QEMU < 10 under TCG (10.0.2's emulated SVM triple-faults an L1 with npt=0 at its "
    "first switch of paging mode); bootstrap.sh or `fab setup` keeps bookworm's 7.2 beside it",
}


@dataclass(frozen=True)
class Qemu:
    """One QEMU installation: the system's, or a private tree kept by setup_qemu.sh (which needs -L for its
    firmware and QEMU_MODULE_DIR for its TCG accelerator module)."""

    binary: str
    version: str
    data_dir: str | None = None
    module_dir: str | None = None

    @property
    def command(self) -> list[str]:
        """How every level starts this QEMU (the path is the same inside guests: they share the host's root)."""
        return [self.binary, *(["-L", self.data_dir] if self.data_dir else [])]

    @property
    def env(self) -> dict[str, str]:
        return {"QEMU_MODULE_DIR": self.module_dir} if self.module_dir else {}

    @property
    def release(self) -> tuple[int, int]:
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    @property
    def qboot(self) -> str | None:
        """QEMU's minimal firmware for -kernel boots, where this QEMU ships it: a nested L1 under TCG comes up
        ~15 s sooner than with SeaBIOS, QEMU's default (bench/bench.py)."""
        path = Path(self.data_dir or "/usr/share/qemu") / "qboot.rom"
        return str(path) if path.exists() else None

    def describe(self) -> str:
        return f"QEMU {self.version} ({self.binary})"


def _version_of(binary: str) -> str:
    m = re.search(r"version (\S+)", run([binary, "--version"], capture=True, check=False).stdout)
    return m.group(1) if m else "unknown"


def qemu_installs(private: Path = PRIVATE_QEMUS) -> list[Qemu]:
    """The system's qemu-system-x86_64 first, then private trees (newest first)."""
    out = []
    if system := which("qemu-system-x86_64"):
        out.append(Qemu(system, _version_of(system)))
    for tree in sorted(private.glob("qemu-*"), reverse=True):
        binary = tree / "usr" / "bin" / "qemu-system-x86_64"
        if binary.exists():
            out.append(
                Qemu(
                    str(binary),
                    _version_of(str(binary)),
                    str(tree / "usr" / "share" / "qemu"),
                    str(tree / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"),
                )
            )
    return out


def topology_support(accel: str, installs: list[Qemu]) -> dict[str, tuple[Qemu | None, str]]:
    """Per topology: the QEMU that runs it at every level on this host (None: it cannot run here), and why."""
    if not installs:
        return {k: (None, "no qemu-system-x86_64 (apt-get install qemu-system-x86)") for k in TCG_QEMU}
    if accel == "kvm":
        why = {
            "shadow": "L1 shadow-paged by the kernel under test (npt=0/ept=0)",
            "nested": "L1 on TDP, L2 on the kernel under test's nested (shadow) MMU",
        }
        return {k: (installs[0], f"{why[k]}, hardware virtualization, {installs[0].describe()}") for k in TCG_QEMU}
    out: dict[str, tuple[Qemu | None, str]] = {}
    for kind, fits in TCG_QEMU.items():
        q = next((q for q in installs if fits(q.release)), None)
        have = ", ".join(q.version for q in installs)
        out[kind] = (q, f"under TCG with {q.describe()}" if q else f"{TCG_QEMU_WHY[kind]} (here: {have})")
    return out


@dataclass
class TopologyDecision:
    kind: str  # "nested" or "shadow"
    qemu: Qemu  # runs every level of its cells
    reasons: list[str]


def decide_topology(requested: str, accel: str, installs: list[Qemu], kut_cpus: int = 1) -> TopologyDecision:
    """auto: nested with hardware virtualization, shadow under TCG (a nested cell there costs minutes more);
    a topology that cannot work here is an error, never a fallback."""
    kind = ("nested" if accel == "kvm" else "shadow") if requested == "auto" else requested
    qemu, why = topology_support(accel, installs)[kind]
    if qemu is None:
        raise AccelError(f"topology.kind: {kind} cannot run here: {why}")
    if kind == "nested" and accel == "tcg" and kut_cpus > 1:
        raise AccelError(
            f"topology.kind: nested under TCG needs topology.kut.cpus: 1 (got {kut_cpus}): with two "
            "emulated CPUs the kernel under test's KVM lost L1 within minutes (a triple fault), or its "
            'own memory under global reclaim (docs/qemu-and-tcg.md, "Nested under TCG")'
        )
    reasons = [why] + (
        ["auto: nested only with hardware virtualization; under TCG shadow keeps the default experiment short"]
        if requested == "auto" and kind == "shadow"
        else []
    )
    return TopologyDecision(kind, qemu, reasons)


@dataclass
class Environment:
    """What this host can do for one run, decided once and passed to every stage (and into the manifest):
    the accelerator, how guests get their root, and per topology the kind and the QEMU that runs it."""

    accel: AccelDecision
    rootfs: RootfsDecision
    topologies: dict[str, TopologyDecision]  # keyed by topology.kind as the cells ask for it (auto, ...)

    def topology(self, cell: Cell) -> TopologyDecision:
        return self.topologies[cell.config.topology.kind]

    @property
    def kinds(self) -> list[str]:
        return sorted({d.kind for d in self.topologies.values()})


QEMU_OVERHEAD_MB = 256  # the kernel under test's QEMU beyond its guest RAM (TCG's code cache, devices)


def check_host_resources(matrix: Matrix, available_mb: int | None = None, free_disk_mb: int | None = None) -> None:
    """One kernel under test runs at a time: its RAM (preallocated by the guests inside it) must fit in what
    the host has available, and its swap image (sparse, filled under pressure) on the scratch disk."""
    kut = max((c.config.topology.kut for c in matrix.cells), key=lambda k: k.memory_mb + k.swap_mb)
    need_mb, swap_mb = kut.memory_mb + QEMU_OVERHEAD_MB, kut.swap_mb
    available_mb = meminfo()["MemAvailable"] >> 10 if available_mb is None else available_mb
    scratch = tempfile.gettempdir()
    free_disk_mb = shutil.disk_usage(scratch).free >> 20 if free_disk_mb is None else free_disk_mb
    if need_mb > available_mb:
        raise HostResourceError(
            f"topology.kut.memory_mb: the kernel under test needs {need_mb} MiB with its QEMU, this host has "
            f"{available_mb} MiB available"
        )
    if swap_mb > free_disk_mb:
        raise HostResourceError(
            f"topology.kut.swap_mb: its swap image needs up to {swap_mb} MiB under {scratch}, {free_disk_mb} MiB free"
        )


def decide_environment(matrix: Matrix) -> Environment:
    """Every decision a run depends on; a cell that cannot run here fails the whole run before anything starts."""
    check_host_resources(matrix)
    accel = decide_accel(matrix.experiment.accel)
    accel.tsc_khz = host_tsc_khz() if accel.accel == "tcg" else None
    installs = qemu_installs()
    topologies: dict[str, TopologyDecision] = {
        c.config.topology.kind: decide_topology(
            c.config.topology.kind, accel.accel, installs, c.config.topology.kut.cpus
        )
        for c in matrix.cells
    }
    return Environment(accel, decide_rootfs(matrix.experiment.boot.rootfs, accel.accel), topologies)


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])
    return out
