"""The run directory's own records, typed: manifest.json (written before the first cell starts, completed
when the run ends) and records/<id>.json (how a cell ended: kept out of cells/<id>/, which the kernel under
test writes, so that no guest can mark its own cell complete). The runner writes them, the fleet merges
them, results and report read them; nobody else looks inside by string keys. Reading tolerates fields an
older or newer harness wrote (extra="ignore"), so old run directories still get reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..util import read_json, write_json

RunStatus = Literal["running", "complete", "incomplete", "failed", "interrupted"]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def save(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json"))


class CellEntry(Record):
    """A cell of the matrix as the manifest lists it (config.Cell without its expanded config)."""

    id: str
    variant: str
    repetition: int
    axes: dict[str, Any] = {}
    order: int
    topology: str | None = None


class BuildEntry(Record):
    """A variant's kernel: its build and how it came to be, and what the variant boots it with."""

    key: str
    dir: str
    kernelrelease: str | None = None
    kernel_version: str
    source: str
    own_source: bool = False
    patch_variant: str | None = None
    patches: dict[str, str] = {}  # origin -> the stashed patch's content id, in the order applied
    patched_result: str = ""
    evidence: list[str] = []
    kernel_params: list[str] = []
    config_sha256: str | None = None
    fragments: dict[str, str] = {}
    distro_image: dict[str, str] = {}  # a distribution's kernel (distro.DistroImage.identity): only KVM built
    bzImage_sha256: str | None = None

    def summary(self) -> str:
        """'6.1.192, series patch v6.0-6.6' / '6.13.0, own source, 2 patches, boots with kvm.tdp_mmu=N'."""
        parts = [self.kernelrelease or self.kernel_version]
        if self.distro_image:
            parts = [f"{self.distro_image['release']} ({self.distro_image['package_version']}) with KVM modules built"]
        parts += ["own source"] if self.own_source else []
        if self.patch_variant:
            more = len(self.patches) - 1
            parts.append(f"series patch {self.patch_variant}" + (f" + {more} more" if more > 0 else ""))
        else:
            parts.append(f"{len(self.patches)} patch(es)" if self.patches else "no patches")
        parts += [f"boots with {' '.join(self.kernel_params)}"] if self.kernel_params else []
        return ", ".join(parts)


class AccelRecord(Record):
    kut: str
    l1: str | None = "kvm"
    l2: str | None = None
    reasons: list[str] = []
    banner: str = ""


class Manifest(Record):
    experiment: str
    run_id: str
    status: RunStatus = "running"
    started: float = Field(default_factory=time.time)
    resumed: list[float] = []
    finished: float | None = None
    duration_s: float = 0.0
    config_path: str
    config_hash: str
    config: dict[str, Any]
    expanded: dict[str, Any]
    axes: dict[str, list[Any]] = {}
    cells: list[CellEntry]
    order: str = "repetitions outer, variants inner (A B A B ...)"
    parallel: str = "one cell at a time"  # how many cells ran at once here, and why (run/slots.py)
    harness_commit: str | None = None
    accel: AccelRecord
    topology: str
    topology_reasons: dict[str, list[str]] = {}
    qemu: dict[str, dict[str, str]] = {}
    rootfs: dict[str, Any] = {}
    builds: dict[str, BuildEntry] = {}
    host: dict[str, Any] = {}
    reproduce: str = ""
    hosts: dict[str, str | None] | None = None  # fleet runs: the status each host's own manifest had
    cell_hosts: dict[str, str] = {}  # fleet runs: which host ran which cell

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.model_validate(read_json(path))

    @property
    def baseline(self) -> str:
        """The variant the others are compared with: the first one listed."""
        return str(self.expanded["variants"][0]["name"])

    @property
    def tcg(self) -> bool:
        return self.accel.kut == "tcg"


class CellRecord(Record):
    """How a cell ended; `complete` is the only status that a resumed run does not redo."""

    status: Literal["complete", "failed"]
    attempt: int
    retried: bool = False
    errors: list[str] = []
    fatal: bool = False  # the kernel cannot run the schedule: no retry, no further cells
    kut_ready_s: float | None = None
    kut_kernel_s: float | None = None
    started: float | None = None
    finished: float | None = None
    pressure_mode: str | None = None
    guest_failures: list[str] = []


def record_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / "records" / f"{cell_id}.json"


def cell_record(run_dir: Path, cell_id: str) -> CellRecord | None:
    path = record_path(run_dir, cell_id)
    return CellRecord.model_validate(read_json(path)) if path.exists() else None


def cell_complete(run_dir: Path, cell_id: str) -> bool:
    """The host recorded it complete and its measurements are there (a directory removed by hand is not)."""
    record = cell_record(run_dir, cell_id)
    return record is not None and record.status == "complete" and (run_dir / "cells" / cell_id).is_dir()
