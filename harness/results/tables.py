"""Raw per-guest outputs -> tidy, typed tables (Parquet, with a CSV twin) in <run>/tables/.

  samples   one row per latency histogram bin per interval: variant, repetition, cell, level, guest, phase, t (s
            since the cell's first phase), latency_ns (bin middle), lo_ns, hi_ns, count, interval
  outliers  every touch the probe kept raw (>= its 1 ms floor): level, guest, t (when it ended), latency_ns
  passes    one row per probe pass over the working set (its duration; the guest's major faults and steal time
            in it, as the guest's own kernel counts them)
  counters  source, name, t, value (sampler, kernel under test)
  phases    phase, mode, t_start, t_end
  events    what the agents said (boots, phases, pressure starting and stopping, deaths): level, guest (who said
            it), kind, t, and typed columns: subject (the guest it is about), phase, mode, status, seconds,
            kernel_s, error, reason, pid; info holds the rest, for reading (never searched)
  pressure  what the pressure actors did: mode, kind, t, mb, count, seconds, ok, error, target, info
  trace     the kernel under test's traced cause events: the hypothesis's shrink calls (shrink_start/end: pid,
            comm, asked, freed) and guests' QEMUs in direct reclaim (guest, nr_reclaimed)
  vm_zaps   steps of each VM's shadow-page zap counters: source (sampler, scan), guest (whose QEMU runs the VM),
            t0, t1, zapped, recycled
  crashes   every panic, oops, BUG, WARN, stall and OOM kill any level's kernel logged, in every attempt (attempt:
            its directory, retried: a failed attempt kept aside): kind, what it said, its top frames, its signature,
            when (uptime_s of that level; phase) - results/crashes.py
  runs      one row per run of a workload (workload.runs): level, guest, workload, run, t0, t1, phase (the one it
            lay in from start to end; "across" where it spanned two), status, stopped, error and its output's tail
  workload_metrics  each metric a run gave: metric, unit, better (lower / higher), value, with the run's columns
  clocks    each guest's clock against its parent's (guest/clock.py) and against the kernel under test's
  cells     one row per cell of the plan: status (complete / failed / missing), attempts, facts (kut_facts: the
            kernel under test's LevelFacts as JSON)

All times are on the kernel under test's clock (CLOCK_REALTIME): every agent aligns its own to its parent's at
boot, and a guest's timestamps are then corrected by its measured offset (clocks), interpolated between
measurements and chained through its parents. Every line is read through results/guest_files.py as its
contract record: what does not fit is a problem of its cell, said, never a row.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ResultsError
from ..guest.contract import EventKind
from ..guest.records import Event, LevelFacts
from ..util import warn
from . import crashes
from .clocks import GuestClock, clock_samples
from .guest_files import DIR_DEPTH, Problems, json_object, present, records, walk
from .manifest import CellEntry, Manifest, cell_complete, cell_record
from .rows import GuestRows

_CELL = ["variant", "repetition", "cell"]
COLUMNS = {  # fixed, so that a run that measured nothing yet still has well-formed (empty) tables
    "samples": _CELL + ["level", "guest", "phase", "t", "latency_ns", "lo_ns", "hi_ns", "count", "interval"],
    "outliers": _CELL + ["level", "guest", "t", "latency_ns"],
    "passes": _CELL + ["level", "guest", "pass", "t", "phase", "duration_ms", "majflt", "steal_ms"],
    "counters": _CELL + ["source", "name", "t", "value"],
    "phases": _CELL + ["phase", "mode", "t_start", "t_end"],
    "events": _CELL
    + ["level", "guest", "kind", "t", "subject", "phase", "mode", "status", "seconds", "kernel_s"]
    + ["error", "reason", "pid", "info"],
    "pressure": _CELL + ["mode", "kind", "t", "mb", "count", "seconds", "ok", "error", "target", "info"],
    "trace": _CELL
    + ["kind", "t", "pid", "comm", "guest", "cache_items", "total_scan", "delta", "freed"]
    + ["nr_reclaimed"],
    "vm_zaps": _CELL + ["source", "guest", "t0", "t1", "zapped", "recycled"],
    "crashes": _CELL
    + ["attempt", "retried", "level", "guest", "kind", "said", "frames", "signature", "uptime_s", "line", "phase"],
    "runs": _CELL + ["level", "guest", "workload", "run", "t0", "t1", "phase", "status", "stopped", "error", "tail"],
    "workload_metrics": _CELL
    + ["level", "guest", "workload", "run", "phase", "t", "metric", "unit", "better", "value"],
    "clocks": _CELL
    + ["level", "guest", "parent", "method", "t", "offset_ms", "uncertainty_ms", "offset_kut_ms", "uncertainty_kut_ms"],
    "cells": _CELL
    + ["host", "status", "attempt", "retried", "kut_ready_s"]
    + ["kvm_params", "children_on_kvm", "kut_facts", "errors", "problems"],
}
TABLES = tuple(COLUMNS)


def guest_dirs(cell_dir: Path, problems: Problems) -> list[tuple[str, str, Path]]:
    """(guest name, level, export dir) for every guest of a cell, found by their plan files, parents first."""
    out = []
    for d, entries in walk(cell_dir, max_depth=DIR_DEPTH):
        if any(e.name == "plan.json" for e in entries):
            p = json_object(d / "plan.json", problems, cell_dir)
            if p is not None and isinstance(p.get("name"), str) and p.get("level") in ("kut", "l1", "l2"):
                out.append((p["name"][:64], p["level"], d))
    return sorted(out, key=lambda x: (len(x[2].parts), str(x[2])))


@dataclass
class PhaseSpans:
    """A cell's phases in time order (s since its first phase): which one a time falls in."""

    names: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, phases: pd.DataFrame | list[dict]) -> PhaseSpans:
        df = pd.DataFrame(phases, columns=COLUMNS["phases"]).sort_values("t_start")
        return cls(df["phase"].to_numpy(object), df["t_start"].to_numpy(float), df["t_end"].to_numpy(float))

    def index(self, t: np.ndarray) -> np.ndarray:
        """The phase each time falls in, -1 where none (before, between or after them)."""
        t = np.asarray(t, float)
        if not len(self.starts):
            return np.full(t.shape, -1)
        i = np.searchsorted(self.starts, t, side="right") - 1
        return np.where((i >= 0) & (t < self.ends[np.maximum(i, 0)]), i, -1)

    def name_at(self, t: float) -> str:
        """The phase's name, or "pre" before the first and "post" anywhere after it outside a phase."""
        i = int(self.index(np.array([t]))[0])
        if i >= 0:
            return str(self.names[i])
        return "pre" if len(self.starts) and t < self.starts[0] else "post"


