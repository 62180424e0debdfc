"""Serve this level's root filesystem to one child guest, read-only, with secrets hidden. Stdlib only.

Usage: python3 -E -S rootfs.py WORKDIR [HIDDEN...]  (virtiofs: the supervisor starts it before the
child's QEMU, which connects to WORKDIR/sock), or
python3 -E -S rootfs.py --exec WORKDIR [HIDDEN...] -- QEMU ARGV...  (9p: QEMU itself runs in the
namespace and exports WORKDIR/root). Either way the guest gets a read-only copy of `/` made in a
mount namespace of its own: every mount of the copy is remounted read-only, the copies of /proc,
/sys and /dev are dropped (a guest mounts its own), and each HIDDEN path (a glob: /etc/ssh/*_key)
is covered, a directory by an empty tmpfs, a file by an empty one. The level's mounts are untouched.
virtiofsd has no read-only switch (QEMU 7.2's C daemon, Debian 12) and runs as root; it chroots
into the copy (its `namespace` sandbox needs PID namespaces, which the trimmed kernel under test
does not have).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# the Rust daemon (Debian 13+), QEMU <= 7.2's C daemon, or that daemon in the QEMU 7.2 tree that
# harness/setup_qemu.sh keeps beside a QEMU 10 (which ships none)
VIRTIOFSD_PATHS = (
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/local/lib/nestpress/qemu-7.2/usr/lib/qemu/virtiofsd",
)
CLONE_NEWNS = 0x20000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
KEPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
DROPPED = ("proc", "sys", "dev")
_libc = ctypes.CDLL(None, use_errno=True)


def find_virtiofsd() -> str | None:
    return next((p for p in VIRTIOFSD_PATHS if os.access(p, os.X_OK)), None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        sys.exit(f"rootfs: {what}: {os.strerror(err)}")


def _mounts_under(top: str) -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) for every mount at or below top, parents first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == top or point.startswith(top + "/"):
                flags = sum(KEPT_FLAGS.get(o, 0) for o in fields[5].split(","))
                found.append((point, flags))
    return sorted(found, key=lambda m: m[0].count("/"))


def _hide(root: str, workdir: str, hidden: list[str]) -> None:
    """Cover each hidden path of the copy (symlinks resolved as the host resolves them)."""
    empty = os.path.join(workdir, "empty")
    with open(empty, "w"):
        pass
    os.chmod(empty, 0o444)
    for pattern in hidden:
        for host_path in glob.glob(pattern):
            target = root + os.path.realpath(host_path)
            if os.path.isdir(target):
                rc = _libc.mount(b"hidden", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k")
            elif os.path.exists(target):
                rc = _libc.mount(empty.encode(), target.encode(), None, MS_BIND, None)
            else:
                continue  # under a dropped /proc, /sys or /dev: not in the copy
            _check(rc, f"hide {host_path}")


def readonly_root_copy(workdir: str, hidden: list[str]) -> str:
    """WORKDIR/root: all of `/`, recursively bound and read-only, hidden paths covered, visible to this
    process (and what it execs) only."""
    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(_libc.mount(b"/", root.encode(), None, MS_BIND | MS_REC, None), "bind / recursively")
    for name in DROPPED:
        path = os.path.join(root, name)
        if os.path.ismount(path):
            _check(_libc.umount2(path.encode(), MNT_DETACH), f"drop {path}")
    _hide(root, workdir, hidden)
    for point, flags in _mounts_under(root):
        _check(
            _libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None),
            f"remount {point} read-only",
        )
    return root


def main(args: list[str]) -> None:
    if args[0] == "--exec":  # 9p: QEMU runs here and exports WORKDIR/root
        sep = args.index("--")
        readonly_root_copy(args[1], args[2:sep])
        os.execvp(args[sep + 1], args[sep + 1 :])  # a bare qemu-system-x86_64 is looked up in PATH
    virtiofsd = find_virtiofsd()
    if virtiofsd is None:
        sys.exit(f"rootfs: no virtiofsd in {', '.join(VIRTIOFSD_PATHS)}")
    workdir = args[0]
    root = readonly_root_copy(workdir, args[1:])
    os.execv(
        virtiofsd,
        [
            virtiofsd,
            f"--socket-path={os.path.join(workdir, 'sock')}",
            "-o",
            f"source={root}",
            "-o",
            "cache=always",
            "-o",
            "sandbox=chroot",
            "-o",
            "announce_submounts",
        ],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
