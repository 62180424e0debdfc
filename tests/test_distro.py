"""A distribution's kernel as the kernel under test (harness/distro.py): the pure parts on made-up trees and images
(fast), then the real thing: Debian's packaged 6.1 image and headers, KVM's modules built from linux-source-6.1
for both variants, a module that does not match the image refused, and a boot that loads ours and shows the
patch's effect."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import harness, require

from harness.config import DistroKernel, Experiment, load
from harness.errors import BuildError, PressureError, SourceError
from harness.kernel import distro
from harness.kernel.build import Builder
from harness.kernel.distro import DEBIAN, Distro, DistroImage
from harness.kernel.source import KernelVersion
from harness.machine.qemu import GuestSpec, kernel_cmdline
from harness.report import analyze
from harness.run.schedule import check_kernel

MMU = "arch/x86/kvm/mmu/mmu.c"


def fake_distro(root: Path) -> Distro:
    """Debian's layout under a directory of the test's own."""
    return Distro(
        name="debian",
        image=f"{root}/boot/vmlinuz-{{r}}",
        headers=f"{root}/src/linux-headers-{{r}}",
        modules=f"{root}/modules/{{r}}",
        config=f"{root}/boot/config-{{r}}",
        system_map=f"{root}/boot/System.map-{{r}}",
        version_in_image=DEBIAN.version_in_image,
        busybox=DEBIAN.busybox,
        busybox_package=DEBIAN.busybox_package,
        ccache_env={},
    )


def fake_image(path: Path, version: str) -> None:
    """A file with a bzImage setup header whose version string is Debian's shape."""
    data = bytearray(0x8000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x1000)
    s = f"6.1.0-9-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian {version} (2026-11-16)"
    data[0x1200 : 0x1200 + len(s)] = s.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def install_fake(root: Path, release: str, version: str) -> Distro:
    d = fake_distro(root)
    fake_image(d.path("image", release), version)
    d.path("headers", release).mkdir(parents=True)
    (d.path("headers", release) / "Module.symvers").write_text("")
    d.path("modules", release).mkdir(parents=True)
    return d


def test_the_image_says_its_package_version_and_a_mismatch_with_the_source_is_refused(tmp_path, monkeypatch):
    d = install_fake(tmp_path, "6.1.0-9-amd64", "6.1.190-1")
    img = distro.inspect(d, "6.1.0-9-amd64")
    assert (img.package_version, img.version) == ("6.1.190-1", KernelVersion(6, 1, 190))
    monkeypatch.setitem(distro.DISTROS, "debian", d)
    with pytest.raises(SourceError, match=r"6.1.0-9-amd64 is 6.1.190 \(6.1.190-1\) but the source is 6.1.192"):
        distro.resolve(DistroKernel(release="6.1.0-9-amd64"), KernelVersion(6, 1, 192))
    with pytest.raises(SourceError, match=r"auto: no installed debian kernel .* is version 6.1.192.*6.1.0-9-amd64"):
        distro.resolve(DistroKernel(), KernelVersion(6, 1, 192))
    with pytest.raises(SourceError, match=r"no image at .*vmlinuz-6.1.0-8-amd64; install it: apt-get install"):
        distro.inspect(d, "6.1.0-8-amd64")


def test_kvm_sources_are_copied_once_and_then_only_what_a_patch_changed(tmp_path):
    tree, dest = tmp_path / "tree", tmp_path / "kvm"
    for rel, text in (
        ("arch/x86/kvm/Makefile", "ccflags-y += -I $(srctree)/arch/x86/kvm\ninclude $(srctree)/virt/kvm/Makefile.kvm"),
        (MMU, "int a;\n"),
        ("arch/x86/kvm/x86.c", "int b;\n"),
        ("virt/kvm/kvm_main.c", "int c;\n"),
    ):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    assert len(distro.sync_kvm_sources(tree, dest)) == 4
    mk = (dest / "arch/x86/kvm/Makefile").read_text()
    assert "$(srctree)" not in mk and "include $(src)/../../../virt/kvm/Makefile.kvm" in mk
    assert (dest / "include/trace").is_dir()  # where trace.h's ../../arch/x86/kvm resolves from
    assert distro.sync_kvm_sources(tree, dest) == []
    (tree / MMU).write_text("int a2;\n")
    (tree / "arch/x86/kvm/x86.c").unlink()
    assert sorted(distro.sync_kvm_sources(tree, dest)) == [MMU, "arch/x86/kvm/x86.c"]
    assert (dest / MMU).read_text() == "int a2;\n" and not (dest / "arch/x86/kvm/x86.c").exists()


