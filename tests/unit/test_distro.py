"""A distribution's kernel as the kernel under test (kernel/distro.py, kernel/products.py): the pure parts on made-up
trees and images. The real thing is tests/kernel/test_distro_kernel.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from harness.config import DistroKernel, Experiment, load
from harness.errors import PressureError, SourceError
from harness.kernel import distro, products
from harness.kernel.distro import DEBIAN, Distro, DistroImage
from harness.kernel.source import KernelVersion
from harness.machine.qemu import GuestSpec, kernel_cmdline
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
    assert len(products.sync_kvm_sources(tree, dest)) == 4
    mk = (dest / "arch/x86/kvm/Makefile").read_text()
    assert "$(srctree)" not in mk and "include $(src)/../../../virt/kvm/Makefile.kvm" in mk
    assert (dest / "include/trace").is_dir()  # where trace.h's ../../arch/x86/kvm resolves from
    assert products.sync_kvm_sources(tree, dest) == []
    (tree / MMU).write_text("int a2;\n")
    (tree / "arch/x86/kvm/x86.c").unlink()
    assert sorted(products.sync_kvm_sources(tree, dest)) == [MMU, "arch/x86/kvm/x86.c"]
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


def test_a_mode_the_distributions_kernel_lacks_is_refused_with_what_to_do_instead(tmp_path):
    base = load("shrinker-ab-distro").experiment.model_dump(by_alias=True)
    exp = Experiment.model_validate(
        {**base, "phases": [{"name": "scan", "duration_s": 5, "pressure": "shrinker-scan"}]}
    )
    config = tmp_path / "config"
    config.write_text("CONFIG_DEBUG_FS=y\nCONFIG_KVM=m\nCONFIG_9P_FS=m\nCONFIG_NET_9P_VIRTIO=m\nCONFIG_FTRACE=y\n")
    with pytest.raises(PressureError, match=r"CONFIG_SHRINKER_DEBUG .*The debian kernel is built without them: use"):
        check_kernel(exp, "baseline", config)
