"""Ctrl-C during a fleet run (lab/remote.py): every reachable host's job is stopped whatever the others do, and a
job whose start was under way is stopped once started, or never starts. Three hosts in-process (their start and
stop the only thing faked: the real thing is tests/lab/test_fab.py's); the Ctrl-C is a real SIGINT."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from fabric import Connection

from harness.errors import RemoteError
from harness.lab.remote import Remote, run_on_hosts


class FakeHost(Remote):
    def __init__(self, name: str, reachable: bool = True, start_takes: float = 0.0):
        super().__init__(Connection(name, user="u", port=22))
        self.reachable, self.start_takes = reachable, start_takes
        self.stopped: list[str] = []
        self.started: list[str] = []

    def sh(self, cmd, timeout=120, warn_only=False, hide=True):
        if not self.reachable:
            raise RemoteError(f"{self.name}: unreachable within 15s")
        if "setsid nohup" in cmd:
            time.sleep(self.start_takes)
            self.started.append(cmd)
        return None

    @property
    def root(self) -> str:
        return "/r"

    def stop_job(self, job: str) -> None:
        if not self.reachable:
            raise RemoteError(f"{self.name}: unreachable within 15s")
        self.stopped.append(job)


def run_and_interrupt(hosts: list[Remote], after_s: float) -> None:
    def body(r: Remote, i: int) -> int:
        if isinstance(r, FakeHost) and r.reachable:
            r.start_job(f"job{i}", ["run"])
        r.cancelled.wait(30)  # following the job's log, until the Ctrl-C
        return 0

    # Ctrl-C as at a terminal, even where pytest was started in the background (which ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            run_on_hosts(hosts, body)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_every_reachable_hosts_job_when_the_first_host_does_not_answer():
    dead, h1, h2 = FakeHost("dead", reachable=False), FakeHost("h1"), FakeHost("h2")
    dead.job = "job0"  # it had started, then the host went away
    run_and_interrupt([dead, h1, h2], 0.5)
    assert h1.stopped == ["job1"] and h2.stopped == ["job2"]


def test_a_start_under_way_when_ctrl_c_comes_is_stopped_once_started_and_no_later_start_happens():
    slow = FakeHost("slow", start_takes=1.5)  # Ctrl-C arrives while it starts its job
    late = FakeHost("late")
    late.cancelled.set()  # as a host whose start comes after the Ctrl-C
    with pytest.raises(RemoteError, match="not started: the run was interrupted"):
        late.start_job("job9", ["run"])
    run_and_interrupt([slow], 0.5)
    assert slow.started and slow.stopped == ["job0"]
