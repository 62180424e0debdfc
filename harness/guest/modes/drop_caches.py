"""`drop-caches`: vm.drop_caches=2 every period; drop_slab() calls every shrinker, memcg-aware or not."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from .base import Log, Mode, PhaseEvidence, param, write


@dataclass
class Knobs:
    period_s: float = param(3.0, "seconds between writes to /proc/sys/vm/drop_caches", gt=0, le=3600)


class DropCaches(Mode):
    name = "drop-caches"
    about = "vm.drop_caches=2 every period: drop_slab() calls every shrinker"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {
        "CONFIG_MEMCG": "each pressure actor runs in a cgroup of its own",
        "CONFIG_PROC_SYSCTL": "writes /proc/sys/vm/drop_caches",
    }
    calls_global_shrinkers = True
    legacy: ClassVar[dict[str, str]] = {"pressure.drop_caches_period_s": "period_s"}

    def act(self, params: Knobs, ready, log: Log) -> None:
        ready()
        while True:
            write("/proc/sys/vm/drop_caches", "2")
            log("drop_caches")
            time.sleep(params.period_s)

    def shortfalls(self, ev: PhaseEvidence, params: Knobs) -> list[str]:
        return [] if ev.counters.rise("vmstat.drop_slab") > 0 else ["drop_slab did not rise"]

    def shown(self, ev: PhaseEvidence) -> str:
        return f"drop_slab +{ev.counters.rise('vmstat.drop_slab'):.0f}"


MODE = DropCaches()