def _phases(cell_dir: Path, base: dict, problems: Problems) -> tuple[list[dict], float]:
    """The cell's phases from its kernel under test's phase_start/end events, and their clock's origin (ns)."""
    events = list(records(cell_dir / "events.jsonl", problems, cell_dir, Event.from_guest))
    starts = {e.phase: e for e in events if e.kind is EventKind.PHASE_START and e.phase}
    ends = {e.phase: e for e in events if e.kind is EventKind.PHASE_END and e.phase}
    t0 = min((e.t for e in starts.values()), default=min((e.t for e in events), default=0))
    phases = [
        {
            **base,
            "phase": name,
            "mode": e.mode or "none",
            "t_start": (e.t - t0) / 1e9,
            "t_end": (ends[name].t - t0) / 1e9 if name in ends else (e.t - t0) / 1e9 + (e.duration_s or 0.0),
        }
        for name, e in starts.items()
    ]
    return phases, t0


def _clock_rows(g: dict, parent: str | None, samples: list, mine: GuestClock, sec) -> list[dict]:
    """A guest's clock measurements: against its parent, and (below the kernel under test) against that one."""
    kut = parent is None  # the kernel under test's own: against the host, not corrected
    return [
        {
            **g,
            "parent": parent or "host",
            "method": c.method,
            "t": sec(c.t if kut else mine.t[i]),
            "offset_ms": c.offset_ns / 1e6,
            "uncertainty_ms": c.uncertainty_ns / 1e6,
            "offset_kut_ms": np.nan if kut else mine.offset[i] / 1e6,
            "uncertainty_kut_ms": np.nan if kut else mine.uncertainty[i] / 1e6,
        }
        for i, c in enumerate(samples)
    ]


def collect_cell(cell_dir: Path, cell: CellEntry, problems: Problems | None = None) -> dict[str, list[dict]]:
    problems = Problems() if problems is None else problems
    base = {"variant": cell.variant, "repetition": cell.repetition, "cell": cell.id}
    phases, t0 = _phases(cell_dir, base, problems)
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    rows["phases"] = phases
    spans = PhaseSpans.of(phases)
    clocks: dict[Path, GuestClock] = {}
    names: dict[Path, str] = {}
    for guest, level, d in guest_dirs(cell_dir, problems):
        parent = next((p for p in d.parents if p in clocks), None)  # its parent's export holds its own
        if parent is None and d != cell_dir:
            continue  # a plan.json of a guest without a parent: not one the kernel under test started
        g = {**base, "level": level, "guest": guest}
        names[d] = guest
        samples = clock_samples(d / "clock.jsonl", problems, cell_dir)
        clocks[d] = mine = clocks[parent].below(samples) if parent is not None else GuestClock.reference()

        def sec(ns: float, clock: GuestClock = mine) -> float:
            return (ns - clock.offset_at(ns) - t0) / 1e9

        rows["clocks"] += _clock_rows(
            g, names.get(parent) if parent else None, samples, mine, lambda ns: (ns - t0) / 1e9
        )
        for table, row in GuestRows(base, {"level": level, "guest": guest}, sec, spans.name_at).read(
            d, problems, cell_dir
        ):
            rows[table].append(row)
    return rows


