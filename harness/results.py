"""Raw per-guest outputs -> tidy tables (Parquet, with a CSV twin) in <run>/tables/.

  samples   one row per latency histogram bin per interval: variant, repetition, cell, level,
            guest, phase, t (s since the cell's first phase), latency_ns (bin middle), lo_ns,
            hi_ns, count
  passes    one row per probe pass over the working set (its duration)
  counters  variant, repetition, cell, source, name, t, value (sampler, kernel under test)
  phases    cell, variant, repetition, phase, mode, t_start, t_end
  events    boots, pressure steps, shrinker invocations, guest deaths: cell, guest, kind, t, detail
  cells     one row per cell of the plan: status (complete / failed / missing), attempts, facts

All times share one clock: CLOCK_REALTIME, which every agent aligns to its parent's at boot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import ResultsError
from .guest.contract import EventKind
from .guest.probe import bucket_bounds
from .manifest import CellEntry, Manifest, cell_record
from .util import read_json

_CELL = ["variant", "repetition", "cell"]
COLUMNS = {  # fixed, so that a run that measured nothing yet still has well-formed (empty) tables
    "samples": _CELL + ["level", "guest", "phase", "t", "latency_ns", "lo_ns", "hi_ns", "count", "interval"],
    "passes": _CELL + ["level", "guest", "pass", "t", "phase", "duration_ms"],
    "counters": _CELL + ["source", "name", "t", "value"],
    "phases": _CELL + ["phase", "mode", "t_start", "t_end"],
    "events": _CELL + ["level", "guest", "kind", "t", "detail"],
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
    ],
}
TABLES = tuple(COLUMNS)


def _jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _guest_dirs(cell_dir: Path) -> list[tuple[str, str, Path]]:
    """(guest name, level, export dir) for every guest of a cell, found by their facts/plan files."""
    out = []
    for plan in sorted(cell_dir.rglob("plan.json")):
        p = read_json(plan)
        out.append((p["name"], p["level"], plan.parent))
    return out


def _phase_of(t: float, phases: list[dict]) -> str:
    for p in phases:
        if p["t_start"] <= t < p["t_end"]:
            return p["phase"]
    return "pre" if phases and t < phases[0]["t_start"] else "post"


def collect_cell(cell_dir: Path, cell: CellEntry) -> dict[str, list[dict]]:
    base = {"variant": cell.variant, "repetition": cell.repetition, "cell": cell.id}
    kut_events = _jsonl(cell_dir / "events.jsonl")
    starts = {e["phase"]: e for e in kut_events if e["kind"] == EventKind.PHASE_START.value}
    ends = {e["phase"]: e for e in kut_events if e["kind"] == EventKind.PHASE_END.value}
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
    for guest, level, d in _guest_dirs(cell_dir):
        g = {**base, "level": level, "guest": guest}
        for e in _jsonl(d / "events.jsonl"):
            detail = {k: v for k, v in e.items() if k not in ("t", "mono", "kind")}
            rows["events"].append({**g, "kind": e["kind"], "t": sec(e["t"]), "detail": json.dumps(detail)})
        for e in _jsonl(d / "pressure.jsonl"):
            rows["events"].append(
                {
                    **g,
                    "kind": "pressure." + e["kind"],
                    "t": sec(e["t"]),
                    "detail": json.dumps({k: v for k, v in e.items() if k not in ("t", "kind")}),
                }
            )
        for e in _jsonl(d / "shrinker.jsonl"):
            if "t" in e:
                rows["events"].append({**g, "kind": e["kind"], "t": sec(e["t"]), "detail": json.dumps(e["fields"])})
        for rec in _jsonl(d / "probe.jsonl"):
            if rec["type"] == "hist":
                tm = sec((rec["t0"] + rec["t1"]) / 2)
                phase = _phase_of(tm, phases)
                for k, n in rec["counts"].items():
                    lo, hi = bucket_bounds(int(k))
                    rows["samples"].append(
                        {
                            **g,
                            "phase": phase,
                            "t": tm,
                            "latency_ns": (lo + hi) / 2,
                            "lo_ns": lo,
                            "hi_ns": hi,
                            "count": n,
                            "interval": rec["t0"],
                        }
                    )
                for t, ns in rec.get("outliers", []):
                    rows["events"].append(
                        {**g, "kind": "probe_outlier", "t": sec(t), "detail": json.dumps({"latency_ns": ns})}
                    )
            elif rec["type"] == "pass":
                tm = sec(rec["t1"])
                rows["passes"].append(
                    {
                        **g,
                        "pass": rec["pass"],
                        "t": tm,
                        "phase": _phase_of(sec(rec["t0"]), phases),
                        "duration_ms": (rec["t1"] - rec["t0"]) / 1e6,
                    }
                )
        for rec in _jsonl(d / "counters.jsonl"):
            t = sec(rec["t"])
            for name, value in rec["v"].items():
                rows["counters"].append(
                    {**base, "source": name.split(".", 1)[0], "name": name, "t": t, "value": float(value)}
                )
    return rows


def cell_status(run_dir: Path, cell: CellEntry, host: str) -> dict:
    d = run_dir / "cells" / cell.id
    record = cell_record(run_dir, cell.id)
    facts = {}
    for guest, _level, gd in _guest_dirs(d) if d.exists() else []:
        if (gd / "facts.json").exists():
            facts[guest] = read_json(gd / "facts.json")
    kut = facts.get("kut", {})
    return {
        "cell": cell.id,
        "variant": cell.variant,
        "repetition": cell.repetition,
        "host": host,
        "status": record.status if record else "missing" if not d.exists() else "incomplete",
        "attempt": record.attempt if record else 0,
        "retried": record.retried if record else False,
        "kut_ready_s": record.kut_ready_s if record else None,
        "x86_mmu_shrinker_present": bool(kut.get("x86_mmu_shrinker_dirs")) if kut else None,
        "mmu_shrink_scan_in_kallsyms": kut.get("mmu_shrink_scan_in_kallsyms"),
        "kvm_params": json.dumps(kut.get("kvm_params", {})),
        "children_on_kvm": json.dumps({g: f.get("runs_on_kvm") for g, f in facts.items() if g != "kut"}),
        "errors": json.dumps(record.errors if record else []),
    }


def collect(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Build every table from the cell directories and write them; returns the frames."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise ResultsError(f"{run_dir}: no manifest.json - not a nestpress run directory")
    manifest = Manifest.load(manifest_path)
    rows: dict[str, list[dict]] = {t: [] for t in TABLES}
    for cell in manifest.cells:
        rows["cells"].append(cell_status(run_dir, cell, manifest.cell_hosts.get(cell.id, "local")))
        d = run_dir / "cells" / cell.id
        if d.exists():
            for table, r in collect_cell(d, cell).items():
                rows[table].extend(r)
    frames = {t: pd.DataFrame(r, columns=COLUMNS[t]) for t, r in rows.items()}
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
