"""`shrinker-scan`: writes "0 0 N" to /sys/kernel/debug/shrinker/x86-mmu-*/scan, calling the KVM MMU shrinker directly
(6.0+ with CONFIG_SHRINKER_DEBUG). The pressure mode that names the shrinker: it exists to call it."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import ClassVar

from .base import Log, Mode, PhaseEvidence, guest_module, param, write

DEBUGFS = "/sys/kernel/debug/shrinker"


def kvm_shrinker_in(facts) -> bool:
    """Does this kernel register KVM's x86-mmu shrinker? Its debugfs directory where the kernel has
    CONFIG_SHRINKER_DEBUG (a distribution's may not), else its scan function in the kernel's symbols (the patch
    removes it). facts: a LevelFacts."""
    return (
        any(d.startswith("x86-mmu-") for d in facts.shrinker_dirs) or "mmu_shrink_scan" in facts.functions_in_kallsyms
    )


@dataclass
class Knobs:
    objects: int = param(1024, "objects asked per debugfs scan write", ge=1, le=1 << 24)
    period_s: float = param(3.0, "seconds between writes", gt=0, le=3600)


class ShrinkerScan(Mode):
    name = "shrinker-scan"
    about = "writes to the x86-mmu shrinker's debugfs scan file: calls it directly"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {
        "CONFIG_MEMCG": "each pressure actor runs in a cgroup of its own",
        "CONFIG_SHRINKER_DEBUG": "writes /sys/kernel/debug/shrinker/x86-mmu-*/scan",
    }
    calls_global_shrinkers = True
    legacy: ClassVar[dict[str, str]] = {
        "pressure.shrinker_scan_objects": "objects",
        "pressure.shrinker_scan_period_s": "period_s",
    }

    def preflight(self) -> list[str]:
        if not os.path.isdir(DEBUGFS):
            return ["shrinker-scan needs /sys/kernel/debug/shrinker (CONFIG_SHRINKER_DEBUG, 6.0+)"]
        return []

    def unavailable(self) -> str | None:
        if not glob.glob(f"{DEBUGFS}/x86-mmu-*"):
            return (
                f"shrinker-scan: no {DEBUGFS}/x86-mmu-* here: the KVM MMU shrinker does not exist on this kernel "
                "(expected on the patched kernel) or CONFIG_SHRINKER_DEBUG is off"
            )
        return None

    def act(self, params: Knobs, ready, log: Log) -> None:
        sampler = guest_module("sampler")
        ready()
        while True:
            for d in glob.glob(f"{DEBUGFS}/x86-mmu-*"):
                guests, t0, before = sampler.qemu_guests(), time.time_ns(), sampler.vm_stats(sampler.ZAP_STATS)
                began = time.monotonic()  # the call's span: a spike it caused overlaps it (analysis/attribution.py)
                write(d + "/scan", f"0 0 {params.objects}")
                took = round(time.monotonic() - began, 6)
                t1, after = time.time_ns(), sampler.vm_stats(sampler.ZAP_STATS)
                log("shrinker_scan", target=os.path.basename(d), count=params.objects, seconds=took)
                # which VM the call zapped, and how much, within its span: these calls bypass the tracepoints that
                # wake the sampler's zap steps (its own t: when the counters were read)
                for step in sampler.zap_steps(t0, before, t1, after, guests):
                    log.zap(step)
            time.sleep(params.period_s)

    def inapplicable(self, ev: PhaseEvidence) -> str | None:
        if ev.facts is not None and not kvm_shrinker_in(ev.facts):
            return "no x86-mmu shrinker in this kernel: nothing to scan"
        return None

    def shortfalls(self, ev: PhaseEvidence, params: Knobs) -> list[str]:
        """The shrinker freed shadow pages (not merely got called): KVM's recycled pages rose or the shrinker's
        count fell (for an L2's nested pages the recursive zapping of their children is in neither alone)."""
        c = ev.counters
        if c.rise("kvm.mmu_recycled") > 0 or c.fall("shrinker.x86_mmu_count") > 0:
            return []
        return ["the x86-mmu shrinker freed nothing (count did not fall, mmu_recycled +0)"]

    def shown(self, ev: PhaseEvidence) -> str:
        writes = sum(r.kind == "shrinker_scan" for r in ev.records)
        return f"scan writes {writes}, mmu_recycled +{ev.counters.rise('kvm.mmu_recycled'):.0f}"


MODE = ShrinkerScan()
