"""Bisect's logic without a kernel: the search finds any first bad commit in at most ceil(log2 n) steps and steps
around skipped ones; the criteria read and decide as the A/B would; bad input is refused before anything builds,
naming what is wrong; the log it writes is one `git bisect replay` takes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import git, harness

from harness.bisect.driver import make_plan
from harness.bisect.judge import Judge, Reading, label_matches
from harness.bisect.outputs import Answer, Step, git_log
from harness.bisect.search import Search
from harness.bisect.steps import Measured
from harness.commands import Request
from harness.config.bisect import Criterion
from harness.errors import ConfigError, HarnessError


@pytest.mark.parametrize("n", range(2, 34))
def test_the_search_finds_any_first_bad_commit_in_at_most_ceil_log2_steps(n):
    for first_bad in range(1, n):
        s = Search(n, {0: "good", n - 1: "bad"})
        steps = 0
        while (i := s.next()) is not None:
            s.mark(i, "bad" if i >= first_bad else "good")
            steps += 1
        assert s.first_bad() == [first_bad] and steps <= s.most_steps()
        assert 2 ** s.most_steps() >= n - 1 > 2 ** (s.most_steps() - 1) or n <= 2


def test_skipped_commits_are_stepped_around_and_leave_the_stretch_they_hide():
    s = Search(9, {0: "good", 8: "bad"})
    assert s.next() == 4
    s.mark(4, "skip")
    assert s.next() == 3  # the untried one nearest the middle, the lower of two
    s.mark(3, "good")
    s.mark(5, "skip")
    s.mark(6, "skip")
    s.mark(7, "bad")
    assert s.next() is None and s.first_bad() == [4, 5, 6, 7]


def test_criteria_spelled_on_the_command_line():
    assert Criterion.parse("hypothesis") == Criterion()
    m = Criterion.parse("metric:global:l1:touch p99.9")
    assert (m.kind, m.phase, m.level, m.metric) == ("metric", "global", "l1", "touch p99.9")
    e = Criterion.parse("evidence:drop-caches:shrinker_calls>2")
    assert (e.kind, e.phase, e.counter, e.above) == ("evidence", "drop-caches", "shrinker_calls", 2)
    assert e.slug() == "evidence-drop-caches-shrinker_calls-above-2"
    for bad in ("metric:global:l1", "evidence:global", "latency", "metric:global:l3:touch p99", "evidence:G:x"):
        with pytest.raises(ConfigError, match="--criterion"):
            Criterion.parse(bad)
    assert label_matches("touch p99.9 (us)", "touch p99.9") and not label_matches("touch p99.9 (us)", "touch p99")


def reading(*values: float) -> Reading:
    return Reading(boots=len(values), values=list(values))


def test_a_metric_is_decided_by_the_ab_statistics_and_undecided_between_the_ends():
    crit = Criterion.parse("metric:drop-caches:l1:touch p99.9")
    j = Judge(crit, reading(1000, 1100, 1050), reading(100, 110, 104))
    assert j.ends().mark == "bad" and j.sign == -1
    assert j.step(reading(990, 1080, 1040)).mark == "good"
    assert j.step(reading(98, 112, 101)).mark == "bad"
    assert j.step(reading(320, 330, 310)).mark is None  # differs from both ends: more boots, or skip
    same = Judge(crit, reading(1000, 1100, 1050), reading(990, 1080, 1040))
    assert same.ends().mark is None  # the ends do not differ (yet)


def test_evidence_and_the_hypothesis_are_decided_by_most_boots():
    e = Judge(Criterion.parse("evidence:drop-caches:shrinker_calls"), reading(12), reading(0))
    assert e.ends().mark == "bad" and "present" in e.ends().said
    assert e.step(reading(7)).mark == "good" and e.step(reading(0)).mark == "bad"
    assert e.step(reading(3, 0)).mark is None
    h = Judge(Criterion(), reading(1, 1), reading(0, 0))
    assert h.ends().mark == "bad" and h.step(reading(1, 0, 1)).mark == "good"
    assert Judge(Criterion(), reading(1), reading(1)).ends().mark == "good"  # they do not differ: nothing to find


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Six commits of text: enough history for the refusals and the log."""
    r = tmp_path_factory.mktemp("repo")
    git(r, "init", "-q", "-b", "main")
    for i in range(6):
        (r / "f").write_text(f"{i}\n")
        git(r, "add", "f")
        git(r, "commit", "-qm", f"change {i}")
        git(r, "tag", f"c{i}")
    return r


