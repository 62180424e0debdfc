"""`doctor`: is this host ready, and what will it use - the accelerator and topology decisions with their reasons,
the QEMUs, tools, memory and disk."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..util import HEADER_PACKAGES, TOOL_PACKAGES, which
from .host import decide_accel, decide_rootfs, meminfo, qemu_installs, topology_support


def nested_support() -> dict[str, str]:
    out = {}
    for mod in ("kvm_intel", "kvm_amd"):
        for param in ("nested", "ept", "npt"):
            p = Path(f"/sys/module/{mod}/parameters/{param}")
            if p.exists():
                out[f"{mod}.{param}"] = p.read_text().strip()
    return out


@dataclass
class Doctor:
    accel: str
    reasons: list[str]
    cpu_flags: list[str]
    nested: dict[str, str]
    rootfs: str
    rootfs_reasons: list[str]
    qemu: list[str]  # every installation: "version (path)"
    topologies: dict[str, str]  # kind -> "works: why" / "does not work: why" on this host
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
        lines = [
            f"host: {platform.node()} ({self.kernel}, {self.cpus} CPUs, {self.mem_total_mb} MiB RAM, "
            f"{self.mem_available_mb} MiB available, {self.disk_free_mb} MiB free disk for the cache)",
            f"accel: {self.accel.upper()}" + ("" if self.accel == "kvm" else "  <-- software emulation"),
            *[f"  - {r}" for r in self.reasons],
            f"nested KVM on this host: {self.nested or 'kvm_intel/kvm_amd not loaded'}",
            f"guest root filesystem: {self.rootfs} ({'; '.join(self.rootfs_reasons)})",
            f"qemu-system-x86_64: {'; '.join(self.qemu) or 'MISSING'}",
            *[f"topology {kind}: {what}" for kind, what in self.topologies.items()],
            f"cgroup v2 on this host: {'yes' if self.cgroup_v2 else 'no'} "
            "(pressure runs inside the kernel under test, which mounts its own)",
            f"python: {self.python}",
            "tools: " + ", ".join(f"{t}{'' if p else ' (MISSING)'}" for t, p in self.tools.items()),
        ]
        if self.missing_packages:
            lines.append("install: apt-get install " + " ".join(self.missing_packages) + "   (or: fab setup)")
        lines.append("ready: yes" if self.ready else "ready: NO - " + "; ".join(self.problems))
        return "\n".join(lines)


def doctor(cache_dir: Path | None = None) -> Doctor:
    d = decide_accel("auto")
    rootfs = decide_rootfs("auto", d.accel)
    tools = {t: which(t) for t in TOOL_PACKAGES}
    missing = sorted(
        {TOOL_PACKAGES[t] for t, p in tools.items() if not p}
        | {pkg for h, pkg in HEADER_PACKAGES.items() if not Path(h).exists()}
    )
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
    installs = qemu_installs()
    topologies = {
        kind: ("works " if q else "does not work: ") + why
        for kind, (q, why) in topology_support(d.accel, installs).items()
    }
    return Doctor(
        accel=d.accel,
        reasons=d.reasons,
        cpu_flags=d.cpu_flags,
        nested=nested_support(),
        rootfs=rootfs.kind,
        rootfs_reasons=rootfs.reasons,
        topologies=topologies,
        qemu=[f"{q.version} ({q.binary})" for q in installs],
        cgroup_v2=Path("/sys/fs/cgroup/cgroup.controllers").exists(),
        mem_total_mb=mi["MemTotal"] >> 10,
        mem_available_mb=mi["MemAvailable"] >> 10,
        disk_free_mb=shutil.disk_usage(disk_path).free >> 20,
        cpus=os.cpu_count() or 1,
        kernel=platform.release(),
        python=platform.python_version(),
        tools=tools,
        missing_packages=missing,
        ready=not problems,
        problems=problems,
    )