def test_boot_modules_come_with_their_dependencies_first(tmp_path):
    d = install_fake(tmp_path, "6.1.0-9-amd64", "6.1.192-1")
    (d.path("modules", "6.1.0-9-amd64") / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/sound/unrelated.ko:\n"
    )
    img = DistroImage(d, "6.1.0-9-amd64", "6.1.192-1", KernelVersion(6, 1, 192))
    names = [p.name for p in distro.boot_modules(img, [])]
    assert names == ["virtio.ko", "virtio_pci.ko", "9pnet.ko", "netfs.ko", "9p.ko"]


def test_a_distro_kernel_boots_through_its_init_with_the_agent_after_the_separator():
    spec = GuestSpec(
        name="kut", level="kut", kernel="k", memory_mb=512, cpus=1, accel="tcg", export="/o", console="/c",
        python="/usr/bin/python3", initrd="/i.cpio", distro_init=True,
    )  # fmt: skip
    line = kernel_cmdline(spec)
    assert "rdinit=/init" in line and "init=/usr/bin/python3" not in line.split(" -- ")[0]
    assert "modprobe.blacklist=kvm,kvm_amd,kvm_intel" in line and "rootfstype=9p" in line
    assert line.split(" -- ")[1].startswith("/usr/bin/python3 -E -S ")


def test_a_distro_kernel_takes_its_distributions_source_and_no_variant_sources():
    base = load("shrinker-ab-distro").experiment.model_dump(by_alias=True)
    with pytest.raises(ValueError, match="the source must be the distribution's source tarball"):
        Experiment.model_validate({**base, "source": {"kind": "git", "url": "/x", "ref": "HEAD"}})
    variants = [{"name": "baseline"}, {"name": "other", "source": {"kind": "local", "path": "/x"}}]
    with pytest.raises(ValueError, match="variant other: a source of its own does not fit a distro_kernel"):
        Experiment.model_validate({**base, "variants": variants})
    with pytest.raises(ValueError, match="release"):
        DistroKernel(release="6.1; rm -rf /")


# -- the real thing ------------------------------------------------------------------------------------------


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
    assert base.metadata["compiles"] <= 60  # KVM's modules, not a kernel (1 247 compiles)
    assert patched.metadata["kvm_sources_changed"] == [MMU] and patched.metadata["compiles"] <= 5
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


SHORT = (
    "phases=[{name: steady, duration_s: 6}, {name: drop-caches, duration_s: 8, pressure: drop-caches}, "
    "{name: recovery, duration_s: 4}]"
)


@pytest.mark.kernel
def test_the_distro_kernel_boots_our_modules_and_the_patch_takes_effect(distro_builds, qemu, tmp_path):
    image, _ = distro_builds
    config = "configs/shrinker-ab-distro.yaml"
    args = ["--config", config, "--run-id", "distro", "--output", str(tmp_path), "--set", "repetitions=1"]
    r = harness("experiment", *args, "--set", SHORT, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = tmp_path / "shrinker-ab-distro" / "distro"
    report = analyze(run)
    cells = report.cells.set_index("variant")
    kallsyms = cells["mmu_shrink_scan_in_kallsyms"]
    assert kallsyms["baseline"] and not kallsyms["patched"]
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


def test_a_mode_the_distributions_kernel_lacks_is_refused_with_what_to_do_instead(tmp_path):
    base = load("shrinker-ab-distro").experiment.model_dump(by_alias=True)
    exp = Experiment.model_validate(
        {**base, "phases": [{"name": "scan", "duration_s": 5, "pressure": "shrinker-scan"}]}
    )
    config = tmp_path / "config"
    config.write_text("CONFIG_DEBUG_FS=y\nCONFIG_KVM=m\nCONFIG_9P_FS=m\nCONFIG_NET_9P_VIRTIO=m\nCONFIG_FTRACE=y\n")
    with pytest.raises(PressureError, match=r"CONFIG_SHRINKER_DEBUG .*The debian kernel is built without them: use"):
        check_kernel(exp, "baseline", config)
