"""In-guest agent: PID 1 of every level (kernel under test, L1, L2). Standard library only.

Started from the kernel command line (`init=<python> -- -E -S agent.py`), it mounts the
basics, mounts its results export (9p tag `nestout`), reads `plan.json` there, records
the facts of its level, says `ready.json`, starts its child guests and its probe, and -
in the kernel under test - conducts the phase schedule with the sampler and the pressure
modes. Everything goes to the export as it happens. It powers the guest off at the end,
whatever happened; `exit.json` says how it ended.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clock import PTP_KVM, READY_METHOD, VIRTIO_SERIAL, own_clock, serve_port
from contract import (
    OUT,
    PATH,
    ChildSpec,
    ContractError,
    EventKind,
    ExitKind,
    ExitRecord,
    GuestPlan,
    ProbeJob,
    SamplerJob,
    Schedule,
    WorkloadJob,
)
from level import copy_kmsg, early_mounts, enable_swap, level_facts, set_clock
from pressure import PreflightError, PressureRun, preflight
from records import Event
from supervise import Child, lock_in_memory, read, stop_all, tail

HERE = os.path.dirname(os.path.abspath(__file__))
_libc = ctypes.CDLL(None, use_errno=True)  # reboot(2): PID 1 powers the guest off


class Events:
    """Append-only JSON lines, flushed per line: a crash keeps everything written so far."""

    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, kind: EventKind, **fields) -> None:
        line = Event(t=time.time_ns(), mono=time.monotonic_ns(), kind=kind, **fields).to_json()
        with self._lock:
            self._f.write(line + "\n")


def pin_child_tsc(argv: list[str], kmsg: str) -> list[str]:
    """A child's `-cpu host` with this kernel's refined TSC rate, when the kernel refined it at boot.

    KVM takes the TSC rate a vCPU gets by default from the boot-time estimate; when the refined rate
    differs by more than KVM's 250 ppm tolerance and the CPU cannot scale TSCs (SVM under TCG), the
    child runs on a rate that is off and, as seen once in ten runs, its timer went 100 s late. Naming
    the refined rate keeps the child within tolerance; without a refinement (on KVM the rate is
    known) the argv stays as planned."""
    rates = re.findall(r"Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz", kmsg)
    if not rates or "-cpu" not in argv:
        return argv
    mhz, khz_frac = rates[-1]
    i = argv.index("-cpu") + 1
    if argv[i].split(",")[0] != "host" or "tsc-frequency=" in argv[i]:
        return argv
    hz = (int(mhz) * 1000 + int(khz_frac)) * 1000
    return [*argv[:i], f"{argv[i]},tsc-frequency={hz}", *argv[i + 1 :]]


def start_children(plan: GuestPlan, ev: Events) -> list[Child]:
    def failed(child: Child, e: RuntimeError) -> None:
        save_kvm_trace(child.name)
        ev(EventKind.BOOT_FAILED, guest=child.name, error=str(e))
        child.stop()
        if plan.on_guest_failure == "fail":
            raise e

    kids: list[Child] = []
    specs: dict[str, ChildSpec] = {}
    kmsg = read(os.path.join(OUT, "kmsg.log"))
    for spec in plan.children:
        os.makedirs(spec.export, exist_ok=True)
        spec.plan.save(os.path.join(spec.export, "plan.json"))
        child = child_of(spec, pin_child_tsc(spec.argv, kmsg))
        try:
            child.start()
        except RuntimeError as e:  # its root could not be served: as good as a failed boot
            failed(child, e)
            continue
        ev(EventKind.BOOT_START, guest=spec.name, level=spec.plan.level, pid=child.proc.pid)
        kids.append(child)
        specs[child.name] = spec
    alive = []
    for child in kids:
        try:
            try:
                secs = child.wait_ready(child.boot_timeout)
            except RuntimeError as e:
                if (child := repinned(child, specs[child.name], str(e), ev)) is None:
                    raise
                secs = child.wait_ready(child.boot_timeout)
            ev(EventKind.BOOT_READY, guest=child.name, seconds=secs, kernel_s=child.kernel_ready_s)
            alive.append(child)
        except RuntimeError as e:
            failed(child, e)
    return alive


def child_of(spec: ChildSpec, argv: list[str]) -> Child:
    return Child(
        spec.name,
        argv,
        spec.export,
        spec.console,
        boot_timeout=spec.timeout_s,
        rootfs_server=spec.rootfs_server,
        monitor=spec.monitor,
        clock=spec.clock,
        system_map=spec.system_map,
        env=spec.env,
    )


def repinned(child: Child, spec: ChildSpec, error: str, ev: Events) -> Child | None:
    """The child once more with the TSC rate this kernel's KVM has, where its QEMU refused the pinned one (the
    refined rate more than KVM's tolerance away from the boot-time estimate KVM kept, and no TSC scaling: seen
    where the host's own rate was unknown, so the kernel under test could not be told it); None otherwise."""
    m = re.search(r"TSC frequency mismatch between VM \((\d+) kHz\) and host \((\d+) kHz\)", error)
    if m is None or "tsc-frequency=" not in " ".join(child.argv):
        return None
    argv = [re.sub(r"tsc-frequency=\d+", f"tsc-frequency={int(m.group(2)) * 1000}", a) for a in child.argv]
    child.stop()
    again = child_of(spec, argv)
    again.start()
    ev(
        EventKind.BOOT_START,
        guest=spec.name,
        pid=again.proc.pid if again.proc else None,
        reason=f"again with KVM's TSC rate {m.group(2)} kHz: QEMU refused {m.group(1)} kHz",
    )
    return again


