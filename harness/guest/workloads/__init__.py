"""The workloads, one module each, found by name (WORKLOADS): adding a workload is adding a module here.

Standard library only: a guest's workload runner (guest/workload.py) imports them (as `workloads`) to parse each
run's output, the host as harness.guest.workloads to check a config, build an argv and size a level. Each module
defines WORKLOAD, an instance of base.Workload. (The page-touch probe is not one of them: it is not a program run
again and again but a histogram kept for the whole boot, guest/probe.py.)
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Metric, Workload, WorkloadError

__all__ = ["WORKLOADS", "Metric", "Workload", "WorkloadError", "get"]


def _discover() -> dict[str, Workload]:
    found: dict[str, Workload] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            workload = importlib.import_module(f"{__name__}.{info.name}").WORKLOAD
            found[workload.kind] = workload
    return found


WORKLOADS = _discover()


def get(kind: str) -> Workload:
    """The workload of that kind; a ValueError naming the known ones otherwise."""
    try:
        return WORKLOADS[kind]
    except KeyError:
        raise ValueError(f"unknown workload kind {kind!r} (known: {', '.join(WORKLOADS)})") from None
