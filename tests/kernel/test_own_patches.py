"""A user's own change on the real Debian 6.1 kernel: patch files, an mbox and a git range build (from the cache,
or incrementally on the baseline's objects); a patch for another kernel is refused before anything builds;
variants with their own sources validate each on its own; variants that differ in parameters share one
kernel, boot with their own parameters, and a parameter the kernel does not take fails its cell."""

from __future__ import annotations

import json

import pytest
from conftest import KUT_ONE_CPU, L1_ON_DEMAND, git, harness, sets

from harness import REPO_ROOT
from harness.analysis import analyze
from harness.config import load
from harness.kernel.build import Builder
from harness.kernel.patches import split_mbox
from harness.kernel.source import prepare
from harness.results.manifest import Manifest

pytestmark = pytest.mark.kernel

EXAMPLES = REPO_ROOT / "configs/examples"
MBOX = EXAMPLES / "shrinker-removal-in-two.mbox"
MMU = "arch/x86/kvm/mmu/mmu.c"


def test_the_series_as_a_file_an_mbox_or_a_git_range_is_the_series_build_from_the_cache(
    builds, cache_dir, src61, tmp_path
):
    patched = builds["patched"]
    for example, name in (("own-patch", "my-change"), ("mbox", "in-two-steps")):
        b = Builder(load(EXAMPLES / f"{example}.yaml").experiment, cache_dir).build(
            load(EXAMPLES / f"{example}.yaml").experiment.variant(name)
        )
        assert b.cached and b.key == patched.key, example
    # a topic branch holding the mbox's two commits on the pristine mmu.c
    repo = tmp_path / "kvm"
    (repo / MMU).parent.mkdir(parents=True)
    (repo / MMU).write_bytes((prepare(load("shrinker-ab").experiment.source, cache_dir).tree / MMU).read_bytes())
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "6.1.192")
    git(repo, "tag", "base")
    for i, (subject, text) in enumerate(split_mbox(MBOX)):
        (tmp_path / f"{i}.patch").write_text(text)
        git(repo, "apply", str(tmp_path / f"{i}.patch"))
        git(repo, "commit", "-qam", subject)
    overrides = [f"source={{kind: tarball, path: {src61}}}", f"variants.topic.git.repo={repo}"]
    overrides += ["variants.topic.git.range=base..HEAD"]
    r = harness("validate", "--config", str(EXAMPLES / "git-range.yaml"), *sets(overrides))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("    patch ") == 2 and "Drop the global count of shadow pages" in r.stdout
    exp = load(EXAMPLES / "git-range.yaml", overrides).experiment
    b = Builder(exp, cache_dir).build(exp.variant("topic"))
    assert b.cached and b.key == patched.key
    assert [o.split(" (")[0] for o in b.metadata.about.patches] == [
        f"git {sha}" for sha in git(repo, "rev-list", "--reverse", "base..HEAD").split()
    ]


def test_an_own_patch_builds_incrementally_on_the_baseline_and_takes_effect(builds, cache_dir, tmp_path):
    first = tmp_path / "0001-stop-registering.patch"
    first.write_text(split_mbox(MBOX)[0][1])
    variants = (
        "variants=[{name: baseline}, {name: step-one, patches: ["
        + str(first)
        + "], expect_removed: [mmu_shrink_scan], expect_present: [kvm_total_used_mmu_pages]}]"
    )
    exp = load("shrinker-ab", [variants]).experiment
    b = Builder(exp, cache_dir).build(exp.variant("step-one"))
    assert b.key not in {x.key for x in builds.values()}
    if not b.cached:
        assert b.metadata.compiles < 40, b.metadata.compiles
        print(f"step-one: {b.metadata.duration_s:.0f} s, {b.metadata.compiles} compiles")
    symbols = (b.dir / "System.map").read_text()
    assert " mmu_shrink_scan" not in symbols and " kvm_total_used_mmu_pages" in symbols
    assert b.metadata.about.evidence == [
        f"'mmu_shrink_scan' removed from {MMU}",
        f"'kvm_total_used_mmu_pages' in {MMU}",
    ]


