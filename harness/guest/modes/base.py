"""What a pressure mode is, and what it is given. Standard library only: the kernel under test runs the modes.

A mode declares its knobs (a dataclass whose fields carry their bounds and meaning, from which the config's
schema is made), the kernel options it needs, its size check, its preflight and availability checks, how its
cgroup is set up, its actor, and how its delivery is judged from what the phase showed (PhaseEvidence). The
host's config, schedule and evidence, and the guest's agent, ask the registry (modes/__init__.py) by name.
"""

from __future__ import annotations

import bisect
import dataclasses
import importlib
import itertools
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Protocol

CG = "/sys/fs/cgroup"
PAGE = 4096
SCANS = ("vmstat.pgscan_kswapd", "vmstat.pgscan_direct")  # global reclaim's scans (memcg reclaim is not in them)


def param(default: Any, about: str = "", **bounds: float) -> Any:
    """A knob of a mode: its default, what it means, and its bounds (ge, gt, le, lt), checked by the config."""
    return field(default=default, metadata={"about": about, **bounds})


@dataclass
class Sizes:
    """What the kernel under test has, for a mode's size check before anything boots (MiB)."""

    kut_mb: int
    swap_mb: int
    guests_mb: int  # its guests' RAM and their QEMUs
    reserve_mb: int  # its own kernel, agent and sampler

    @property
    def spare_mb(self) -> int:
        return self.kut_mb - self.guests_mb - self.reserve_mb


@dataclass
class Series:
    """One counter's samples in a cell, in time order (seconds since the cell's first phase)."""

    t: list[float]
    v: list[float]


@dataclass
class Counters:
    """A cell's counters seen from one phase [t0, t1]: how much each rose, how low it went, how far it fell."""

    series: dict[str, Series]
    t0: float
    t1: float

    def rise(self, name: str) -> float:
        """Rise of a cumulative counter over the phase: from the last sample before it to the first after it
        (when its last changes become visible); NaN without two samples. KVM's stats restart at 0 when a VM
        exits, so only rises are summed."""
        s = self.series.get(name)
        if s is None:
            return math.nan
        lo = max(bisect.bisect_right(s.t, self.t0) - 1, 0)
        hi = min(bisect.bisect_right(s.t, self.t1) + 1, len(s.t))
        values = s.v[lo:hi]
        if len(values) < 2:
            return math.nan
        return float(sum(b - a for a, b in itertools.pairwise(values) if b > a))

    def low(self, name: str) -> float:
        """The lowest value within the phase; NaN without a sample in it."""
        s = self.series.get(name)
        inside = s.v[bisect.bisect_left(s.t, self.t0) : bisect.bisect_right(s.t, self.t1)] if s else []
        return float(min(inside)) if inside else math.nan

    def fall(self, name: str) -> float:
        """How far it fell below its value at the phase's start (the last sample before it, against the
        phase and the second after it); NaN without both."""
        s = self.series.get(name)
        if s is None:
            return math.nan
        i = bisect.bisect_right(s.t, self.t0)
        inside = s.v[i : bisect.bisect_right(s.t, self.t1 + 1)]
        if i == 0 or not inside:
            return math.nan
        return float(max(0.0, s.v[i - 1] - min(inside)))

    def scans(self) -> float:
        """Pages global reclaim scanned in the phase (kswapd and direct)."""
        return sum(self.rise(name) for name in SCANS)


@dataclass
class PhaseEvidence:
    """What one phase of one cell showed, as a mode's delivery check reads it (analysis/evidence.py builds it)."""

    mode: str
    counters: Counters
    records: list[Any]  # its actor's PressureRecords (contract.py), from just before the phase started
    facts: Any = None  # the kernel under test's LevelFacts (contract.py), None when it left none


class Log(Protocol):
    """What an actor logs with (guest/pressure.py): a PressureRecord of its mode, or a step of a VM's zap counters."""

    def __call__(self, kind: str, **fields: Any) -> None: ...

    def zap(self, step: Any) -> None: ...  # a contract.VmZap


