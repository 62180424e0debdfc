"""What a build makes from a variant's patched tree, one class per kind behind one interface (Product):

- FullKernel: the whole kernel from a base config and fragments (`make bzImage` in the tree's `o/`), every
  option a fragment asks for checked in the final .config.
- DistroModules: only KVM's three modules, built against a distribution kernel's headers from a copy of KVM's
  sources that is synced with the tree (only files that differ are copied, so a patch recompiles what it
  touches), checked against the image's ABI, with the boot archive every level boots (distro.py).

builder.py owns the rest (the cache, the shared tree, patches in and out, make's output, the metadata).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from ..config import Experiment
from ..config.kernels import kconfig_problem
from ..errors import KconfigError
from ..machine import initramfs
from ..util import hash_file, run
from . import distro
from .distro import DistroImage

INITRD = "initrd.cpio"
KERNEL_ARTIFACTS = (("arch/x86/boot/bzImage", "bzImage"), (".config", "config"), ("System.map", "System.map"))
KVM_DIRS = ("arch/x86/kvm", "virt/kvm")


class Product:
    """One kind of build. make() runs `command` in the tree after prepare(); artifacts() says what it made."""

    def key(self) -> dict[str, Any]:
        """What the output depends on besides the source, the patches and the compiler (the cache key's rest)."""
        raise NotImplementedError

    def ccache_env(self) -> dict[str, str]:
        return {}

    def command(self, tree: Path, cc: str, jobs: int) -> list[str]:
        raise NotImplementedError

    def prepare(self, tree: Path, env: dict[str, str]) -> dict[str, Any]:
        """Get the tree ready for make; returns what to record in the build's metadata."""
        return {}

    def artifacts(self, tree: Path, env: dict[str, str]) -> tuple[str, list[tuple[Path, str]]]:
        """(the kernel release, [(a file it made, its name in the build's directory)])."""
        raise NotImplementedError

    def finish(self, out: Path) -> None:
        """Anything made from the artifacts in the build's directory (before it is cached)."""

    def check(self, out: Path) -> None:
        """Before a build is used (cached or new): is it still good for what it boots?"""

    def describe(self, release: str) -> str:
        return release


def fragment_paths(exp: Experiment) -> list[Path]:
    out = []
    for frag in exp.kernel_config.fragments:
        p = Path(frag).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / "configs" / frag
        if why := kconfig_problem(p):
            raise KconfigError(f"config fragment {frag}: {why} (looked at {p})")
        out.append(p)
    return out


def base_identity(base: str) -> str:
    p = Path(base).expanduser()
    if p.is_file():
        return "file:" + hash_file(p)
    if not re.fullmatch(r"[a-z0-9_]*config", base):
        raise KconfigError(f"kernel_config.base '{base}' is neither a file nor a *config make target")
    return "target:" + base


def requested_options(fragments: list[Path]) -> dict[str, str]:
    """CONFIG_X -> value ('n' for '# CONFIG_X is not set') as the fragments ask, later ones winning."""
    want: dict[str, str] = {}
    for frag in fragments:
        for line in frag.read_text().splitlines():
            line = line.strip()
            if m := re.fullmatch(r"(CONFIG_[A-Za-z0-9_]+)=(.*)", line):
                want[m.group(1)] = m.group(2)
            elif m := re.fullmatch(r"# (CONFIG_[A-Za-z0-9_]+) is not set", line):
                want[m.group(1)] = "n"
    return want


def check_config(final: Path, want: dict[str, str]) -> None:
    have: dict[str, str] = {}
    for line in final.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_[A-Za-z0-9_]+)=(.*)", line):
            have[m.group(1)] = m.group(2)
    dropped = [
        f"{k}={v} (final: {have.get(k, 'not set')})"
        for k, v in want.items()
        if (v == "n" and have.get(k, "n") not in ("n",)) or (v != "n" and have.get(k) != v)
    ]
    if dropped:
        raise KconfigError(
            f"{len(dropped)} option(s) the fragments ask for are not in the final .config "
            f"(unknown in this kernel, or a dependency is missing):\n  " + "\n  ".join(dropped)
        )