def plan_of(repo: Path, good: str, bad: str, *sets: str, criterion: str | None = None):
    given = [f"source={{kind: git, url: {repo}, ref: c0}}", "variants=[{name: baseline}]", *sets]
    return make_plan(Request("bisect", config="shrinker-ab", sets=given, good=good, bad=bad, criterion=criterion))


def test_bad_input_is_refused_before_anything_builds_naming_what_is_wrong(repo):
    refusals = [
        (("nope", "c5"), (), None, "ref 'nope' not found"),
        (("c5", "c1"), (), None, r"--good c5 \(\w+\) is not an ancestor of --bad c1"),
        (("c2", "c2"), (), None, "are the same commit"),
        (("c0", "c5"), (), "metric:nowhere:l1:touch p99", "no phase 'nowhere'"),
        (("c0", "c5"), (), "metric:global:l2:touch p99", "nothing is measured at level l2"),
        (("c0", "c5"), (), "metric:global:l1:touch p42", "the probe has no metric 'touch p42'"),
        (("c0", "c5"), ("phases=[{name: steady, duration_s: 5}]",), None, "needs a pressure phase"),
        (("c0", "c5"), ("variants=[{name: b, git: {ref: c3}}]",), None, "may not name git or a source"),
    ]
    for (good, bad), sets, crit, said in refusals:
        sets = (*sets, "workload.probe.levels=[l1]")
        with pytest.raises(HarnessError, match=said):
            plan_of(repo, good, bad, *sets, criterion=crit)
    r = harness("bisect", "--config", "shrinker-ab", "--good", "v0", "--bad", "v1")
    assert r.returncode == 2 and "bisect walks a git history: shrinker-ab's source is a tarball" in r.stdout + r.stderr


def test_the_log_is_one_git_bisect_replays_to_the_same_first_bad_commit(repo, tmp_path):
    plan = plan_of(repo, "c0", "c5", "workload.probe.levels=[l1]")
    line = plan.history.line
    assert [c.subject for c in line] == [f"change {i}" for i in range(6)] and plan.history.bad == line[-1]
    for marks, first, said in (
        ({0: "good", 5: "bad", 2: "good", 3: "bad"}, [3], f"{line[3].sha} is the first bad commit"),
        ({0: "good", 5: "bad", 2: "good", 3: "skip", 4: "bad"}, [3, 4], "only 'skip'ped commits left to test"),
    ):
        steps = [Step(n, i, m, "", Measured(line[i], tmp_path, 1, Reading())) for n, (i, m) in enumerate(marks.items())]
        (tmp_path / "bisect.log").write_text(git_log(plan, steps, Answer([line[i] for i in first])))
        replay = subprocess.run(
            ["git", "-C", str(repo), "bisect", "replay", str(tmp_path / "bisect.log")], capture_output=True, text=True
        )
        git(repo, "bisect", "reset")
        assert said in replay.stdout and all(line[i].sha in replay.stdout for i in first), replay.stdout


def test_a_commit_is_the_first_variant_at_that_commit_built_as_the_diff_from_good_with_the_bisect_schedule(repo):
    sets = [
        "variants=[{name: tree, cmdline: [quiet]}]",
        "bisect.phases=[{name: dc, duration_s: 3, pressure: drop-caches}]",
    ]
    plan = plan_of(repo, "c1", "c4", *sets, "workload.probe.levels=[l1]")
    good, later = plan.history.good, plan.history.line[2]
    raw = plan.raw_for(later, 2)
    assert raw["variants"] == [{"name": later.short, "cmdline": ["quiet"], "git": {"ref": later.sha}}]
    assert raw["source"]["ref"] == good.sha and raw["repetitions"] == 2 and "bisect" not in raw
    assert raw["phases"] == [{"name": "dc", "duration_s": 3, "pressure": "drop-caches"}]
    assert plan.raw_for(good, 1)["variants"] == [{"name": good.short, "cmdline": ["quiet"]}]
    # a commit's boots do not depend on what judges them: another criterion reads the same runs
    other = plan_of(repo, "c1", "c4", *sets, "workload.probe.levels=[l1]", criterion="evidence:dc:shrinker_calls")
    assert other.schedule_key() == plan.schedule_key() and other.out != plan.out
    assert plan_of(repo, "c1", "c4", "workload.probe.levels=[l1]").schedule_key() != plan.schedule_key()
