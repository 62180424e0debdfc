"""What guests write as they run, record by record: the agents' events, the pressure actors' records, the sampler's
counters, traces and zap steps, the probe's header, histograms and passes, and each level's facts. Standard library
only; the host reads each line back with from_guest() (results/guest_files.py), where whatever does not fit its
type is a problem of its cell, never an exception."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field

try:
    from .contract import EventKind, Record  # as harness.guest.records
    from .workloads.base import Metric
except ImportError:  # in a guest: its directory is sys.path[0]
    from contract import EventKind, Record  # type: ignore[no-redef]
    from workloads.base import Metric  # type: ignore[no-redef]


class Written(Record):
    """A record a guest writes, line by line over 9p: the fields it leaves unset stay out of its line."""

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass
class PressureRecord(Written):
    """One thing a pressure actor did (pressure.jsonl): what (kind, of its mode), how much memory (mb) or how many
    objects (count), how long it took (seconds), whether it worked (ok, error), on what (target); its other figures
    in info, for the reader."""

    t: int
    mode: str
    kind: str
    mb: float | None = None
    count: float | None = None
    seconds: float | None = None
    ok: bool | None = None
    error: str | None = None
    target: str | None = None
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class VmZap(Record):
    """A step of one VM's shadow-page zap counters in the kernel under test (zaps.jsonl, and a shrinker-scan actor's
    vm_zap records): the guest whose QEMU runs that VM lost `zapped` shadow pages (`recycled` of them by
    kvm_mmu_zap_oldest_mmu_pages) in the since_ns before t."""

    t: int
    guest: str
    zapped: int = 0
    recycled: int = 0
    since_ns: int = 0

    def line(self) -> str:
        """Its JSON line, with its kind: it shares pressure.jsonl with an actor's PressureRecords."""
        return json.dumps({"kind": "vm_zap", **self.to_dict()}) + "\n"


@dataclass
class Event(Written):
    """One thing an agent saw or did (events.jsonl), at t (CLOCK_REALTIME ns) of its level. `guest` is the guest it
    is about (a child that started, came up, failed or died; the level itself once ready)."""

    t: int
    kind: EventKind
    mono: int | None = None
    guest: str | None = None
    level: str | None = None
    pid: int | None = None
    phase: str | None = None
    mode: str | None = None
    duration_s: float | None = None
    seconds: float | None = None
    kernel_s: float | None = None
    status: int | None = None
    error: str | None = None
    reason: str | None = None
    when: str | None = None
    ok: bool | None = None
    count: int | None = None
    expected: int | None = None
    warm: int | None = None
    timeout_s: float | None = None
    cgroup: str | None = None
    removed: bool | None = None
    clean: bool | None = None
    console: str | None = None
    stderr: str | None = None
    detail: str | None = None
    method: str | None = None
    port: str | None = None
    step_s: float | None = None
    polls: int | None = None
    wait_s: float | None = None
    device: str | None = None
    total_kb: str | None = None
    events: list[str] | None = None


@dataclass
class CounterSample(Record):
    """One sample of the kernel under test's counters (counters.jsonl), at t (ns): counter name -> value."""

    t: int
    v: dict[str, float]


@dataclass
class TraceCall(Written):
    """A cause event the sampler followed in the kernel under test's tracepoints (trace.jsonl): a call of a shrink
    function the hypothesis names (shrink_start/end: asked, freed, and who called), or a guest's QEMU in direct
    reclaim (begin/end)."""

    t: int
    kind: str  # shrink_start | shrink_end | direct_reclaim_begin | direct_reclaim_end
    pid: int | None = None
    comm: str | None = None
    guest: str | None = None
    raw: str | None = None
    fields: dict[str, int] = field(default_factory=dict)  # the numbers the tracepoint printed


@dataclass
class ProbeHeader(Record):
    """The probe's first record (probe.jsonl): what it touches, and its own floor (clock resolution, loop cost)."""

    t: int
    size_mb: int
    stride: int
    touches_per_pass: int
    pid: int | None = None
    pattern: str | None = None
    access: str | None = None
    sub_bits: int | None = None
    outlier_ns: int | None = None
    clock: str | None = None
    clock_resolution_ns: float | None = None
    loop_overhead_ns: float | None = None


@dataclass
class ProbeHist(Record):
    """One interval of touches (probe.jsonl): a log-linear histogram (bucket index -> touches) and every touch of
    at least the outlier floor as [t, latency_ns]."""

    ALIASES: typing.ClassVar[dict[str, str]] = {"pass": "number"}
    t0: int
    t1: int
    counts: dict[str, int]
    n: int = 0
    sum_ns: int = 0
    max_ns: int = 0
    number: int = 0  # the pass it fell in ("pass" in the file)
    outliers: list[list[int]] = field(default_factory=list)


@dataclass
class ProbePass(Written):
    """One pass over the working set (probe.jsonl), with what the guest's own kernel counted meanwhile."""

    ALIASES: typing.ClassVar[dict[str, str]] = {"pass": "number"}
    t0: int
    t1: int
    number: int  # ("pass" in the file)
    touches: int | None = None
    majflt: int | None = None
    steal_ms: float | None = None


@dataclass
class WorkloadRun(Written):
    """One run of a workload (workload.jsonl): when it ran (t0, t1, ns of its level's clock), how it ended, the
    metrics its output gave; a run that failed says why and ends with its output's last lines (tail). A run the
    agent stopped at the end of the schedule is `stopped`: neither measured nor failed."""

    workload: str
    number: int
    t0: int
    t1: int
    status: int | None = None
    metrics: list[Metric] = field(default_factory=list)
    error: str | None = None
    tail: str | None = None
    stopped: bool | None = None
    output: str | None = None  # the file its output went to, in the same export


@dataclass
class LevelFacts(Record):
    """What makes a level's numbers mean what they say (facts.json): KVM, nesting, TDP, who runs it, which shrinkers
    it registers. (Older runs listed only one shrinker's directories, under another name: from_guest reads it.)"""

    name: str
    level: str
    uname: str | None = None
    cpu_flags: list[str] = field(default_factory=list)
    kvm_device: bool | None = None
    kvm_vendor: str | None = None
    kvm_params: dict[str, str] = field(default_factory=dict)
    runs_on_kvm: bool | None = None
    hypervisor_line: str | None = None
    shrinker_dirs: list[str] = field(default_factory=list)  # every shrinker's debugfs directory (SHRINKER_DEBUG)
    functions_in_kallsyms: list[str] = field(default_factory=list)  # which of its sampler's shrink functions it has
    mem_total_kb: int | None = None
    swap_total_kb: int | None = None
    memory_reclaim_root: bool | None = None
    cmdline: str | None = None
    clocksource: str | None = None
    rootfs: str | None = None

    @classmethod
    def from_guest(cls, data: dict, where: str | None = None):
        if isinstance(data, dict) and "x86_mmu_shrinker_dirs" in data and "shrinker_dirs" not in data:
            data = {**data, "shrinker_dirs": data["x86_mmu_shrinker_dirs"]}
        return super().from_guest(data, where)
