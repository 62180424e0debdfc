"""`root-reclaim`: writes to the root cgroup's memory.reclaim (5.19+); reclaim of the root calls every shrinker."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

from .base import CG, Log, Mode, PhaseEvidence, param, write

EAGAIN = "Resource temporarily unavailable"  # strerror of a write that reclaimed less than it asked: no refusal


@dataclass
class Knobs:
    mb: int = param(256, "MiB asked per write to the root memory.reclaim", ge=1, le=1 << 20)
    period_s: float = param(3.0, "seconds between writes", gt=0, le=3600)


class RootReclaim(Mode):
    name = "root-reclaim"
    about = "writes to the root cgroup's memory.reclaim: root reclaim calls every shrinker"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {"CONFIG_MEMCG": "writes the root cgroup's memory.reclaim"}
    calls_global_shrinkers = True
    legacy: ClassVar[dict[str, str]] = {"pressure.root_reclaim_mb": "mb", "pressure.root_reclaim_period_s": "period_s"}

    def unavailable(self) -> str | None:
        if not os.path.exists(f"{CG}/memory.reclaim"):
            return "root-reclaim: this kernel has no root memory.reclaim (needs 5.19+ and cgroup v2)"
        return None

    def act(self, params: Knobs, ready, log: Log) -> None:
        ready()
        while True:
            log("root_reclaim_request", mb=params.mb)  # the write may block for the whole phase
            try:
                write(f"{CG}/memory.reclaim", f"{params.mb}M")
                log("root_reclaim", ok=True)
            except OSError as e:  # EAGAIN: could not reclaim all that was asked
                log("root_reclaim", ok=False, error=e.strerror)
            time.sleep(params.period_s)

    def shortfalls(self, ev: PhaseEvidence, params: Knobs) -> list[str]:
        """Writes were made (one may block the whole phase) and none refused (EAGAIN, less reclaimable than
        asked, is no refusal), and something was scanned."""
        missing = []
        if not any(r.kind == "root_reclaim_request" for r in ev.records):
            missing.append("no write to the root memory.reclaim was made")
        refused = sorted({str(r.error) for r in ev.records if r.kind == "root_reclaim" and r.ok is False} - {EAGAIN})
        if refused:
            missing.append(f"writes to the root memory.reclaim were refused: {'; '.join(refused)}")
        if not ev.counters.scans() + ev.counters.rise("vmstat.slabs_scanned") > 0:
            missing.append("no reclaim scan")
        return missing

    def shown(self, ev: PhaseEvidence) -> str:
        writes = sum(r.kind == "root_reclaim_request" for r in ev.records)
        return f"memory.reclaim writes {writes}"


MODE = RootReclaim()