def _frames(rows: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    return {t: pd.DataFrame(r, columns=COLUMNS[t]) for t, r in rows.items()}


def cell_frames(cell_dir: Path, cell: CellEntry, problems: Problems | None = None) -> dict[str, pd.DataFrame]:
    """One cell's tables (without its status row): what the host checks when the cell ends."""
    return _frames(collect_cell(cell_dir, cell, problems))


def level_facts(cell_dir: Path, problems: Problems, complete: bool) -> dict[str, LevelFacts]:
    """Each guest's facts.json (LevelFacts), by guest name; a missing one is a problem of a complete cell."""
    facts: dict[str, LevelFacts] = {}
    for guest, level, gd in guest_dirs(cell_dir, problems) if cell_dir.exists() else []:
        path = gd / "facts.json"
        if not present(path):
            if complete:
                problems.note(path, cell_dir, "missing")
            continue
        raw = json_object(path, problems, cell_dir)
        try:
            facts[guest] = LevelFacts.from_guest(raw or {"name": guest, "level": level})
        except ValueError as e:
            problems.note(path, cell_dir, str(e)[:200])
    return facts


def _status(run_dir: Path, cell: CellEntry) -> str:
    record = cell_record(run_dir, cell.id)
    if cell_complete(run_dir, cell.id):
        return "complete"
    if record and record.status == "failed":
        return "failed"
    return "missing" if not (run_dir / "cells" / cell.id).exists() else "incomplete"


def cell_status(run_dir: Path, cell: CellEntry, host: str, problems: Problems) -> dict:
    record = cell_record(run_dir, cell.id)
    facts = level_facts(run_dir / "cells" / cell.id, problems, record is not None and record.status == "complete")
    kut = facts.get("kut")
    return {
        "cell": cell.id,
        "variant": cell.variant,
        "repetition": cell.repetition,
        "host": host,
        "status": _status(run_dir, cell),
        "attempt": record.attempt if record else 0,
        "retried": record.retried if record else False,
        "kut_ready_s": record.kut_ready_s if record else None,
        "kvm_params": json.dumps(kut.kvm_params if kut else {}),
        "children_on_kvm": json.dumps({g: f.runs_on_kvm for g, f in facts.items() if g != "kut"}),
        "kut_facts": kut.to_json() if kut else None,
        "errors": json.dumps(record.errors if record else []),
        "problems": json.dumps(list(problems)),
    }


def attempts(run_dir: Path, cell: CellEntry) -> list[tuple[str, Path]]:
    """A cell's attempt directories: each failed one kept aside (failed/<cell>.<time>), then its own."""
    kept = sorted((run_dir / "failed").glob(f"{glob.escape(cell.id)}.*")) if (run_dir / "failed").is_dir() else []
    out = [(f"failed/{d.name}", d) for d in kept if d.is_dir() and not d.is_symlink()]
    d = run_dir / "cells" / cell.id
    return out + ([("final", d)] if d.is_dir() and not d.is_symlink() else [])


def cell_crashes(run_dir: Path, cell: CellEntry, problems: Problems) -> list[dict]:
    base = {"variant": cell.variant, "repetition": cell.repetition, "cell": cell.id}
    rows = []
    for name, d in attempts(run_dir, cell):
        found = crashes.scan_attempt(d, guest_dirs(d, problems), problems)
        rows += [{**base, "attempt": name, "retried": name != "final", **c} for c in found]
    return rows


def collect(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Build every table from the cell directories and write them; returns the frames."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise ResultsError(f"{run_dir}: no manifest.json - not a nestpress run directory")
    manifest = Manifest.load(manifest_path)
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    for cell in manifest.cells:
        d = run_dir / "cells" / cell.id
        problems = Problems()
        if d.is_dir() and not d.is_symlink():
            for table, r in collect_cell(d, cell, problems).items():
                rows[table].extend(r)
        rows["crashes"] += cell_crashes(run_dir, cell, problems)
        status = cell_status(run_dir, cell, manifest.cell_hosts.get(cell.id, "local"), problems)
        rows["cells"].append(status)
        if status["status"] != "complete":
            warn(f"cell {cell.id}: {status['status']}" + (" (no directory: it never ran)" if not d.exists() else ""))
        for p in problems:
            warn(f"cell {cell.id}: {p}")
    frames = _frames(rows)
    out = run_dir / "tables"
    out.mkdir(exist_ok=True)
    for name, df in frames.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
        df.to_csv(out / f"{name}.csv", index=False)
    return frames


def load(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Read stored tables; a missing or unreadable one is named in the error."""
    frames = {}
    for name in TABLES:
        p = run_dir / "tables" / f"{name}.parquet"
        if not p.exists():
            raise ResultsError(f"{p}: table '{name}' is missing (rebuild with `fab report --run {run_dir}`)")
        try:
            frames[name] = pd.read_parquet(p)
        except Exception as e:
            raise ResultsError(f"{p}: table '{name}' is corrupt ({type(e).__name__}: {e})") from None
    return frames
