"""The host memory group each kernel under test's QEMU runs in: real cgroups on this host (root)."""

import os
import subprocess
import sys

import pytest

from harness.guest.supervise import _spawn
from harness.machine.memory_group import MemoryGroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


def test_a_process_over_its_group_limit_dies_in_the_group_not_on_the_host(tmp_path):
    group, about = MemoryGroup.create(f"test-{os.getpid()}", 64)
    assert group is not None, about
    try:
        hog = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
        proc = _spawn([sys.executable, "-c", hog], subprocess.PIPE, subprocess.DEVNULL, cgroup_procs=group.procs)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == -9 and b"survived" not in out  # OOM-killed inside its group, no swap
        assert group.oom_kills() >= 1
        # a process within its limit runs there, and only it: not this test, not its parent
        ok = _spawn(["cat", "/proc/self/cgroup"], subprocess.PIPE, subprocess.DEVNULL, cgroup_procs=group.procs)
        assert f"nestpress-test-{os.getpid()}" in ok.communicate(timeout=10)[0].decode()
        assert f"nestpress-test-{os.getpid()}" not in open("/proc/self/cgroup").read()
    finally:
        group.remove()
    assert not group.path.exists()


def test_a_group_whose_creator_was_killed_is_removed_by_the_next_run():
    probe, _ = MemoryGroup.create(f"probe-{os.getpid()}", 64)
    assert probe is not None
    probe.remove()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = probe.path.parent / f"nestpress-killed-run-{gone.pid}"
    stale.mkdir()  # as a run that was SIGKILLed leaves it: empty, its pid dead
    live = probe.path.parent / f"nestpress-live-run-{os.getpid()}"
    live.mkdir()
    try:
        group, about = MemoryGroup.create(f"next-{os.getpid()}", 64)
        assert group is not None, about
        group.remove()
        assert not stale.exists() and live.exists()
    finally:
        for d in (stale, live):
            if d.exists():
                d.rmdir()
