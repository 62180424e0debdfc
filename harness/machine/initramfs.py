"""The root of L2 guests: an initramfs with the guests' Python, the agent and nothing else.

Under emulation every file an L2 opens over a shared root is a chain of exits through two
hypervisors and two file servers (its own parent's virtiofsd in L1, L1's over the kernel under
test): Python's start alone took ~5 min that way. So L2 boots from an initramfs made here: the
interpreter guests run, exactly the modules the in-guest agent imports (found by importing them),
the shared libraries it all links, the agent's own files, and the workload command's executable,
each at its host path so that the agent runs unchanged. L2 then reads nothing from a shared
filesystem; its only file channel is its results export. The archive is made once per content
and cached; it is plain `newc` cpio (no compression: the kernel unpacks it at memory speed).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from .. import REPO_ROOT
from ..errors import HarnessError
from ..util import atomic_file, hash_text

GUEST_DIR = REPO_ROOT / "harness" / "guest"
# what the agent and its helpers import, and what they load lazily (a traceback formats its lines)
_IMPORTS = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import agent, probe, pressure, sampler, supervise
try:
    raise RuntimeError("closure")
except RuntimeError as e:
    traceback.format_exception(e)
files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
print(json.dumps({"files": files, "prefix": sys.prefix, "exec_prefix": sys.exec_prefix,
                  "version": "%d.%d" % sys.version_info[:2]}))
"""
DEVICES = {"/dev/console": (5, 1), "/dev/null": (1, 3)}
EMPTY_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp")


def python_closure(python: str) -> list[str]:
    """Files the guests' Python needs to run the agent: modules with their bytecode, and lib-dynload."""
    r = subprocess.run([python, "-E", "-S", "-c", _IMPORTS, str(GUEST_DIR)], capture_output=True, text=True)
    if r.returncode != 0:
        raise HarnessError(f"initramfs: {python} could not import the guest agent:\n{r.stderr[-1500:]}")
    info = json.loads(r.stdout)
    files = []
    for f in info["files"]:
        files.append(f)
        if f.endswith(".py"):
            pyc = Path(f).parent / "__pycache__" / f"{Path(f).stem}.cpython-{info['version'].replace('.', '')}.pyc"
            if pyc.exists():
                files.append(str(pyc))
    # the landmarks Python looks for to find its prefixes (getpath): os.py and lib-dynload
    lib = f"lib/python{info['version']}"
    files.append(os.path.join(info["prefix"], lib, "os.py"))
    dynload = os.path.join(info["exec_prefix"], lib, "lib-dynload")
    return files + ([dynload] if os.path.isdir(dynload) else [])


def elf_deps(path: str) -> list[str]:
    """Shared libraries and the loader an ELF file needs (ldd); nothing for scripts and static files."""
    r = subprocess.run(["ldd", path], capture_output=True, text=True, env={"LC_ALL": "C", "PATH": os.defpath})
    out = []
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            out.append(parts[2])
        elif parts and parts[0].startswith("/"):
            out.append(parts[0])
    return out


def interpreter(path: str) -> str | None:
    """The #! interpreter of a script, if it is one."""
    with open(path, "rb") as f:
        head = f.read(256)
    return head[2:].split(b"\n")[0].split()[0].decode() if head.startswith(b"#!") and len(head) > 2 else None


def command_files(argv: list[str] | None, search_path: str) -> list[str]:
    """The workload command's executable (and a script's interpreter), found as the agent will find it."""
    if not argv:
        return []
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=search_path)
    if not exe or not os.path.isfile(exe):
        raise HarnessError(
            f"workload.command: {argv[0]!r} not found on this host (PATH {search_path}); "
            "L2 boots from an initramfs that carries only the command's own executable"
        )
    interp = interpreter(exe)
    return [exe] + ([interp] if interp else [])


