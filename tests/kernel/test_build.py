"""A real kernel build through the cache: artifacts, the cache hit, reuse by the patched variant, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interruptible

from harness import REPO_ROOT
from harness.config import load
from harness.errors import KconfigError, MissingTool
from harness.kernel.build import Builder
from harness.run.schedule import check_kernel

pytestmark = pytest.mark.kernel


def test_artifacts_and_metadata(builds):
    for b in builds.values():
        meta = json.loads((b.dir / "metadata.json").read_text())
        assert meta["status"] == "complete" and meta["kernelrelease"].startswith("6.1.")
        for f in ("bzImage", "config", "System.map", "build.log"):
            assert (b.dir / f).stat().st_size > 0
        assert meta["reproducer"].startswith("make -C ") and meta["inputs"]["compiler"]
    assert builds["baseline"].key != builds["patched"].key
    assert builds["patched"].metadata.about.patch_variant == "v6.0-6.6"
    # the patch took effect in the built kernel: the shrinker's functions are gone from System.map
    assert " mmu_shrink_scan" in (builds["baseline"].dir / "System.map").read_text()
    assert " mmu_shrink_scan" not in (builds["patched"].dir / "System.map").read_text()
    for name, b in builds.items():  # the real kernels carry everything the default schedule uses
        check_kernel(load("shrinker-ab").experiment, name, b.dir / "config")


def test_patched_build_reused_baseline_objects(builds):
    meta = builds["patched"].metadata
    if builds["patched"].cached:
        pytest.skip("patched kernel came from the cache of an earlier run; its metadata below still holds")
    assert (meta.compiles or 0) < 40, f"patched build recompiled {meta.compiles} files"


def test_second_build_compiles_nothing(builds, cache_dir):
    t0 = time.monotonic()
    again = Builder(load("shrinker-ab").experiment, cache_dir).build_all()
    assert all(b.cached for b in again.values())
    assert {n: b.key for n, b in again.items()} == {n: b.key for n, b in builds.items()}
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("killed_while", ["applying", "reverting"])
def test_a_build_killed_while_changing_patches_is_undone_not_built_as_the_other_variant(
    builds, cache_dir, killed_while
):
    from harness.kernel.build import AppliedState
    from harness.kernel.patches import _git_apply
    from harness.util import write_json

    builder = Builder(load("shrinker-ab").experiment, cache_dir)
    baseline, patched = builder.resolved()["baseline"], builder.resolved()["patched"]
    tree = Path(builds["baseline"].metadata.tree)
    state = tree / ".nestpress-applied.json"
    want = AppliedState(
        result=patched.trial.result_id,
        patches=[str(p.path) for p in patched.patches],
        touched=list(patched.trial.touched),
        removed=list(patched.expect.removed),
    )
    builder._checkout(tree, patched if killed_while == "reverting" else baseline)
    # the kill: the change was recorded, the first patch is in (applying) or still in (reverting), nothing else
    write_json(state, AppliedState(changing=[want]).model_dump())
    if killed_while == "applying":
        assert _git_apply(tree, patched.patches[0].path).returncode == 0
    mmu = tree / "arch/x86/kvm/mmu/mmu.c"
    assert "mmu_shrink_scan" not in mmu.read_text()  # half patched, state unknown to a naive build
    builder._checkout(tree, baseline)
    assert "mmu_shrink_scan" in mmu.read_text() and not state.exists()  # pristine again, as baseline must be
    builder._checkout(tree, patched)
    assert "mmu_shrink_scan" not in mmu.read_text() and json.loads(state.read_text()) == want.model_dump()


def test_fragment_option_unknown_to_the_kernel_is_named(builds, cache_dir, tmp_path):
    frag = tmp_path / "bad.config"
    frag.write_text("CONFIG_NESTPRESS_DOES_NOT_EXIST=y\n")
    exp = load("shrinker-ab", [f"kernel_config.fragments=[kernel/kvm-host.config, {frag}]"]).experiment
    with pytest.raises(KconfigError, match="CONFIG_NESTPRESS_DOES_NOT_EXIST=y"):
        Builder(exp, cache_dir).build(exp.variants[0])


def test_missing_build_tool_names_the_package(builds, cache_dir, tmp_path, monkeypatch):
    frag = tmp_path / "other.config"
    frag.write_text("CONFIG_PRINTK_TIME=y\n")
    exp = load("shrinker-ab", [f"kernel_config.fragments=[kernel/kvm-host.config, {frag}]"]).experiment
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no flex, bison, make ...
    with pytest.raises(MissingTool, match="install the Debian package"):
        Builder(exp, cache_dir).build(exp.variants[0])


def test_ctrl_c_during_build_keeps_nothing_in_the_cache(builds, cache_dir, tmp_path):
    frag = tmp_path / "interrupt.config"
    frag.write_text("CONFIG_PRINTK_TIME=y\n")
    cfg = ["--config", "shrinker-ab", "--set", f"kernel_config.fragments=[kernel/kvm-host.config, {frag}]"]
    before = set((cache_dir / "builds").iterdir())
    p = subprocess.Popen(
        [sys.executable, "-m", "harness", "build", *cfg],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, NESTPRESS_CACHE=str(cache_dir)),
        preexec_fn=interruptible,
    )
    deadline = time.monotonic() + 300
    work = None
    while time.monotonic() < deadline and work is None:  # wait until this build is under way
        time.sleep(1)
        for m in (cache_dir / "work").glob("*/*/metadata.json"):
            meta = json.loads(m.read_text())
            if meta["status"] == "running" and str(frag) in meta["inputs"]["fragments"]:
                work = m
    time.sleep(8)  # into configure/make
    assert work is not None, "build never started"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "interrupted" in out
    assert set((cache_dir / "builds").iterdir()) == before  # no (half-)artifact appeared
    assert not list((cache_dir / "builds").glob(".*.tmp-*"))
    assert json.loads(work.read_text())["status"] == "interrupted"
