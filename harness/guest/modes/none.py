"""`none`: no pressure. The phase claims quiet: global reclaim must not run in it."""

from __future__ import annotations

from .base import Mode, PhaseEvidence


class Idle(Mode):
    name = "none"
    about = "no pressure (an undisturbed phase: global reclaim must not run in it)"
    cgroup = False

    def shortfalls(self, ev: PhaseEvidence, params: None) -> list[str]:
        scans = ev.counters.scans()
        return [f"global reclaim ran (+{scans:.0f} pages scanned) in a phase without pressure"] if scans > 0 else []


MODE = Idle()
