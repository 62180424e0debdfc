"""One guest's files -> rows of the run's tables: every line read as its contract record (guest/contract.py) first,
so a row holds only typed, checked values. What a record does not say is NaN or None, never guessed.

Older runs wrote some records in an older shape (a shrinker-scan actor's `objects` and `took_s`, the sampler's
zap steps with their counts under `fields`); the `_older_*` helpers read those too, so old runs keep their
reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..guest.probe import bucket_bounds
from ..guest.records import (
    CounterSample,
    Event,
    PressureRecord,
    ProbeHist,
    ProbePass,
    TraceCall,
    VmZap,
    WorkloadRun,
)
from .guest_files import Problems, records

Row = tuple[str, dict[str, Any]]  # (table, row)
EVENT_COLUMNS = (
    "guest",
    "phase",
    "mode",
    "status",
    "seconds",
    "kernel_s",
    "error",
    "reason",
    "pid",
)  # typed columns of `events`
TRACE_NUMBERS = ("cache_items", "total_scan", "delta", "freed", "nr_reclaimed")
PRESSURE_FIELDS = {f.name for f in dataclasses.fields(PressureRecord)}
OLDER_PRESSURE = {"hog_mb": "mb", "objects": "count", "took_s": "seconds", "shrinker": "target"}


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan


def _info(values: dict[str, Any]) -> str:
    """What a record said besides its typed columns, for the reader (never searched)."""
    return json.dumps({k: v for k, v in values.items() if v is not None and v != {} and v != []}, default=str)


def _older_pressure(line: dict) -> PressureRecord:
    """A PressureRecord, also from a run whose actors wrote their figures flat (hog_mb, objects, took_s)."""
    typed = {OLDER_PRESSURE.get(k, k): v for k, v in line.items()}
    info = {k: v for k, v in typed.items() if k not in PRESSURE_FIELDS and isinstance(v, (int, float))}
    return PressureRecord.from_guest({**{k: v for k, v in typed.items() if k in PRESSURE_FIELDS}, "info": info})


def _older_zap(line: dict) -> VmZap:
    """A VmZap, also from a run whose sampler put the counts under `fields`."""
    fields = line.get("fields")
    return VmZap.from_guest({**line, **fields} if isinstance(fields, dict) else line)


# (shrinker.jsonl: what trace.jsonl was called before, in older runs)
KUT_FILES: tuple[str, ...] = ("events.jsonl", "pressure.jsonl", "trace.jsonl", "shrinker.jsonl", "zaps.jsonl")
KUT_FILES += ("counters.jsonl", "workload.jsonl")
GUEST_FILES = ("events.jsonl", "probe.jsonl", "workload.jsonl")  # below the kernel under test: its own, no more
NAME_LIMIT = 80  # a workload's or metric's name, as a guest wrote it
BUCKETS = 1 << 12  # the probe's histogram has far fewer (bucket() of an hour in ns is < 700)


class GuestRows:
    """Rows of one guest's files. base: the cell's columns; guest: its level and name; sec: its clock's ns ->
    seconds since the cell's first phase on the kernel under test's clock; phase_at: the phase of a time.
    The kernel under test's counters, pressure, traces and zap steps are read from its own export only: a guest
    below it could write files of those names, and they would be read as that kernel's."""

    def __init__(self, base: dict, guest: dict, sec: Callable[[float], float], phase_at: Callable[[float], str]):
        self.base, self.g, self.sec, self.phase_at = base, {**base, **guest}, sec, phase_at

    def read(self, directory: Path, problems: Problems, cell_dir: Path) -> Iterator[Row]:
        converters = {
            "events.jsonl": self.event,
            "pressure.jsonl": self.pressure,
            "trace.jsonl": self.trace,
            "shrinker.jsonl": self.trace,
            "zaps.jsonl": self.zap,
            "probe.jsonl": self.probe,
            "counters.jsonl": self.counters,
            "workload.jsonl": self.workload,
        }
        for name in KUT_FILES if self.g["level"] == "kut" else GUEST_FILES:
            for rows in records(directory / name, problems, cell_dir, converters[name]):
                yield from rows

    def event(self, line: dict) -> list[Row]:
        e = Event.from_guest(line)
        values = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
        typed = {("subject" if k == "guest" else k): values.pop(k) for k in EVENT_COLUMNS}
        for k in ("t", "mono", "kind"):
            values.pop(k)
        return [("events", {**self.g, "kind": e.kind.value, "t": self.sec(e.t), **typed, "info": _info(values)})]

    def pressure(self, line: dict) -> list[Row]:
        if line.get("kind") == "vm_zap":
            return self._zap(_older_zap(line), "scan")
        r = _older_pressure(line)
        row = {**self.base, "mode": r.mode, "kind": r.kind, "t": self.sec(r.t), "mb": r.mb, "count": r.count}
        row |= {"seconds": r.seconds, "ok": r.ok, "error": r.error, "target": r.target, "info": _info(r.info)}
        return [("pressure", row)]

    def trace(self, line: dict) -> list[Row]:
        c = TraceCall.from_guest(line)
        numbers = {k: _number(c.fields.get(k)) for k in TRACE_NUMBERS}
        row = {**self.base, "kind": c.kind, "t": self.sec(c.t), "pid": c.pid, "comm": c.comm, "guest": c.guest}
        return [("trace", {**row, **numbers})]

    def zap(self, line: dict) -> list[Row]:
        return self._zap(_older_zap(line), "sampler")

    def _zap(self, z: VmZap, source: str) -> list[Row]:
        t1 = self.sec(z.t)
        row = {**self.base, "source": source, "guest": z.guest, "t0": t1 - z.since_ns / 1e9, "t1": t1}
        return [("vm_zaps", {**row, "zapped": z.zapped, "recycled": z.recycled})]

    def probe(self, line: dict) -> list[Row] | None:
        kind = line.get("type")
        if kind == "hist":
            return self._hist(ProbeHist.from_guest(line))
        if kind == "pass":
            p = ProbePass.from_guest(line)
            row = {**self.g, "pass": p.number, "t": self.sec(p.t1), "phase": self.phase_at(self.sec(p.t0))}
            row |= {"duration_ms": (p.t1 - p.t0) / 1e6, "majflt": _number(p.majflt), "steal_ms": _number(p.steal_ms)}
            return [("passes", row)]
        return None  # the header: what the probe touches and its floor

    def _hist(self, h: ProbeHist) -> list[Row]:
        tm = self.sec((h.t0 + h.t1) / 2)
        phase = self.phase_at(tm)
        out: list[Row] = []
        for k, n in h.counts.items():
            if not (k.isdigit() and int(k) < BUCKETS and n >= 0):
                raise ValueError(f"histogram bucket {k[:20]!r}: {n} touches")
            lo, hi = bucket_bounds(int(k))
            row = {**self.g, "phase": phase, "t": tm, "latency_ns": (lo + hi) / 2, "lo_ns": lo, "hi_ns": hi}
            out.append(("samples", {**row, "count": n, "interval": h.t0}))
        for pair in h.outliers:
            if len(pair) != 2:
                raise ValueError(f"an outlier is [t, latency_ns], not {str(pair)[:40]}")
            out.append(("outliers", {**self.g, "t": self.sec(pair[0]), "latency_ns": float(pair[1])}))
        return out

    def counters(self, line: dict) -> list[Row]:
        s = CounterSample.from_guest(line)
        t = self.sec(s.t)
        return [
            ("counters", {**self.base, "source": name.split(".", 1)[0], "name": name, "t": t, "value": value})
            for name, value in s.v.items()
        ]

    def workload(self, line: dict) -> list[Row]:
        r = WorkloadRun.from_guest(line)
        t0, t1 = self.sec(r.t0), self.sec(r.t1)
        first, last = self.phase_at(t0), self.phase_at(t1)
        run = {
            **self.g,
            "workload": r.workload[:NAME_LIMIT],
            "run": r.number,
            "phase": first if first == last else "across",
        }
        out: list[Row] = [
            (
                "runs",
                {
                    **run,
                    "t0": t0,
                    "t1": t1,
                    "status": r.status,
                    "stopped": bool(r.stopped),
                    "error": r.error,
                    "tail": r.tail,
                },
            )
        ]
        for m in r.metrics:
            metric = {"metric": m.name[:NAME_LIMIT], "unit": m.unit[:20], "better": m.better, "value": float(m.value)}
            out.append(("workload_metrics", {**run, "t": t1, **metric}))
        return out
