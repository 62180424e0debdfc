"""Bisect on the real Debian 6.1 kernel: a history of six commits on its source, one of which removes the x86-mmu
shrinker (the series' patch), the others harmless (documentation, comments in compiled code, a selftest note).
`bisect` names that commit by evidence (the shrinker's calls under drop-caches) in at most ceil(log2 n) steps, its
log replays with `git bisect`, the same command resumes without booting anything again, and by a latency metric
(L1's touch p99.9 under drop-caches, decided by the A/B's statistics) it finds the same commit, from the boots the
first bisection measured and one more of each."""

from __future__ import annotations

import subprocess

import matplotlib.image as mpimg
import pandas as pd
import pytest
from conftest import git, harness

from harness import REPO_ROOT
from harness.config import load
from harness.kernel.source import prepare

pytestmark = pytest.mark.kernel

REMOVAL = REPO_ROOT / "patches/shrinker-removal/v6.0-6.6/0001-KVM-x86-mmu-Remove-KVM-memory-shrinker.patch"
SUBJECT = "KVM: x86/mmu: Remove KVM memory shrinker"
HARMLESS = {  # position on the line -> (file, what is appended, subject)
    1: ("Documentation/virt/kvm/locking.rst", "\n.. a note\n", "docs: kvm: a note on locking"),
    2: ("virt/kvm/kvm_main.c", "\n/* a comment */\n", "KVM: a comment in kvm_main.c"),
    4: ("tools/testing/selftests/kvm/NOTES", "selftests notes\n", "KVM: selftests: notes"),
    5: ("arch/x86/kvm/x86.c", "\n/* another comment */\n", "KVM: x86: a comment in x86.c"),
}


def own_copy(path) -> None:
    """The tree is hard-linked to the pristine source: a file about to change gets an inode of its own first."""
    if path.exists():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)


@pytest.fixture(scope="module")
def history(builds, cache_dir, tmp_path_factory):
    """good (the 6.1 source), five commits after it, the removal third; tags good and bad at the ends."""
    pristine = prepare(load("shrinker-ab").experiment.source, cache_dir).tree
    repo = tmp_path_factory.mktemp("linux")
    subprocess.run(["cp", "-al", f"{pristine}/.", str(repo)], check=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "core.looseCompression=1", "add", "-A")
    git(repo, "commit", "-qm", "Linux 6.1 (Debian's source)")
    git(repo, "tag", "good")
    for i in range(1, 6):
        if i == 3:
            own_copy(repo / "arch/x86/kvm/mmu/mmu.c")
            git(repo, "apply", str(REMOVAL))
            subject = SUBJECT
        else:
            name, text, subject = HARMLESS[i]
            own_copy(repo / name)
            with open(repo / name, "a") as f:
                f.write(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", subject)
    git(repo, "tag", "bad")
    return repo, git(repo, "rev-parse", "HEAD~2").strip()


def bisect(repo, out, *more: str):
    r = harness("bisect", "--config", "shrinker-bisect", "--good", "good", "--bad", "bad", "--output", str(out),
                "--set", f"source.url={repo}", *more, timeout=3000)  # fmt: skip
    print(r.stdout[-6000:], r.stderr[-6000:])
    return r


@pytest.fixture(scope="module")
def by_evidence(history, tmp_path_factory):
    repo, _ = history
    out = tmp_path_factory.mktemp("results")
    return bisect(repo, out), out / "shrinker-bisect" / "bisect-good-bad"


def test_bisect_by_evidence_names_the_commit_that_removed_the_shrinker_in_ceil_log2_steps(history, by_evidence):
    (repo, removal), (r, folder) = history, by_evidence
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"{removal} {SUBJECT}"  # the command's last line: id and subject
    mine = folder / "evidence-drop-caches-shrinker_calls"
    assert (mine / "report.txt").read_text().splitlines()[0] == (
        f"first commit that changed shrinker_calls > 0 in drop-caches: {removal[:12]} {SUBJECT}"
    )
    steps = pd.read_csv(mine / "steps.csv")
    assert len(steps[steps["step"] > 0]) <= 3  # five commits after good: ceil(log2 5)
    ends = steps[steps["step"] == 0].set_index("mark")
    assert float(ends.loc["good", "values"]) > 0 and float(ends.loc["bad", "values"]) == 0
    assert set(steps["mark"]) <= {"good", "bad"} and (steps["boots"] == 1).all()
    assert steps.loc[steps["commit"] == removal, "mark"].tolist() == ["bad"]
    assert mpimg.imread(mine / "criterion.png").shape[0] > 100
    replay = subprocess.run(["git", "-C", str(repo), "bisect", "replay", str(mine / "bisect.log")], capture_output=True,
                            text=True)  # fmt: skip
    git(repo, "bisect", "reset")
    assert f"{removal} is the first bad commit" in replay.stdout, replay.stdout + replay.stderr


def test_the_same_command_resumes_without_booting_again(history, by_evidence):
    repo, removal = history
    r = bisect(repo, by_evidence[1].parent.parent)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == f"{removal} {SUBJECT}"
    steps = pd.read_csv(by_evidence[1] / "evidence-drop-caches-shrinker_calls" / "steps.csv")
    assert (steps["new_boots"] == 0).all() and "booting guests" not in r.stderr


def test_bisect_by_a_latency_metric_finds_the_same_commit(history, by_evidence):
    repo, removal = history
    metric = "metric:drop-caches:l1:touch p99.9"
    r = bisect(repo, by_evidence[1].parent.parent, "--criterion", metric, "--set", "bisect.repetitions=2",
               "--set", "bisect.max_repetitions=3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"{removal} {SUBJECT}"
    steps = pd.read_csv(by_evidence[1] / "metric-drop-caches-l1-touch-p99.9" / "steps.csv")
    ends = steps[steps["step"] == 0].set_index("mark")
    good, bad = (pd.Series(ends.loc[m, "values"].split(";"), dtype=float) for m in ("good", "bad"))
    assert bad.max() < good.min()  # removing the shrinker lowered the tail: no zaps to refault from
    assert (steps["boots"] >= 2).all() and steps["new_boots"].min() >= 1  # each commit one more boot at least
