"""A distribution's kernel as the kernel under test, the real thing: Debian's packaged 6.1 image and headers, KVM's
modules built from linux-source-6.1 for both variants, a module that does not match the image refused, and a boot
that loads ours and shows the patch's effect. (The pure parts: tests/unit/test_distro.py.)"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import KUT_ONE_CPU, L1_ON_DEMAND, harness, require, sets

from harness.analysis import analyze
from harness.config import load
from harness.errors import BuildError
from harness.kernel import distro
from harness.kernel.build import Builder
from harness.kernel.distro import DEBIAN

MMU = "arch/x86/kvm/mmu/mmu.c"


@pytest.fixture(scope="session")
def distro_builds(src61, cache_dir):
    require(bool(distro.installed_releases(DEBIAN)), "a Debian kernel image with its headers (fab setup)")
    exp = load("shrinker-ab-distro").experiment
    builder = Builder(exp, cache_dir)
    return builder.image(), builder.build_all()


@pytest.mark.kernel
def test_both_variants_build_only_kvm_modules_and_the_patched_one_recompiles_mmu_c(distro_builds):
    image, builds = distro_builds
    base, patched = builds["baseline"], builds["patched"]
    assert base.metadata.compiles <= 60  # KVM's modules, not a kernel (1 247 compiles)
    assert patched.metadata.kvm_sources_changed == [MMU] and patched.metadata.compiles <= 5
    theirs = image.path("modules") / "kernel/arch/x86/kvm/kvm.ko"
    for b in (base, patched):
        assert distro.modinfo(b.dir / "kvm.ko", "vermagic") == distro.modinfo(theirs, "vermagic")
        assert b.bzimage.read_bytes() == image.path("image").read_bytes()
        archive = b.initrd.read_bytes() if b.initrd else b""
        assert b"nestpress/kvm/kvm.ko" in archive and b"nestpress/boot/9p.ko" in archive
    assert b"mmu_shrink_scan" in (base.dir / "kvm.ko").read_bytes()
    assert b"mmu_shrink_scan" not in (patched.dir / "kvm.ko").read_bytes()


@pytest.mark.kernel
def test_modules_that_do_not_match_the_image_are_refused_naming_both_versions(distro_builds, tmp_path):
    image, builds = distro_builds
    b = builds["baseline"]
    kos = [b.dir / m for m in distro.KVM_MODULES]
    distro.check_abi(kos, b.dir / "Module.symvers", image)  # as built: accepted
    # built against other headers: one imported symbol's CRC differs from what the image exports
    sym, crc = next(iter(distro.imported_crcs(b.dir / "kvm.ko").items()))
    symvers = (image.path("headers") / "Module.symvers").read_text()
    other = tmp_path / "Module.symvers"
    other.write_text(symvers.replace(f"{crc:#010x}\t{sym}\t", f"{crc ^ 1:#010x}\t{sym}\t"))
    with pytest.raises(BuildError, match=rf"kvm.ko: {sym} built against CRC {crc:#010x}.*{image.release}"):
        distro.check_abi(kos, b.dir / "Module.symvers", image, symvers=other)
    # for another release: its vermagic
    data = (b.dir / "kvm.ko").read_bytes()
    magic = f"vermagic={image.release} ".encode()
    wrong = tmp_path / "kvm.ko"
    wrong.write_bytes(data.replace(magic, magic.replace(b"-amd64", b"-amd6X")))
    with pytest.raises(BuildError, match=r"kvm.ko: vermagic '.*-amd6X .*', the image's modules have"):
        distro.check_abi([wrong], b.dir / "Module.symvers", image)


SHORT = [
    "repetitions=1",
    "phases=[{name: steady, duration_s: 6}, {name: drop-caches, duration_s: 8, pressure: drop-caches}, "
    "{name: recovery, duration_s: 4}]",
    "workload.probe.size_mb=256",  # a first pass of seconds, not ~25 s: the evidence is the shrinker's calls
    L1_ON_DEMAND,
    KUT_ONE_CPU,
]


@pytest.mark.kernel
def test_the_distro_kernel_boots_our_modules_and_the_patch_takes_effect(distro_builds, qemu, tmp_path):
    image, _ = distro_builds
    config = "configs/shrinker-ab-distro.yaml"
    args = ["--config", config, "--run-id", "distro", "--output", str(tmp_path)]
    r = harness("experiment", *args, *sets(SHORT), timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = tmp_path / "shrinker-ab-distro" / "distro"
    report = analyze(run)
    cells = report.cells.set_index("variant")
    present = report.evidence.groupby("variant")["shrinker_present"].first()  # from kallsyms: no SHRINKER_DEBUG here
    assert present["baseline"] and not present["patched"]
    for v in ("baseline", "patched"):
        kmsg = (run / "cells" / f"{v}.r1" / "kmsg.log").read_text()
        assert "kvm: loading out-of-tree module taints kernel" in kmsg  # ours, not the image's (signed) kvm.ko
        params = json.loads(cells.loc[v, "kvm_params"])  # given to insmod from the command line by /init
        assert params["kvm_amd.nested"] == "1" and params["kvm_amd.npt"] == "N", params
    ev = report.evidence.set_index(["variant", "phase"])
    assert ev.loc[("baseline", "drop-caches"), "shrinker_calls"] > 0
    assert ev.loc[("baseline", "drop-caches"), "mmu_recycled"] > 0
    assert ev.loc[("patched", "drop-caches"), "shrinker_calls"] == 0
    assert ev.loc[("patched", "drop-caches"), "mmu_recycled"] == 0
    assert (ev["delivery"] == "delivered").all(), ev[["delivery", "delivery_reason"]]
    first_screen = (run / "report.md").read_text().split("## Verdict")[0]
    assert f"{image.release} ({image.package_version}) with KVM modules built" in first_screen
    clocks = report.frames["clocks"]  # the image's ptp_kvm, from the boot archive: L1 measures itself
    assert set(clocks.loc[clocks["level"] == "l1", "method"]) == {"ptp_kvm"}
    assert clocks["uncertainty_kut_ms"].max() <= 1.0


@pytest.mark.kernel
def test_a_cached_module_that_no_longer_matches_the_image_is_refused_before_anything_boots(
    distro_builds, cache_dir, tmp_path
):
    """As after an upgrade of the image in place: the cache's build is checked again before the run boots it."""
    image, builds = distro_builds
    cache = tmp_path / "cache"
    for d in ("src", "patches"):
        shutil.copytree(cache_dir / d, cache / d, copy_function=os.link)
    for b in builds.values():
        shutil.copytree(b.dir, cache / "builds" / b.dir.name)
    ko = cache / "builds" / builds["baseline"].dir.name / "kvm.ko"
    magic = f"vermagic={image.release} ".encode()
    ko.write_bytes(ko.read_bytes().replace(magic, magic.replace(b"-amd64", b"-amd6X")))
    r = harness(
        "run", "--config", "shrinker-ab-distro", "--output", str(tmp_path / "out"), env={"NESTPRESS_CACHE": str(cache)}
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "KVM modules do not match" in out and "amd6X" in out, out[-2000:]
    assert not list((tmp_path / "out").rglob("console.log"))  # nothing booted
