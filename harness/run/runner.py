"""Run an experiment: build -> manifest -> cells (boot, conduct, collect) -> tables -> report.

The run directory results/<experiment>/<run-id>/ gets manifest.json before the first cell
starts, and one directory per cell that the kernel under test's agent fills as it goes
(cells/<cell-id>/, with L1/L2 exports nested inside). records/<cell-id>.json, which only the host
writes, marks a cell complete;
running again into the same run directory skips complete cells and redoes the rest.
Ctrl-C (or SIGTERM) at any point stops every QEMU of the run, removes its temp dir and
leaves a manifest that says `interrupted`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .. import REPO_ROOT
from ..config import Cell, Matrix
from ..errors import ConfigError, GuestError, HarnessError, PressureError
from ..guest.contract import GUEST_FAILURES, PATH, ContractError, EventKind, ExitKind, ExitRecord
from ..guest.supervise import Child, stop_all, tail
from ..kernel.build import Builder, BuildResult
from ..machine import initramfs
from ..machine.host import GROUP_SLACK_MB, MemoryGroup, decide_environment, doctor, export_model
from ..machine.qemu import build_plan, dry_run, probe_levels, qemu_argv, rootfs_server
from ..results.manifest import AccelRecord, BuildEntry, CellEntry, CellRecord, Manifest, cell_complete, record_path
from ..results.tables import Problems, cell_frames, guest_records
from ..util import (
    GuestFileError,
    console,
    default_cache,
    defuse_guest_files,
    fmt_s,
    log,
    python_for_guests,
    read_guest_file,
    status,
    warn,
)
from . import checks as health
from .schedule import check as check_sizes
from .schedule import check_kernel

WARM_TIMEOUT_S = 240
STAGES = {
    EventKind.BOOT_READY.value: "{guest} up, warming probes",
    EventKind.PROBE_START.value: "warming probes",
    EventKind.PROBES_WARM.value: "probes warm",
}
SHUTDOWN_S = 90


def harness_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def new_run_id() -> str:
    """Sorts by start time; the random tail keeps two runs started in the same second apart."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_run_id(run_id: str) -> str:
    """A run id is one directory name under <output>/<experiment>: never a path, never `..`."""
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"--run-id {run_id!r}: letters, digits, '_', '.', '-' only (a name, not a path)")
    return run_id


def find_run_dir(matrix: Matrix, run_id: str | None, resume: bool, root: Path | None = None) -> Path:
    """An explicit run id (resume into it), the newest run of this config (--resume), or a new one."""
    base = (root or Path(matrix.experiment.output)).resolve() / matrix.experiment.name
    if run_id:
        return base / check_run_id(run_id)
    if resume and base.exists():
        for d in sorted(base.iterdir(), reverse=True):
            m = d / "manifest.json"
            if m.exists() and Manifest.load(m).config_hash == matrix.config_hash():
                return d
    return base / new_run_id()


