"""Experiment configs: YAML -> validated model -> expanded matrix of cells.

A field marked as an *axis* may hold one value or a list; every list-valued axis
multiplies the matrix of cells (LKP-style), so `pressure.mode: [global, memcg-limit]` makes
two cells per variant and repetition. Overrides (`--set a.b=value`) are applied
to the raw YAML before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import REPO_ROOT
from .errors import ConfigError
from .guest.contract import PressureMode

TopologyKind = Literal["auto", "nested", "shadow"]
ProbeLevel = Literal["l1", "l2"]
PROBE_LEVELS: list[ProbeLevel] = ["l2", "l1"]


def axis(default: Any = ..., **kw: Any) -> Any:
    """A field that may be given as a list, expanding the matrix of cells."""
    return Field(default, json_schema_extra={"axis": True}, **kw)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no infinite phase or NaN timeout


class Source(Strict):
    """Where the kernel comes from. The tree is never modified: the harness works on a copy."""

    kind: Literal["tarball", "git", "local"] = Field(description="tarball file, git repository + ref, or local tree")
    path: str | None = Field(None, description="tarball file or local tree (tarball/local)")
    url: str | None = Field(None, description="git repository: URL or path (git)")
    ref: str = Field("HEAD", description="git ref to build (git)")
    package: str | None = Field(None, description="Debian package that provides the tarball (installed by `fab setup`)")

    @property
    def where(self) -> str:
        """The tarball, the local tree or the repository (the validator below made sure it is there)."""
        return str(self.url if self.kind == "git" else self.path)

    @model_validator(mode="after")
    def _needs_location(self) -> Source:
        if self.kind in ("tarball", "local") and not self.path:
            raise ValueError(f"source.kind={self.kind} needs source.path")
        if self.kind == "git" and not self.url:
            raise ValueError("source.kind=git needs source.url")
        for name, value in (("url", self.url), ("ref", self.ref)):
            if self.kind == "git" and str(value).startswith("-"):  # git would read it as an option
                raise ValueError(f"source.{name} may not start with '-': {value!r}")
        return self


class KernelConfig(Strict):
    base: str = Field("tinyconfig", description="make target (tinyconfig, defconfig, ...) or a config file path")

    @field_validator("base")
    @classmethod
    def _target_or_file(cls, base: str) -> str:
        if not (re.fullmatch(r"[a-z0-9_]*config", base) or Path(base).expanduser().is_file()):
            raise ValueError(f"{base!r} is neither a make *config target nor an existing file")
        return base

    fragments: list[str] = Field(
        default_factory=lambda: ["kernel/kvm-host.config"],
        description="fragments, relative to configs/ or absolute, merged in order",
    )


class DistroKernel(Strict):
    """The kernel under test as a distribution packages it: only KVM's modules are built (harness/distro.py)."""

    distro: Literal["debian"] = Field("debian", description="whose packages: image, headers and source")
    release: str = Field(
        "auto",
        pattern=r"^(auto|[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-[a-z0-9]+)$",
        description="the image's ABI release (linux-image-<release>, e.g. 6.1.0-56-amd64), or auto: the installed "
        "one whose version is the source's",
    )


GIT_REF = r"^[A-Za-z0-9_/.~^@{}+-]+$"  # what `git rev-parse` takes as a revision (no leading '-': below)
# parts of the kernel command line the harness owns: a variant may not move the root, init or console
RESERVED_PARAMS = ("root", "rootfstype", "rootflags", "init", "rdinit", "console", "earlyprintk", "panic", "nestpress.")
PARAM = r"^[a-z0-9_]+$"
PARAM_VALUE = r"^[A-Za-z0-9_.,:+-]+$"


class GitChange(Strict):
    """A variant from a git repository: the tree at a ref, or the commits of a range applied as patches."""

    repo: str | None = Field(
        None,
        description="repository (path, or URL for `ref`); default: the experiment's git source. Relative paths "
        "are relative to the config file",
    )
    ref: str | None = Field(
        None,
        pattern=GIT_REF,
        description="this variant's kernel is the tree at this ref (branch, tag, commit); in the experiment "
        "source's own repository it is built as the diff from the source's ref, on the same tree",
    )
    range: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_/.~^@{}+-]+\.\.[A-Za-z0-9_/.~^@{}+-]+$",
        description="`base..topic`: the range's commits (oldest first, no merges) applied as patches",
    )

    @model_validator(mode="after")
    def _one_of(self) -> GitChange:
        if (self.ref is None) == (self.range is None):
            raise ValueError("git: give exactly one of ref or range")
        if any(str(x).startswith("-") for x in (self.repo, self.ref, self.range) if x):  # git would read an option
            raise ValueError("git: repo, ref and range may not start with '-'")
        return self