class FullKernel(Product):
    def __init__(self, exp: Experiment):
        self.exp = exp

    def key(self) -> dict[str, Any]:
        frags = fragment_paths(self.exp)
        return {
            "config_base": base_identity(self.exp.kernel_config.base),
            "fragments": {
                str(f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f): hash_file(f) for f in frags
            },
        }

    def command(self, tree: Path, cc: str, jobs: int) -> list[str]:
        return ["make", "-C", str(tree), "O=o", f"-j{jobs}", f"CC={cc}", "bzImage"]

    @staticmethod
    def make(tree: Path, *targets: str, env: dict) -> str:
        return run(["make", "-s", "-C", str(tree), "O=o", *targets], capture=True, env=env).stdout

    def prepare(self, tree: Path, env: dict[str, str]) -> dict[str, Any]:
        """The .config in the tree's o/: base, fragments merged, olddefconfig; every asked-for option checked. An
        unchanged .config keeps its time stamp, so make sees nothing new."""
        o = tree / "o"
        o.mkdir(exist_ok=True)
        cfg = o / ".config"
        old = cfg.read_bytes() if cfg.exists() else None
        old_mtime = cfg.stat().st_mtime_ns if cfg.exists() else None
        base = self.exp.kernel_config.base
        if Path(base).expanduser().is_file():
            shutil.copy(Path(base).expanduser(), cfg)
        else:
            self.make(tree, base, env=env)
        frags = fragment_paths(self.exp)
        if frags:
            merge = [str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(o), str(cfg), *map(str, frags)]
            run(merge, cwd=tree, capture=True, env=env)
        self.make(tree, "olddefconfig", env=env)
        check_config(cfg, requested_options(frags))
        if old is not None and old_mtime is not None and cfg.read_bytes() == old:
            os.utime(cfg, ns=(old_mtime, old_mtime))  # same config: keep make's view of it unchanged
        return {"config_sha256": hash_file(cfg)}

    def artifacts(self, tree: Path, env: dict[str, str]) -> tuple[str, list[tuple[Path, str]]]:
        return self.make(tree, "kernelrelease", env=env).strip(), [(tree / f"o/{a}", b) for a, b in KERNEL_ARTIFACTS]


class DistroModules(Product):
    def __init__(self, image: DistroImage, work_root: Path):
        self.image = image
        self.mod_dir = work_root / f"kvm-{image.release}"

    @property
    def kos(self) -> list[Path]:
        return [self.mod_dir / "arch/x86/kvm" / m for m in distro.KVM_MODULES]

    def key(self) -> dict[str, Any]:
        return {
            "distro_image": self.image.identity,
            "boot_init": hash_file(initramfs.DISTRO_INIT),
            "boot_modules": list(distro.BOOT_MODULES),
        }

    def ccache_env(self) -> dict[str, str]:
        return dict(self.image.distro.ccache_env)

    def command(self, tree: Path, cc: str, jobs: int) -> list[str]:
        headers = self.image.path("headers")
        return ["make", "-C", str(headers), f"M={self.mod_dir / 'arch/x86/kvm'}", f"-j{jobs}", "modules"]

    def prepare(self, tree: Path, env: dict[str, str]) -> dict[str, Any]:
        return {"kvm_sources_changed": sync_kvm_sources(tree, self.mod_dir)}

    def artifacts(self, tree: Path, env: dict[str, str]) -> tuple[str, list[tuple[Path, str]]]:
        symvers = self.mod_dir / "arch/x86/kvm/Module.symvers"
        distro.check_abi(self.kos, symvers, self.image)  # before it is cached
        files = [
            (self.image.path("image"), "bzImage"),
            (self.image.path("config"), "config"),
            (self.image.path("system_map"), "System.map"),
            (symvers, "Module.symvers"),
            *((ko, ko.name) for ko in self.kos),
        ]
        return self.image.release, files

    def finish(self, out: Path) -> None:
        ours = [out / m for m in distro.KVM_MODULES]
        initramfs.boot_archive(self.image.distro.busybox, distro.boot_modules(self.image, ours), ours, out / INITRD)

    def check(self, out: Path) -> None:
        """Its modules against the image, before any boot (the build checked them too; the image may have moved)."""
        distro.check_abi([out / m for m in distro.KVM_MODULES], out / "Module.symvers", self.image)

    def describe(self, release: str) -> str:
        return f"KVM modules for {self.image.describe()}"


def sync_kvm_sources(tree: Path, dest: Path) -> list[str]:
    """Make dest hold KVM's sources as the (patched) tree has them, copying only files that differ, so that make
    rebuilds only what a patch changed. The Makefile is pointed at dest's own virt/kvm (kbuild's srctree is the
    headers', which have no KVM sources). Returns the files that changed."""
    listing = dest / ".nestpress-sources"
    before = set(listing.read_text().split("\n")) - {""} if listing.exists() else set()
    now, changed = set(), []
    for d in KVM_DIRS:
        for s in sorted(p for p in (tree / d).rglob("*") if p.is_file()):
            rel = str(s.relative_to(tree))
            t = dest / rel
            now.add(rel)
            text = _out_of_tree_makefile(s.read_bytes()) if rel == "arch/x86/kvm/Makefile" else s.read_bytes()
            if t.exists() and t.read_bytes() == text:
                continue
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(text)
            changed.append(rel)
    for rel in sorted(before - now):  # a file a patch removed (what make generated is never in the listing)
        (dest / rel).unlink(missing_ok=True)
        changed.append(rel)
    (dest / "include" / "trace").mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(sorted(now)))
    return changed


def _out_of_tree_makefile(makefile: bytes) -> bytes:
    """arch/x86/kvm/Makefile for `make M=`: $(srctree) is the headers' tree there. Its own includes become
    $(src); virt/kvm is dest's; trace.h's TRACE_INCLUDE_PATH (../../arch/x86/kvm, relative to an include
    directory) resolves from dest/include/trace."""
    text = makefile.decode().replace("$(srctree)/arch/$(SRCARCH)/kvm", "$(src)")
    text = text.replace("$(srctree)/arch/x86/kvm", "$(src)").replace("$(srctree)/virt/kvm", "$(src)/../../../virt/kvm")
    return ("ccflags-y += -I $(src)/../../../include/trace\n" + text).encode()