def lock_run_dir(run_dir: Path) -> int:
    """One writer per run directory (a second run with the same --run-id, here or from a fleet job, would
    interleave cells and records): an exclusive lock held while the run lasts; returns its descriptor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HarnessError(
            f"{run_dir}: another nestpress run (pid {holder}) is writing this run directory; wait for it to end "
            "or choose another --run-id"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


class Runner:
    def __init__(self, matrix: Matrix, run_dir: Path, cache: Path | None = None, reproduce: str = ""):
        self.matrix, self.exp, self.run_dir = matrix, matrix.experiment, run_dir
        self.cache = cache
        self.reproduce = reproduce
        self.env = decide_environment(matrix)
        self.cell_times: list[float] = []
        self.l2_initrd: Path | None = None
        self.group_said = False
        self.export_model = "none"

    # -- manifest -----------------------------------------------------------------------------
    def _manifest(self, builds: dict[str, BuildResult]) -> Manifest:
        params = {v.name: v.kernel_params() for v in self.exp.variants}
        env, matrix = self.env, self.matrix
        path = self.run_dir / "manifest.json"
        old = Manifest.load(path) if path.exists() else None
        return Manifest(
            experiment=self.exp.name,
            run_id=self.run_dir.name,
            started=old.started if old else time.time(),
            resumed=old.resumed + [time.time()] if old else [],
            duration_s=old.duration_s if old else 0.0,
            config_path=matrix.config_path,
            config_hash=matrix.config_hash(),
            config=matrix.raw,
            expanded=self.exp.model_dump(by_alias=True),
            axes=matrix.axes,
            cells=[
                CellEntry(
                    id=c.id,
                    variant=c.variant,
                    repetition=c.repetition,
                    axes=c.axes,
                    order=c.order,
                    topology=self._topology(c),
                )
                for c in matrix.cells
            ],
            harness_commit=harness_commit(),
            accel=AccelRecord(
                kut=env.accel.accel,
                l2="kvm" if "nested" in env.kinds else None,
                reasons=env.accel.reasons,
                banner=env.accel.banner,
            ),
            topology=", ".join(env.kinds),
            topology_reasons={k: d.reasons for k, d in env.topologies.items()},
            qemu={d.kind: {"version": d.qemu.version, "binary": d.qemu.binary} for d in env.topologies.values()},
            rootfs={"kind": env.rootfs.kind, "reasons": env.rootfs.reasons},
            builds={
                name: BuildEntry(
                    key=b.key,
                    dir=str(b.dir),
                    kernelrelease=b.metadata.get("kernelrelease"),
                    kernel_version=b.metadata["about"]["kernel_version"],
                    source=b.metadata["about"]["source_description"],
                    own_source=b.metadata["about"]["own_source"],
                    patch_variant=b.metadata["about"]["patch_variant"],
                    patches=b.metadata["about"]["patches"],
                    patched_result=b.metadata["inputs"]["patched_result"],
                    evidence=b.metadata["about"]["evidence"],
                    kernel_params=params[name],
                    config_sha256=b.metadata.get("config_sha256"),
                    fragments=b.metadata["inputs"].get("fragments", {}),
                    distro_image=b.metadata["inputs"].get("distro_image", {}),
                    bzImage_sha256=b.metadata.get("artifacts", {}).get("bzImage"),
                )
                for name, b in builds.items()
            },
            host=doctor(self.cache).as_dict(),
            reproduce=self.reproduce,
        )

    # -- run ----------------------------------------------------------------------------------
    def run(self) -> Path:
        env = self.env
        console.print(
            f"[bold]{env.accel.banner}[/bold]", style="bold green" if env.accel.accel == "kvm" else "bold yellow"
        )
        for d in env.topologies.values():
            console.print(f"topology: {d.kind} ({'; '.join(d.reasons)})")
        console.print(f"guest root filesystem: {env.rootfs.kind} (read-only; {'; '.join(env.rootfs.reasons)})")
        for cell in self.matrix.cells:
            check_sizes(cell.config, self._topology(cell))
        builds = Builder(self.exp, self.cache).build_all()
        for cell in self.matrix.cells:
            check_kernel(cell.config, cell.variant, builds[cell.variant].dir / "config", env.rootfs.kind)
        if "nested" in env.kinds:
            probe = self.exp.workload.probe
            self.l2_initrd = initramfs.build(
                python_for_guests(),
                self.exp.workload.command if "l2" in probe.levels else None,
                PATH,
                self.cache or default_cache(),
            )
            log(f"L2 root: initramfs {self.l2_initrd} ({self.l2_initrd.stat().st_size >> 20} MiB)")
        if not any(self.run_dir.is_relative_to(p) for p in (REPO_ROOT, Path.cwd().resolve())):
            log(f"results go outside the project, as the config or --output says: {self.run_dir}", style="yellow")
        lock = lock_run_dir(self.run_dir)
        self.export_model, why = export_model(self.run_dir)
        (log if self.export_model != "none" else warn)(f"results export: 9p security_model={self.export_model} ({why})")
        try:
            return self._run_cells(builds)
        finally:
            os.close(lock)

    def _run_cells(self, builds: dict[str, BuildResult]) -> Path:
        manifest = self._manifest(builds)
        manifest.save(self.run_dir / "manifest.json")
        log(f"run directory: {self.run_dir}")
        old = signal.signal(signal.SIGTERM, _on_sigterm)
        t0 = time.monotonic()
        try:
            todo = [c for c in self.matrix.cells if not self._complete(c)]
            if len(todo) < len(self.matrix.cells):
                log(f"resume: {len(self.matrix.cells) - len(todo)} cell(s) already complete, {len(todo)} to run")
            for k, cell in enumerate(todo, 1):
                self._run_cell(cell, builds[cell.variant], k, len(todo), t0)
            manifest.status = "complete" if all(self._complete(c) for c in self.matrix.cells) else "incomplete"
        except HarnessError:
            manifest.status = "failed"
            raise
        except (KeyboardInterrupt, _Terminated):
            manifest.status = "interrupted"
            raise HarnessError(
                f"interrupted: every QEMU of the run was stopped; partial results in {self.run_dir} "
                f"(run again with --run-id {self.run_dir.name} to resume)"
            ) from None
        finally:
            stop_all()
            signal.signal(signal.SIGTERM, old)
            manifest.finished = time.time()
            manifest.duration_s += time.monotonic() - t0
            manifest.save(self.run_dir / "manifest.json")
        return self.run_dir

    def _topology(self, cell: Cell) -> str:
        return self.env.topology(cell).kind

    def _complete(self, cell: Cell) -> bool:
        return cell_complete(self.run_dir, cell.id)

    def _estimate(self, cell: Cell) -> float:
        if self.cell_times:
            return sum(self.cell_times) / len(self.cell_times)
        boots = 10 + 25 * (2 if self._topology(cell) == "nested" else 1) if self.env.accel.accel == "tcg" else 10
        return boots + 20 + sum(p.duration_s for p in cell.config.phases)

    def _run_cell(self, cell: Cell, build: BuildResult, k: int, n: int, t0: float) -> None:
        attempts = cell.config.boot.retries + 1
        errors: list[str] = []
        record = record_path(self.run_dir, cell.id)
        record.parent.mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            cell_dir = self.run_dir / "cells" / cell.id
            if cell_dir.exists():  # an incomplete earlier attempt: kept aside for diagnosis, redone whole
                kept = self.run_dir / "failed" / f"{cell.id}.{time.strftime('%H%M%S')}"
                kept.parent.mkdir(exist_ok=True)
                cell_dir.rename(kept)
                log(f"cell {cell.id}: the failed attempt's files are in {kept}")
            cell_dir.mkdir(parents=True)
            started = time.monotonic()
            try:
                result = self._attempt(cell, build, cell_dir, k, n, t0)
            except PressureError as e:
                CellRecord(status="failed", attempt=attempt, errors=[*errors, str(e)], fatal=True).save(record)
                raise
            except GuestError as e:
                errors.append(str(e))
                CellRecord(status="failed", attempt=attempt, errors=errors).save(record)
                warn(f"cell {cell.id} attempt {attempt}/{attempts} failed: {e}")
                continue
            self.cell_times.append(time.monotonic() - started)
            result.attempt, result.retried, result.errors = attempt, attempt > 1, errors
            result.save(record)
            return
        log(f"cell {cell.id}: gave up after {attempts} attempt(s); the report will list it as missing", style="red")

    def _attempt(self, cell: Cell, build: BuildResult, cell_dir: Path, k: int, n: int, t0: float) -> CellRecord:
        exp = cell.config
        tmp = Path(tempfile.mkdtemp(prefix=f"nestpress-{self.run_dir.name}-"))
        group: MemoryGroup | None = None
        try:
            swap = None
            if exp.topology.kut.swap_mb:
                swap = tmp / "swap.img"
                with open(swap, "wb") as f:
                    f.truncate(exp.topology.kut.swap_mb << 20)
            # nested: L1 is up before its L2s boot, so the probes' warm-up includes an L2 boot
            decision = self.env.topology(cell)
            warm_s = WARM_TIMEOUT_S + (exp.boot.timeout_s.get("l2", 0) if decision.kind == "nested" else 0)
            spec, guest_plan = build_plan(
                exp,
                str(build.bzimage),
                self.env.accel.accel,
                decision,
                self.env.rootfs.kind,
                cell_dir,
                tmp,
                self.run_dir.name,
                python_for_guests(),
                warm_s,
                swap,
                initramfs.joined(self.l2_initrd, build.initrd, self.cache or default_cache())
                if self.l2_initrd and build.initrd
                else self.l2_initrd,
                self.export_model,
                tuple(exp.variant(cell.variant).kernel_params()),
                build.initrd,
            )
            guest_plan.cell = cell.id
            guest_plan.save(str(cell_dir / "plan.json"))
            argv = qemu_argv(spec)
            (cell_dir / "qemu.cmdline").write_text(dry_run(argv) + "\n")
            limit_mb = exp.topology.kut.memory_mb + GROUP_SLACK_MB
            group, about = MemoryGroup.create(
                re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{self.run_dir.name}-{cell.id}-{os.getpid()}"), limit_mb
            )
            if not self.group_said:
                (log if group else warn)(f"host memory group for each kernel under test: {about}")
                self.group_said = True
            kut = Child(
                "kut",
                argv,
                str(cell_dir),
                spec.console,
                rootfs_server=rootfs_server(spec),
                monitor=spec.monitor,
                clock=spec.clock,
                system_map=str(build.dir / "System.map"),
                env=decision.qemu.env,
                view_dir=spec.rootfs_dir if spec.root_view else None,
                cgroup_procs=group.procs if group else None,
            )
            started = time.time()
            try:
                kut.start()
                ready = kut.wait_ready(exp.boot.timeout_s.get("kut", 120))
            except RuntimeError as e:
                raise GuestError(str(e)) from None
            # the boot timeouts of the levels this topology has: a hung cell is given up (and retried) that much sooner
            levels = ("kut", "l1", "l2") if decision.kind == "nested" else ("kut", "l1")
            boots = sum(t for level, t in exp.boot.timeout_s.items() if level in levels)
            budget = self._estimate(cell) * 2 + boots + SHUTDOWN_S
            self._follow(cell, kut, cell_dir, k, n, t0, budget)
            kut.stop()
            if defused := defuse_guest_files(cell_dir):
                warn(f"cell {cell.id}: removed or made safe what guests left in results: {', '.join(defused[:10])}")
            exit_info = self._exit_record(cell, cell_dir)
            if exit_info is None and group and group.oom_kills():
                raise GuestError(
                    f"kut's QEMU was OOM-killed inside its host memory group ({limit_mb} MiB: guest RAM + "
                    f"{GROUP_SLACK_MB} MiB); console:\n{tail(spec.console)}"
                )
            if exit_info is None:
                raise GuestError(
                    f"kut exited without exit.json (QEMU status {kut.returncode}: 0 with -no-reboot "
                    f"is a reset, e.g. a triple fault; qemu.debug.log has the CPU state); console:\n"
                    f"{tail(spec.console)}"
                )
            if exit_info.kind is ExitKind.PREFLIGHT:
                # the same kernel fails the same way every time: no retry, no further cells
                raise PressureError(exit_info.message or "the kernel under test cannot run this schedule")
            if exit_info.kind is ExitKind.ERROR:
                raise GuestError(f"agent in the kernel under test failed:\n{(exit_info.error or '')[-1500:]}")
            problems = Problems()
            failures = [
                e
                for e in guest_records(cell_dir / "events.jsonl", problems, cell_dir)
                if e.get("kind") in {k.value for k in GUEST_FAILURES}
            ]
            for p in problems:
                warn(f"cell {cell.id}: {p}")
            if failures and exp.boot.on_guest_failure == "fail":
                raise GuestError(
                    f"guest failure(s) in {cell.id}: "
                    + "; ".join(str(e.get("error", e["kind"]))[:300] for e in failures)
                )
            entry = CellEntry(id=cell.id, variant=cell.variant, repetition=cell.repetition, order=cell.order)
            short = health.shortfalls(
                cell_frames(cell_dir, entry),
                cell_dir,
                exp.checks,
                [p.name for p in exp.phases],
                probe_levels(exp, decision.kind),
                exp.sampler.interval_s,
            )
            variant = exp.variant(cell.variant)
            short += health.param_mismatches(cell_dir, variant.module_params_text())
            if short:
                raise GuestError(f"cell {cell.id} did not measure what it was for: " + "; ".join(short))
            return CellRecord(
                status="complete",
                attempt=0,
                kut_ready_s=ready,
                kut_kernel_s=kut.kernel_ready_s,
                started=started,
                finished=time.time(),
                pressure_mode=exp.pressure.mode,
                guest_failures=[str(e.get("error", e["kind"]))[:500] for e in failures],
            )
        finally:
            stop_all()
            if group:
                group.remove()
            defuse_guest_files(cell_dir)
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _exit_record(cell: Cell, cell_dir: Path) -> ExitRecord | None:
        """exit.json as the kernel under test left it: absent is None, torn or not a record is said."""
        path = cell_dir / "exit.json"
        if not path.exists() and not path.is_symlink():
            return None
        try:
            return ExitRecord.from_dict(json.loads(read_guest_file(path, limit=1 << 20)), str(path))
        except (GuestFileError, ValueError, ContractError) as e:
            raise GuestError(f"cell {cell.id}: exit.json is torn or no exit record ({e})") from None

    def _follow(self, cell: Cell, kut: Child, cell_dir: Path, k: int, n: int, t0: float, budget: float) -> None:
        """Wait for the kernel under test to power off, showing which stage it is in."""
        events = cell_dir / "events.jsonl"
        stage = "booting guests"
        deadline = time.monotonic() + budget
        est = self._estimate(cell)
        with status(f"cell {k}/{n} {cell.id}: {stage}") as progress:
            while kut.running():
                if time.monotonic() > deadline:
                    raise GuestError(f"cell {cell.id} ran past its {budget:.0f}s budget; console:\n{tail(kut.console)}")
                with contextlib.suppress(GuestFileError, OSError):
                    for line in read_guest_file(events, tail=4096).splitlines()[-5:]:
                        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                            e = json.loads(line)
                            if e["kind"] == EventKind.PHASE_START.value:
                                stage = f"phase {e['phase']} ({e['mode']}, {float(e['duration_s']):g}s)"
                            elif e["kind"] in STAGES:
                                stage = STAGES[e["kind"]].format(guest=e.get("guest"))
                elapsed = time.monotonic() - t0
                eta = est * (n - k + 1) - (time.monotonic() - kut.started)
                progress.update(
                    f"cell {k}/{n} {cell.id}: {stage} | elapsed {fmt_s(elapsed)} | remaining ~{fmt_s(max(0, eta))}"
                )
                time.sleep(1)
        log(f"cell {k}/{n} {cell.id}: done in {fmt_s(time.monotonic() - kut.started)}")
