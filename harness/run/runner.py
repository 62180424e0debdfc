"""Run an experiment: build -> manifest -> cells (boot, conduct, collect) -> tables -> report.

The run directory results/<experiment>/<run-id>/ gets manifest.json before the first cell
starts, and one directory per cell that the kernel under test's agent fills as it goes
(cells/<cell-id>/, with L1/L2 exports nested inside). records/<cell-id>.json, which only the host
writes, marks a cell complete; running again into the same run directory skips complete cells and
redoes the rest. Ctrl-C (or SIGTERM) at any point stops every QEMU of the run, removes its temp dir
and leaves a manifest that says `interrupted`; any other end leaves it `complete`, `incomplete` or
`failed`, never `running`. Each attempt at a cell is run/cell.py's.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from .. import REPO_ROOT
from ..config import Cell, Matrix
from ..errors import GuestError, HarnessError, PressureError
from ..guest.contract import PATH
from ..guest.supervise import stop_all
from ..kernel.build import Builder, BuildResult
from ..machine import initramfs
from ..machine.doctor import doctor
from ..machine.host import decide_environment, meminfo
from ..machine.memory_group import export_model
from ..results import crashes
from ..results.guest_files import Problems
from ..results.manifest import AccelRecord, CellEntry, CellRecord, Manifest, cell_complete, record_path
from ..results.tables import guest_dirs
from ..util import console, default_cache, log, python_for_guests, warn
from . import slots
from .cell import Attempt, Progress, RunContext
from .run_dir import harness_commit, lock_run_dir
from .schedule import check as check_sizes
from .schedule import check_kernel

# what a cell's guests can make reading their files raise, if a check misses it: the cell fails, the run goes on
GUEST_DATA_ERRORS = (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError, UnicodeError)
# what the fallback means, said when a run uses it
EXPORT_NONE = (
    "guests write their results as the host's root; the host never follows a link a guest made (every file it "
    "writes or reads there is opened without following links) and removes links, devices and set-id bits once "
    "each cell's guests are off"
)


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
        self.ctx: RunContext | None = None
        self.stopping = threading.Event()  # set when the run stops: a cell beside another is not retried then
        self.slots = slots.Slots(1, (frozenset(),), "one cell at a time")

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
            builds={name: b.entry(params[name]) for name, b in builds.items()},
            host=doctor(self.cache).as_dict(),
            reproduce=self.reproduce,
            parallel=self.slots.said,
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
        available_mb = meminfo()["MemAvailable"] >> 10
        self.slots = slots.decide(self.exp.parallel, self.matrix.cells, slots.host_cpus(), available_mb)
        log(self.slots.said)
        builds = Builder(self.exp, self.cache).build_all()
        for cell in self.matrix.cells:
            check_kernel(cell.config, cell.variant, builds[cell.variant].dir / "config", env.rootfs.kind)
        l2_initrd = self._l2_initrd() if "nested" in env.kinds else None
        if not any(self.run_dir.is_relative_to(p) for p in (REPO_ROOT, Path.cwd().resolve())):
            log(f"results go outside the project, as the config or --output says: {self.run_dir}", style="yellow")
        lock = lock_run_dir(self.run_dir)
        model, why = export_model(self.run_dir)
        if model == "none":
            warn(f"results export: 9p security_model=none ({why}): {EXPORT_NONE}")
        else:
            log(f"results export: 9p security_model={model} ({why})")
        self.ctx = RunContext(self.run_dir, env, self.cache or default_cache(), l2_initrd, model)
        try:
            return self._run_cells(builds)
        finally:
            os.close(lock)

    def _l2_initrd(self) -> Path:
        probe = self.exp.workload.probe
        command = self.exp.workload.command if "l2" in probe.levels else None
        runs = tuple(list(r.knobs.argv) for r in self.exp.workload.runs_at("l2"))  # a `command` run: argv is its knob
        archive = initramfs.build(python_for_guests(), command, PATH, self.cache or default_cache(), runs)
        log(f"L2 root: initramfs {archive} ({archive.stat().st_size >> 20} MiB)")
        return archive

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
            k = 1
            for wave in slots.waves(todo, self.slots.n):
                self._run_wave(wave, builds, k, len(todo), t0)
                k += len(wave)
            manifest.status = "complete" if all(self._complete(c) for c in self.matrix.cells) else "incomplete"
        except (KeyboardInterrupt, _Terminated):
            self.stopping.set()
            manifest.status = "interrupted"
            raise HarnessError(
                f"interrupted: every QEMU of the run was stopped; partial results in {self.run_dir} "
                f"(run again with --run-id {self.run_dir.name} to resume)"
            ) from None
        except BaseException:  # whatever stopped it, the manifest ends in a final state
            self.stopping.set()
            manifest.status = "failed"
            raise
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

    def _run_wave(self, wave: list[Cell], builds: dict[str, BuildResult], k: int, n: int, t0: float) -> None:
        """Cells that start together, each on its slot's CPUs; one alone runs here. The first that stops the run
        (Ctrl-C, a kernel that cannot run the schedule) stops every QEMU of the wave."""
        if len(wave) == 1:
            self._run_cell(wave[0], builds[wave[0].variant], k, n, t0, self.slots.cpus[0])
            return
        with ThreadPoolExecutor(len(wave), thread_name_prefix="cell") as pool:
            futures = [
                pool.submit(self._run_cell, cell, builds[cell.variant], k + i, n, t0, self.slots.cpus[i])
                for i, cell in enumerate(wave)
            ]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()
            except BaseException:
                self.stopping.set()
                stop_all()
                raise

    def _run_cell(
        self, cell: Cell, build: BuildResult, k: int, n: int, t0: float, cpus: frozenset[int] = frozenset()
    ) -> None:
        """A cell's attempts, until one completes or retries run out. A failed attempt's files are kept aside."""
        assert self.ctx is not None
        attempts = cell.config.boot.retries + 1
        errors: list[str] = []
        record = record_path(self.run_dir, cell.id)
        record.parent.mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            if self.stopping.is_set():
                return
            cell_dir = self.run_dir / "cells" / cell.id
            if cell_dir.exists():  # an incomplete earlier attempt: kept aside for diagnosis, redone whole
                kept = self.run_dir / "failed" / f"{cell.id}.{time.strftime('%H%M%S')}"
                kept.parent.mkdir(exist_ok=True)
                cell_dir.rename(kept)
                log(f"cell {cell.id}: the failed attempt's files are in {kept}")
            cell_dir.mkdir(parents=True)
            started = time.monotonic()
            progress = Progress(k, n, t0, self._estimate(cell), self.slots.n)
            try:
                try:
                    result = Attempt(self.ctx, cell, build, cell_dir, progress, cpus).run()
                finally:
                    say_crashes(cell.id, attempt, cell_dir)
            except PressureError as e:
                CellRecord(status="failed", attempt=attempt, errors=[*errors, str(e)], fatal=True).save(record)
                raise
            except (GuestError, *GUEST_DATA_ERRORS) as e:  # a guest may fail its own cell, never the run
                if not isinstance(e, GuestError):
                    e = GuestError(f"what the cell left could not be read: {type(e).__name__}: {str(e)[:500]}")
                errors.append(str(e))
                CellRecord(status="failed", attempt=attempt, errors=errors).save(record)
                if self.stopping.is_set():  # its QEMU was stopped with the run's: not a failure of its own
                    return
                warn(f"cell {cell.id} attempt {attempt}/{attempts} failed: {e}")
                continue
            self.cell_times.append(time.monotonic() - started)
            result.attempt, result.retried, result.errors = attempt, attempt > 1, errors
            result.save(record)
            return
        log(f"cell {cell.id}: gave up after {attempts} attempt(s); the report will list it as missing", style="red")


def say_crashes(cell: str, attempt: int, cell_dir: Path) -> None:
    """Say on the terminal, as soon as an attempt ends, every crash, stall or warning its kernels logged: a retry
    goes on measuring, but never hides one (the `crashes` table and the report's first screen keep them)."""
    problems = Problems()
    for c in crashes.scan_attempt(cell_dir, guest_dirs(cell_dir, problems), problems):
        if c["kind"] != "oom-kill":
            where = f" during {c['phase']}" if c["phase"] else ""
            did = "went silent (a freeze)" if c["kind"] == "freeze" else f"logged a {c['kind']}"
            warn(f"cell {cell} attempt {attempt}: {c['guest']} {did}{where}: {c['said'][:160]}")
