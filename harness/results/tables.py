"""Raw per-guest outputs -> tidy tables (Parquet, with a CSV twin) in <run>/tables/.

  samples   one row per latency histogram bin per interval: variant, repetition, cell, level,
            guest, phase, t (s since the cell's first phase), latency_ns (bin middle), lo_ns,
            hi_ns, count
  passes    one row per probe pass over the working set (its duration; the guest's major faults and steal
            time in it, as the guest's own kernel counts them)
  counters  variant, repetition, cell, source, name, t, value (sampler, kernel under test)
  phases    cell, variant, repetition, phase, mode, t_start, t_end
  events    boots, pressure steps, shrinker invocations, guest deaths: cell, guest, kind, t, detail
  clocks    each guest's clock against its parent's (guest/clock.py) and against the kernel under test's
  cells     one row per cell of the plan: status (complete / failed / missing), attempts, facts

All times are on the kernel under test's clock (CLOCK_REALTIME): every agent aligns its own to its parent's at
boot, and a guest's timestamps are then corrected by its measured offset (clocks), interpolated between
measurements and chained through its parents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ResultsError
from ..guest.contract import ClockSample, ContractError, EventKind
from ..guest.probe import bucket_bounds
from .manifest import CellEntry, Manifest, cell_complete, cell_record
from ..util import GuestFileError, read_guest_file, warn

_CELL = ["variant", "repetition", "cell"]
COLUMNS = {  # fixed, so that a run that measured nothing yet still has well-formed (empty) tables
    "samples": _CELL + ["level", "guest", "phase", "t", "latency_ns", "lo_ns", "hi_ns", "count", "interval"],
    "passes": _CELL + ["level", "guest", "pass", "t", "phase", "duration_ms", "majflt", "steal_ms"],
    "counters": _CELL + ["source", "name", "t", "value"],
    "phases": _CELL + ["phase", "mode", "t_start", "t_end"],
    "events": _CELL + ["level", "guest", "kind", "t", "detail"],
    "clocks": _CELL
    + ["level", "guest", "parent", "method", "t", "offset_ms", "uncertainty_ms", "offset_kut_ms", "uncertainty_kut_ms"],
    "cells": [
        "cell",
        "variant",
        "repetition",
        "host",
        "status",
        "attempt",
        "retried",
        "kut_ready_s",
        "x86_mmu_shrinker_present",
        "mmu_shrink_scan_in_kallsyms",
        "kvm_params",
        "children_on_kvm",
        "errors",
        "problems",
    ],
}
TABLES = tuple(COLUMNS)


class Problems(list):
    """What was wrong with a cell's guest files (torn, missing, not data): said with the cell named."""

    def note(self, path: Path, cell_dir: Path, what: str) -> None:
        self.append(f"{path.relative_to(cell_dir) if path.is_relative_to(cell_dir) else path}: {what}")


def guest_records(path: Path, problems: Problems, cell_dir: Path) -> list[dict]:
    """Records of a JSON-lines file a guest wrote; a torn line (crash mid-write) or one that is not a
    record is skipped and counted, a file that is no regular file or too large is skipped and said."""
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = read_guest_file(path)
    except GuestFileError as e:
        problems.note(path, cell_dir, str(e).split(": ", 1)[-1])
        return []
    out, bad = [], 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    if bad:
        problems.note(path, cell_dir, f"{bad} torn or malformed line(s) skipped")
    return out


def _guest_json(path: Path, problems: Problems, cell_dir: Path) -> dict | None:
    """One JSON object a guest wrote (facts.json, plan.json of its children), or None, said."""
    try:
        rec = json.loads(read_guest_file(path, limit=1 << 20))
    except (GuestFileError, ValueError) as e:
        problems.note(path, cell_dir, f"torn or unreadable ({str(e).split(': ', 1)[-1]})")
        return None
    if not isinstance(rec, dict):
        problems.note(path, cell_dir, "not a JSON object")
        return None
    return rec


@dataclass
class GuestClock:
    """A guest's clock against the kernel under test's, sampled: at t (ns, the kernel under test's clock) it
    read offset ns ahead, give or take uncertainty ns. Empty for the kernel under test itself (the reference)
    and for a guest whose clock was not measured."""

    t: np.ndarray
    offset: np.ndarray
    uncertainty: np.ndarray

    @classmethod
    def reference(cls) -> GuestClock:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0))

    def offset_at(self, ns: float) -> float:
        return float(np.interp(ns, self.t, self.offset)) if len(self.t) else 0.0

    def uncertainty_at(self, ns: float) -> float:
        return float(np.interp(ns, self.t, self.uncertainty)) if len(self.t) else 0.0

    def below(self, samples: list[ClockSample]) -> GuestClock:
        """The clock of a child of this guest, from the child's samples against this guest's clock."""
        t = np.array([s.t - self.offset_at(s.t) for s in samples], float)
        off = np.array([s.offset_ns + self.offset_at(s.t) for s in samples], float)
        unc = np.array([s.uncertainty_ns + self.uncertainty_at(s.t) for s in samples], float)
        order = np.argsort(t)
        return GuestClock(t[order], off[order], unc[order])