def guest_module(name: str) -> ModuleType:
    """A module of the guest directory, as the host (harness.guest.<name>) or a guest (<name>) imports it."""
    parent = (__package__ or "").rpartition(".")[0]  # "harness.guest" on the host, "" in a guest
    return importlib.import_module(f"{parent}.{name}" if parent else name)


class Mode:
    """A pressure mode. Subclasses say what differs; a mode without an actor (none) idles."""

    name: str = ""
    about: str = ""
    knob_type: type | None = None  # its knobs: a dataclass of param() fields
    needs: ClassVar[dict[str, str]] = {}  # kernel options -> why
    cgroup = True  # its actor runs in a cgroup of its own
    calls_global_shrinkers = False  # its reclaim calls shrinkers that are not memcg-aware (the KVM MMU's)
    legacy: ClassVar[dict[str, str]] = {}  # an older config's dotted key -> this mode's knob (read from old runs too)

    # -- host, before anything boots ---------------------------------------------------------------
    def check_sizes(self, params: Any, sizes: Sizes) -> list[str]:
        """Why these knobs cannot work on a kernel under test of these sizes (nothing: they can)."""
        return []

    def params(self, data: dict[str, Any] | None) -> Any:
        """Its knobs from a mapping (the config's, or what the plan carries), defaults filled in."""
        return self.knob_type(**(data or {})) if self.knob_type else None

    # -- the kernel under test ---------------------------------------------------------------------
    def preflight(self) -> list[str]:
        """What would make a schedule that uses this mode meaningless on this kernel (said before any guest)."""
        return []

    def unavailable(self) -> str | None:
        """Why it cannot act on this kernel when its phase starts (recorded; the phase goes on without it)."""
        return None

    def setup_cgroup(self, path: str, params: Any) -> None:
        """Limits of its actor's group, written before the actor joins it."""

    def act(self, params: Any, ready: Callable[[], None], log: Log) -> None:
        """The body of its phase, until SIGTERM; ready() says the pressure is on (the phase's clock starts)."""
        raise NotImplementedError(f"pressure mode {self.name} has no actor")

    @property
    def acts(self) -> bool:
        return type(self).act is not Mode.act

    # -- host, after the run -----------------------------------------------------------------------
    def inapplicable(self, ev: PhaseEvidence) -> str | None:
        """Why this mode does not exist on the kernel that ran it (its A/B rows are then not comparable)."""
        return None

    def shortfalls(self, ev: PhaseEvidence, params: Any) -> list[str]:
        """What the phase should have shown by its mode and did not (nothing: it delivered)."""
        return []

    def shown(self, ev: PhaseEvidence) -> str:
        """The figures its delivery was judged on, for the evidence line of the report."""
        return ""


def knob_fields(mode: Mode) -> list[dataclasses.Field]:
    return list(dataclasses.fields(mode.knob_type)) if mode.knob_type else []


# -- what actors share ------------------------------------------------------------------------------
def meminfo_mb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) >> 10
    raise KeyError(key)


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def reclaim_scans() -> int:
    """Pages the whole machine's reclaim has scanned so far (kswapd and direct; memcg reclaim is not in these)."""
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k in ("pgscan_kswapd", "pgscan_direct"))


class Hog:
    """Anonymous memory taken in chunks and kept hot by re-touching it."""

    def __init__(self) -> None:
        self.chunks: list[mmap.mmap] = []

    @property
    def mb(self) -> int:
        return sum(len(c) for c in self.chunks) >> 20

    def grow(self, mb: int) -> None:
        """MAP_POPULATE faults the chunk in inside one syscall: a Python loop per page manages only
        ~50 MB/s under TCG, too slow to push a kernel into reclaim within a phase."""
        populate = getattr(mmap, "MAP_POPULATE", 0)
        m = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        if not populate:
            for off in range(0, len(m), PAGE):
                m[off] = 1
        self.chunks.append(m)

    def touch(self) -> None:
        for m in self.chunks:
            for off in range(0, len(m), PAGE):
                m[off] = 2
