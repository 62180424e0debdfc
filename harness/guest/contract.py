"""What crosses between the host and its guests, and between a guest and its children: one definition
both sides import. Standard library only: the agent imports it by file from its own directory, the host
as harness.guest.contract.

The host writes a GuestPlan to each guest's export as plan.json; the guest reads it back with
GuestPlan.load(), which checks the version and every field, and ends by writing an ExitRecord to
exit.json. Events (events.jsonl) carry an EventKind.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

try:
    from . import modes  # as harness.guest.contract
except ImportError:  # in a guest: its directory is sys.path[0]
    import modes  # type: ignore[no-redef]

VERSION = 1
OUT = "/run/nestpress/out"  # where every agent mounts its results export (9p tag `nestout`)
SCRATCH = "/run/nestpress"  # tmpfs in every guest: its children's sockets live here
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the agent's, and its command's


class ContractError(ValueError):
    """A record that does not fit the contract (another version, a missing or unknown field, a wrong type)."""


class EventKind(enum.StrEnum):
    CLOCK = "clock"
    SWAP = "swap"
    READY = "ready"
    KVM_TRACE = "kvm_trace"
    BOOT_START = "boot_start"
    BOOT_READY = "boot_ready"
    BOOT_FAILED = "boot_failed"
    GUEST_DIED = "guest_died"
    GUEST_EXIT = "guest_exit"
    PROBE_START = "probe_start"
    PROBE_DIED = "probe_died"
    PROBE_EXIT = "probe_exit"
    PROBES_WARM = "probes_warm"
    PROBES_NOT_WARM = "probes_not_warm"
    COMMAND_EXIT = "command_exit"
    WORKLOAD_START = "workload_start"
    WORKLOAD_END = "workload_end"
    PHASE_START = "phase_start"
    PHASE_END = "phase_end"
    PRESSURE_UNAVAILABLE = "pressure_unavailable"
    PRESSURE_START = "pressure_start"
    PRESSURE_STOP = "pressure_stop"
    CGROUP_REMOVED = "cgroup_removed"
    NOT_LOCKED = "not_locked"  # the agent could not lock itself in memory (supervise.lock_in_memory)


# the events that say a guest did not give what it should: a cell with any of them is marked in its record
GUEST_FAILURES = (EventKind.BOOT_FAILED, EventKind.GUEST_DIED, EventKind.PROBES_NOT_WARM)


class ExitKind(enum.StrEnum):
    OK = "ok"
    PREFLIGHT = "preflight"  # the kernel cannot run the schedule: said before any guest starts, never retried
    ERROR = "error"


MAX_INT = 1 << 63  # a count, a size or a time in ns beyond this is no measurement


def _scalar(tp, value, where: str):
    """A number, a bool or a string as tp: a bool is no number, an int may stand for a float, a number is finite and
    within MAX_INT."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = number if tp is float else isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not fits:
        raise ContractError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {str(value)[:80]!r}")
    if number and not (-MAX_INT < value < MAX_INT and (isinstance(value, int) or math.isfinite(value))):
        raise ContractError(f"{where}: {str(value)[:40]} is not a finite number within +-2**63")
    return float(value) if tp is float else value


@functools.cache
def _shape(tp) -> tuple:
    """(origin, args) of a field's type, resolved once per type."""
    return typing.get_origin(tp), typing.get_args(tp)


def _plain_ints(value: list) -> bool:
    """Every item an int (no bool) within +-MAX_INT: a histogram's buckets, checked at once (the common case)."""
    return all(type(v) is int and -MAX_INT < v < MAX_INT for v in value)


def _convert(tp, value, where: str):
    """value as type tp, recursively (dataclasses, enums, lists, dicts, unions); ContractError otherwise."""
    origin, args = _shape(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, value, where)
            except ContractError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ContractError(f"{where}: {str(value)[:80]!r} is not a {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ContractError(f"{where}: expected a list, got {type(value).__name__}")
        if args[0] in (int, float) and _plain_ints(value):  # else item by item, naming the one that is wrong
            return [float(v) for v in value] if args[0] is float else list(value)
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ContractError(f"{where}: {str(value)[:80]!r} is not one of {[m.value for m in tp]}") from None
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp in (int, float, bool, str):
        return _scalar(tp, value, where)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ContractError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


@functools.cache
def _fields(cls) -> tuple[dict, frozenset]:
    """A record type's field types and names, resolved once (get_type_hints parses its string annotations)."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def _from_dict(cls, data, where: str, lenient: bool = False):
    """cls from a mapping; lenient: fields it does not know are left out (a guest's records, which an older or newer
    agent may have written), else they are an error (what the host hands a guest)."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints, names = _fields(cls)
    data = {cls.ALIASES.get(k, k): v for k, v in data.items()} if getattr(cls, "ALIASES", None) else data
    unknown = set(data) - names
    if unknown and not lenient:
        raise ContractError(f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ContractError(f"{where}: missing field {f.name!r} of {cls.__name__}")
    return cls(**kwargs)


class Record:
    """A dataclass that travels as JSON: to_json() on one side, from_dict() (checked) on the other. ALIASES: a JSON
    key that cannot be a field's name (a keyword) -> the field's."""

    ALIASES: typing.ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        data = json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]
        back = {field: key for key, field in self.ALIASES.items()}
        return {back.get(k, k): v for k, v in data.items()} if back else data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str | None = None):
        return _from_dict(cls, data, where or cls.__name__)

    @classmethod
    def from_guest(cls, data: dict, where: str | None = None):
        """As from_dict, for what a guest wrote: fields this harness does not know are left out, not refused."""
        return _from_dict(cls, data, where or cls.__name__, lenient=True)

    @classmethod
    def load(cls, path: str):
        with open(path) as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise ContractError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(data, path)

    def save(self, path: str) -> None:
        """Write-then-rename, so a reader never sees half a record."""
        with open(path + ".tmp", "w") as f:
            f.write(self.to_json())
        os.replace(path + ".tmp", path)


