"""Shared fixtures and helpers, and the tiers: tests/unit (no kernel, no ssh: the fast tier, `pytest tests/unit`),
tests/kernel (real kernels, QEMU; marked `kernel`), tests/lab (fab through a real sshd; marked `ssh`). Kernel
tests share one build cache per run (NESTPRESS_CACHE), so every test kernel is built once. Set
NESTPRESS_REQUIRE_KERNEL=1 (CI does) to turn a missing kernel source or QEMU into a failure instead of a skip."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT
from harness.config import load
from harness.kernel.build import Builder

TIERS = {"kernel": pytest.mark.kernel, "lab": pytest.mark.ssh}
SRC_61 = Path("/usr/src/linux-source-6.1.tar.xz")


def pytest_collection_modifyitems(items) -> None:
    """Every test of tests/kernel is a kernel test, every one of tests/lab an ssh test: -m selects by tier."""
    for item in items:
        tier = TIERS.get(Path(item.path).parent.name)
        if tier is not None:
            item.add_marker(tier)


SRC_612 = Path("/usr/src/linux-source-6.12.tar.xz")


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("NESTPRESS_REQUIRE_KERNEL"):
        pytest.fail(f"required for this run: {why}")
    pytest.skip(why)


def git(repo: Path, *args: str) -> str:
    """git in a test repository, as a committer of its own; its output."""
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


# L1's RAM on demand instead of resident from QEMU's start: 11 s less a boot here (measured). For runs whose evidence
# is the shrinker's calls and no global phase follows (a global hog would take what L1 did not, measured: +10 s)
L1_ON_DEMAND = "topology.l1.prealloc=false"
# A kernel under test of one vCPU, for runs whose evidence is counters, not a latency: `auto` runs its cells two at a
# time on 2 host CPUs, each pinned to one (the nested test's pair: 262 s against 508 s one at a time), and the
# emulator's freezes of a two-CPU kernel under test (docs/qemu-and-tcg.md; twice in the outcomes run) stay away
KUT_ONE_CPU = "topology.kut.cpus=1"


def sets(values: list[str]) -> list[str]:
    """--set for each override, as a user writes them on the command line."""
    return [a for v in values for a in ("--set", v)]


def mail_lines(run_dir: Path) -> list[str]:
    """report.txt's lines, each within a mail client's 72 columns (as it is pasted into a mail)."""
    lines = (run_dir / "report.txt").read_text().splitlines()
    assert lines and max(map(len, lines)) <= 72, max(lines, key=len, default="")
    return lines


def interruptible() -> None:
    """preexec_fn of a command a test sends SIGINT: Ctrl-C's default, as at a terminal. A shell that starts a job in
    the background (`pytest ... &`, nohup) makes it ignore SIGINT, and every process it starts inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def harness(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The harness's command line, as a user runs it (env: variables to set besides this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, COLUMNS="400", **(env or {})),  # lines unfolded, to be read back whole
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("NESTPRESS_CACHE") or tmp_path_factory.mktemp("nestpress-cache"))
    os.environ["NESTPRESS_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def src61() -> Path:
    require(SRC_61.exists(), f"{SRC_61} (apt-get install linux-source-6.1)")
    return SRC_61


@pytest.fixture(scope="session")
def src612() -> Path:
    require(SRC_612.exists(), f"{SRC_612} (apt-get install linux-source-6.12)")
    return SRC_612


@pytest.fixture(scope="session")
def qemu() -> str:
    q = shutil.which("qemu-system-x86_64")
    require(q is not None, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
    return str(q)


@pytest.fixture(scope="session")
def builds(src61, cache_dir):
    """Baseline and patched 6.1 kernels of the default experiment (built once per run, shared)."""
    exp = load("shrinker-ab").experiment
    return Builder(exp, cache_dir).build_all()


def assert_every_phase_delivered(evidence) -> None:
    """Every phase of both kernels delivered its pressure; shrinker-scan has nothing to scan on the patched one."""
    scan_on_patched = (evidence["variant"] == "patched") & (evidence["phase"] == "shrinker-scan")
    assert evidence.loc[scan_on_patched, "delivery"].eq("not applicable").all()
    why = evidence[["cell", "phase", "delivery_reason"]]
    assert evidence.loc[~scan_on_patched, "delivery"].eq("delivered").all(), why


def phase_row(evidence, variant: str, phase: str):
    """The one evidence row of a variant's phase (a run of one repetition)."""
    rows = evidence[(evidence["variant"] == variant) & (evidence["phase"] == phase)]
    assert len(rows) == 1, f"{variant}/{phase} missing from the evidence"
    return rows.iloc[0]