class Variant(Strict):
    """A kernel to compare: the source (the experiment's or its own) with this variant's changes applied in
    order (series, then patch files, then a git range), booted with its own parameters. The first variant
    is the baseline the others are compared with."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    series: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="patch series under patches/")
    patch_variant: str = Field("auto", description="variant of the series, or auto to pick by kernel version")
    patches: list[str] = Field(
        default_factory=list,
        description="patch files, mbox files (several patches, as `git format-patch` or a list archive gives "
        "them) or directories of *.patch, applied in order; relative to the config file",
    )
    git: GitChange | None = Field(None, description="a ref or a range of a git repository")
    source: Source | None = Field(
        None, description="this variant's own kernel source (default: the experiment's); builds share nothing"
    )
    cmdline: list[str] = Field(
        default_factory=list, description="kernel parameters of this variant's kernel under test (no rebuild)"
    )
    module_params: dict[str, dict[str, str | int | bool]] = Field(
        default_factory=dict,
        description="module -> parameter -> value for the kernel under test, e.g. {kvm: {tdp_mmu: false}}; "
        "passed as module.param=value on its command line (no rebuild) and checked once it booted",
    )
    expect_removed: list[str] = Field(
        default_factory=list, description="strings the patches must remove from the files they touch (checked)"
    )
    expect_present: list[str] = Field(
        default_factory=list, description="strings the files the patches touch must hold afterwards (checked)"
    )

    @field_validator("patches")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        if bad := [p for p in paths if not p.strip() or "\0" in p]:
            raise ValueError(f"empty or NUL in patch paths: {bad!r}")
        return paths

    @field_validator("cmdline")
    @classmethod
    def _kernel_params(cls, params: list[str]) -> list[str]:
        for p in params:
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.,:=/+-]*", p):
                raise ValueError(f"{p!r}: one kernel parameter, no spaces or quotes")
            if p.split("=", 1)[0] in RESERVED_PARAMS or p.startswith("nestpress."):
                raise ValueError(f"{p!r}: the harness sets {p.split('=', 1)[0]} itself")
        return params

    @field_validator("module_params")
    @classmethod
    def _module_params(cls, mods: dict[str, dict[str, str | int | bool]]) -> dict[str, dict[str, str | int | bool]]:
        for mod, params in mods.items():
            if not re.fullmatch(PARAM, mod) or mod == "nestpress":
                raise ValueError(f"module name {mod!r}: lower-case letters, digits, _")
            for name, value in params.items():
                if not re.fullmatch(PARAM, name) or not re.fullmatch(PARAM_VALUE, param_value(value)):
                    raise ValueError(f"{mod}.{name}={value!r}: parameter names [a-z0-9_], values without spaces")
        return mods

    @model_validator(mode="after")
    def _one_source(self) -> Variant:
        if self.source is not None and self.git is not None and self.git.ref is not None:
            raise ValueError("give the variant's kernel as source or as git.ref, not both")
        return self

    def module_params_text(self) -> dict[str, dict[str, str]]:
        return {mod: {name: param_value(v) for name, v in ps.items()} for mod, ps in self.module_params.items()}

    def kernel_params(self) -> list[str]:
        """What this variant adds to its kernel under test's command line (after the harness's own)."""
        return [*self.cmdline] + [
            f"{mod}.{name}={v}" for mod, ps in self.module_params_text().items() for name, v in ps.items()
        ]


def param_value(value: str | int | bool) -> str:
    """A module parameter's value as the kernel command line takes it (booleans as Y/N, as sysfs shows them)."""
    return ("Y" if value else "N") if isinstance(value, bool) else str(value)


class LevelSpec(Strict):
    count: int = axis(1, ge=1, le=16, description="guests at this level (per parent)")
    memory_mb: int = axis(ge=64, description="memory per guest")
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
    memory_mb: int = Field(4096, ge=512, description="memory of the kernel under test")
    cpus: int = Field(2, ge=1, le=64)
    swap_mb: int = Field(1024, ge=0, description="virtio-blk swap disk, so global reclaim has something to do")
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
    size_mb: int = axis(1200, ge=1, description="address span the probe touches (mapped MAP_NORESERVE)")
    access: Literal["write", "read"] = "write"
    pattern: Literal["sequential", "random"] = "sequential"
    stride: int = Field(
        4096,
        ge=8,
        description="bytes between touches (4096: every page; resident memory is "
        "size_mb * 4096 / stride when stride > 4096)",
    )
    interval_s: float = Field(1.0, gt=0, description="histogram interval")
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
        description="argv run in every guest that runs the probe; its stdout, "
        "stderr and exit status are kept apart in files",
    )


