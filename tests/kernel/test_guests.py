"""Real QEMU, real kernels from the build pipeline: boot to the agent, panic detection, cleanup."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interruptible

from harness import REPO_ROOT
from harness.config import load
from harness.errors import AccelError
from harness.guest.contract import ChildSpec, ExitKind, ExitRecord, GuestPlan
from harness.guest.supervise import Child
from harness.machine.host import decide_accel, decide_rootfs
from harness.machine.qemu import GuestSpec, qemu_argv, rootfs_server
from harness.run.schedule import conductor_schedule
from harness.util import python_for_guests

pytestmark = pytest.mark.kernel


def kut_spec(kernel: Path, out: Path, python: str | None = None, rootfs: str = "9p", hidden=()) -> GuestSpec:
    return GuestSpec(
        "kut",
        "kut",
        str(kernel),
        768,
        1,
        "tcg",
        str(out),
        str(out / "console.log"),
        python or python_for_guests(),
        rootfs=rootfs,
        rootfs_dir=str(out.parent / "rootfs"),
        root_view=True,
        hidden=tuple(hidden),
    )


@pytest.mark.parametrize("rootfs", ["9p", "virtiofs"])
def test_kernel_boots_to_agent_and_reports_its_level(builds, qemu, tmp_path, rootfs):
    if rootfs == "virtiofs":
        try:
            decide_rootfs("virtiofs", decide_accel("auto").accel)
        except AccelError as e:
            pytest.skip(str(e))
    out = tmp_path / "kut"
    out.mkdir()
    canary = tmp_path / "written-by-the-guest"
    secrets = tmp_path / "secrets"  # a directory and a file the view must hide, as it hides ~/.ssh and /etc/shadow
    (secrets / "ssh").mkdir(parents=True)
    (secrets / "ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    (secrets / "shadow").write_text("root:$6$hash\n")
    # the guest remounts its root read-write and tries to write a host file: the share itself must refuse;
    # then it reads what is hidden, and looks for the host's /proc in the share (a guest mounts its own)
    probe_write = (
        f"uname -r; mount -o remount,rw /; touch {canary} && echo WROTE || echo REFUSED; "
        f"cat {secrets}/shadow {secrets}/ssh/* 2>&1; echo SEEN; "
        "mkdir -p /run/tmp/r && mount --bind / /run/tmp/r && ls -A /run/tmp/r/proc | wc -l"  # the share only
    )
    GuestPlan(name="kut", level="kut", run_id="t", command=["sh", "-c", probe_write]).save(str(out / "plan.json"))
    (out / "stop").touch()  # nothing to conduct: come up, report, power off
    spec = kut_spec(builds["baseline"].bzimage, out, rootfs=rootfs, hidden=[f"{secrets}/sh*", f"{secrets}/ssh"])
    child = Child(
        "kut", qemu_argv(spec), str(out), spec.console, rootfs_server=rootfs_server(spec), view_dir=spec.rootfs_dir
    )
    child.start()
    try:
        ready = child.wait_ready(180)
        assert child.wait_exit(120) is not None
    finally:
        child.stop()
    said = (out / "command.stdout").read_text().splitlines()
    assert not canary.exists() and said[1] == "REFUSED"
    assert "SEEN" in said and not any("PRIVATE" in x or "$6$" in x for x in said), said  # hidden: read as empty
    assert said[-1] == "0", said  # the share's /proc is an empty directory, not the host's
    assert not (tmp_path / "rootfs").exists()  # the view of / (and virtiofs's socket) are gone
    console = (out / "console.log").read_text()
    assert "Linux version 6.1." in console
    facts = json.loads((out / "facts.json").read_text())
    assert facts["uname"].startswith("6.1.") and facts["kvm_device"] and "svm" in facts["cpu_flags"]
    assert any(d.startswith("x86-mmu-") for d in facts["shrinker_dirs"]) and facts["rootfs"] == rootfs
    assert (out / "command.stdout").read_text().startswith("6.1.") and (out / "command.exit").read_text() == "0\n"
    assert json.loads((out / "exit.json").read_text())["status"] == 0
    assert (out / "kmsg.log").stat().st_size > 0 and (out / "agent.stderr").exists()
    assert 0 < ready < 180


def test_panicking_guest_is_detected_with_its_console(builds, qemu, tmp_path):
    out = tmp_path / "kut"
    out.mkdir()
    spec = kut_spec(builds["baseline"].bzimage, out, python="/nonexistent/python3")
    child = Child("kut", qemu_argv(spec), str(out), spec.console)
    child.start()
    try:
        with pytest.raises(RuntimeError) as e:
            child.wait_ready(180)
    finally:
        child.stop()
    assert "kernel panic" in str(e.value) and "/nonexistent/python3" in str(e.value)


def _processes_of(run_marker: str, name: str = "qemu-system") -> list[str]:
    r = subprocess.run(["pgrep", "-af", name], capture_output=True, text=True)
    return [l for l in r.stdout.splitlines() if run_marker in l]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_qemu_and_no_temp_dir(builds, qemu, tmp_path, sig):
    """Two cells side by side (a pair), both up when the signal comes: neither QEMU, server nor temp dir is left."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness", *"experiment --config shrinker-ab --set repetitions=1 --parallel 2".split()]
    p = subprocess.Popen(
        [*cmd, "--output", str(out), "--run-id", f"kill-{sig.name}"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=interruptible,
    )
    run_dir = out / "shrinker-ab" / f"kill-{sig.name}"
    ready = [run_dir / "cells" / f"{v}.r1" / "ready.json" for v in ("baseline", "patched")]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(r.exists() for r in ready):
        time.sleep(1)
    assert all(r.exists() for r in ready), "the kernels under test never came up side by side"
    assert len(_processes_of(str(run_dir))) == 2
    servers = decide_rootfs("auto", decide_accel("auto").accel).kind == "virtiofs"  # kut's root from a virtiofsd
    assert bool(_processes_of(f"/tmp/nestpress-kill-{sig.name}-", "virtiofsd")) == servers
    p.send_signal(sig)
    p.communicate(timeout=90)
    time.sleep(3)
    assert not _processes_of(str(run_dir)), "QEMU of the killed run is still running"
    assert not _processes_of(f"/tmp/nestpress-kill-{sig.name}-", "virtiofsd"), "its virtiofsd is still running"
    tmp_dirs = [d for d in Path("/tmp").glob(f"nestpress-kill-{sig.name}-*")]
    if sig == signal.SIGINT:
        assert p.returncode != 0
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
        assert not tmp_dirs
        assert "INCOMPLETE" in (run_dir / "report.md").read_text()  # the report says what it is
    for d in tmp_dirs:  # what a SIGKILL leaves (nothing runs to remove it): the test's own litter, not the host's
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "cmdline, says",
    [("cgroup_disable=memory", "memory controller is not available"), ("debugfs=off", "no /sys/kernel/debug/kvm")],
)
def test_kernel_that_cannot_run_the_schedule_fails_before_any_guest_starts(builds, qemu, tmp_path, cmdline, says):
    out = tmp_path / "kut"
    out.mkdir()
    control = load("shrinker-ab", ["phases=[{name: control, duration_s: 1, pressure: memcg-limit}]"]).experiment
    schedule = conductor_schedule(control, warm_timeout_s=5, expected_probes=0)
    child = ChildSpec(
        name="l1-0",
        export=str(out / "l1-0"),
        console=str(out / "l1-0" / "console.log"),
        timeout_s=5,
        argv=["sleep", "600"],
        plan=GuestPlan(name="l1-0", level="l1", run_id="t"),
    )
    GuestPlan(
        name="kut", level="kut", run_id="t", cgroup_controllers=["memory"], children=[child], schedule=schedule
    ).save(str(out / "plan.json"))
    spec = kut_spec(builds["baseline"].bzimage, out)
    spec.cmdline_extra = [cmdline]
    child = Child("kut", qemu_argv(spec), str(out), spec.console)
    child.start()
    try:
        child.wait_ready(180)
        assert child.wait_exit(60) is not None
    finally:
        child.stop()
    record = ExitRecord.load(str(out / "exit.json"))
    assert record.kind is ExitKind.PREFLIGHT and says in record.message
    assert "PreflightError: the kernel under test cannot run this schedule" in record.error
    kinds = [json.loads(l)["kind"] for l in (out / "events.jsonl").read_text().splitlines()]
    assert "ready" in kinds and "boot_start" not in kinds and "phase_start" not in kinds