def start_probe(plan: GuestPlan, ev: Events) -> subprocess.Popen | None:
    if plan.probe is None:
        return None
    job = ProbeJob(
        spec=plan.probe,
        out=os.path.join(OUT, "probe.jsonl"),
        status=os.path.join(OUT, "probe.status"),
        stop=os.path.join(OUT, "stop"),
    )
    ev(EventKind.PROBE_START, guest=plan.name)
    return subprocess.Popen(
        [sys.executable, "-E", "-S", os.path.join(HERE, "probe.py"), job.to_json()],
        stdout=open(os.path.join(OUT, "probe.stdout"), "w"),
        stderr=open(os.path.join(OUT, "probe.stderr"), "w"),
    )


def start_workloads(plan: GuestPlan, ev: Events) -> list[tuple[str, subprocess.Popen]]:
    """A runner per workload of this level (guest/workload.py), each until stop_workloads()."""
    procs = []
    for spec in plan.workloads:
        job = WorkloadJob(spec=spec, out=OUT, stop=os.path.join(OUT, "stop"))
        ev(EventKind.WORKLOAD_START, detail=f"{spec.name} ({spec.kind})")
        with open(os.path.join(OUT, f"workload.{spec.name}.stderr"), "w") as err:
            argv = [sys.executable, "-E", "-S", os.path.join(HERE, "workload.py"), job.to_json()]
            procs.append((spec.name, subprocess.Popen(argv, stdout=err, stderr=err)))
    return procs


def stop_workloads(procs: list[tuple[str, subprocess.Popen]], ev: Events) -> None:
    """Stop every runner (a run cut short is recorded as stopped); a runner that ended on its own failed."""
    for name, p in procs:
        ended = p.poll()
        status = ended if ended is not None else stop_process(p, 15)
        ev(EventKind.WORKLOAD_END, detail=name, status=status, when="early" if ended is not None else "stopped")


def run_command(plan: GuestPlan, ev: Events) -> None:
    """The plan's command, if any: stdout, stderr and exit status each in a file of their own."""
    if not plan.command:
        return
    with open(os.path.join(OUT, "command.stdout"), "w") as out, open(os.path.join(OUT, "command.stderr"), "w") as err:
        r = subprocess.run(plan.command, stdout=out, stderr=err)
    with open(os.path.join(OUT, "command.exit"), "w") as f:
        f.write(f"{r.returncode}\n")
    ev(EventKind.COMMAND_EXIT, status=r.returncode)


KVM_TRACE = "/sys/kernel/tracing/instances/nestpress-kvm"
KVM_TRACE_EVENTS = (
    "kvm_exit",
    "kvm_entry",
    "kvm_nested_vmenter",
    "kvm_nested_vmexit_inject",
    "kvm_inj_exception",
    "kvm_inj_virq",
    "kvm_emulate_insn",
    "kvm_page_fault",
    "kvm_nested_vmenter_failed",
)


def start_kvm_trace(ev: Events) -> None:
    """The last seconds of the kernel under test's KVM, kept in a ring buffer (boot.kvm_trace_on_failure): what
    a guest did before it died (a triple fault shows as a shutdown exit after the exception that caused it)."""
    try:
        os.makedirs(KVM_TRACE, exist_ok=True)
        with open(KVM_TRACE + "/buffer_size_kb", "w") as f:
            f.write("8192")
        for e in KVM_TRACE_EVENTS:
            with open(f"{KVM_TRACE}/events/kvm/{e}/enable", "w") as f:
                f.write("1")
        ev(EventKind.KVM_TRACE, events=list(KVM_TRACE_EVENTS))
    except OSError as e:
        ev(EventKind.KVM_TRACE, error=str(e))