class GlobalPressure(Strict):
    target_available_mb: int = Field(
        96, ge=16, description="in the phase the hog grows until MemAvailable falls to this and reclaim scans start"
    )
    overshoot_mb: int = Field(384, ge=0, description="then grows this much further into swap")
    headroom_mb: int = Field(
        256,
        ge=0,
        description="before the phase starts the hog takes free memory down to target + this (no pressure yet), "
        "so that the phase itself is reclaim however much memory the kernel under test had free",
    )
    chunk_mb: int = Field(32, ge=1)
    ramp_s: float = Field(5.0, ge=0, description="spreads the in-phase growth (headroom + overshoot) over this")


class Pressure(Strict):
    mode: PressureMode = axis(PressureMode.GLOBAL, description="what makes the kernel under test reclaim")
    global_: GlobalPressure = Field(GlobalPressure(), alias="global")
    drop_caches_period_s: float = Field(3.0, gt=0)
    root_reclaim_mb: int = Field(256, ge=1, description="bytes asked per write to the root memory.reclaim")
    root_reclaim_period_s: float = Field(3.0, gt=0)
    shrinker_scan_objects: int = Field(1024, ge=1, description="objects asked per debugfs scan write")
    shrinker_scan_period_s: float = Field(3.0, gt=0)
    memcg_limit_mb: int = Field(
        64, ge=8, description="memory.high of the control hog's group (its memory.max: this + the hog + 64 MiB)"
    )
    memcg_hog_mb: int = Field(512, ge=8, description="what the control hog tries to allocate")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Phase(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    duration_s: float = Field(gt=0)
    pressure: bool | PressureMode = Field(
        False, description="true: the cell's pressure.mode during this phase; or name a mode for this phase alone"
    )

    def mode(self, cell_mode: PressureMode) -> PressureMode:
        if self.pressure is True:
            return cell_mode
        return PressureMode(self.pressure) if self.pressure else PressureMode.NONE


class Sampler(Strict):
    interval_s: float = Field(0.5, gt=0)
    trace_shrinker: bool = Field(
        True,
        description="record cause events: the KVM shrinker's calls and guests' direct reclaim (vmscan "
        "tracepoints), and read each VM's shadow-page zap counters whenever the shrinker ran",
    )
    zap_interval_s: float = Field(
        0.1,
        ge=0,
        le=1,
        description="after the shrinker's calls each VM's shadow-page zap counters are read, at most this often "
        "(not polled: nothing is read between its calls); each rise goes to the events table as vm_zap; 0: with "
        "the next sample",
    )


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
        description="matching window for a guest whose clock offset was not measured (a run from before the "
        "round-trip clock); otherwise the measured uncertainty is the window",
    )


