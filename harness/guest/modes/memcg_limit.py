"""`memcg-limit`, the control: a hog over a tight memory.high reclaims only inside its group (and is throttled),
where shrinkers that are not memcg-aware - the KVM MMU's - are never called."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import Hog, Log, Mode, PhaseEvidence, Sizes, param, write

SLACK_MB = 64  # the hog's Python and page tables, above what it allocates


@dataclass
class Knobs:
    limit_mb: int = param(
        64, "memory.high of the control hog's group (its memory.max: this + the hog + 64 MiB)", ge=8, le=1 << 20
    )
    hog_mb: int = param(512, "what the control hog tries to allocate", ge=8, le=1 << 20)
    min_events: int = param(50, "memory.events max+high the control must raise in its group to count", ge=1, le=1 << 30)


class MemcgLimit(Mode):
    name = "memcg-limit"
    about = "the control: a hog over a tight memory.high, reclaim confined to its group"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {"CONFIG_MEMCG": "the control is a cgroup with a tight memory.high"}
    legacy: ClassVar[dict[str, str]] = {
        "pressure.memcg_limit_mb": "limit_mb",
        "pressure.memcg_hog_mb": "hog_mb",
        "checks.memcg_min_events": "min_events",
    }

    def check_sizes(self, params: Knobs, sizes: Sizes) -> list[str]:
        if params.limit_mb >= sizes.spare_mb:
            return [
                f"pressure.memcg-limit.limit_mb={params.limit_mb} is not a tight limit: the kernel under test has only "
                f"~{sizes.spare_mb} MiB to spare, so the control would cause global reclaim"
            ]
        return []

    def setup_cgroup(self, path: str, params: Knobs) -> None:
        """memory.high, not memory.max, at the limit: over it the group reclaims and its tasks are throttled, never
        OOM-killed. With memory.max at the limit 6.12's memcg OOM killer took the hog within its first second (20
        max events, then no pressure for the rest of the phase). memory.max stays a bound the hog never reaches."""
        write(path + "/memory.high", str(params.limit_mb << 20))
        write(path + "/memory.max", str((params.limit_mb + params.hog_mb + SLACK_MB) << 20))

    def act(self, params: Knobs, ready, log: Log) -> None:
        ready()
        hog = Hog()
        while hog.mb < params.hog_mb:
            hog.grow(min(32, params.hog_mb - hog.mb))
        log("hog_holding", mb=hog.mb)
        while True:
            hog.touch()

    def shortfalls(self, ev: PhaseEvidence, params: Knobs) -> list[str]:
        """Its group's memory.events max+high rose by min_events, and global reclaim did not run."""
        missing = []
        events = self._events(ev)
        if events < params.min_events:
            missing.append(f"memory.events max+high +{events:.0f} in the hog's group (need {params.min_events})")
        if (scans := ev.counters.scans()) > 0:
            missing.append(f"global reclaim ran (+{scans:.0f} pages scanned): not a memcg-confined control")
        return missing

    def shown(self, ev: PhaseEvidence) -> str:
        c = ev.counters
        high, most = (c.rise(f"cgroup.pressure.events.{k}") for k in ("high", "max"))
        return f"memory.events high +{_n(high)}, max +{_n(most)}"

    @staticmethod
    def _events(ev: PhaseEvidence) -> float:
        return sum(_n(ev.counters.rise(f"cgroup.pressure.events.{k}")) for k in ("max", "high"))


def _n(v: float) -> float:
    return 0.0 if math.isnan(v) else v  # NaN (no samples of the group): none seen


MODE = MemcgLimit()
