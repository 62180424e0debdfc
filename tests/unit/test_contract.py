"""The host-guest contract: what the host writes, a guest reads back the same, typed and checked."""

import json
import re
import subprocess
import sys

import pytest

from harness.config import load
from harness.guest.contract import (
    ContractError,
    ExitKind,
    ExitRecord,
    GuestPlan,
    ProbeJob,
    ProbeSpec,
    Schedule,
)
from harness.run.schedule import conductor_schedule


def test_schedule_round_trips_with_its_modes():
    exp = load("shrinker-ab").experiment
    schedule = conductor_schedule(exp, 240, 1)
    back = Schedule.from_dict(json.loads(schedule.to_json()))
    assert back == schedule
    assert [p.mode for p in back.phases][:4] == ["none", "memcg-limit", "none", "global"]
    assert back.pressure["global"]["overshoot_mb"] == exp.pressure.knobs("global").overshoot_mb


def test_a_plan_of_another_version_is_refused_with_both_versions():
    data = GuestPlan(name="kut", level="kut", run_id="r").to_dict()
    data["version"] = 99
    with pytest.raises(ContractError, match=r"version 99.*speaks version 1"):
        GuestPlan.from_dict(data)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"bogus": 1}, r"unknown field\(s\) \['bogus'\]"),
        ({"run_id": 7}, "run_id: expected str, got int"),
        ({"children": [{"name": "l1-0"}]}, "missing field 'export' of ChildSpec"),
        ({"schedule": {"phases": [{"name": "p", "duration_s": 1, "mode": "gobal"}]}}, "'gobal' is not one of"),
    ],
)
def test_a_malformed_plan_says_which_field(change, says):
    data = dict(GuestPlan(name="kut", level="kut", run_id="r").to_dict(), **change)
    with pytest.raises(ContractError, match=says):
        GuestPlan.from_dict(data)


def test_probe_job_and_exit_record_files(tmp_path):
    job = ProbeJob(
        spec=ProbeSpec(size_mb=8, access="write", pattern="random", stride=4096, interval_s=1.0),
        out="/o/probe.jsonl",
        status="/o/probe.status",
        stop="/o/stop",
    )
    assert ProbeJob.from_dict(json.loads(job.to_json())) == job
    record = ExitRecord(
        status=1, kind=ExitKind.PREFLIGHT, error="Traceback ...", message="PreflightError: no cgroup", t=1
    )
    record.save(str(tmp_path / "exit.json"))
    assert ExitRecord.load(str(tmp_path / "exit.json")).kind is ExitKind.PREFLIGHT
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ContractError, match="not JSON"):
        ExitRecord.load(str(tmp_path / "bad.json"))


def test_child_gets_the_refined_tsc_rate_only_when_this_kernel_refined_it():
    from harness.guest.agent import pin_child_tsc

    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "512"]
    refined = (
        "[    0.080000] tsc: Detected 2593.307 MHz processor\n"
        "[    1.600957] tsc: Refined TSC clocksource calibration: 2596.152 MHz\n"
    )
    assert pin_child_tsc(argv, refined)[4] == "host,tsc-frequency=2596152000"
    assert pin_child_tsc(argv, refined)[:4] == argv[:4] and pin_child_tsc(argv, refined)[5:] == argv[5:]
    assert pin_child_tsc(argv, "[    0.000000] tsc: Detected 2596.120 MHz processor\n") == argv
    assert pin_child_tsc(["q", "-cpu", "max"], refined) == ["q", "-cpu", "max"]


def test_harness_process_locks_itself_in_memory():
    code = (
        "from harness.guest.supervise import lock_in_memory; assert lock_in_memory() is None; "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmLck')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[1]) > 0


@pytest.mark.parametrize(
    "outlier, says",
    [([5, True], "outliers[0][1]: expected int, got bool"), ([5, 2**70], "outliers[0][1]: 1180591620717411303424 is")],
)
def test_a_list_of_numbers_is_checked_item_by_item_and_the_wrong_one_named(outlier, says):
    """Outliers [t, latency] read at once where every item is a plain int in range; a bool or a number past any
    measurement is refused, named by its place."""
    from harness.guest.records import ProbeHist

    ok = ProbeHist.from_guest({"t0": 1, "t1": 2, "counts": {"3": 4}, "outliers": [[5, 6], [7, 8]]})
    assert ok.outliers == [[5, 6], [7, 8]]
    with pytest.raises(ContractError, match=re.escape(says)):
        ProbeHist.from_guest({"t0": 1, "t1": 2, "counts": {}, "outliers": [[5, 6], outlier][::-1]})
