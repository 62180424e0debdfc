"""QEMU command lines and guest topologies, as pure functions (config in, argument lists out).

Every level boots the same way, virtme-style: the built bzImage (through qboot where QEMU
ships it), the host's root shared read-only - over virtiofs (guest/rootfs.py serves it) where
a virtiofsd exists, else over virtio-9p (`multidevs=remap`) - tmpfs for what must be writable,
and a writable 9p export of its own (tag `nestout`) for its plan and results. PID 1 is the
agent (harness/guest/agent.py), run by the host's Python from the shared root, so L1 and L2
see the same tools as the host. The kernel under test also gets
a virtio-blk swap disk so that global reclaim has something to do.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import REPO_ROOT
from ..config import Experiment
from ..guest.clock import PORT as CLOCK_PORT
from ..guest.contract import OUT, SCRATCH, ChildSpec, GuestPlan, ProbeSpec, RootServer
from ..run.schedule import conductor_schedule
from .host import TopologyDecision

AGENT = REPO_ROOT / "harness" / "guest" / "agent.py"
ROOTFS_SERVER = REPO_ROOT / "harness" / "guest" / "rootfs.py"
ROOT_TAG = "nestroot"
KUT_SWAP_DEVICE = "/dev/vda"
DISTRO_KVM = ("kvm", "kvm_amd", "kvm_intel")  # a distribution kernel's own, kept out (ours are in its initrd)
# A level with guests keeps its time on the TSC: only then does its KVM answer their ptp_kvm's clock pairing
# hypercall (kvm_get_walltime_and_clockread), by which they measure their clocks far more closely than over the
# clock port (guest/clock.py; under TCG an L1 within 0.02-0.04 ms instead of 0.5-1.2, an L2 against its L1
# 0.17-0.35 ms instead of 1.4-2.0). A KVM guest otherwise runs on kvm-clock. `reliable`: no watchdog that could
# demote the TSC under emulation's uneven timing.
PARENT_CLOCKSOURCE = ("clocksource=tsc", "tsc=reliable")


@dataclass
class GuestSpec:
    name: str  # kut, l1-0, l1-0.l2-0 ...
    level: str  # kut | l1 | l2
    kernel: str
    memory_mb: int
    cpus: int
    accel: str  # kvm | tcg
    export: str  # writable results dir, as the parent sees it
    console: str  # serial console log, as the parent sees it
    python: str
    prealloc: bool = False  # guest RAM faulted in before the guest starts
    mlock: bool = False  # guest RAM locked in the parent (never swapped)
    rootfs: str = "9p"  # 9p | virtiofs (the host's root, shared) | initramfs (initramfs.py)
    rootfs_dir: str = ""  # where the root's view of / (and virtiofs's socket) lives while the guest runs
    root_view: bool = False  # 9p: QEMU exports a read-only view of / from a namespace of its own (rootfs.py)
    hidden: tuple[str, ...] = ()  # paths (globs) the view covers: what the guest must not read
    initrd: str | None = None  # initramfs: the archive; a distribution kernel: its boot archive (distro.py)
    distro_init: bool = False  # the initrd's /init (guest/distro-init.sh) loads modules, then starts the agent
    cmdline_extra: list[str] = field(default_factory=list)
    swap_image: str | None = None
    monitor: str | None = None  # QEMU human monitor socket: where a hung guest's vCPUs are (supervise.py)
    clock: str | None = None  # socket of its clock port: its parent measures its clock there (guest/clock.py)
    thp: str = "never"  # transparent_hugepage= (what backs this guest's own guests' RAM, config.LevelSpec)
    qemu: tuple[str, ...] = ("qemu-system-x86_64",)  # the command that starts it (host.Qemu.command)
    bios: str | None = None  # firmware (host.Qemu.qboot); None: QEMU's default, SeaBIOS
    export_model: str = "none"  # 9p security_model of the results export (host.export_model for the host's)

    @property
    def rootfs_socket(self) -> str:
        return f"{self.rootfs_dir}/sock"


def kernel_cmdline(spec: GuestSpec) -> str:
    # Below the kernel under test the console is a file on a 9p export, written through emulated
    # I/O: only emergencies (panics) go there; the agent keeps the whole kernel log in kmsg.log.
    quiet = spec.level != "kut"
    root = {
        "virtiofs": [f"root={ROOT_TAG}", "rootfstype=virtiofs", "ro", f"init={spec.python}"],
        "9p": [
            "root=/dev/root",
            "rootfstype=9p",
            "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose,access=any",
            "ro",
            f"init={spec.python}",
        ],
        "initramfs": [f"rdinit={spec.python}"],
    }[spec.rootfs]
    if spec.distro_init:  # /init mounts the root the command line names, then execs the interpreter after "--"
        root = [a for a in root if not a.startswith(("init=", "rdinit="))]
        root += ["rdinit=/init", f"modprobe.blacklist={','.join(DISTRO_KVM)}"]
    args = [
        "console=ttyS0",
        *([] if quiet else ["earlyprintk=serial,ttyS0"]),
        f"loglevel={1 if quiet else 5}",
        "panic=-1",
        "oops=panic",
        "random.trust_cpu=on",  # getrandom() must not block PID 1
        "mitigations=off",
        "nokaslr",
        f"transparent_hugepage={spec.thp}",
        f"nestpress.level={spec.level}",
        f"nestpress.name={spec.name}",
        *spec.cmdline_extra,
        *root,
        "--",
        *([spec.python] if spec.distro_init else []),
        "-E",
        "-S",
        str(AGENT),
    ]
    return " ".join(args)


def opt(value: str) -> str:
    """A path or name inside a QEMU option list: its commas doubled, so `x,readonly=on` stays a name."""
    return value.replace(",", ",,")


def qemu_argv(spec: GuestSpec) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    argv = [
        *spec.qemu,
        "-name",
        f"nestpress-{spec.name}",
        *cpu,
        "-machine",
        "pc,memory-backend=ram",
        # under TCG a guest that resets (a triple fault: QEMU exits 0 under -no-reboot) logs its CPU state
        *(["-d", "cpu_reset,guest_errors", "-D", f"{spec.export}/qemu.debug.log"] if spec.accel == "tcg" else []),
        *(["-bios", spec.bios] if spec.bios else []),
        "-m",
        str(spec.memory_mb),
        "-smp",
        str(spec.cpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-display",
        "none",
        "-vga",
        "none",
        "-rtc",
        "base=utc,clock=host",
        "-kernel",
        spec.kernel,
        "-append",
        kernel_cmdline(spec),
        "-serial",
        f"file:{opt(spec.console)}",
        *(["-monitor", f"unix:{opt(spec.monitor)},server=on,wait=off"] if spec.monitor else []),
        *(
            [
                "-device",
                "virtio-serial-pci,id=nestser",
                "-chardev",
                f"socket,id=nestclock,path={opt(spec.clock)},server=on,wait=off",
                "-device",
                f"virtserialport,bus=nestser.0,chardev=nestclock,name={CLOCK_PORT}",
            ]
            if spec.clock
            else []
        ),
        *{
            "virtiofs": [
                "-chardev",
                f"socket,id=root,path={opt(spec.rootfs_socket)}",
                "-device",
                f"vhost-user-fs-pci,chardev=root,tag={ROOT_TAG}",
            ],
            "9p": [
                "-fsdev",
                f"local,id=root,path={opt(spec.rootfs_dir + '/root' if spec.root_view else '/')},"
                "security_model=none,readonly=on,multidevs=remap",
                "-device",
                "virtio-9p-pci,fsdev=root,mount_tag=/dev/root",
            ],
            "initramfs": [],
        }[spec.rootfs],
        *(["-initrd", spec.initrd] if spec.initrd else []),
        "-fsdev",
        f"local,id=out,path={opt(spec.export)},security_model={spec.export_model}",
        "-device",
        "virtio-9p-pci,fsdev=out,mount_tag=nestout",
    ]
    if spec.swap_image:
        argv += ["-drive", f"file={opt(spec.swap_image)},if=virtio,format=raw,cache=unsafe"]
    if spec.mlock:
        argv += ["-overcommit", "mem-lock=on"]
    # Below the kernel under test guest RAM is resident from the start (LevelSpec.prealloc), as on a
    # busy host: reclaim in the kernel under test then meets real guest memory, and a hog has less
    # free memory to fill before reclaim begins. Two threads fault it in.
    prealloc = ",prealloc=on,prealloc-threads=2" if spec.prealloc else ""
    # virtiofs: the daemon reads and writes guest RAM directly, so it must be shareable memory
    backend = "memory-backend-memfd,share=on" if spec.rootfs == "virtiofs" else "memory-backend-ram"
    argv += ["-object", f"{backend},id=ram,size={spec.memory_mb}M{prealloc}"]
    if spec.rootfs == "9p" and spec.root_view:  # QEMU starts inside the namespace that holds the view (this
        # host's Python makes it: spec.python is the guest's init, which a test may point elsewhere)
        argv = [sys.executable, "-E", "-S", str(ROOTFS_SERVER), "--exec", spec.rootfs_dir, *spec.hidden, "--", *argv]
    return argv


def rootfs_server(spec: GuestSpec) -> RootServer | None:
    """The process that must serve the guest's root before its QEMU starts (virtiofs only), for Child."""
    if spec.rootfs != "virtiofs":
        return None
    return RootServer(
        argv=[spec.python, "-E", "-S", str(ROOTFS_SERVER), spec.rootfs_dir, *spec.hidden], socket=spec.rootfs_socket
    )