def save_kvm_trace(name: str) -> None:
    """When a guest died: stop the ring buffer and save it (a no-op unless start_kvm_trace ran)."""
    if os.path.isdir(KVM_TRACE):
        with open(KVM_TRACE + "/tracing_on", "w") as f:
            f.write("0")
        with open(KVM_TRACE + "/trace") as src, open(os.path.join(OUT, f"kvm-trace.{name}.txt"), "w") as dst:
            dst.write(src.read())


def report_deaths(kids: list[Child], ev: Events) -> int:
    """Record each guest the first time it is seen dead; how many of them are alive."""
    for k in kids:
        if why := k.new_problem():
            save_kvm_trace(k.name)
            ev(EventKind.GUEST_DIED, guest=k.name, error=why, console=tail(k.console))
    return sum(1 for k in kids if k.failure is None)


def wait_probes_warm(expected: int, timeout: float, kids: list[Child], ev: Events) -> None:
    """The phases start once every probe finished one pass: shadow pages are then in place."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kids and not report_deaths(kids, ev):
            raise RuntimeError("every guest died before its probe finished a pass: nothing to measure")
        status = [
            json.loads(read(s, "{}") or "{}")
            for s in glob.glob(os.path.join(OUT, "**", "probe.status"), recursive=True)
        ]
        failed = [s["failed"] for s in status if s.get("failed")]
        if failed:
            raise RuntimeError(f"probe failed before the phases could start: {'; '.join(failed)}")
        warm = [s for s in status if s.get("passes", 0) >= 1]
        if len(warm) >= expected:
            ev(EventKind.PROBES_WARM, count=len(warm))
            return
        time.sleep(0.5)
    ev(EventKind.PROBES_NOT_WARM, expected=expected, warm=len(warm), timeout_s=timeout)
    if not warm and expected:
        raise RuntimeError(
            f"no probe finished a pass within {timeout:.0f}s (guests failed to boot or hung): nothing to measure"
        )


def start_sampler(plan: GuestPlan) -> subprocess.Popen | None:
    """Kernel under test only: counters from before the first guest boots to the end (boot-time shadow
    paging is on record too; the report only compares what lies inside the phases)."""
    if plan.schedule is None:
        return None
    return subprocess.Popen(
        [
            sys.executable,
            "-E",
            "-S",
            os.path.join(HERE, "sampler.py"),
            SamplerJob(spec=plan.schedule.sampler, out=OUT).to_json(),
        ],
        stdout=open(os.path.join(OUT, "sampler.stdout"), "w"),
        stderr=open(os.path.join(OUT, "sampler.stderr"), "w"),
    )


def conduct(plan: GuestPlan, kids: list[Child], ev: Events) -> None:
    """Kernel under test only: the phase schedule with the pressure each phase asks for."""
    schedule = plan.schedule
    assert schedule is not None
    if plan.children and not kids:
        raise RuntimeError("no guest came up (the boot_failed events say why): nothing to measure")
    wait_probes_warm(schedule.expected_probes, schedule.warm_timeout_s, kids, ev)
    deadline = time.monotonic() + 120  # a baseline sample before the first phase
    while not read(os.path.join(OUT, "counters.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    works = start_workloads(plan, ev)  # the kernel under test's own, during the phases only
    try:
        run_phases(plan, schedule, kids, ev)
    finally:
        stop_workloads(works, ev)


def run_phases(plan: GuestPlan, schedule: Schedule, kids: list[Child], ev: Events) -> None:
    for phase in schedule.phases:
        pr = PressureRun(phase.mode, schedule.pressure.get(phase.mode, {}), f"{plan.run_id}-{phase.name}", OUT, ev)
        try:
            pr.start()
            ev(EventKind.PHASE_START, phase=phase.name, mode=phase.mode, duration_s=phase.duration_s)
            end = time.monotonic() + phase.duration_s
            while time.monotonic() < end:
                report_deaths(kids, ev)
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        finally:
            pr.stop()
            ev(EventKind.PHASE_END, phase=phase.name, mode=phase.mode)


def wait_for_stop(plan: GuestPlan, kids: list[Child], probe: subprocess.Popen | None, ev: Events) -> None:
    """Below the kernel under test: run until the parent says stop; a probe or guest that dies says so at once."""
    deadline = time.monotonic() + plan.max_s
    while not os.path.exists(os.path.join(OUT, "stop")) and time.monotonic() < deadline:
        report_deaths(kids, ev)
        if probe is not None and probe.poll() is not None:
            ev(EventKind.PROBE_DIED, status=probe.returncode, stderr=tail(os.path.join(OUT, "probe.stderr"), 5))
            with open(os.path.join(OUT, "probe.status"), "w") as f:
                json.dump({"passes": 0, "failed": f"probe exited with {probe.returncode}"}, f)
            probe = None
        time.sleep(0.5)


def stop_process(p: subprocess.Popen | None, grace: float) -> int | None:
    if p is None:
        return None
    p.terminate()
    try:
        return p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def finish(
    kids: list[Child],
    probe: subprocess.Popen | None,
    works: list[tuple[str, subprocess.Popen]],
    sampler: subprocess.Popen | None,
    ev: Events,
) -> None:
    stop_workloads(works, ev)
    if probe:
        ev(EventKind.PROBE_EXIT, status=stop_process(probe, 20))
    for k in kids:
        open(os.path.join(k.export, "stop"), "w").close()
    for k in kids:
        status = k.wait_exit(60)
        ev(EventKind.GUEST_EXIT, guest=k.name, status=status, clean=status is not None)
        k.stop()
    stop_process(sampler, 10)  # last: the guests' shutdown is on record too


def main() -> int:
    early_mounts()
    for fd, name in ((1, "agent.stdout"), (2, "agent.stderr")):
        f = os.open(os.path.join(OUT, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(PATH=PATH, HOME="/run/tmp", TMPDIR="/run/tmp")
    copy_kmsg(os.path.join(OUT, "kmsg.log"))
    ev = Events(os.path.join(OUT, "events.jsonl"))
    serve_port(lambda why: ev(EventKind.CLOCK, ok=False, port=why))
    if (refused := lock_in_memory()) is not None:
        ev(EventKind.NOT_LOCKED, error=refused)
    kind, error, message = ExitKind.OK, None, None
    kids: list[Child] = []
    probe = sampler = None
    works: list[tuple[str, subprocess.Popen]] = []
    own = None  # the Watch of this guest's own clock (ptp_kvm), when it has one
    try:
        plan = GuestPlan.load(os.path.join(OUT, "plan.json"))
        set_clock(ev)
        if plan.swap_device:
            enable_swap(plan.swap_device, ev)
        time.sleep(0.2)  # let the kmsg pump catch up before facts read it
        level_facts(plan).save(os.path.join(OUT, "facts.json"))
        own, how = own_clock(os.path.join(OUT, "clock.jsonl"))  # its parent measures it unless it can do better
        ev(EventKind.CLOCK, method=PTP_KVM if own else VIRTIO_SERIAL, detail=how)
        with open(os.path.join(OUT, "ready.json"), "w") as ready:
            uptime = float(read("/proc/uptime", "0").split()[0])
            json.dump({"t": time.time_ns(), "uptime_s": uptime, READY_METHOD: PTP_KVM if own else VIRTIO_SERIAL}, ready)
        ev(EventKind.READY, guest=plan.name)
        if plan.schedule is not None:
            for note in preflight({phase.mode for phase in plan.schedule.phases}, plan.run_id):
                ev(EventKind.PRESSURE_UNAVAILABLE, reason=note, when="preflight")
        if plan.cgroup_controllers:
            with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as control:
                control.write(" ".join("+" + c for c in plan.cgroup_controllers))
        sampler = start_sampler(plan)
        if plan.kvm_trace_on_failure:
            start_kvm_trace(ev)
        kids = start_children(plan, ev)
        probe = start_probe(plan, ev)
        works = start_workloads(plan, ev) if plan.schedule is None else []  # below the kernel under test
        run_command(plan, ev)
        if plan.schedule is not None:
            conduct(plan, kids, ev)
        else:
            wait_for_stop(plan, kids, probe, ev)
    except BaseException as e:
        # a kernel that cannot run the schedule, or a plan this agent cannot read, fails the same way every time
        kind = ExitKind.PREFLIGHT if isinstance(e, (PreflightError, ContractError)) else ExitKind.ERROR
        error, message = "".join(traceback.format_exception(e)), f"{type(e).__name__}: {e}"
        print(error, file=sys.stderr)
    finally:
        try:
            finish(kids, probe, works, sampler, ev)
        except Exception:
            print(traceback.format_exc(), file=sys.stderr)
        if own is not None:
            own.stop()  # its last measurement, as a parent's watch takes one when it stops its guest
        stop_all()
        ExitRecord(
            status=0 if kind is ExitKind.OK else 1, kind=kind, error=error, message=message, t=time.time_ns()
        ).save(os.path.join(OUT, "exit.json"))
    return 0 if kind is ExitKind.OK else 1


if __name__ == "__main__":
    try:
        main()
    finally:
        os.sync()
        _libc.reboot(0x4321FEDC)  # RB_POWER_OFF; PID 1 must never just exit
