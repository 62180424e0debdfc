"""The phase schedule, on the host: check sizes before anything starts, schedule phases per cell.

The pressure itself runs inside the kernel under test (harness/guest/pressure.py): its
modes need that kernel's cgroup v2 hierarchy, debugfs and /proc, and what they act on
lives there. Here we only make sure a config cannot ask for the impossible
and turn the phases into the schedule the conductor follows.
"""

from __future__ import annotations

from pathlib import Path

from .. import hypotheses
from ..config import Experiment
from ..errors import PressureError
from ..guest import modes
from ..guest.contract import PhaseSpec, SamplerSpec, Schedule
from ..guest.modes import Sizes

GUEST_OVERHEAD_MB = 160  # QEMU + guest kernel beyond a guest's -m, measured roughly on TCG
KUT_RESERVE_MB = 256  # the kernel under test's own kernel, agent and sampler


def check(exp: Experiment, topology: str) -> None:
    """Raise PressureError for sizes that cannot work on the kernel under test."""
    t = exp.topology
    kut = t.kut.memory_mb
    l1_total = t.l1.count * (t.l1.memory_mb + GUEST_OVERHEAD_MB)
    if l1_total + KUT_RESERVE_MB > kut:
        raise PressureError(
            f"topology: {t.l1.count} L1 guest(s) of {t.l1.memory_mb} MiB need about "
            f"{l1_total + KUT_RESERVE_MB} MiB but the kernel under test has {kut} MiB "
            "(raise topology.kut.memory_mb)"
        )
    if topology == "nested" and t.l1.count and t.l2.count * (t.l2.memory_mb + GUEST_OVERHEAD_MB) + 128 > t.l1.memory_mb:
        raise PressureError(
            f"topology: {t.l2.count} L2 guest(s) of {t.l2.memory_mb} MiB do not fit in an L1 of {t.l1.memory_mb} MiB"
        )
    for level, spec in (("l1", t.l1), ("l2", t.l2)):
        probe = exp.workload.probe.resident_mb(spec.thp)
        if level in exp.workload.probe.levels and (level == "l1" or topology == "nested"):
            room = (
                spec.memory_mb
                - 128
                - (t.l2.count * (t.l2.memory_mb + GUEST_OVERHEAD_MB) if level == "l1" and topology == "nested" else 0)
            )
            if probe > room:
                raise PressureError(
                    f"workload.probe: {probe:.0f} MiB resident does not fit in {level} "
                    f"({spec.memory_mb} MiB, about {room} MiB free for the probe)"
                )
    free = {
        "kut": kut - l1_total - KUT_RESERVE_MB,
        "l1": t.l1.memory_mb - 128 - (t.l2.count * (t.l2.memory_mb + GUEST_OVERHEAD_MB) if topology == "nested" else 0),
        "l2": t.l2.memory_mb - 128,
    }
    for run in exp.workload.runs:
        need = run.workload.resident_mb(run.knobs)
        if need > free[run.level]:
            raise PressureError(
                f"workload.runs {run.label}: {need:.0f} MiB resident does not fit in {run.level} "
                f"(about {free[run.level]} MiB free there)"
            )
    sizes = Sizes(kut_mb=kut, swap_mb=t.kut.swap_mb, guests_mb=l1_total, reserve_mb=KUT_RESERVE_MB)
    for name in exp.modes_used():
        if problems := modes.get(name).check_sizes(exp.pressure.knobs(name), sizes):
            raise PressureError("; ".join(problems))


# what each part of a run needs from the kernel under test's .config, and why
ALWAYS_NEEDED = {
    "CONFIG_DEBUG_FS": "the sampler reads KVM's MMU stats from /sys/kernel/debug/kvm",
    "CONFIG_KVM": "the kernel under test runs the guests",
}


# every level's root comes over one of these (qemu.py); the kernel under test also serves it to its L1s
ROOTFS_NEEDS = {
    "9p": {
        "CONFIG_9P_FS": "every level's root is the host's over virtio-9p",
        "CONFIG_NET_9P_VIRTIO": "every level's root is the host's over virtio-9p",
    },
    "virtiofs": {
        "CONFIG_VIRTIO_FS": "every level's root is the host's over virtiofs (boot.rootfs)",
        "CONFIG_SECCOMP_FILTER": "virtiofsd serves the guests' root and installs a seccomp filter",
    },
}


def kernel_options(config_text: str) -> set[str]:
    return {
        line.split("=", 1)[0]
        for line in config_text.splitlines()
        if line.startswith("CONFIG_") and line.split("=", 1)[1] in ("y", "m")
    }


def check_kernel(exp: Experiment, variant: str, kernel_config: Path, rootfs: str = "9p") -> None:
    """Raise PressureError, before anything boots, when the built kernel lacks what the run uses."""
    have = kernel_options(kernel_config.read_text())
    need = {**ALWAYS_NEEDED, **ROOTFS_NEEDS[rootfs]}
    for name in exp.modes_used():
        need.update(modes.get(name).needs)
    if traces(exp):
        need["CONFIG_FTRACE"] = "sampler.trace follows the vmscan tracepoints"
    missing = [f"{opt} ({why})" for opt, why in need.items() if opt not in have]
    if missing:
        raise PressureError(
            f"kernel of variant {variant!r} ({kernel_config}) lacks what this run needs: "
            + "; ".join(missing)
            + (
                f". The {exp.distro_kernel.distro} kernel is built without them: use another pressure mode "
                "(drop-caches calls every shrinker) or the full build (no distro_kernel)."
                if exp.distro_kernel
                else ". Add them to a fragment in kernel_config.fragments "
                "(configs/kernel/kvm-host.config has them all)."
            )
        )


def traces(exp: Experiment) -> bool:
    """Whether the sampler follows the vmscan tracepoints: as the config says, else as its hypothesis does."""
    return exp.sampler.trace if exp.sampler.trace is not None else hypotheses.get(exp.hypothesis).traces_reclaim


def conductor_schedule(exp: Experiment, warm_timeout_s: float, expected_probes: int) -> Schedule:
    """What the kernel under test's agent conducts: phases with their modes, the knobs of each mode, the sampler."""
    hypothesis = hypotheses.get(exp.hypothesis)
    return Schedule(
        phases=[PhaseSpec(name=p.name, duration_s=p.duration_s, mode=p.mode(exp.pressure.mode)) for p in exp.phases],
        pressure={name: exp.pressure.knob_values(name) for name in exp.modes_used()},
        sampler=SamplerSpec(
            interval_s=exp.sampler.interval_s,
            trace=traces(exp),
            zap_interval_s=exp.sampler.zap_interval_s,
            shrinkers=list(hypothesis.shrinkers),
            shrink_functions=list(hypothesis.shrink_functions),
        ),
        warm_timeout_s=warm_timeout_s,
        expected_probes=expected_probes,
    )
