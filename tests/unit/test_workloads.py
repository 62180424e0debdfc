"""Workloads and hypotheses as plug-ins: the registries, the config's checks, each parser on what the real programs
printed (tests/data/selftests/), the guest's runner on real programs, and what a failed workload makes of its cell."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

from harness import REPO_ROOT, hypotheses
from harness.analysis import stats
from harness.config import load
from harness.errors import ConfigError, PressureError
from harness.guest.contract import WorkloadJob, WorkloadSpec
from harness.guest.records import WorkloadRun
from harness.guest.workload import Runner
from harness.guest.workloads import WORKLOADS, WorkloadError, get
from harness.run.checks import workload_shortfalls
from harness.run.schedule import check

RECORDED = REPO_ROOT / "tests" / "data" / "selftests"
SELFTEST = get("kvm-selftest")
COMMAND = get("command")


def parsed(test: str, name: str) -> dict[str, tuple[float, str, str]]:
    knobs = SELFTEST.params({"test": test})
    return {m.name: (m.value, m.unit, m.better) for m in SELFTEST.parse(knobs, (RECORDED / name).read_text())}


def test_the_registries_find_every_plug_in_by_name():
    assert {"kvm-selftest", "command"} <= set(WORKLOADS)
    assert {"kvm-mmu-shrinker", "eager-page-split"} <= set(hypotheses.HYPOTHESES)
    with pytest.raises(ValueError, match=r"known: .*command"):
        get("fio")


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("hypothesis=thp-collapse", "unknown hypothesis 'thp-collapse' \\(known: .*eager-page-split"),
        ('workload.runs=[{"kind": "fio"}]', "does not match any of the expected tags: 'command', 'kvm-selftest'"),
        ('workload.runs=[{"kind": "kvm-selftest", "level": "l2"}]', "kvm-selftest runs at kut, l1, not l2"),
        ('workload.runs=[{"kind": "kvm-selftest", "test": "../../bin/sh"}]', "is not a selftest's program name"),
        ('workload.runs=[{"kind": "command", "argv": []}]', "argv is empty"),
        ('workload.runs=[{"kind": "command", "argv": ["x"], "format": "regex"}]', "needs patterns"),
        ('workload.runs=[{"kind": "command", "argv": ["x"], "format": "regex", "patterns": {"a": "("}}]', "pattern"),
        ('workload.runs=[{"kind": "command", "argv": ["x"]}, {"kind": "command", "argv": ["y"]}]', "two entries"),
    ],
)
def test_validate_refuses_what_no_plug_in_can_run(override, said):
    with pytest.raises(ConfigError, match=said):
        load("eager-split-ab", [override])


def test_a_workload_that_does_not_fit_its_level_is_refused_before_anything_boots():
    exp = load("eager-split-ab", ['workload.runs=[{"kind": "kvm-selftest", "args": ["-b", "2G"]}]']).experiment
    with pytest.raises(PressureError, match="dirty-log-perf-test: 2048 MiB resident does not fit in kut"):
        check(exp, "nested")
    check(load("eager-split-ab").experiment, "nested")  # the shipped one fits


def test_dirty_log_perf_test_output_gives_every_time_it_printed():
    got = parsed("dirty_log_perf_test", "dirty_log_perf_test.out")
    assert got["Iteration 1 dirty memory time"] == (9.088003108, "s", "lower")
    assert got["Enabling dirty logging time"][0] == 0.001623871
    assert got["Get dirty log over 2 iterations"][0] == 0.245163737  # "... took 0.245s. (Avg ...)"
    assert len(got) == 8 and "Test iterations" not in got


def test_demand_paging_test_output_gives_its_rate_higher_is_better():
    got = parsed("demand_paging_test", "demand_paging_test.out")
    assert got["Overall demand paging rate"] == (1813.022354, "pages/s", "higher")
    assert got["Total guest execution time"] == (1.80368439, "s", "lower")


def test_a_selftest_that_failed_or_skipped_gives_no_metric():
    for test, name in (
        ("demand_paging_test", "demand_paging_test-u-missing.out"),
        ("access_tracking_perf_test", "access_tracking_perf_test.out"),
    ):
        with pytest.raises(WorkloadError, match="printed no figure"):
            parsed(test, name)
    knobs = SELFTEST.params({"test": "dirty_log_perf_test", "metrics": ["no such figure"]})
    with pytest.raises(WorkloadError, match="named \\['no such figure'\\]"):
        SELFTEST.parse(knobs, (RECORDED / "dirty_log_perf_test.out").read_text())


def test_resident_size_reads_the_memstress_flags_both_ways():
    size = SELFTEST.resident_mb
    assert size(SELFTEST.params({"args": ["-b", "256M", "-v", "2"]})) == 512
    assert size(SELFTEST.params({"args": ["-b256M", "-v2"]})) == 512
    assert size(SELFTEST.params({})) == 1024  # its defaults: 1 GiB, one vCPU
    assert size(SELFTEST.params({"test": "demand_paging_test", "args": ["-b", "64M", "-u", "MISSING"]})) == 128


def test_a_command_reads_json_lines_and_skips_the_rest():
    text = 'warming up\n{not json\n{"metric": "touch", "value": 3.5, "unit": "ms"}\n{"metric": "ops", "value": 9, '
    text += '"better": "higher"}\n{"metric": "bad", "value": true}\n{"metric": "nan", "value": NaN}\n[1]\n'
    got = COMMAND.parse(COMMAND.params({"argv": ["x"]}), text)
    assert [(m.name, m.value, m.unit, m.better) for m in got] == [
        ("touch", 3.5, "ms", "lower"),
        ("ops", 9.0, "", "higher"),
    ]
    with pytest.raises(WorkloadError, match="no metric in the jsonl form"):
        COMMAND.parse(COMMAND.params({"argv": ["x"]}), "hello\n")


def test_a_command_reads_named_expressions_the_last_match_counting():
    knobs = COMMAND.params(
        {
            "argv": ["x"],
            "format": "regex",
            "patterns": {"rate": r"rate=(?P<value>[0-9.]+)", "lat": r"lat (?P<value>\d+)us"},
            "units": {"lat": "us"},
            "higher_is_better": ["rate"],
        }
    )
    got = {m.name: (m.value, m.unit, m.better) for m in COMMAND.parse(knobs, "rate=1.5\nrate=2.5\nlat 40us\n")}
    assert got == {"rate": (2.5, "", "higher"), "lat": (40.0, "us", "lower")}


def _run(tmp_path, argv):
    job = WorkloadJob(
        spec=WorkloadSpec(name="w", kind="command", argv=argv, params={"argv": argv}, timeout_s=20),
        out=str(tmp_path),
        stop=str(tmp_path / "stop"),
    )
    return Runner(job).run_once(1)


def test_the_guest_runner_keeps_each_run_and_its_metrics(tmp_path):
    argv = [sys.executable, "-c", "import json; print(json.dumps({'metric': 'x', 'value': 2, 'unit': 'ms'}))"]
    run = _run(tmp_path, argv)
    assert run.status == 0 and run.error is None and [(m.name, m.value) for m in run.metrics] == [("x", 2.0)]
    assert (tmp_path / run.output).read_text().startswith('{"metric"')
    back = WorkloadRun.from_guest(json.loads(run.to_json()))  # what the host reads back
    assert back.metrics == run.metrics and back.t1 >= back.t0


def test_a_run_that_fails_or_says_nothing_names_why_with_its_last_lines(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('setting up'); sys.exit('uffd: Function not implemented')"]
    run = _run(tmp_path, argv)
    assert run.error == "exited with status 1" and "Function not implemented" in (run.tail or "")
    argv = [sys.executable, "-c", "print('all good, no numbers')"]
    run = _run(tmp_path, argv)
    assert run.status == 0 and "no metric" in (run.error or "") and "all good" in (run.tail or "")
    rows = pd.DataFrame(
        [{"workload": "w", "level": "kut", "guest": "kut", "run": 1, "error": run.error, "tail": run.tail}]
    )
    said = workload_shortfalls(rows, pd.DataFrame(columns=["workload", "phase"]), {"w": "kut", "never": "l1"})
    assert said[0].startswith("workload w (kut kut, run 1): its output holds no metric") and "all good" in said[0]
    assert said[1].startswith("workload never (l1): no run gave metrics inside a phase (0 run(s)")


def test_a_metric_that_is_better_higher_is_worse_when_it_falls():
    c = stats.compare(np.array([100.0, 101, 99]), np.array([50.0, 51, 49]))
    assert stats.verdict(c, better="higher")[0] == "worse" and stats.verdict(c)[0] == "better"


def test_a_selftest_the_source_lacks_is_refused_naming_its_version(tmp_path):
    from harness.errors import BuildError
    from harness.kernel import selftests

    kvm = tmp_path / "tree" / selftests.KVM
    (kvm / "x86_64").mkdir(parents=True)
    (kvm / "dirty_log_perf_test.c").write_text("")
    (kvm / "x86_64" / "nx_huge_pages_test.c").write_text("")
    assert selftests.source_of(tmp_path / "tree", "nx_huge_pages_test").as_posix() == "x86_64/nx_huge_pages_test.c"
    with pytest.raises(BuildError, match=r"Linux 6\.1\.192\) has no KVM selftest 'eager_split_test'.*dirty_log_perf"):
        selftests.build(tmp_path / "tree", ["eager_split_test"], tmp_path / "cache", 1, "variant mine", "6.1.192")
