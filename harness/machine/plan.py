"""A cell's machines as a plan tree: the kernel under test's QEMU spec, and the plan its agent (and its children's)
will follow, as pure functions of a CellMachines (what the cell is made of) and the schedule it conducts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Experiment, LevelSpec
from ..guest.contract import OUT, SCRATCH, ChildSpec, GuestPlan, ProbeSpec, Schedule, WorkloadSpec
from ..guest.workloads.base import Binaries
from .host import TopologyDecision
from .qemu import PARENT_CLOCKSOURCE, GuestSpec, kut_params, qemu_argv, rootfs_server

KUT_SWAP_DEVICE = "/dev/vda"


def present_levels(exp: Experiment, topology: str) -> set[str]:
    """The levels a cell has: the kernel under test, L1 where it starts any, L2 where the topology nests."""
    t = exp.topology
    present = {"kut", "l1"} if t.l1.count else {"kut"}
    return present | ({"l2"} if topology == "nested" and t.l1.count and t.l2.count else set())


def probe_levels(exp: Experiment, topology: str) -> set[str]:
    return {str(level) for level in exp.workload.probe.levels} & present_levels(exp, topology)


@dataclass
class CellMachines:
    """What one cell's machines are made of. The kernel under test and L1 share the host's root (rootfs); L2 boots
    from l2_initrd (initramfs.py); every level runs the one QEMU decided for the topology. cell_dir is the results
    directory (the kernel under test's export), scratch a host-only directory for its sockets. variant_params (the
    variant's cmdline and module_params) follow the harness's own, so a variant's value wins. boot_initrd: a
    distribution kernel's boot archive, which every level boots (for L2, l2_initrd has it appended)."""

    exp: Experiment
    kernel: Path
    accel: str
    topology: TopologyDecision
    rootfs: str
    cell_dir: Path
    scratch: Path
    run_id: str
    python: str
    swap_image: Path | None = None
    l2_initrd: Path | None = None
    export_model: str = "none"
    variant_params: tuple[str, ...] = ()
    boot_initrd: Path | None = None
    tsc_khz: int | None = None  # the kernel under test's TSC rate, where it is known better than it measures it
    # what the variant's build made for its workloads (its KVM selftests)
    binaries: Binaries = dataclasses.field(default_factory=Binaries)

    @property
    def probe(self) -> ProbeSpec:
        p = self.exp.workload.probe
        return ProbeSpec(
            size_mb=p.size_mb, access=p.access, pattern=p.pattern, stride=p.stride, interval_s=p.interval_s
        )

    def guest_plan(self, name: str, level: str, children: list[ChildSpec]) -> GuestPlan:
        runs = level in probe_levels(self.exp, self.topology.kind)
        return GuestPlan(
            name=name,
            level=level,
            run_id=self.run_id,
            children=children,
            probe=self.probe if runs else None,
            command=self.exp.workload.command if runs else None,
            workloads=self.workloads(level),
            on_guest_failure=self.exp.boot.on_guest_failure,
        )

    def workloads(self, level: str) -> list[WorkloadSpec]:
        """The workload entries this level runs (workload.runs), with the argv each makes for this build."""
        return [
            WorkloadSpec(
                name=run.label,
                kind=run.kind,
                argv=run.workload.argv(run.knobs, self.binaries),
                params=dataclasses.asdict(run.knobs) if run.knobs is not None else {},
                timeout_s=run.timeout_s,
                pause_s=run.pause_s,
            )
            for run in self.exp.workload.runs_at(level)
        ]

    def child(self, parent_out: str, name: str, level: str, spec_level: LevelSpec, grandchildren: list[ChildSpec]):
        """A guest the kernel under test (an L1) or an L1 (an L2) starts: its QEMU and the plan it follows."""
        export = f"{parent_out}/{name.split('.')[-1]}"
        qemu = self.topology.qemu
        spec = GuestSpec(
            name=name,
            level=level,
            kernel=str(self.kernel),
            memory_mb=spec_level.memory_mb,
            cpus=spec_level.cpus,
            prealloc=spec_level.prealloc,
            mlock=spec_level.mlock,
            accel="kvm",
            export=export,
            console=f"{export}/console.log",
            python=self.python,
            rootfs="initramfs" if level == "l2" else self.rootfs,
            initrd=str(self.l2_initrd) if level == "l2" else str(self.boot_initrd) if self.boot_initrd else None,
            distro_init=self.boot_initrd is not None,
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
            timeout_s=self.exp.boot.timeout_s.get(level, 600),
            argv=qemu_argv(spec),
            plan=self.guest_plan(name, level, grandchildren),
            rootfs_server=rootfs_server(spec),
            monitor=spec.monitor,
            clock=spec.clock,
            system_map=str(self.kernel.with_name("System.map")),
            env=qemu.env,
        )

    def l1s(self) -> list[ChildSpec]:
        t = self.exp.topology
        if self.topology.kind == "nested" and self.l2_initrd is None:
            raise ValueError("nested topology: the L2 initramfs must be built first (initramfs.build)")
        out = []
        for i in range(t.l1.count):
            name = f"l1-{i}"
            l2s = [self.child(OUT, f"{name}.l2-{j}", "l2", t.l2, []) for j in range(t.l2.count)]
            out.append(self.child(OUT, name, "l1", t.l1, l2s if self.topology.kind == "nested" else []))
        return out

    def expected_probes(self) -> int:
        """How many probes the kernel under test waits for before the phases start."""
        t, levels = self.exp.topology, probe_levels(self.exp, self.topology.kind)
        return t.l1.count * (("l1" in levels) + ("l2" in levels) * t.l2.count)

    def kut(self) -> GuestSpec:
        t, qemu = self.exp.topology, self.topology.qemu
        return GuestSpec(
            name="kut",
            level="kut",
            kernel=str(self.kernel),
            memory_mb=t.kut.memory_mb,
            cpus=t.kut.cpus,
            accel=self.accel,
            export=str(self.cell_dir),
            console=str(self.cell_dir / "console.log"),
            python=self.python,
            rootfs=self.rootfs,
            initrd=str(self.boot_initrd) if self.boot_initrd else None,
            distro_init=self.boot_initrd is not None,
            rootfs_dir=str(self.scratch / "kut.rootfs"),
            root_view=os.geteuid() == 0,  # the view needs a mount namespace; without one 9p exports all of /
            hidden=tuple(self.exp.boot.hidden),
            monitor=str(self.scratch / "monitor"),
            clock=str(self.scratch / "clock"),
            cmdline_extra=[
                *kut_params(self.topology.kind),
                *PARENT_CLOCKSOURCE,
                *([f"tsc_early_khz={self.tsc_khz}"] if self.tsc_khz else []),
                *self.variant_params,
            ],
            thp=t.kut.thp,
            qemu=tuple(qemu.command),
            bios=qemu.qboot,
            swap_image=str(self.swap_image) if self.swap_image else None,
            export_model=self.export_model,
        )


def build_plan(m: CellMachines, schedule: Schedule) -> tuple[GuestSpec, GuestPlan]:
    """The kernel under test's QEMU spec and the plan tree its agent conducts `schedule` by."""
    kut = m.kut()
    plan = m.guest_plan("kut", "kut", m.l1s())
    plan.swap_device = KUT_SWAP_DEVICE if kut.swap_image else None
    plan.cgroup_controllers = ["memory"]
    plan.topology = m.topology.kind
    plan.schedule = schedule
    plan.kvm_trace_on_failure = m.exp.boot.kvm_trace_on_failure
    return kut, plan
