"""Pressure planning on the host: check sizes before anything starts, schedule phases per cell.

The pressure itself runs inside the kernel under test (harness/guest/pressure.py): its
modes need that kernel's cgroup v2 hierarchy, debugfs and /proc, and the KVM shrinker
under test lives there. Here we only make sure a config cannot ask for the impossible
and turn the phases into the schedule the conductor follows.
"""
from __future__ import annotations

from .config import Experiment
from .errors import PressureError

GUEST_OVERHEAD_MB = 160      # QEMU + guest kernel beyond a guest's -m, measured roughly on TCG
KUT_RESERVE_MB = 256         # the kernel under test's own kernel, agent and sampler


def modes_used(exp: Experiment, cell_mode: str) -> list[str]:
    return [p.mode(cell_mode) for p in exp.phases]


def check(exp: Experiment, cell_mode: str, topology: str) -> None:
    """Raise PressureError for sizes that cannot work on the kernel under test."""
    t, pr = exp.topology, exp.pressure
    kut = t.kut.memory_mb
    l1_total = t.l1.count * (t.l1.memory_mb + GUEST_OVERHEAD_MB)
    if l1_total + KUT_RESERVE_MB > kut:
        raise PressureError(f"topology: {t.l1.count} L1 guest(s) of {t.l1.memory_mb} MiB need about "
                            f"{l1_total + KUT_RESERVE_MB} MiB but the kernel under test has {kut} MiB "
                            "(raise topology.kut.memory_mb)")
    if topology == "nested" and t.l2.count * (t.l2.memory_mb + GUEST_OVERHEAD_MB) + 128 > t.l1.memory_mb:
        raise PressureError(f"topology: {t.l2.count} L2 guest(s) of {t.l2.memory_mb} MiB do not fit in an L1 "
                            f"of {t.l1.memory_mb} MiB")
    probe = exp.workload.probe.resident_mb
    for level, spec in (("l1", t.l1), ("l2", t.l2)):
        if level in exp.workload.probe.levels and (level == "l1" or topology == "nested"):
            room = spec.memory_mb - 128 - (t.l2.count * (t.l2.memory_mb + GUEST_OVERHEAD_MB)
                                           if level == "l1" and topology == "nested" else 0)
            if probe > room:
                raise PressureError(f"workload.probe: {probe:.0f} MiB resident does not fit in {level} "
                                    f"({spec.memory_mb} MiB, about {room} MiB free for the probe)")
    modes = modes_used(exp, cell_mode)
    if "global" in modes:
        if t.kut.swap_mb == 0:
            raise PressureError("pressure global needs swap in the kernel under test (topology.kut.swap_mb > 0): "
                                "without it an anonymous hog meets the OOM killer instead of sustained reclaim")
        if pr.global_.overshoot_mb >= t.kut.swap_mb:
            raise PressureError(f"pressure.global.overshoot_mb={pr.global_.overshoot_mb} must stay below the swap "
                                f"({t.kut.swap_mb} MiB) or the hog ends in the OOM killer")
    if "memcg-limit" in modes and pr.memcg_limit_mb >= kut - l1_total - KUT_RESERVE_MB:
        raise PressureError(f"pressure.memcg_limit_mb={pr.memcg_limit_mb} is not a tight limit: the kernel under "
                            f"test has only ~{kut - l1_total - KUT_RESERVE_MB} MiB to spare, so the control would "
                            "cause global reclaim")


def conductor_plan(exp: Experiment, cell_mode: str, warm_timeout_s: float) -> dict:
    """What the kernel under test's agent conducts: phases with their modes, pressure knobs, sampler."""
    return {
        "phases": [{"name": p.name, "duration_s": p.duration_s, "mode": p.mode(cell_mode)} for p in exp.phases],
        "pressure": exp.pressure.model_dump(by_alias=True),
        "sampler": exp.sampler.model_dump(),
        "warm_timeout_s": warm_timeout_s,
    }