def clock_samples(path: Path, problems: Problems, cell_dir: Path) -> list[ClockSample]:
    """A guest's clock.jsonl (written by its parent): its measurements; a failure to measure is said."""
    out = []
    for rec in guest_records(path, problems, cell_dir):
        if "ended" in rec:  # what closed the port (the guest's end, normally)
            continue
        if "error" in rec:
            problems.note(path, cell_dir, f"clock not measured: {str(rec['error'])[:200]}")
            continue
        try:
            out.append(ClockSample.from_dict(rec))
        except ContractError as e:
            problems.note(path, cell_dir, str(e)[:200])
    return out


def _guest_dirs(cell_dir: Path, problems: Problems) -> list[tuple[str, str, Path]]:
    """(guest name, level, export dir) for every guest of a cell, found by their plan files."""
    out = []
    for plan in sorted(cell_dir.rglob("plan.json")):
        p = _guest_json(plan, problems, cell_dir)
        if p is not None and isinstance(p.get("name"), str) and isinstance(p.get("level"), str):
            out.append((p["name"], p["level"], plan.parent))
    return out


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


def _rows(records: list[dict], to_rows, problems: Problems, path: Path, cell_dir: Path) -> list[tuple[str, dict]]:
    """(table, row) from each record; a record without the fields its kind has is skipped and counted."""
    out, bad = [], 0
    for rec in records:
        try:
            out.extend(to_rows(rec))
        except (KeyError, TypeError, ValueError, AttributeError):
            bad += 1
    if bad:
        problems.note(path, cell_dir, f"{bad} record(s) without the fields their kind has, skipped")
    return out


def _number(v) -> float:
    """A number a guest wrote, or NaN (missing, null, or not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan


def _converters(g: dict, base: dict, sec, phases: PhaseSpans) -> dict:
    """For each file a guest writes: record -> [(table, row)], for guest g (its level and name in `g`)."""

    def event(e: dict) -> list[tuple[str, dict]]:
        detail = {k: v for k, v in e.items() if k not in ("t", "mono", "kind")}
        return [("events", {**g, "kind": e["kind"], "t": sec(e["t"]), "detail": json.dumps(detail)})]

    def pressure(e: dict) -> list[tuple[str, dict]]:
        detail = json.dumps({k: v for k, v in e.items() if k not in ("t", "kind")})
        return [("events", {**g, "kind": "pressure." + e["kind"], "t": sec(e["t"]), "detail": detail})]

    def shrinker(e: dict) -> list[tuple[str, dict]]:
        if "t" not in e:
            return []
        who = {k: e[k] for k in ("pid", "comm", "guest") if k in e}  # who called the shrinker, or stalled
        return [("events", {**g, "kind": e["kind"], "t": sec(e["t"]), "detail": json.dumps({**e["fields"], **who})})]

    def probe(rec: dict) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if rec["type"] == "hist":
            tm = sec((rec["t0"] + rec["t1"]) / 2)
            phase = phases.name_at(tm)
            for k, n in rec["counts"].items():
                lo, hi = bucket_bounds(int(k))
                out.append(
                    (
                        "samples",
                        {
                            **g,
                            "phase": phase,
                            "t": tm,
                            "latency_ns": (lo + hi) / 2,
                            "lo_ns": lo,
                            "hi_ns": hi,
                            "count": int(n),
                            "interval": rec["t0"],
                        },
                    )
                )
            for t, ns in rec.get("outliers", []):
                out.append(
                    (
                        "events",
                        {**g, "kind": "probe_outlier", "t": sec(t), "detail": json.dumps({"latency_ns": ns})},
                    )
                )
        elif rec["type"] == "pass":
            out.append(
                (
                    "passes",
                    {
                        **g,
                        "pass": rec["pass"],
                        "t": sec(rec["t1"]),
                        "phase": phases.name_at(sec(rec["t0"])),
                        "duration_ms": (rec["t1"] - rec["t0"]) / 1e6,
                        "majflt": _number(rec.get("majflt")),
                        "steal_ms": _number(rec.get("steal_ms")),
                    },
                )
            )
        return out

    def counters(rec: dict) -> list[tuple[str, dict]]:
        t = sec(rec["t"])
        return [
            ("counters", {**base, "source": name.split(".", 1)[0], "name": name, "t": t, "value": float(value)})
            for name, value in rec["v"].items()
        ]

    return {
        "events.jsonl": event,
        "pressure.jsonl": pressure,
        "shrinker.jsonl": shrinker,
        "zaps.jsonl": shrinker,
        "probe.jsonl": probe,
        "counters.jsonl": counters,
    }


def collect_cell(cell_dir: Path, cell: CellEntry, problems: Problems | None = None) -> dict[str, list[dict]]:
    problems = Problems() if problems is None else problems
    base = {"variant": cell.variant, "repetition": cell.repetition, "cell": cell.id}
    kut_events = [
        e for e in guest_records(cell_dir / "events.jsonl", problems, cell_dir) if isinstance(e.get("t"), (int, float))
    ]
    starts = {e["phase"]: e for e in kut_events if e.get("kind") == EventKind.PHASE_START.value and "phase" in e}
    ends = {e["phase"]: e for e in kut_events if e.get("kind") == EventKind.PHASE_END.value and "phase" in e}
    t0 = min((e["t"] for e in starts.values()), default=None)
    if t0 is None:
        t0 = min((e["t"] for e in kut_events), default=0)
    sec = lambda ns: (ns - t0) / 1e9  # noqa: E731
    phases = [
        {
            **base,
            "phase": name,
            "mode": e["mode"],
            "t_start": sec(e["t"]),
            "t_end": sec(ends[name]["t"]) if name in ends else sec(e["t"]) + e["duration_s"],
        }
        for name, e in starts.items()
    ]
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    rows["phases"] = phases
    spans = PhaseSpans.of(phases)
    clocks: dict[Path, GuestClock] = {}
    names: dict[Path, str] = {}
    for guest, level, d in sorted(_guest_dirs(cell_dir, problems), key=lambda x: len(x[2].parts)):
        g = {**base, "level": level, "guest": guest}
        names[d] = guest
        parent = next((p for p in d.parents if p in clocks), None)  # its parent's export holds its own
        samples = sorted(clock_samples(d / "clock.jsonl", problems, cell_dir), key=lambda c: c.t)
        clocks[d] = mine = clocks[parent].below(samples) if parent is not None else GuestClock.reference()
        kut = parent is None
        for i, c in enumerate(samples):  # the kernel under test's own: against the host, not corrected
            rows["clocks"].append(
                {
                    **g,
                    "parent": "host" if parent is None else names[parent],
                    "method": c.method,
                    "t": sec(c.t if kut else mine.t[i]),
                    "offset_ms": c.offset_ns / 1e6,
                    "uncertainty_ms": c.uncertainty_ns / 1e6,
                    "offset_kut_ms": np.nan if kut else mine.offset[i] / 1e6,
                    "uncertainty_kut_ms": np.nan if kut else mine.uncertainty[i] / 1e6,
                }
            )

        def on_kut_clock(ns: float, clock: GuestClock = mine) -> float:
            return sec(ns - clock.offset_at(ns))

        for file, to_rows in _converters(g, base, on_kut_clock, spans).items():
            path = d / file
            for table, row in _rows(guest_records(path, problems, cell_dir), to_rows, problems, path, cell_dir):
                rows[table].append(row)
    return rows


def _frames(rows: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    return {t: pd.DataFrame(r, columns=COLUMNS[t]) for t, r in rows.items()}


def cell_frames(cell_dir: Path, cell: CellEntry, problems: Problems | None = None) -> dict[str, pd.DataFrame]:
    """One cell's tables (without its status row): what the host checks when the cell ends."""
    return _frames(collect_cell(cell_dir, cell, problems))


