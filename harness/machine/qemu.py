"""QEMU command lines, as pure functions (a GuestSpec in, an argument list out).

Every level boots the same way, virtme-style: the built bzImage (through qboot where QEMU
ships it), the host's root shared read-only - over virtiofs (guest/rootfs.py serves it) where
a virtiofsd exists, else over virtio-9p (`multidevs=remap`) - tmpfs for what must be writable,
and a writable 9p export of its own (tag `nestout`) for its plan and results. PID 1 is the
agent (harness/guest/agent.py), run by the host's Python from the shared root, so L1 and L2
see the same tools as the host. The kernel under test also gets
a virtio-blk swap disk so that global reclaim has something to do.
"""

from __future__ import annotations

import shlex

from .. import REPO_ROOT
from ..guest.clock import PORT as CLOCK_PORT
from ..guest.contract import RootServer
from .roots import ROOTS, opt
from .spec import GuestSpec

AGENT = REPO_ROOT / "harness" / "guest" / "agent.py"
DISTRO_KVM = ("kvm", "kvm_amd", "kvm_intel")  # a distribution kernel's own, kept out (ours are in its initrd)
# A level with guests keeps its time on the TSC: only then does its KVM answer their ptp_kvm's clock pairing
# hypercall (kvm_get_walltime_and_clockread), by which they measure their clocks far more closely than over the
# clock port (guest/clock.py; under TCG an L1 within 0.02-0.04 ms instead of 0.5-1.2, an L2 against its L1
# 0.17-0.35 ms instead of 1.4-2.0). A KVM guest otherwise runs on kvm-clock. `reliable`: no watchdog that could
# demote the TSC under emulation's uneven timing.
PARENT_CLOCKSOURCE = ("clocksource=tsc", "tsc=reliable")


def kernel_cmdline(spec: GuestSpec) -> str:
    # Below the kernel under test the console is a file on a 9p export, written through emulated
    # I/O: only emergencies (panics) go there; the agent keeps the whole kernel log in kmsg.log.
    quiet = spec.level != "kut"
    root = ROOTS[spec.rootfs].cmdline(spec)
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
        *ROOTS[spec.rootfs].devices(spec),
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
    root = ROOTS[spec.rootfs]
    backend = "memory-backend-memfd,share=on" if root.shared_memory else "memory-backend-ram"
    argv += ["-object", f"{backend},id=ram,size={spec.memory_mb}M{prealloc}"]
    return root.wrap(argv, spec)


def rootfs_server(spec: GuestSpec) -> RootServer | None:
    """The process that must serve the guest's root before its QEMU starts (virtiofs only), for Child."""
    return ROOTS[spec.rootfs].server(spec)


def dry_run(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def kut_params(topology: str) -> list[str]:
    """Module parameters of the kernel under test's own KVM for this topology."""
    params = ["kvm_amd.nested=1", "kvm_intel.nested=1"]
    if topology == "shadow":  # TDP off: every L1 is shadow-paged by the kernel under test
        params += ["kvm_amd.npt=0", "kvm_intel.ept=0"]
    return params