@dataclass
class PressureJob(Record):
    """What the agent hands one pressure actor process (guest/pressure.py), in its argv: its mode (modes/) and that
    mode's knobs."""

    mode: str
    params: dict[str, int | float | bool | str]
    cgroup: str
    log: str


@dataclass
class SamplerSpec(Record):
    """What the sampler reads: counters every interval_s; with `trace`, the vmscan tracepoints - calls of the
    shrink_functions and guests' direct reclaim; the counts of the named shrinkers' debugfs directories. The names
    come from the experiment's hypothesis (harness/hypotheses/)."""

    ALIASES: typing.ClassVar[dict[str, str]] = {"trace_shrinker": "trace"}
    interval_s: float
    trace: bool
    zap_interval_s: float = 0.1
    shrinkers: list[str] = field(default_factory=list)
    shrink_functions: list[str] = field(default_factory=list)


@dataclass
class SamplerJob(Record):
    spec: SamplerSpec
    out: str  # the directory its counters.jsonl, trace.jsonl and zaps.jsonl go to


@dataclass
class ProbeSpec(Record):
    size_mb: int
    access: str  # write | read
    pattern: str  # sequential | random
    stride: int
    interval_s: float


@dataclass
class ProbeJob(Record):
    """What the agent hands the probe process (guest/probe.py), in its argv."""

    spec: ProbeSpec
    out: str  # probe.jsonl
    status: str  # probe.status: passes so far, or why it failed
    stop: str  # the file whose existence ends it
    pause_s: float = 0.0


@dataclass
class WorkloadSpec(Record):
    """One workload a level runs again and again during the schedule (guest/workload.py): its name, its kind in the
    registry (workloads/), the argv the host made for it, and its knobs (what its parser reads)."""

    name: str
    kind: str
    argv: list[str]
    params: dict[str, list[str] | dict[str, str] | int | float | bool | str]
    timeout_s: float = 600.0
    pause_s: float = 0.0


@dataclass
class WorkloadJob(Record):
    """What the agent hands one workload runner, in its argv."""

    spec: WorkloadSpec
    out: str  # the directory its workload.jsonl and each run's output go to
    stop: str  # the file whose existence ends it


@dataclass
class PhaseSpec(Record):
    name: str
    duration_s: float
    mode: str  # a pressure mode's name (modes/)

    def __post_init__(self) -> None:
        if self.mode not in modes.MODES:
            raise ContractError(f"phase {self.name}: {self.mode!r} is not one of {list(modes.MODES)}")


@dataclass
class Schedule(Record):
    """What the kernel under test's agent conducts: the phases and their pressure, and the sampler."""

    phases: list[PhaseSpec]
    pressure: dict[str, dict[str, int | float | bool | str]]  # the knobs of each mode its phases use
    sampler: SamplerSpec
    warm_timeout_s: float
    expected_probes: int = 0


@dataclass
class ClockSample(Record):
    """One measurement of a child's clock against its parent's (guest/clock.py), in clock.jsonl of the child's
    export: at t (the parent's CLOCK_REALTIME, ns) the child's clock read offset_ns ahead, give or take
    uncertainty_ns (what `exchanges` round trips, the shortest round_trip_ns, allow together). method: who
    measured how - the parent over the clock port (virtio-serial) or the child by hypercall (ptp_kvm)."""

    t: int
    offset_ns: int
    uncertainty_ns: int
    exchanges: int
    round_trip_ns: int = 0
    method: str = "virtio-serial"


@dataclass
class RootServer(Record):
    """The process that serves a child's root over virtiofs (guest/rootfs.py) before its QEMU starts."""

    argv: list[str]
    socket: str


@dataclass
class ChildSpec(Record):
    """One guest a level starts: its QEMU command line, where its files go, and the plan it will follow."""

    name: str
    export: str
    console: str
    timeout_s: float
    argv: list[str]
    plan: GuestPlan
    rootfs_server: RootServer | None = None
    monitor: str | None = None
    clock: str | None = None  # the host side of its clock port (guest/clock.py)
    system_map: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class GuestPlan(Record):
    """Everything one level's agent does: its children, its probe and command, and (the kernel under test)
    the schedule it conducts."""

    name: str
    level: str  # kut | l1 | l2
    run_id: str
    version: int = VERSION
    cell: str | None = None
    children: list[ChildSpec] = field(default_factory=list)
    probe: ProbeSpec | None = None
    command: list[str] | None = None
    workloads: list[WorkloadSpec] = field(default_factory=list)
    on_guest_failure: str = "continue"
    swap_device: str | None = None
    cgroup_controllers: list[str] = field(default_factory=list)
    topology: str | None = None
    schedule: Schedule | None = None
    kvm_trace_on_failure: bool = False
    max_s: float = 3600.0  # below the kernel under test: how long to wait for the parent's stop

    @classmethod
    def from_dict(cls, data: dict, where: str | None = None):
        if isinstance(data, dict) and data.get("version") != VERSION:
            raise ContractError(
                f"{where or 'plan'}: a plan of version {data.get('version')!r}; this agent "
                f"speaks version {VERSION} (host and guest run different harness versions)"
            )
        return super().from_dict(data, where)


@dataclass
class ExitRecord(Record):
    """How an agent ended (exit.json): the host decides from `kind`, never from the error's text."""

    status: int
    kind: ExitKind
    error: str | None  # the traceback
    t: int
    message: str | None = None  # the exception's own words, for the user
