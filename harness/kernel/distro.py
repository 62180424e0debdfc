"""A distribution's kernel as the kernel under test: its image and headers as packaged, only KVM's three modules
built from the matching source (both variants the same way), loaded from an initramfs made here.

The patch touches one module, so this is the physical limit of the build: 45 compiles instead of a kernel, and
a patched rebuild is mmu.o and a link. Everything a distribution decides (package names, where the image, its
headers and modules live, where the image says its package version) is in one `Distro`; Debian is the one
implemented, another is another instance. A module that does not match the image is refused before any boot:
its vermagic against the image's own modules, every imported symbol's CRC against the headers' Module.symvers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..config import DistroKernel, Experiment
from ..errors import BuildError, SourceError
from ..machine.initramfs import elf_deps
from ..util import hash_file, run
from .source import KernelVersion

KVM_MODULES = ("kvm.ko", "kvm-amd.ko", "kvm-intel.ko")
# what every level needs before its agent runs: the root share (9p or virtiofs), the results export (9p),
# the swap disk (virtio-blk), the clock port and the KVM PTP clock (guest/clock.py; ptp_kvm loads only where
# the parent's KVM pairs clocks), and kvm.ko's one dependency outside KVM
BOOT_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtiofs",
    "virtio_blk",
    "virtio_console",
    "ptp_kvm",
    "irqbypass",
)


@dataclass(frozen=True)
class Distro:
    name: str
    image: str  # paths, with {r} for the release
    headers: str
    modules: str
    config: str
    system_map: str
    version_in_image: str  # regex on the image's version string: its package version
    busybox: str  # a static busybox: the initramfs's shell, insmod, mount and switch_root
    busybox_package: str
    ccache_env: dict[str, str]  # how its headers' Makefile takes ccache

    def path(self, which: str, release: str) -> Path:
        return Path(getattr(self, which).format(r=release))

    def packages(self, spec: DistroKernel) -> list[str]:
        """What `fab setup` installs: the image and its headers (auto: the suite's current ABI), and busybox."""
        if spec.release == "auto":
            return ["linux-image-amd64", "linux-headers-amd64", self.busybox_package]
        return [f"linux-image-{spec.release}", f"linux-headers-{spec.release}", self.busybox_package]

    def package_version(self, package: str) -> str | None:
        r = run(["dpkg-query", "-W", "-f", "${Version}", package], capture=True, check=False)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


DEBIAN = Distro(
    name="debian",
    image="/boot/vmlinuz-{r}",
    headers="/usr/src/linux-headers-{r}",
    modules="/lib/modules/{r}",
    config="/boot/config-{r}",
    system_map="/boot/System.map-{r}",
    version_in_image=r" Debian (\S+) ",
    busybox="/bin/busybox",
    busybox_package="busybox-static",
    ccache_env={"DEBIAN_KERNEL_USE_CCACHE": "1"},
)
DISTROS = {d.name: d for d in (DEBIAN,)}


@dataclass(frozen=True)
class DistroImage:
    """One installed image with its headers, checked to belong together."""

    distro: Distro
    release: str  # 6.1.0-56-amd64
    package_version: str  # 6.1.192-2, as the image says
    version: KernelVersion  # 6.1.192

    def path(self, which: str) -> Path:
        return self.distro.path(which, self.release)

    @cached_property  # hashes the image: once, not per variant
    def identity(self) -> dict[str, str]:
        """What a module build against it depends on (part of the build's cache key)."""
        return {
            "release": self.release,
            "package_version": self.package_version,
            "image": hash_file(self.path("image")),
            "symvers": hash_file(self.path("headers") / "Module.symvers"),
            "compiler": next(
                (
                    line.split("=", 1)[1]
                    for line in (self.path("headers") / ".config").read_text().splitlines()
                    if line.startswith("CONFIG_CC_VERSION_TEXT=")
                ),
                "",
            ),
        }

    def describe(self) -> str:
        return f"{self.distro.name} kernel {self.release} ({self.package_version})"


def image_version_string(image: Path) -> str:
    """The version string a bzImage carries in its setup header (what `file` prints)."""
    with open(image, "rb") as f:
        head = f.read(0x8000)
    if head[0x202:0x206] != b"HdrS":
        raise SourceError(f"{image}: not a bzImage (no setup header)")
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    return head[offset + 0x200 : offset + 0x400].split(b"\0")[0].decode(errors="replace")


def _upstream(package_version: str) -> KernelVersion | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", package_version)
    return KernelVersion(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def installed_releases(distro: Distro) -> list[str]:
    """Releases with both an image and its headers on this host, newest first."""
    boot = Path(distro.image.format(r="x")).parent
    found = [p.name.split("-", 1)[1] for p in boot.glob(Path(distro.image.format(r="*")).name)]
    found = [r for r in found if distro.path("headers", r).is_dir()]
    return sorted(found, key=lambda r: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", r)], reverse=True)


def inspect(distro: Distro, release: str) -> DistroImage:
    """The image of this release, its headers and its modules present, and their versions agreeing."""
    image = distro.path("image", release)
    hint = f"install it: apt-get install {' '.join(distro.packages(DistroKernel(release=release))[:2])} (or fab setup)"
    for what, p in (("image", image), ("headers", distro.path("headers", release) / "Module.symvers")):
        if not p.exists():
            raise SourceError(f"distro_kernel {release}: no {what} at {p}; {hint}")
    if not distro.path("modules", release).is_dir():
        raise SourceError(f"distro_kernel {release}: no modules at {distro.path('modules', release)}; {hint}")
    said = image_version_string(image)
    m = re.search(distro.version_in_image, said + " ")
    version = _upstream(m.group(1)) if m else None
    if not m or version is None:
        raise SourceError(f"{image}: cannot read its {distro.name} package version from {said!r}")
    headers_version = distro.package_version(f"linux-headers-{release}")
    if headers_version is not None and headers_version != m.group(1):
        raise SourceError(
            f"distro_kernel {release}: the image is {m.group(1)} but its headers are {headers_version}: "
            f"install the matching pair ({hint})"
        )
    return DistroImage(distro, release, m.group(1), version)


def resolve(spec: DistroKernel, source_version: KernelVersion) -> DistroImage:
    """The image the config names (or, auto, the newest installed one of the source's version), checked to be
    the source's version: modules built from other sources than the image's would load and mean nothing."""
    distro = DISTROS[spec.distro]
    if spec.release != "auto":
        img = inspect(distro, spec.release)
    else:
        candidates = [inspect(distro, r) for r in installed_releases(distro)]
        matching = [c for c in candidates if c.version == source_version]
        if not matching:
            have = ", ".join(f"{c.release} ({c.package_version})" for c in candidates) or "none"
            raise SourceError(
                f"distro_kernel auto: no installed {distro.name} kernel image with headers is version "
                f"{source_version} (the source's); installed: {have}. Install one (fab setup installs "
                f"{' '.join(distro.packages(spec)[:2])}) or name the release"
            )
        img = matching[0]
    if img.version != source_version:
        raise SourceError(
            f"distro_kernel {img.release} is {img.version} ({img.package_version}) but the source is "
            f"{source_version}: KVM built from another version's source must not be loaded into it. Install the "
            "source package of the image's version, or the image of the source's"
        )
    if not Path(distro.busybox).is_file() or elf_deps(distro.busybox):
        raise SourceError(
            f"distro_kernel: no static {distro.busybox} (the initramfs's shell, which runs before any library "
            f"is there): apt-get install {distro.busybox_package}"
        )
    return img


def packages_for(exp: Experiment) -> list[str]:
    """What `fab setup --config` installs for an experiment: its sources' packages, and a distribution kernel's
    image, headers and busybox (opt-in: on a lab host a new image may become what it boots next)."""
    sources = [exp.source, *(v.source for v in exp.variants if v.source)]
    pkgs = [s.package for s in sources if s.package]
    if exp.distro_kernel:
        pkgs += DISTROS[exp.distro_kernel.distro].packages(exp.distro_kernel)
    return list(dict.fromkeys(pkgs))


# -- the ABI check ------------------------------------------------------------------------------------------


def modinfo(ko: Path, field: str) -> str:
    return run(["modinfo", "-F", field, str(ko)], capture=True).stdout.strip()


def imported_crcs(ko: Path) -> dict[str, int]:
    """The symbols a module imports with the CRCs it was built against (its __versions)."""
    r = run(["modprobe", "--dump-modversions", str(ko)], capture=True, check=False)
    if r.returncode != 0:
        raise BuildError(f"{ko}: cannot read its symbol versions (modprobe --dump-modversions): {r.stderr.strip()}")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1]] = int(parts[0], 16)
    return out


def read_symvers(path: Path) -> dict[str, tuple[int, str]]:
    """Module.symvers: symbol -> (CRC, exporting module)."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out[parts[1]] = (int(parts[0], 16), parts[2])
    return out


def check_abi(modules: list[Path], own_symvers: Path, image: DistroImage, symvers: Path | None = None) -> None:
    """Refuse modules that would not load, or would load wrongly, into this image: vermagic against the image's
    own kvm.ko, every imported CRC against what exports it (our kvm.ko for kvm-amd/intel, else the headers'
    Module.symvers, which is the image's). Names the versions on a mismatch."""
    theirs = image.path("modules") / "kernel" / "arch/x86/kvm" / "kvm.ko"
    want_magic = modinfo(theirs, "vermagic") if theirs.exists() else None
    exports = read_symvers(symvers or image.path("headers") / "Module.symvers")
    ours = read_symvers(own_symvers) if own_symvers.exists() else {}
    problems = []
    for ko in modules:
        magic = modinfo(ko, "vermagic")
        if want_magic is not None and magic != want_magic:
            problems.append(f"{ko.name}: vermagic '{magic}', the image's modules have '{want_magic}'")
        for sym, crc in imported_crcs(ko).items():
            have = ours.get(sym) or exports.get(sym)
            if have is None:
                problems.append(f"{ko.name}: imports {sym}, which neither the image nor our modules export")
            elif have[0] != crc:
                problems.append(
                    f"{ko.name}: {sym} built against CRC {crc:#010x}, {have[1]} exports {have[0]:#010x} in "
                    f"{image.release} ({image.package_version})"
                )
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise BuildError(
            f"KVM modules do not match {image.describe()}; refusing to boot them:\n  {shown}\n"
            "(built against other headers, or the image was upgraded: rebuild, or install the matching headers)"
        )


# -- what the initramfs loads -------------------------------------------------------------------------------


def boot_modules(image: DistroImage, ours: list[Path]) -> list[Path]:
    """The image's own modules every level loads, with their dependencies, each after what it needs: those the
    root share, the export and the swap disk need, and what our KVM modules import from others (kvm-amd's SEV
    functions are ccp's)."""
    moddir = image.path("modules")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[re.sub(r"\.ko(\.\w+)?$", "", Path(path).name).replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    own = {ko.name.removesuffix(".ko").replace("-", "_") for ko in ours}
    wanted = [*BOOT_MODULES, *(d for ko in ours for d in modinfo(ko, "depends").split(",") if d and d not in own)]
    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    for p in order:
        if not p.endswith(".ko"):
            raise BuildError(f"{moddir / p}: compressed modules are not supported yet (busybox insmod loads .ko)")
    return [moddir / p for p in order]