def _file_bytes(path: str) -> bytes:
    """A file's contents; an ELF file without its debug sections (every page L2 touches costs nested faults:
    a pyenv libpython is 23 MB with them, 4 MB without)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x7fELF") or not shutil.which("strip"):
        return data
    with tempfile.TemporaryDirectory(prefix="nestpress-strip-") as d:
        out = os.path.join(d, "stripped")
        r = subprocess.run(["strip", "--strip-debug", "-o", out, path], capture_output=True)
        return Path(out).read_bytes() if r.returncode == 0 else data


class Archive:
    """newc cpio entries, each path once, with every directory and symlink on the way to it."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int, tuple[int, int]]] = {}  # path -> (mode, data, mtime, rdev)

    def add(self, path: str) -> None:
        """Add a host path as the guest must see it: each symlink in it kept as a symlink, then its target."""
        parts = Path(path).parts[1:]
        cur = ""
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}"
            if cur in self.entries:
                if stat.S_ISLNK(self.entries[cur][0]):
                    return self.add(os.path.realpath(cur) + "".join("/" + p for p in parts[i + 1 :]))
                continue
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                self.entries[cur] = (st.st_mode, target.encode(), int(st.st_mtime), (0, 0))
                return self.add(
                    os.path.normpath(os.path.join(os.path.dirname(cur), target))
                    + "".join("/" + p for p in parts[i + 1 :])
                )
            if stat.S_ISDIR(st.st_mode):
                self.entries[cur] = (stat.S_IFDIR | 0o755, b"", int(st.st_mtime), (0, 0))
            elif stat.S_ISREG(st.st_mode):
                self.entries[cur] = (stat.S_IFREG | (st.st_mode & 0o755), _file_bytes(cur), int(st.st_mtime), (0, 0))
            else:
                raise HarnessError(f"initramfs: {cur} is neither a file, a directory nor a symlink")
        return None

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A file at a path of the archive's own (its directories made on the way)."""
        for parent in reversed(Path(path).parents[:-1]):
            self.mkdir(str(parent))
        self.entries[path] = (stat.S_IFREG | mode, data, 0, (0, 0))

    def mkdir(self, path: str) -> None:
        self.entries.setdefault(path, (stat.S_IFDIR | 0o755, b"", 0, (0, 0)))

    def device(self, path: str, major: int, minor: int) -> None:
        self.entries[path] = (stat.S_IFCHR | 0o600, b"", 0, (major, minor))

    def cpio(self) -> bytes:
        out = bytearray()

        def entry(ino: int, name: str, mode: int, data: bytes, mtime: int, rdev: tuple[int, int]) -> None:
            fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
            out.extend(b"070701" + "".join(f"{x:08X}" for x in fields).encode() + name.encode() + b"\0")
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))

        # parents before children: sorted paths put a directory before what it holds
        for ino, path in enumerate(sorted(self.entries), 1):
            mode, data, mtime, rdev = self.entries[path]
            entry(ino, path.lstrip("/"), mode, data, mtime, rdev)
        entry(0, "TRAILER!!!", 0, b"", 0, (0, 0))
        return bytes(out)


def contents(python: str, command: list[str] | None, search_path: str, more: tuple[list[str], ...] = ()) -> list[str]:
    """Every host path the L2 root holds (before symlinks and directories on the way are added); more: the argvs of
    L2's workload runs, whose executables it carries too."""
    files = [
        python,
        *python_closure(python),
        *(f for argv in (command, *more) for f in command_files(argv, search_path)),
    ]
    files += [str(p) for p in sorted(GUEST_DIR.rglob("*.py"))]
    elves = [f for f in files if os.path.isfile(f) and not f.endswith((".py", ".pyc"))]
    return sorted(set(files + [dep for f in elves for dep in elf_deps(f)]))


def _skeleton() -> Archive:
    arc = Archive()
    for d in EMPTY_DIRS:
        arc.mkdir(d)
    for dev, (major, minor) in DEVICES.items():
        arc.device(dev, major, minor)
    return arc


def build(
    python: str, command: list[str] | None, search_path: str, cache: Path, more: tuple[list[str], ...] = ()
) -> Path:
    """The L2 initramfs for this interpreter and command, from the cache when its inputs are unchanged."""
    paths = contents(python, command, search_path, more)
    key = hash_text(*(f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in paths))[:20]
    dest = cache / "initramfs" / f"{key}.cpio"
    if dest.exists():
        return dest
    arc = _skeleton()
    for p in paths:
        arc.add(p)
    with atomic_file(dest) as tmp:
        tmp.write_bytes(arc.cpio())
    return dest


DISTRO_INIT = GUEST_DIR / "distro-init.sh"


def boot_archive(busybox: str, boot_modules: list[Path], kvm_modules: list[Path], dest: Path) -> Path:
    """The initramfs a distribution's kernel boots at every level (guest/distro-init.sh is its /init): a static
    busybox, the image's modules the root share, the export and the swap disk need (loaded in this order), and
    the variant's KVM modules. Made with the build (distro.py), into dest."""
    arc = _skeleton()
    arc.file("/init", DISTRO_INIT.read_bytes(), 0o755)
    # all under /nestpress: appended to L2's archive, a directory where L2 has a symlink (/lib -> usr/lib on a
    # merged-/usr host) would replace the symlink
    arc.file("/nestpress/busybox", Path(busybox).read_bytes(), 0o755)
    arc.mkdir("/newroot")
    for ko in boot_modules:
        arc.file(f"/nestpress/boot/{ko.name}", ko.read_bytes())
    arc.file("/nestpress/boot.order", "".join(f"{ko.name}\n" for ko in boot_modules).encode())
    for ko in kvm_modules:
        arc.file(f"/nestpress/kvm/{ko.name}", _file_bytes(str(ko)))  # without debug info: 31 MB less
    with atomic_file(dest) as tmp:
        tmp.write_bytes(arc.cpio())
    return dest


def joined(first: Path, second: Path, cache: Path) -> Path:
    """Two archives as one initrd (the kernel unpacks concatenated cpio archives in order): L2's root with the
    distribution kernel's boot archive after it. Both paths already name their contents (L2's archive by its
    inputs, the boot archive by its build's key), so the paths are the key: nothing is read again per cell."""
    key = hash_text(str(first), str(second))[:20]
    dest = cache / "initramfs" / f"{key}.joined.cpio"
    if not dest.exists():
        with atomic_file(dest) as tmp:
            tmp.write_bytes(first.read_bytes() + second.read_bytes())
    return dest