def cell_status(run_dir: Path, cell: CellEntry, host: str, problems: Problems) -> dict:
    d = run_dir / "cells" / cell.id
    record = cell_record(run_dir, cell.id)
    facts: dict[str, dict] = {}
    for guest, _level, gd in _guest_dirs(d, problems) if d.exists() else []:
        if (gd / "facts.json").exists() or (gd / "facts.json").is_symlink():
            facts[guest] = _guest_json(gd / "facts.json", problems, d) or {}
        elif record is not None and record.status == "complete":
            problems.note(gd / "facts.json", d, "missing")
    kut = facts.get("kut", {})
    return {
        "cell": cell.id,
        "variant": cell.variant,
        "repetition": cell.repetition,
        "host": host,
        "status": "complete"
        if cell_complete(run_dir, cell.id)
        else "failed"
        if record and record.status == "failed"
        else "missing"
        if not d.exists()
        else "incomplete",
        "attempt": record.attempt if record else 0,
        "retried": record.retried if record else False,
        "kut_ready_s": record.kut_ready_s if record else None,
        # its debugfs directory where the kernel has CONFIG_SHRINKER_DEBUG (a distribution's may not), else its
        # scan function in the kernel's symbols (the patch removes it)
        "x86_mmu_shrinker_present": bool(kut.get("x86_mmu_shrinker_dirs") or kut.get("mmu_shrink_scan_in_kallsyms"))
        if kut
        else None,
        "mmu_shrink_scan_in_kallsyms": kut.get("mmu_shrink_scan_in_kallsyms"),
        "kvm_params": json.dumps(kut.get("kvm_params", {})),
        "children_on_kvm": json.dumps({g: f.get("runs_on_kvm") for g, f in facts.items() if g != "kut"}),
        "errors": json.dumps(record.errors if record else []),
        "problems": json.dumps(list(problems)),
    }


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
        if d.exists():
            for table, r in collect_cell(d, cell, problems).items():
                rows[table].extend(r)
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