class Checks(Strict):
    """What a cell must show to count (else it failed and is retried), and what a phase must show to have
    delivered its pressure (else its A/B rows are inconclusive and the run ends with exit status 3)."""

    min_intervals_per_phase: int = Field(
        2, ge=1, description="probe histograms (one per probe interval) each probe level must write in every phase"
    )
    max_probe_gap_s: float = Field(
        30.0, gt=0, description="longest silence of a probe during the phases before its guest counts as stalled"
    )
    memcg_min_events: int = Field(
        50, ge=1, description="memory.events max+high the memcg-limit control must raise in its group"
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
    repetitions: int = Field(3, ge=1, le=100)
    output: str = Field("results", description="results root; a run lands in <output>/<name>/<run-id>")

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

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


def axis_paths(model: type[BaseModel] = Experiment, prefix: str = "") -> list[str]:
    """Dotted paths of every axis field (by YAML name), found from the schema itself."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        ann = f.annotation
        if extra.get("axis"):
            out.append(prefix + key)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(axis_paths(ann, prefix + key + "."))
    return out


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(d, list):
            d = _list_item(d, part, ".".join(parts[: i + 1]))
            continue
        d = d.setdefault(part, {})
        if not isinstance(d, (dict, list)):
            raise ConfigError(f"override {path}: {'.'.join(parts[: i + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(d, list):
        idx = _list_index(d, last, path)
        d[idx] = value
    else:
        d[last] = value


def _list_index(items: list, key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"override {path}: no list element named or numbered '{key}'")


def _list_item(items: list, key: str, path: str) -> Any:
    return items[_list_index(items, key, path)]


MAX_CONFIG_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings; values are YAML (`3`, `[a, b]`, `true`). List elements by name or index."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A config named by path, or by bare name from configs/ (`shrinker-ab`)."""
    p = Path(path)
    if p.exists():
        return p.resolve()
    for cand in (REPO_ROOT / "configs" / p, REPO_ROOT / "configs" / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"{path}: no such config file (looked in . and {REPO_ROOT / 'configs'})")


def load_raw(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, dict]:
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    with p.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 10} KiB; not an experiment config")
    try:
        raw = yaml.load(data.decode(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set(raw, key, value)
    return p, raw


def _is_url(where: str) -> bool:
    return "://" in where or bool(re.match(r"^[\w.-]+@[\w.-]+:", where))


def anchored(base: Path, given: str) -> str:
    """A variant's path as the config gives it, relative to the config file's directory `base`."""
    return os.path.normpath(base / Path(given).expanduser())


def _anchor_variant_paths(raw: dict, base: Path) -> None:
    """A variant's patch files and git repository, given relative, are relative to the config file (a user
    keeps their patch beside their config), made absolute here so every later stage reads one path."""
    variants = raw.get("variants")
    for v in variants if isinstance(variants, list) else []:
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("patches"), list):
            v["patches"] = [anchored(base, x) if isinstance(x, str) and x.strip() else x for x in v["patches"]]
        git = v.get("git")
        if isinstance(git, dict) and isinstance(git.get("repo"), str) and not _is_url(git["repo"]):
            git["repo"] = anchored(base, git["repo"])


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid experiment config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "\n".join(lines)


def _validate(path: Path, raw: dict) -> Experiment:
    """Validate each axis value on its own (by expanding with the first of each list) and the whole."""
    axes = axis_paths()
    for a in axes:
        given = _get(raw, a)
        if isinstance(given, list) and len({json.dumps(v, sort_keys=True) for v in given}) != len(given):
            raise ConfigError(f"{path}: {a}: a value is listed twice ({given}); each would be the same cell")
    for combo in _combinations(raw, axes) or [raw]:
        try:
            Experiment.model_validate(combo)
        except ValidationError as e:
            raise ConfigError(_format_errors(path, e)) from None
    # the stored model keeps the first value of each axis; the matrix lives in expand()
    return Experiment.model_validate(_combinations(raw, axes)[0])


def _combinations(raw: dict, axes: list[str]) -> list[dict]:
    lists = {a: v for a in axes if isinstance(v := _get(raw, a), list)}
    if not lists:
        return [raw]
    out = []
    for values in itertools.product(*lists.values()):
        d = copy.deepcopy(raw)
        for a, v in zip(lists, values):
            _set(d, a, v)
        out.append(d)
    return out


class Matrix(BaseModel):
    """The validated experiment and its expanded cells (one per variant x repetition x axis value), in run order."""

    config_path: str
    raw: dict
    experiment: Experiment
    axes: dict[str, list[Any]]
    cells: list[Cell]

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    def shard(self, i: int, n: int) -> list[Cell]:
        """Host i of n's cells: every n-th block of one cell per variant, so each host runs baseline and
        patched of the same repetition and axis values together, interleaved."""
        block = len(self.experiment.variants)
        return [c for c in self.cells if (c.order // block) % n == i]


class Cell(BaseModel):
    """One atomic run: a variant, a repetition, one value of every axis."""

    id: str
    variant: str
    repetition: int
    axes: dict[str, Any]
    order: int
    config: Experiment


def load(path: str | Path, overrides: list[str] | None = None) -> Matrix:
    """The validated matrix. Its `raw` is the config as written (what its hash, and so a resume, compare);
    the models have the variants' relative paths anchored at the config file."""
    p, raw = load_raw(path, overrides)
    anchored = copy.deepcopy(raw)
    _anchor_variant_paths(anchored, p.parent)
    exp = _validate(p, anchored)
    axes_all = axis_paths()
    lists = {a: v for a in axes_all if isinstance(v := _get(anchored, a), list)}
    combos = _combinations(anchored, axes_all)
    cells: list[Cell] = []
    # repetitions outermost and variants innermost: baseline and patched interleave (A B A B ...)
    for rep in range(1, exp.repetitions + 1):
        for combo in combos:
            cfg = Experiment.model_validate(combo)
            axis_values = {a: _get(combo, a) for a in lists}
            for var in exp.variants:
                label = "-".join(f"{a.split('.')[-1]}={axis_values[a]}" for a in lists)
                cid = f"{var.name}.r{rep}" + (f".{label}" if label else "")
                cells.append(
                    Cell(id=cid, variant=var.name, repetition=rep, axes=axis_values, order=len(cells), config=cfg)
                )
    return Matrix(config_path=str(p), raw=raw, experiment=exp, axes=lists, cells=cells)


def variant_summary(v: Variant) -> str:
    """What a variant changes, in a few words (resolved in full by variants.py)."""
    parts = [f"series {v.series}:{v.patch_variant}"] if v.series else []
    parts += [f"{len(v.patches)} patch path(s)"] if v.patches else []
    parts += [f"git {v.git.ref or v.git.range}"] if v.git else []
    parts += [f"own source {v.source.kind} {v.source.where}"] if v.source else []
    parts += [f"boots with {' '.join(v.kernel_params())}"] if v.kernel_params() else []
    return ", ".join(parts) or "the source as it is"


def describe(matrix: Matrix) -> str:
    exp = matrix.experiment
    lines = [
        f"experiment {exp.name}: {len(matrix.cells)} cell(s) from {matrix.config_path}",
        f"  source: {exp.source.kind} {exp.source.path or exp.source.url}"
        + (f" @ {exp.source.ref}" if exp.source.kind == "git" else ""),
        f"  kernel: {exp.distro_kernel.distro} image {exp.distro_kernel.release}, KVM modules built from the source"
        if exp.distro_kernel
        else f"  kernel config: {exp.kernel_config.base} + "
        + (", ".join(exp.kernel_config.fragments) or "(no fragments)"),
        "  variants: " + ", ".join(f"{v.name} ({variant_summary(v)})" for v in exp.variants),
        "  phases: "
        + " -> ".join(
            f"{p.name} {p.duration_s:g}s" + (f" [{p.mode(exp.pressure.mode)}]" if p.pressure else "")
            for p in exp.phases
        ),
        f"  repetitions: {exp.repetitions} (variants interleaved)",
    ]
    for a, vals in matrix.axes.items():
        lines.append(f"  axis {a}: {vals}")
    lines.append("  cells:")
    lines.extend(f"    {c.order + 1:3d}. {c.id}" for c in matrix.cells)
    return "\n".join(lines)


def schema_reference() -> str:
    """Markdown config reference generated from the schema (the README embeds it)."""
    schema = Experiment.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    lines: list[str] = []

    def walk(props: dict, required: list[str], prefix: str) -> None:
        for name, spec in props.items():
            ref = spec.get("$ref") or next(
                (x.get("$ref") for x in spec.get("allOf", []) + spec.get("anyOf", []) if "$ref" in x), None
            )
            path = prefix + name
            item = spec.get("items", {}).get("$ref") if spec.get("type") == "array" else None
            if item and "properties" in defs[item.split("/")[-1]]:  # a list of objects: each item's fields
                sub = defs[item.split("/")[-1]]
                about = " ".join(sub.get("description", "").split())
                lines.append(f"| `{path}` | list | {'required' if name in required else ''} | {about} |")
                walk(sub["properties"], sub.get("required", []), path + "[].")
                continue
            if ref and "properties" in defs[ref.split("/")[-1]]:
                sub = defs[ref.split("/")[-1]]
                walk(sub["properties"], sub.get("required", []), path + ".")
                continue
            kind = spec.get("type") or "/".join(x.get("type", "?") for x in spec.get("anyOf", []))
            if "enum" in spec:
                kind = " \\| ".join(map(str, spec["enum"]))
            elif "anyOf" in spec and any("enum" in x for x in spec["anyOf"]):
                kind = " \\| ".join(str(v) for x in spec["anyOf"] for v in x.get("enum", [])) + " (or a list)"
            if spec.get("axis"):
                kind += " (axis: a list expands the matrix)"
            default = "required" if name in required else json.dumps(spec.get("default")) if "default" in spec else ""
            lines.append(f"| `{path}` | {kind} | {default} | {spec.get('description', '')} |")

    walk(schema["properties"], schema.get("required", []), "")
    return "| field | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(lines)
