"""The experiment schema: topology, workload, pressure, phases, sampler, checks, boot, and the Experiment.

A field marked as an *axis* may hold one value or a list; every list-valued axis multiplies the matrix of
cells (matrix.py). The config reference in the docs is generated from these models (reference.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator

from .. import hypotheses
from .base import Strict, axis
from .bisect import Criterion
from .kernels import DistroKernel, KernelConfig, Source, Variant
from .pressure import ModeName, Pressure, upgrade
from .workloads import WorkloadRun

HypothesisName = Annotated[
    str,
    AfterValidator(lambda name: hypotheses.get(name).name),
    WithJsonSchema({"type": "string", "enum": list(hypotheses.HYPOTHESES)}),
]

TopologyKind = Literal["auto", "nested", "shadow"]
ProbeLevel = Literal["l1", "l2"]
PROBE_LEVELS: list[ProbeLevel] = ["l2", "l1"]


class LevelSpec(Strict):
    count: int = axis(
        1,
        ge=0,
        le=16,
        description="guests at this level (per parent); 0: none (a kernel-under-test-only "
        "experiment, its workloads in `workload.runs`)",
    )
    memory_mb: int = axis(ge=64, le=1 << 20, description="memory per guest")
    cpus: int = Field(1, ge=1, le=64)
    prealloc: bool = Field(
        True,
        description="guest RAM resident from QEMU start, as on a busy host, so reclaim "
        "in the kernel under test meets it (under TCG 1.6 GiB adds ~12 s to "
        "L1's boot)",
    )
    thp: Literal["never", "always", "madvise"] = Field(
        "never",
        description="transparent huge pages in this guest (transparent_hugepage=): with `always` an L1 "
        "maps its L2's RAM with 2 MiB pages in its nested page tables",
    )
    mlock: bool = Field(
        False,
        description="guest RAM locked in its parent (QEMU -overcommit mem-lock=on): reclaim "
        "in the parent never swaps it, as on hosts that pin guest memory",
    )


class KutSpec(Strict):
    memory_mb: int = Field(4096, ge=512, le=1 << 20, description="memory of the kernel under test")
    cpus: int = Field(2, ge=1, le=64)
    swap_mb: int = Field(
        1024, ge=0, le=1 << 20, description="virtio-blk swap disk, so global reclaim has something to do"
    )
    thp: Literal["never", "always", "madvise"] = Field(
        "never",
        description="transparent huge pages in the kernel under test: `never` keeps its guests' RAM in 4 KiB "
        "pages, so its nested MMU keeps one shadow page per 2 MiB of L2 memory",
    )


class Topology(Strict):
    kind: TopologyKind = axis("auto", description="auto: nested on KVM hosts, shadow under TCG")
    kut: KutSpec = KutSpec()
    l1: LevelSpec = LevelSpec(memory_mb=1600)
    l2: LevelSpec = LevelSpec(memory_mb=384)


class Probe(Strict):
    size_mb: int = axis(1200, ge=1, le=1 << 20, description="address span the probe touches (mapped MAP_NORESERVE)")
    access: Literal["write", "read"] = "write"
    pattern: Literal["sequential", "random"] = "sequential"
    stride: int = Field(
        4096,
        ge=8,
        le=1 << 30,
        description="bytes between touches (4096: every page; resident memory is "
        "size_mb * 4096 / stride when stride > 4096)",
    )
    interval_s: float = Field(1.0, ge=0.01, le=3600, description="histogram interval")
    levels: list[ProbeLevel] = Field(
        default_factory=lambda: list(PROBE_LEVELS),
        description="where the probe runs (levels absent in the topology are skipped)",
    )

    def resident_mb(self, thp: str = "never") -> float:
        """What the probe keeps resident: with transparent huge pages every 2 MiB it touches is all there."""
        return self.size_mb * (1.0 if thp == "always" else min(1.0, 4096 / self.stride))


class Workload(Strict):
    probe: Probe = Probe()
    command: list[str] | None = Field(
        None,
        description="argv run once in every guest that runs the probe, before the phases; its stdout, "
        "stderr and exit status are kept apart in files (for metrics, use a `command` entry of `runs`)",
    )
    runs: list[WorkloadRun] = Field(
        default_factory=list,
        description="programs run again and again during the schedule, their output parsed into metrics that "
        "join the A/B (kinds: the registry's, harness/guest/workloads/)",
    )

    @model_validator(mode="after")
    def _names_unique(self) -> Workload:
        names = [r.label for r in self.runs]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"workload.runs: two entries named {', '.join(dup)}: give each a `name`")
        return self

    def runs_at(self, level: str) -> list[WorkloadRun]:
        return [r for r in self.runs if r.level == level]

    def selftests(self) -> list[str]:
        """The KVM selftests any entry runs (built from each variant's tree)."""
        return sorted({t for r in self.runs for t in r.workload.needs_selftests(r.knobs)})


class Phase(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    duration_s: float = Field(gt=0, le=86400)
    pressure: bool | ModeName = Field(
        False, description="true: the cell's pressure.mode during this phase; or name a mode for this phase alone"
    )

    def mode(self, cell_mode: str) -> str:
        if self.pressure is True:
            return cell_mode
        return str(self.pressure) if self.pressure else "none"


class Bisect(Strict):
    """How `bisect` measures each commit it tries: the config's own schedule or a shorter one, and how many boots."""

    criterion: Criterion = Field(Criterion(), description="what a commit is judged by (or --criterion)")
    phases: list[Phase] | None = Field(None, min_length=1, description="a reduced schedule (default: the config's)")
    repetitions: int | None = Field(
        None, ge=1, le=50, description="boots of each commit at first (default: 3 by a metric, as the A/B, else 1)"
    )
    max_repetitions: int = Field(6, ge=1, le=50, description="boots of a commit before a metric undecided is skipped")
    on_crash: Literal["skip", "bad"] = Field(
        "skip", description="a commit whose kernel under test crashes (panic, oops, BUG, freeze): skip or bad"
    )

    def first_repetitions(self) -> int:
        return self.repetitions or (3 if self.criterion.kind == "metric" else 1)


class Sampler(Strict):
    interval_s: float = Field(0.5, ge=0.05, le=60)
    trace: bool | None = Field(
        None,
        description="record cause events from the vmscan tracepoints: the hypothesis's shrinkers' calls and "
        "guests' direct reclaim, and read each VM's zap counters after those calls (null: as the hypothesis "
        "says; `trace_shrinker` is its older spelling)",
    )
    zap_interval_s: float = Field(
        0.1,
        ge=0,
        le=1,
        description="after a traced shrinker call each VM's zap counters are read, at most this often "
        "(not polled: nothing is read between calls); each rise goes to the vm_zaps table; 0: with "
        "the next sample",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trace_shrinker" in data:
            data = {k: v for k, v in data.items() if k != "trace_shrinker"} | {"trace": data["trace_shrinker"]}
        return data


class Attribution(Strict):
    """How the report ties each latency spike to the cause events it overlaps (report/attribution.py)."""

    spike_quantile: float = Field(
        0.999,
        gt=0.5,
        lt=1,
        description="a spike is a touch above this quantile of the same guest's undisturbed (no-pressure) phases "
        "in the same cell, and never below the probe's raw-record floor (1 ms: shorter touches are only in histograms)",
    )
    unmeasured_window_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="matching window for a guest whose clock offset was not measured (a run from before the "
        "round-trip clock); otherwise the measured uncertainty is the window",
    )


class Checks(Strict):
    """What a cell must show to count (else it failed and is retried), and what a phase must show to have
    delivered its pressure (else its A/B rows are inconclusive and the run ends with exit status 3)."""

    min_intervals_per_phase: int = Field(
        2,
        ge=1,
        le=3600,
        description="probe histograms (one per probe interval) each probe level must write in every phase",
    )
    max_probe_gap_s: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="longest silence of a probe during the phases before its guest counts as stalled",
    )
    max_phase_overrun_s: float = Field(
        90.0,
        gt=0,
        le=86400,
        description="how long past a phase's length the kernel under test may take to record its end before it "
        "counts as frozen and its cell is given up (a phase's pressure stops within 40 s)",
    )


class Boot(Strict):
    timeout_s: dict[str, float] = Field(
        default_factory=lambda: {"kut": 120.0, "l1": 300.0, "l2": 900.0},
        description="per level: QEMU start to agent ready",
    )
    retries: int = Field(
        1, ge=0, le=5, description="reruns of a cell whose guests failed to boot or that fell short of `checks`"
    )

    @field_validator("hidden")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        if bad := [x for x in paths if not x.startswith("/") or "\0" in x]:
            raise ValueError(f"absolute host paths only: {bad}")
        return paths

    @field_validator("timeout_s")
    @classmethod
    def _known_levels(cls, t: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(t) - {"kut", "l1", "l2"})
        if unknown:
            raise ValueError(f"levels are kut, l1, l2; unknown: {', '.join(unknown)}")
        if bad := {k: v for k, v in t.items() if not 0 < v <= 86400}:
            raise ValueError(f"timeouts must be over 0 s and at most a day: {bad}")
        return t

    on_guest_failure: Literal["fail", "continue"] = Field(
        "continue",
        description="fail: any guest that fails to boot or dies fails the cell; continue: the cell goes on "
        "with the others (it still fails if a probing level then lacks samples: `checks`)",
    )
    kvm_trace_on_failure: bool = Field(
        False,
        description="keep the kernel under test's KVM tracepoints (exits, nested entries, injected "
        "exceptions) in a ring buffer and save it as kvm-trace.<guest>.txt when a guest dies or fails to boot",
    )
    hidden: list[str] = Field(
        default_factory=lambda: ["/root/.ssh", "/home/*/.ssh", "/etc/shadow", "/etc/gshadow", "/etc/ssh/*_key"],
        description="host paths (globs) the kernel under test and its guests cannot read in the host's root: "
        "directories show empty, files empty",
    )
    rootfs: Literal["auto", "9p", "virtiofs"] = Field(
        "auto",
        description="how each level shares the host's root with its guests, read-only; "
        "auto: virtiofs on KVM where a virtiofsd exists and the run is root, else virtio-9p (under TCG the "
        "host's virtiofsd writes bypass TCG's invalidation of translated code)",
    )


def check_output(output: str) -> str:
    """A results root (config `output:` or --output) is a plain directory path: never one that climbs."""
    if not output.strip() or ".." in Path(output).parts or "\0" in output:
        raise ValueError(f"{output!r}: a directory path without '..' (absolute, or relative to where you run)")
    return output


class Experiment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    source: Source
    kernel_config: KernelConfig = KernelConfig()
    distro_kernel: DistroKernel | None = Field(
        None,
        description="boot a distribution's kernel and build only KVM's modules from the source (kernel_config unused)",
    )
    hypothesis: HypothesisName = Field(
        "kvm-mmu-shrinker",
        description="what the run asks of its kernels: the mechanism it observes, what its evidence means, "
        "its report's words (the registry's, harness/hypotheses/)",
    )
    variants: list[Variant] = Field(min_length=1)
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto: KVM when usable with vmx/svm, else TCG (said loudly)"
    )
    topology: Topology = Topology()
    workload: Workload = Workload()
    pressure: Pressure = Pressure()
    phases: list[Phase] = Field(min_length=1)
    sampler: Sampler = Sampler()
    attribution: Attribution = Attribution()
    boot: Boot = Boot()
    checks: Checks = Checks()
    repetitions: int = Field(3, ge=1, le=1000)
    parallel: Literal["auto"] | Annotated[int, Field(ge=1, le=512)] = Field(
        "auto",
        description="cells at once on one host, each kernel under test on CPUs of its own and in its own memory "
        "group, a repetition's variants started together; auto: as many as the host's CPUs and memory hold",
    )
    output: str = Field("results", description="results root; a run lands in <output>/<name>/<run-id>")
    bisect: Bisect = Field(Bisect(), description="what `bisect` measures each commit by (ignored by other commands)")

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @model_validator(mode="before")
    @classmethod
    def _older_spellings(cls, data: Any) -> Any:
        return upgrade(data)

    def modes_used(self) -> list[str]:
        """The pressure modes its phases use, in the order they first run."""
        return list(dict.fromkeys(p.mode(self.pressure.mode) for p in self.phases))

    @field_validator("output")
    @classmethod
    def _output_is_a_plain_path(cls, output: str) -> str:
        return check_output(output)

    @model_validator(mode="after")
    def _git_variants_have_a_repository(self) -> Experiment:
        if self.source.kind != "git":
            for v in self.variants:
                if v.git is not None and not v.git.repo:
                    raise ValueError(
                        f"variant {v.name}: git without repo needs the experiment's source to be a git repository "
                        f"(it is a {self.source.kind}); give git.repo"
                    )
        return self

    @model_validator(mode="after")
    def _distro_kernel_builds_from_its_own_source(self) -> Experiment:
        if self.distro_kernel is not None:
            if self.source.kind != "tarball":
                raise ValueError("distro_kernel: the source must be the distribution's source tarball (kind: tarball)")
            for v in self.variants:
                if v.source is not None or (v.git is not None and v.git.ref is not None):
                    raise ValueError(
                        f"variant {v.name}: a source of its own does not fit a distro_kernel, whose modules must "
                        "match the one image (give patches, a series or git.range instead)"
                    )
        return self

    @field_validator("variants", "phases")
    @classmethod
    def _unique_names(cls, items: list) -> list:
        names = [x.name for x in items]
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names}")
        return items
