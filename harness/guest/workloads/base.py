"""What a workload is. Standard library only: the guests parse their own runs' output with it.

A workload is a program a guest runs again and again during the schedule; each run's output becomes metrics (a
name, a value, a unit, which way is better). A workload declares its knobs (a dataclass of param() fields, from
which the config's schema is made), the levels it may run at, its argv, its resident size, and its parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

LEVELS = ("kut", "l1", "l2")


class WorkloadError(ValueError):
    """A run's output that gives no metric, or a workload the config cannot have."""


def param(default: Any, about: str = "", **bounds: float) -> Any:
    """A knob of a workload: its default, what it means, and its bounds (ge, gt, le, lt), checked by the config."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"about": about, **bounds})
    return field(default=default, metadata={"about": about, **bounds})


@dataclass(frozen=True)
class Metric:
    """One figure of one run: `better` says which way a change is an improvement ("lower" or "higher")."""

    name: str
    value: float
    unit: str = ""
    better: str = "lower"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name


@dataclass(frozen=True)
class Binaries:
    """Where the host put what a workload runs, as the level that runs it sees it (the host's root, read-only)."""

    kvm_selftests: str | None = None  # the variant's KVM selftests, built from its own tree


class Workload:
    kind = ""
    about = ""
    levels: ClassVar[tuple[str, ...]] = LEVELS  # where it can run
    knob_type: type | None = None

    def params(self, data: dict[str, Any] | None) -> Any:
        return self.knob_type(**(data or {})) if self.knob_type else None

    def check(self, knobs: Any) -> list[str]:
        """What is wrong with these knobs that the bounds cannot say (the config refuses them)."""
        return []

    def argv(self, knobs: Any, binaries: Binaries) -> list[str]:
        raise NotImplementedError

    def resident_mb(self, knobs: Any) -> float:
        """What one run keeps resident at its level, for the size check before anything boots."""
        return 0.0

    def needs_selftests(self, knobs: Any) -> list[str]:
        """The KVM selftests (program names) it runs, built from each variant's own tree."""
        return []

    def parse(self, knobs: Any, text: str) -> list[Metric]:
        """The metrics of one run's output; WorkloadError where it holds none (never an empty list)."""
        raise NotImplementedError


def knob_fields(workload: Workload) -> list[dataclasses.Field]:
    return list(dataclasses.fields(workload.knob_type)) if workload.knob_type else []


def size_bytes(text: str) -> int:
    """A size as the selftests take it (parse_size: 64M, 1G, 4096)."""
    text = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise WorkloadError(f"{text!r} is not a size (a number with K, M, G or T)")
    return int(digits) * scale
