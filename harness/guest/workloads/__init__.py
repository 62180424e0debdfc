"""The workloads, one module each, found by name (WORKLOADS): adding a workload is adding a module here.

Standard library only: a guest's workload runner (guest/workload.py) imports them (as `workloads`) to parse each
run's output, the host as harness.guest.workloads to check a config, build an argv and size a level. Each module
defines WORKLOAD, an instance of base.Workload. (The page-touch probe is not one of them: it is not a program run
again and again but a histogram kept for the whole boot, guest/probe.py.)
"""

from __future__ import annotations

try:
    from ..registry import discover, lookup
except ImportError:  # in a guest: a top-level package
    from registry import discover, lookup  # type: ignore[no-redef]
from .base import Metric, Workload, WorkloadError

__all__ = ["WORKLOADS", "Metric", "Workload", "WorkloadError", "get"]


WORKLOADS = discover(__name__, __path__, "WORKLOAD", "kind")


def get(name: str) -> Workload:
    """The workload kind of that name; a ValueError naming the known ones otherwise."""
    return lookup(WORKLOADS, name, "workload kind")
