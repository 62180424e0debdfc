"""One attempt at one cell, in three stages: prepare (scratch directory, swap image, plan tree, host memory group),
boot (the kernel under test's QEMU, followed until it powers off or runs past its budget), judge (its exit record,
the guests' failures, whether the cell measured what it was for). Whatever happens, every QEMU it started is
stopped, its memory group removed and what the guests left in results/ made safe.

A cell that failed for the guests' or the emulator's reasons raises GuestError (the runner retries it); one whose
kernel cannot run the schedule at all raises PressureError (no retry, no further cells).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Cell
from ..errors import GuestError, PressureError
from ..guest.contract import GUEST_FAILURES, EventKind, ExitKind, ExitRecord
from ..guest.records import Event
from ..guest.supervise import Child, tail
from ..guest.workloads.base import Binaries
from ..kernel.build import BuildResult
from ..machine import initramfs
from ..machine.host import Environment
from ..machine.memory_group import GROUP_SLACK_MB, MemoryGroup
from ..machine.plan import CellMachines, build_plan, present_levels, probe_levels
from ..machine.qemu import GuestSpec, dry_run, qemu_argv, rootfs_server
from ..results import crashes
from ..results.guest_files import (
    GuestFileError,
    Problems,
    defuse,
    json_object,
    json_record,
    present,
    read_text,
    records,
)
from ..results.manifest import CellEntry, CellRecord
from ..results.tables import cell_frames
from ..util import fmt_s, log, python_for_guests, status, warn, write_json
from . import checks
from .schedule import conductor_schedule

WARM_TIMEOUT_S = 240
SHUTDOWN_S = 90
STAGES = {
    EventKind.BOOT_READY: "{guest} up, warming probes",
    EventKind.PROBE_START: "warming probes",
    EventKind.PROBES_WARM: "probes warm",
}


@dataclass
class Watch:
    """The kernel under test's progress as the host reads it in its events (guest data): the stage for the status
    line and, while a phase runs, when that phase's end is due: a kernel under test still in it then went silent.
    Once the schedule's last phase has ended it has SHUTDOWN_S to power off (its guests stop, it writes exit.json:
    1-9 s measured); one still running then froze winding down (seen in CI: only the cell's budget caught it)."""

    overrun_s: float  # checks.max_phase_overrun_s
    last_phase: str = ""  # the schedule's last phase: its end starts the wind-down
    stage: str = "booting guests"
    phase: str = ""  # the line of the phase start or last end being timed, so that each is timed once
    due: float | None = None  # time.monotonic() by which that phase's end (or the power-off) must be on record

    @property
    def missed(self) -> str:
        """What a kernel under test past `due` did not do, for the freeze note."""
        if self.stage.startswith("winding down"):
            return f"not powered off {SHUTDOWN_S} s after its last phase ended"
        return f"its phase not ended {self.overrun_s:g} s after its length"

    def read(self, events: Path, now: float) -> None:
        last: tuple[Event, str] | None = None  # the last phase start or end in these lines
        with contextlib.suppress(GuestFileError, OSError):
            for line in read_text(events, tail=4096).splitlines()[-5:]:
                with contextlib.suppress(ValueError, TypeError, KeyError, RecursionError):
                    e = Event.from_guest(json_record(line))
                    if e.kind is EventKind.PHASE_START:
                        self.stage = f"phase {e.phase} ({e.mode}, {e.duration_s or 0:g}s)"
                    elif e.kind is EventKind.PHASE_END and e.phase == self.last_phase:
                        self.stage = f"winding down after phase {e.phase}"
                    elif e.kind in STAGES:
                        self.stage = STAGES[e.kind].format(guest=e.guest)
                    if e.kind in (EventKind.PHASE_START, EventKind.PHASE_END):
                        last = e, line
        if not last or last[1] == self.phase:
            return
        if last[0].kind is EventKind.PHASE_START:
            self.phase, self.due = last[1], now + (last[0].duration_s or 0) + self.overrun_s
        elif last[0].phase == self.last_phase and self.last_phase:
            self.phase, self.due = last[1], now + SHUTDOWN_S
        else:
            self.due = None


@dataclass
class RunContext:
    """What every attempt of a run shares: where it goes, what this host decided, the cache and L2's root."""

    run_dir: Path
    env: Environment
    cache: Path
    l2_initrd: Path | None
    export_model: str
    group_said: bool = False


@dataclass
class Progress:
    """Where the run stands, for the status line: cell k of n, since t0, with a cell's estimated length, `parallel`
    cells at a time."""

    k: int
    n: int
    t0: float
    estimate_s: float
    parallel: int = 1

    def remaining_s(self, in_cell_s: float) -> float:
        waves_left = -(-(self.n - self.k + 1) // self.parallel)
        return max(0.0, self.estimate_s * waves_left - in_cell_s)


class Attempt:
    def __init__(
        self,
        ctx: RunContext,
        cell: Cell,
        build: BuildResult,
        cell_dir: Path,
        progress: Progress,
        cpus: frozenset[int] = frozenset(),
    ):
        self.ctx, self.cell, self.build, self.cell_dir, self.progress = ctx, cell, build, cell_dir, progress
        self.cpus = cpus  # the host CPUs its kernel under test runs on (cells side by side), empty: any
        self.kut: Child | None = None
        self.froze: tuple[str, str] | None = None  # (its last stage, what it missed) when it went silent
        self.exp = cell.config
        self.topology = ctx.env.topology(cell)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"nestpress-{ctx.run_dir.name}-"))
        self.group: MemoryGroup | None = None

    def run(self) -> CellRecord:
        try:
            spec = self.prepare()
            kut, started, ready = self.boot(spec)
            return self.judge(kut, spec, started, ready)
        finally:
            if self.kut:  # its own QEMU only: a cell beside it goes on
                self.kut.stop(grace=2.0)
            self.note_freeze()
            if self.group:
                self.group.remove()
            defuse(self.cell_dir)
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- prepare -------------------------------------------------------------------------------------
    def machines(self) -> CellMachines:
        swap = None
        if self.exp.topology.kut.swap_mb:
            swap = self.scratch / "swap.img"
            with open(swap, "wb") as f:
                f.truncate(self.exp.topology.kut.swap_mb << 20)
        l2 = self.ctx.l2_initrd
        return CellMachines(
            exp=self.exp,
            kernel=self.build.bzimage,
            accel=self.ctx.env.accel.accel,
            topology=self.topology,
            rootfs=self.ctx.env.rootfs.kind,
            cell_dir=self.cell_dir,
            scratch=self.scratch,
            run_id=self.ctx.run_dir.name,
            python=python_for_guests(),
            swap_image=swap,
            l2_initrd=initramfs.joined(l2, self.build.initrd, self.ctx.cache) if l2 and self.build.initrd else l2,
            export_model=self.ctx.export_model,
            variant_params=tuple(self.exp.variant(self.cell.variant).kernel_params()),
            boot_initrd=self.build.initrd,
            tsc_khz=self.ctx.env.accel.tsc_khz,
            binaries=Binaries(kvm_selftests=str(self.build.selftests) if self.build.selftests else None),
        )

    def prepare(self) -> GuestSpec:
        """The plan tree in the cell directory, the kernel under test's command line beside it, its memory group."""
        m = self.machines()
        # nested: L1 is up before its L2s boot, so the probes' warm-up includes an L2 boot
        warm_s = WARM_TIMEOUT_S + (self.exp.boot.timeout_s.get("l2", 0) if self.topology.kind == "nested" else 0)
        spec, plan = build_plan(m, conductor_schedule(self.exp, warm_s, m.expected_probes()))
        plan.cell = self.cell.id
        plan.save(str(self.cell_dir / "plan.json"))
        (self.cell_dir / "qemu.cmdline").write_text(dry_run(qemu_argv(spec)) + "\n")
        name = re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{self.ctx.run_dir.name}-{self.cell.id}-{os.getpid()}")
        self.group, about = MemoryGroup.create(name, self.limit_mb)
        if not self.ctx.group_said:
            (log if self.group else warn)(f"host memory group for each kernel under test: {about}")
            self.ctx.group_said = True
        return spec

    @property
    def limit_mb(self) -> int:
        return self.exp.topology.kut.memory_mb + GROUP_SLACK_MB

    # -- boot ----------------------------------------------------------------------------------------
    def budget_s(self) -> float:
        """Twice the cell's estimate, plus the boot timeouts of the levels this topology has: a hung cell is given
        up (and retried) that much sooner."""
        levels = ("kut", "l1", "l2") if self.topology.kind == "nested" else ("kut", "l1")
        boots = sum(t for level, t in self.exp.boot.timeout_s.items() if level in levels)
        return self.progress.estimate_s * 2 + boots + SHUTDOWN_S

    def boot(self, spec: GuestSpec) -> tuple[Child, float, float]:
        """Start the kernel under test, wait for its agent, follow it until it powers off: (it, start, ready s)."""
        kut = Child(
            "kut",
            qemu_argv(spec),
            str(self.cell_dir),
            spec.console,
            rootfs_server=rootfs_server(spec),
            monitor=spec.monitor,
            clock=spec.clock,
            system_map=str(self.build.dir / "System.map"),
            env=self.topology.qemu.env,
            view_dir=spec.rootfs_dir if spec.root_view else None,
            cgroup_procs=self.group.procs if self.group else None,
            cpus=self.cpus,
        )
        self.kut = kut
        started = time.time()
        try:
            kut.start()
            ready = kut.wait_ready(self.exp.boot.timeout_s.get("kut", 120))
        except RuntimeError as e:
            raise GuestError(str(e)) from None
        # its facts come before its ready: a module parameter it lacks fails the cell before any guest boots
        if wrong := checks.param_mismatches(self.cell_dir, self.exp.variant(self.cell.variant).module_params_text()):
            raise GuestError(
                f"cell {self.cell.id}: the kernel under test booted without its variant's " + "; ".join(wrong)
            )
        self.follow(kut, self.budget_s())
        kut.stop()
        return kut, started, ready

    def follow(self, kut: Child, budget: float) -> None:
        """Wait for the kernel under test to power off, showing which stage it is in; one that runs past its budget,
        or stays in a phase past that phase's end, went silent (a freeze): given up then, not at the budget's end."""
        p, cell = self.progress, self.cell
        last = self.exp.phases[-1].name if self.exp.phases else ""
        watch, deadline = Watch(self.exp.checks.max_phase_overrun_s, last), time.monotonic() + budget
        with status(f"cell {p.k}/{p.n} {cell.id}: {watch.stage}") as line:
            while kut.running():
                now = time.monotonic()
                watch.read(self.cell_dir / "events.jsonl", now)
                if now > deadline or (watch.due is not None and now > watch.due):
                    said = f"no progress until its {budget:.0f} s budget ran out" if now > deadline else watch.missed
                    self.froze = (watch.stage, said)
                    raise GuestError(
                        f"cell {cell.id}: the kernel under test went silent ({said}; last stage: {watch.stage}); "
                        f"console:\n{tail(kut.console)}"
                    )
                eta = p.remaining_s(now - kut.started)
                elapsed = fmt_s(now - p.t0)
                line.update(f"cell {p.k}/{p.n} {cell.id}: {watch.stage} | elapsed {elapsed} | remaining ~{fmt_s(eta)}")
                time.sleep(1)
        log(f"cell {p.k}/{p.n} {cell.id}: done in {fmt_s(time.monotonic() - kut.started)}")

    def note_freeze(self) -> None:
        """With its QEMU off (nothing in the guest writes any more): the host's note of a silent freeze, or no
        note at all - a file of that name the guest left is removed (results/crashes.py reads the note)."""
        path = self.cell_dir / crashes.FREEZE_NOTE
        with contextlib.suppress(OSError):
            path.unlink()
        if self.froze:
            stage, said = self.froze
            with contextlib.suppress(OSError):
                write_json(path, {"stage": stage, "said": said})

    # -- judge ---------------------------------------------------------------------------------------
    def exit_record(self) -> ExitRecord | None:
        """exit.json as the kernel under test left it: absent is None, torn or not a record is said."""
        path = self.cell_dir / "exit.json"
        if not present(path):
            return None
        problems = Problems()
        raw = json_object(path, problems, self.cell_dir)
        try:
            return ExitRecord.from_guest(raw if raw is not None else {}, str(path))
        except (ValueError, TypeError) as e:
            why = "; ".join(problems) or str(e)
            raise GuestError(f"cell {self.cell.id}: exit.json is torn or no exit record ({why})") from None

    def judge(self, kut: Child, spec: GuestSpec, started: float, ready: float) -> CellRecord:
        """How the cell ended: its kernel under test's exit record, its guests' failures, what it measured."""
        if defused := defuse(self.cell_dir):
            warn(f"cell {self.cell.id}: removed or made safe what guests left in results: {', '.join(defused[:10])}")
        exit_info = self.exit_record()
        if exit_info is None and self.group and self.group.oom_kills():
            raise GuestError(
                f"kut's QEMU was OOM-killed inside its host memory group ({self.limit_mb} MiB: guest RAM + "
                f"{GROUP_SLACK_MB} MiB); console:\n{tail(spec.console)}"
            )
        if exit_info is None:
            raise GuestError(
                f"kut exited without exit.json (QEMU status {kut.returncode}: 0 with -no-reboot "
                f"is a reset, e.g. a triple fault; qemu.debug.log has the CPU state); console:\n{tail(spec.console)}"
            )
        if exit_info.kind is ExitKind.PREFLIGHT:
            # the same kernel fails the same way every time: no retry, no further cells
            raise PressureError(exit_info.message or "the kernel under test cannot run this schedule")
        if exit_info.kind is ExitKind.ERROR:
            raise GuestError(f"agent in the kernel under test failed:\n{(exit_info.error or '')[-1500:]}")
        failures = self.guest_failures()
        if failures and self.exp.boot.on_guest_failure == "fail":
            raise GuestError(f"guest failure(s) in {self.cell.id}: " + "; ".join(f[:300] for f in failures))
        if short := self.shortfalls():
            raise GuestError(f"cell {self.cell.id} did not measure what it was for: " + "; ".join(short))
        return CellRecord(
            status="complete",
            attempt=0,
            kut_ready_s=ready,
            kut_kernel_s=kut.kernel_ready_s,
            started=started,
            finished=time.time(),
            pressure_mode=self.exp.pressure.mode,
            guest_failures=[f[:500] for f in failures],
        )

    def guest_failures(self) -> list[str]:
        """What the kernel under test said of guests that failed to boot, died or never warmed up."""
        problems = Problems()
        events = records(self.cell_dir / "events.jsonl", problems, self.cell_dir, Event.from_guest)
        failures = [e.error or e.kind.value for e in events if e.kind in GUEST_FAILURES]
        for p in problems:
            warn(f"cell {self.cell.id}: {p}")
        return failures

    def shortfalls(self) -> list[str]:
        c = self.cell
        entry = CellEntry(id=c.id, variant=c.variant, repetition=c.repetition, order=c.order)
        levels = probe_levels(self.exp, self.topology.kind)
        phases = [p.name for p in self.exp.phases]
        frames = cell_frames(self.cell_dir, entry)
        present = present_levels(self.exp, self.topology.kind)
        expected = {run.label: run.level for run in self.exp.workload.runs if run.level in present}
        short = checks.shortfalls(
            frames,
            self.cell_dir,
            self.exp.checks,
            phases,
            levels,
            self.exp.sampler.interval_s,
        )
        return short + checks.workload_shortfalls(frames["runs"], frames["workload_metrics"], expected)
