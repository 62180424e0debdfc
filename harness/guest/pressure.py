"""Pressure phases, run inside the kernel under test: the mechanism every mode (modes/) shares. Standard library only.

Each pressure phase gets its own cgroup v2 group, /sys/fs/cgroup/nestpress-<run>-<phase>-<mode>, set up by its
mode, which the actor process joins before it does anything; the group is removed at the end of the phase, also
on failure (cgroup.kill, then rmdir). The actor is this file run as a script with a PressureJob; what it does is
its mode's act(), and every record it logs is a PressureRecord in pressure.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

try:
    from . import modes  # as harness.guest.pressure
    from .contract import EventKind, PressureJob
    from .records import PressureRecord, VmZap
except ImportError:  # run as a script in a guest: its directory is sys.path[0]
    import modes  # type: ignore[no-redef]
    from contract import EventKind, PressureJob  # type: ignore[no-redef]
    from records import PressureRecord, VmZap  # type: ignore[no-redef]

CG = "/sys/fs/cgroup"
READY_TIMEOUT_S = 120
TYPED = ("mb", "count", "seconds", "ok", "error", "target")  # PressureRecord's own fields; other figures go to info


def unavailable(mode: modes.Mode) -> str | None:
    """Why this mode cannot act on this kernel (said clearly, recorded, and the phase goes on)."""
    if why := mode.unavailable():
        return why
    if mode.cgroup and not os.path.exists(f"{CG}/cgroup.procs"):
        return f"{mode.name}: no cgroup v2 hierarchy at {CG}"
    return None


class PreflightError(RuntimeError):
    """The kernel under test cannot run this schedule: said before any guest starts, never retried."""


def _cgroup_problems(run_id: str) -> list[str]:
    from supervise import read  # the agent's helper; the pressure actors themselves never load it

    controllers = read(f"{CG}/cgroup.controllers", None)
    if controllers is None:
        return [f"no cgroup v2 hierarchy at {CG} (CONFIG_CGROUPS/CONFIG_MEMCG, cgroup2 mount)"]
    if "memory" not in controllers.split():
        return [
            f"the cgroup v2 memory controller is not available at {CG} (controllers: "
            f"{controllers or 'none'}; CONFIG_MEMCG off or cgroup_disable=memory)"
        ]
    probe = f"{CG}/nestpress-{run_id}-preflight"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return [f"cannot create a cgroup under {CG}: {e.strerror}"]
    return []


def preflight(names: set[str], run_id: str) -> list[str]:
    """Raise PreflightError for what would make the run meaningless; return notes for modes that will idle."""
    used = [modes.get(n) for n in sorted(names)]
    problems = []
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        problems.append(
            "no /sys/kernel/debug/kvm: debugfs is not mounted or not in this kernel "
            "(CONFIG_DEBUG_FS, and no debugfs=off on the command line); the sampler needs KVM's stats"
        )
    if any(m.cgroup for m in used):
        problems += _cgroup_problems(run_id)
    problems += [p for m in used for p in m.preflight()]
    if problems:
        raise PreflightError("the kernel under test cannot run this schedule: " + "; ".join(problems))
    return [why for m in used if (why := unavailable(m))]


class PressureRun:
    """One phase's pressure: its mode's cgroup set up, the actor started in it; stop() undoes both."""

    def __init__(self, mode: str, params: dict[str, Any], name: str, out: str, events):
        self.mode, self.params, self.events = modes.get(mode), params, events
        self.cgroup = f"{CG}/nestpress-{name}-{mode}"
        self.out = out
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not self.mode.acts:
            return
        if why := unavailable(self.mode):
            self.events(EventKind.PRESSURE_UNAVAILABLE, mode=self.mode.name, reason=why)
            return
        os.makedirs(self.cgroup)
        self.mode.setup_cgroup(self.cgroup, self.mode.params(self.params))
        log = os.path.join(self.out, "pressure.jsonl")
        job = PressureJob(mode=self.mode.name, params=self.params, cgroup=self.cgroup, log=log)
        stderr = os.path.join(self.out, "pressure.stderr")
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-S", os.path.abspath(__file__), job.to_json()],
            stdout=open(os.path.join(self.out, "pressure.stdout"), "a"),
            stderr=open(stderr, "a"),
        )
        # the phase clock starts when the pressure is on, not when a (slow, under TCG) Python starts
        ready = os.path.join(self.out, f"pressure.ready.{self.proc.pid}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(stderr, errors="replace") as f:
                    raise RuntimeError(
                        f"pressure actor for {self.mode.name} did not start (status {self.proc.poll()}): "
                        + f.read()[-500:]
                    )
            time.sleep(0.1)
        os.unlink(ready)
        self.events(EventKind.PRESSURE_START, mode=self.mode.name, cgroup=self.cgroup, pid=self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.events(EventKind.PRESSURE_STOP, mode=self.mode.name, status=self.proc.returncode)
        if os.path.isdir(self.cgroup):
            try:
                with open(self.cgroup + "/cgroup.kill", "w") as f:
                    f.write("1")
            except OSError:
                pass
            for _ in range(100):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)
            self.events(EventKind.CGROUP_REMOVED, cgroup=self.cgroup, removed=not os.path.exists(self.cgroup))


class ActorLog:
    """What an actor logs: PressureRecords of its mode, and the steps of VMs' zap counters, one JSON line each."""

    def __init__(self, path: str, mode: str):
        self.out, self.mode = open(path, "a", buffering=1), mode

    def __call__(self, kind: str, **fields: Any) -> None:
        typed = {k: fields.pop(k) for k in TYPED if k in fields}
        rec = PressureRecord(t=time.time_ns(), mode=self.mode, kind=kind, info=fields, **typed)
        self.out.write(rec.to_json() + "\n")

    def zap(self, step: VmZap) -> None:
        self.out.write(step.line())


def _main(arg: str) -> None:
    job = PressureJob.from_dict(json.loads(arg))
    with open(job.cgroup + "/cgroup.procs", "w") as f:  # join the group before allocating anything
        f.write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    mode = modes.get(job.mode)

    def ready() -> None:
        open(os.path.join(os.path.dirname(job.log), f"pressure.ready.{os.getpid()}"), "w").close()

    mode.act(mode.params(job.params), ready, ActorLog(job.log, mode.name))


if __name__ == "__main__":
    _main(sys.argv[1])
