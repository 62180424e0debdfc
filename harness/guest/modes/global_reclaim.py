"""`global`: a hog grows until MemAvailable falls to a target, then past it into swap: kswapd and direct reclaim
run for the whole machine, and shrink_slab() calls every shrinker. memory.max of its group bounds it, so the
machine survives."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from .base import Hog, Log, Mode, PhaseEvidence, Sizes, meminfo_mb, param, reclaim_scans, write


@dataclass
class Knobs:
    target_available_mb: int = param(
        96, "in the phase the hog grows until MemAvailable falls to this and reclaim scans start", ge=16, le=1 << 20
    )
    overshoot_mb: int = param(384, "then grows this much further into swap", ge=0, le=1 << 20)
    headroom_mb: int = param(
        256,
        "before the phase starts the hog takes free memory down to target + this (no pressure yet), so that the "
        "phase itself is reclaim however much memory the kernel under test had free",
        ge=0,
        le=1 << 20,
    )
    chunk_mb: int = param(32, "MiB the hog takes at a time", ge=1, le=4096)
    ramp_s: float = param(5.0, "spreads the in-phase growth (headroom + overshoot) over this", ge=0, le=3600)


class GlobalReclaim(Mode):
    name = "global"
    about = "a hog into swap: kswapd and direct reclaim for the whole machine"
    knob_type = Knobs
    needs: ClassVar[dict[str, str]] = {
        "CONFIG_MEMCG": "the hog's cgroup bounds it with memory.max",
        "CONFIG_SWAP": "sustained reclaim",
    }
    calls_global_shrinkers = True

    def check_sizes(self, params: Knobs, sizes: Sizes) -> list[str]:
        if sizes.swap_mb == 0:
            return [
                "pressure global needs swap in the kernel under test (topology.kut.swap_mb > 0): without it an "
                "anonymous hog meets the OOM killer instead of sustained reclaim"
            ]
        if params.overshoot_mb >= sizes.swap_mb:
            return [
                f"pressure.global.overshoot_mb={params.overshoot_mb} must stay below the swap ({sizes.swap_mb} MiB) "
                "or the hog ends in the OOM killer"
            ]
        return []

    def setup_cgroup(self, path: str, params: Knobs) -> None:
        """The bound that keeps the machine alive: never more than the memory there is, less a reserve."""
        write(path + "/memory.max", str(max(64, meminfo_mb("MemTotal") - 128) << 20))

    def act(self, params: Knobs, ready, log: Log) -> None:
        hog = grow_into_reclaim(params, ready, log)
        while True:
            hog.touch()

    def shortfalls(self, ev: PhaseEvidence, params: Knobs) -> list[str]:
        """Global reclaim scanned, and MemAvailable reached the target."""
        missing = []
        if ev.counters.scans() <= 0:
            missing.append("global reclaim never scanned (pgscan kswapd+direct +0)")
        low = ev.counters.low("meminfo.MemAvailable_kb") / 1024
        if not low <= params.target_available_mb:
            missing.append(f"MemAvailable stayed at {low:.0f} MB or more (target {params.target_available_mb} MB)")
        return missing

    def shown(self, ev: PhaseEvidence) -> str:
        low = ev.counters.low("meminfo.MemAvailable_kb") / 1024
        return f"pgscan +{ev.counters.scans():.0f}, MemAvailable down to {low:.0f} MB"


def grow_into_reclaim(p: Knobs, ready, log: Log) -> Hog:
    """Grow a hog into global reclaim, driven by what this kernel reports, not by a plan made up front.

    Before the phase starts (ready() is the phase's clock), the hog takes the memory that is free to take:
    until MemAvailable is headroom_mb above the target, which creates no pressure. In the phase it grows
    until both MemAvailable reached the target and reclaim scans started, then overshoot_mb further into
    swap. MemAvailable at the start differs a lot between kernels and configs (guest RAM that is
    preallocated counts as used on 6.1 and 6.12 alike; a larger kernel under test leaves more); growing a
    fixed plan from it took longer than the phase on 6.12 (2 GB under TCG), so the slow part now happens
    before the phase, and the grow rate is logged."""
    hog = Hog()
    avail0, total = meminfo_mb("MemAvailable"), meminfo_mb("MemTotal") + meminfo_mb("SwapTotal")
    log("hog_plan", mem_available_mb=avail0, target_mb=p.target_available_mb, headroom_mb=p.headroom_mb)
    t0 = time.monotonic()
    while meminfo_mb("MemAvailable") - p.chunk_mb > p.target_available_mb + p.headroom_mb:
        hog.grow(p.chunk_mb)
    pre_s = time.monotonic() - t0
    log("hog_ready", mb=hog.mb, seconds=round(pre_s, 2), mem_available_mb=meminfo_mb("MemAvailable"))
    ready()
    t1, scans0 = time.monotonic(), reclaim_scans()
    pace = p.ramp_s * p.chunk_mb / max(p.chunk_mb, p.headroom_mb + p.overshoot_mb)
    # the bound: everything there is, RAM and swap (the group's memory.max keeps the machine alive anyway)
    while hog.mb < total and (meminfo_mb("MemAvailable") > p.target_available_mb or reclaim_scans() == scans0):
        hog.grow(p.chunk_mb)
        time.sleep(pace)
    reached_mb, reached_s = hog.mb, time.monotonic() - t1
    while hog.mb < min(total, reached_mb + p.overshoot_mb):
        hog.grow(min(p.chunk_mb, reached_mb + p.overshoot_mb - hog.mb))
        time.sleep(pace)
    grown_s = time.monotonic() - t1
    log(
        "hog_holding",
        mb=hog.mb,
        seconds=round(grown_s, 2),
        reclaim_reached_at_mb=reached_mb,
        reclaim_reached_after_s=round(reached_s, 2),
        grow_mb_per_s=round(hog.mb / max(pre_s + grown_s, 1e-3), 1),
        mem_available_mb=meminfo_mb("MemAvailable"),
        reclaim_scans=reclaim_scans() - scans0,
    )
    return hog


MODE = GlobalReclaim()
