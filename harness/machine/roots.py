"""How a level gets its root filesystem, one class per kind (ROOTS): the kernel command line it needs, the QEMU
devices that serve it, the guest RAM it needs, the server that must run first, and the kernel options.

- `9p`: the host's root over virtio-9p, read-only (`multidevs=remap`); as root, QEMU runs in a mount namespace
  of its own that holds a read-only view of / with the hidden paths covered (guest/rootfs.py --exec).
- `virtiofs`: the host's root over virtiofs, served by guest/rootfs.py (virtiofsd chrooted into a read-only
  view); guest RAM must be shareable memory (the daemon maps it).
- `initramfs`: L2's root, an archive made here (initramfs.py): nothing shared at all.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from .. import REPO_ROOT
from ..guest.contract import RootServer
from .spec import GuestSpec

ROOTFS_SERVER = REPO_ROOT / "harness" / "guest" / "rootfs.py"
ROOT_TAG = "nestroot"


def opt(value: str) -> str:
    """A path or name inside a QEMU option list: its commas doubled, so `x,readonly=on` stays a name."""
    return value.replace(",", ",,")


class Root:
    name = ""
    needs: ClassVar[dict[str, str]] = {}  # kernel options -> why (every level that serves or mounts it)
    shared_memory = False  # guest RAM must be a shared memfd (a daemon maps it)

    def cmdline(self, spec: GuestSpec) -> list[str]:
        """Kernel parameters that mount it and start the agent from it (spec.python is the init)."""
        raise NotImplementedError

    def devices(self, spec: GuestSpec) -> list[str]:
        """QEMU arguments that serve it."""
        return []

    def server(self, spec: GuestSpec) -> RootServer | None:
        """The process that must serve it before QEMU starts, if any."""
        return None

    def wrap(self, argv: list[str], spec: GuestSpec) -> list[str]:
        """QEMU's argv as it is started (in a namespace of its own, where the kind needs one)."""
        return argv


class NineP(Root):
    name = "9p"
    needs: ClassVar[dict[str, str]] = {
        "CONFIG_9P_FS": "every level's root is the host's over virtio-9p",
        "CONFIG_NET_9P_VIRTIO": "every level's root is the host's over virtio-9p",
    }

    def cmdline(self, spec: GuestSpec) -> list[str]:
        flags = "trans=virtio,version=9p2000.L,msize=262144,cache=loose,access=any"
        return ["root=/dev/root", "rootfstype=9p", f"rootflags={flags}", "ro", f"init={spec.python}"]

    def devices(self, spec: GuestSpec) -> list[str]:
        path = spec.rootfs_dir + "/root" if spec.root_view else "/"
        return [
            "-fsdev",
            f"local,id=root,path={opt(path)},security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=/dev/root",
        ]

    def wrap(self, argv: list[str], spec: GuestSpec) -> list[str]:
        """QEMU starts inside the namespace that holds the view (this host's Python makes it: spec.python is the
        guest's init, which a test may point elsewhere)."""
        if not spec.root_view:
            return argv
        return [sys.executable, "-E", "-S", str(ROOTFS_SERVER), "--exec", spec.rootfs_dir, *spec.hidden, "--", *argv]


class Virtiofs(Root):
    name = "virtiofs"
    needs: ClassVar[dict[str, str]] = {
        "CONFIG_VIRTIO_FS": "every level's root is the host's over virtiofs (boot.rootfs)",
        "CONFIG_SECCOMP_FILTER": "virtiofsd serves the guests' root and installs a seccomp filter",
    }
    shared_memory = True

    def cmdline(self, spec: GuestSpec) -> list[str]:
        return [f"root={ROOT_TAG}", "rootfstype=virtiofs", "ro", f"init={spec.python}"]

    def devices(self, spec: GuestSpec) -> list[str]:
        return [
            "-chardev",
            f"socket,id=root,path={opt(spec.rootfs_socket)}",
            "-device",
            f"vhost-user-fs-pci,chardev=root,tag={ROOT_TAG}",
        ]

    def server(self, spec: GuestSpec) -> RootServer | None:
        return RootServer(
            argv=[spec.python, "-E", "-S", str(ROOTFS_SERVER), spec.rootfs_dir, *spec.hidden],
            socket=spec.rootfs_socket,
        )


class Initramfs(Root):
    name = "initramfs"

    def cmdline(self, spec: GuestSpec) -> list[str]:
        return [f"rdinit={spec.python}"]


ROOTS: dict[str, Root] = {r.name: r for r in (NineP(), Virtiofs(), Initramfs())}