def test_a_patch_for_another_kernel_is_refused_by_validate_naming_variant_patch_and_hunk(src61, cache_dir):
    other = REPO_ROOT / "patches/shrinker-removal/v6.7-6.12/0001-KVM-x86-mmu-Remove-KVM-memory-shrinker.patch"
    before = set((cache_dir / "builds").iterdir()) if (cache_dir / "builds").exists() else set()
    r = harness(
        "validate", "--config", "shrinker-ab", "--set", f"variants=[{{name: b}}, {{name: mine, patches: [{other}]}}]"
    )
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert "variant mine" in err and f"{other}" in err and f"{MMU}, hunk #" in err, err[-2000:]
    after = set((cache_dir / "builds").iterdir()) if (cache_dir / "builds").exists() else set()
    assert after == before


def test_variants_with_their_own_sources_validate_each_on_its_own(src612, cache_dir, tmp_path):
    upstream = tmp_path / "linux"
    (upstream / MMU).parent.mkdir(parents=True)
    (upstream / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 13\nSUBLEVEL = 0\nEXTRAVERSION =\n")
    (upstream / MMU).write_text("/* the shrinker is gone upstream */\n")
    git(upstream, "init", "-q")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-qm", "v6.13")
    git(upstream, "tag", "v6.13")
    r = harness(
        "validate",
        "--config",
        str(EXAMPLES / "upstream-vs-port.yaml"),
        "--set",
        f"variants.upstream.source.url={upstream}",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "variant baseline: /usr/src/linux-source-6.12.tar.xz (6.12." in out
    assert "series shrinker-removal v6.7-6.12" in out
    assert f"variant upstream: {upstream}@v6.13" in out and "(6.13.0)" in out and "shares nothing" in out


PARAMS = [
    "topology.kind=shadow",
    "repetitions=1",
    "workload.probe.size_mb=256",
    L1_ON_DEMAND,
    KUT_ONE_CPU,
    "phases=[{name: steady, duration_s: 4}, {name: rest, duration_s: 4}]",
    "boot.retries=0",
    "variants.no-mmio-caching.cmdline=[kvm.mmio_caching=0]",
]


def test_variants_that_differ_in_parameters_share_one_kernel_and_boot_with_their_own(builds, qemu, tmp_path):
    typo = (
        "variants=[{name: baseline}, {name: legacy-tdp-mmu, module_params: {kvm: {tdp_mmu: false}}}, "
        "{name: no-mmio-caching}, {name: typo, module_params: {kvm: {tdp_mmuu: 0}}}]"
    )
    overrides = [typo, *PARAMS]
    r = harness(
        "experiment",
        "--config",
        str(EXAMPLES / "kvm-params.yaml"),
        "--run-id",
        "params",
        "--output",
        str(tmp_path),
        *sets(overrides),
        timeout=1800,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]  # the typo's cell failed; the others are complete
    run = tmp_path / "kvm-params" / "params"
    m = Manifest.load(run / "manifest.json")
    assert len({b.key for b in m.builds.values()}) == 1 and m.builds["baseline"].key == builds["baseline"].key
    assert m.builds["legacy-tdp-mmu"].kernel_params == ["kvm.tdp_mmu=N"]
    report = analyze(run)
    cells = report.cells.set_index("variant")
    params = {v: json.loads(cells.loc[v, "kvm_params"]) for v in ("baseline", "legacy-tdp-mmu", "no-mmio-caching")}
    assert params["baseline"]["kvm.tdp_mmu"] == "Y" and params["baseline"]["kvm.mmio_caching"] == "Y"
    assert params["legacy-tdp-mmu"]["kvm.tdp_mmu"] == "N" and params["no-mmio-caching"]["kvm.mmio_caching"] == "N"
    assert cells.loc["typo", "status"] == "failed"
    assert (
        "module parameter kvm.tdp_mmuu: asked 0, the kernel under test has (no such parameter)"
        in cells.loc["typo", "errors"]
    )
    assert set(report.ab["variant"]) >= {"legacy-tdp-mmu", "no-mmio-caching"}  # each compared with the baseline
    first_screen = (run / "report.md").read_text().split("## Verdict")[0]
    assert "`legacy-tdp-mmu` (6.1.192, no patches, boots with kvm.tdp_mmu=N)" in first_screen