def dry_run(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def kut_params(topology: str) -> list[str]:
    """Module parameters of the kernel under test's own KVM for this topology."""
    params = ["kvm_amd.nested=1", "kvm_intel.nested=1"]
    if topology == "shadow":  # TDP off: every L1 is shadow-paged by the kernel under test
        params += ["kvm_amd.npt=0", "kvm_intel.ept=0"]
    return params


def probe_levels(exp: Experiment, topology: str) -> set[str]:
    present = {"l1", "l2"} if topology == "nested" else {"l1"}
    return {str(level) for level in exp.workload.probe.levels} & present


def build_plan(
    exp: Experiment,
    kernel: str,
    accel: str,
    decision: TopologyDecision,
    rootfs: str,
    cell_dir: Path,
    scratch: Path,
    run_id: str,
    python: str,
    warm_timeout_s: float,
    swap_image: Path | None,
    l2_initrd: Path | None = None,
    export_model: str = "none",
    variant_params: tuple[str, ...] = (),
    boot_initrd: Path | None = None,
) -> tuple[GuestSpec, GuestPlan]:
    """The kernel under test's QEMU spec and the plan tree its agent (and its children's) will follow.
    The kernel under test and L1 share the host's root (rootfs); L2 boots from l2_initrd (initramfs.py);
    every level runs the one QEMU decided for the topology. cell_dir is the results directory (the kernel
    under test's export), scratch a host-only directory for its sockets. variant_params (the variant's
    cmdline and module_params) follow the harness's own, so a variant's value wins. boot_initrd: a distribution
    kernel's boot archive, which every level boots (for L2, l2_initrd has it appended: initramfs.joined)."""
    topology, qemu = decision.kind, decision.qemu
    levels = probe_levels(exp, topology)
    system_map = str(Path(kernel).with_name("System.map"))
    p = exp.workload.probe
    probe = ProbeSpec(size_mb=p.size_mb, access=p.access, pattern=p.pattern, stride=p.stride, interval_s=p.interval_s)
    timeouts = exp.boot.timeout_s

    def guest_plan(name: str, level: str, children: list[ChildSpec]) -> GuestPlan:
        return GuestPlan(
            name=name,
            level=level,
            run_id=run_id,
            children=children,
            probe=probe if level in levels else None,
            command=exp.workload.command if level in levels else None,
            on_guest_failure=exp.boot.on_guest_failure,
        )

    def child(parent_out: str, name: str, level: str, spec_level, grandchildren: list[ChildSpec]) -> ChildSpec:
        export = f"{parent_out}/{name.split('.')[-1]}"
        spec = GuestSpec(
            name=name,
            level=level,
            kernel=kernel,
            memory_mb=spec_level.memory_mb,
            cpus=spec_level.cpus,
            prealloc=spec_level.prealloc,
            mlock=spec_level.mlock,
            accel="kvm",
            export=export,
            console=f"{export}/console.log",
            python=python,
            rootfs="initramfs" if level == "l2" else rootfs,
            initrd=str(l2_initrd) if level == "l2" else str(boot_initrd) if boot_initrd else None,
            distro_init=boot_initrd is not None,
            thp=spec_level.thp,
            qemu=tuple(qemu.command),
            bios=qemu.qboot,
            rootfs_dir=f"{SCRATCH}/{name}.rootfs",
            monitor=f"{SCRATCH}/{name}.monitor",
            clock=f"{SCRATCH}/{name}.clock",
            cmdline_extra=list(PARENT_CLOCKSOURCE) if grandchildren else [],
        )
        return ChildSpec(
            name=name,
            export=export,
            console=spec.console,
            timeout_s=timeouts.get(level, 600),
            argv=qemu_argv(spec),
            plan=guest_plan(name, level, grandchildren),
            rootfs_server=rootfs_server(spec),
            monitor=spec.monitor,
            clock=spec.clock,
            system_map=system_map,
            env=qemu.env,
        )

    if topology == "nested" and l2_initrd is None:
        raise ValueError("nested topology: the L2 initramfs must be built first (initramfs.build)")
    l1s = []
    for i in range(exp.topology.l1.count):
        l1_name = f"l1-{i}"
        l2s = (
            [child(OUT, f"{l1_name}.l2-{j}", "l2", exp.topology.l2, []) for j in range(exp.topology.l2.count)]
            if topology == "nested"
            else []
        )
        l1s.append(child(OUT, l1_name, "l1", exp.topology.l1, l2s))
    expected_probes = sum(1 for c in l1s if "l1" in levels) + sum(len(c.plan.children) for c in l1s if "l2" in levels)
    kut = GuestSpec(
        name="kut",
        level="kut",
        kernel=kernel,
        memory_mb=exp.topology.kut.memory_mb,
        cpus=exp.topology.kut.cpus,
        accel=accel,
        export=str(cell_dir),
        console=str(cell_dir / "console.log"),
        python=python,
        rootfs=rootfs,
        initrd=str(boot_initrd) if boot_initrd else None,
        distro_init=boot_initrd is not None,
        rootfs_dir=str(scratch / "kut.rootfs"),
        root_view=os.geteuid() == 0,  # the view needs a mount namespace; without one 9p exports all of /
        hidden=tuple(exp.boot.hidden),
        monitor=str(scratch / "monitor"),
        clock=str(scratch / "clock"),
        cmdline_extra=[*kut_params(topology), *PARENT_CLOCKSOURCE, *variant_params],
        thp=exp.topology.kut.thp,
        qemu=tuple(qemu.command),
        bios=qemu.qboot,
        swap_image=str(swap_image) if swap_image else None,
        export_model=export_model,
    )
    plan = guest_plan("kut", "kut", l1s)
    plan.swap_device = KUT_SWAP_DEVICE if kut.swap_image else None
    plan.cgroup_controllers = ["memory"]
    plan.topology = topology
    plan.schedule = conductor_schedule(exp, warm_timeout_s, expected_probes)
    plan.kvm_trace_on_failure = exp.boot.kvm_trace_on_failure
    return kut, plan
