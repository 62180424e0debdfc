"""Cached kernel builds: source + patches + config fragments -> bzImage, once per distinct input.

Layout under the cache (default ~/.cache/nestpress, or $NESTPRESS_CACHE):
  src/<source-key>/                 pristine tree (shared, never modified)
  work/<work-key>/tree/             hard-linked copy of it, switched between the variants' patch sets
  work/<work-key>/tree/o/           out-of-tree build dir (a direct child, so kbuild uses srctree=..)
  builds/<build-key>/               finished artifacts: bzImage, config, System.map, build.log, metadata.json
  ccache/                           compiler cache

Every variant of a source is built in the same tree and the same `o/`: switching variants
reverses the applied series and applies the next one, so make recompiles only the files a
patch touches. (A copy of `o/` elsewhere would not do: the objtool binary records absolute
paths, gets relinked in a new place, and every object depends on it.) Config changes reuse
`o/` too: kbuild's per-option dependencies rebuild only what changed. A lock file serialises
builds in one tree.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from .. import REPO_ROOT
from ..config import Experiment, Source, Variant
from ..errors import BuildError, KconfigError
from ..machine import initramfs
from ..results.manifest import Record
from ..util import (
    atomic_dir,
    default_cache,
    hash_file,
    hash_text,
    log,
    need_tool,
    own_cache,
    read_json,
    run,
    status,
    write_json,
)
from . import distro
from .distro import DistroImage
from .patches import apply, check_effect, revert, undo_partial
from .source import PreparedSource, prepare
from .variants import Resolved, resolve_all

RECIPE = "nestpress-build-1"  # bump when the way we build changes what comes out
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "perl")


class AppliedState(Record):
    """The build tree's .nestpress-applied.json: which patches are in (as the cache's copies), or, while
    changing, every set that may be partly in."""

    result: str = ""
    patches: list[str] = Field(default_factory=list)
    touched: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    changing: list[AppliedState] = Field(default_factory=list)


@dataclass
class BuildResult:
    variant: str
    key: str
    dir: Path
    bzimage: Path
    metadata: dict
    cached: bool

    @property
    def initrd(self) -> Path | None:
        """A distribution kernel's boot archive (its modules and ours); a full build needs none."""
        p = self.dir / INITRD
        return p if p.exists() else None


INITRD = "initrd.cpio"
KERNEL_ARTIFACTS = (("arch/x86/boot/bzImage", "bzImage"), (".config", "config"), ("System.map", "System.map"))


def compiler_version() -> str:
    need_tool("gcc")
    return run(["gcc", "--version"], capture=True).stdout.splitlines()[0]


def fragment_paths(exp: Experiment) -> list[Path]:
    out = []
    for frag in exp.kernel_config.fragments:
        p = Path(frag).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / "configs" / frag
        if not p.exists():
            raise KconfigError(f"config fragment {frag} not found (looked at {p})")
        out.append(p)
    return out


def check_inputs(exp: Experiment, cache: Path | None = None) -> list[str]:
    """What a build would refuse, found without building: every variant's source (prepared: extracted or
    exported once, as the build would), its patches tried on that source, the fragments. Returns what it
    resolved, to be said."""
    builder = Builder(exp, cache)
    if exp.distro_kernel is None:
        fragment_paths(exp)
    lines = [line for r in builder.resolved().values() for line in r.describe()]
    image = builder.image()
    return lines + ([f"kernel under test: {image.describe()}, KVM modules built from the source"] if image else [])


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


class Builder:
    """Builds the variants of one experiment; variants of one source share its tree and compiled objects."""

    def __init__(self, exp: Experiment, cache: Path | None = None, jobs: int | None = None):
        self.exp = exp
        self.cache = own_cache((cache or default_cache()).resolve())
        self.jobs = jobs or os.cpu_count() or 1
        self._sources: dict[str, PreparedSource] = {}
        self._resolved: dict[str, Resolved] | None = None
        self._image: DistroImage | None = None

    def prepare(self, src: Source) -> PreparedSource:
        key = src.model_dump_json()
        if key not in self._sources:
            self._sources[key] = prepare(src, self.cache)
        return self._sources[key]

    def resolved(self) -> dict[str, Resolved]:
        if self._resolved is None:
            self._resolved = resolve_all(self.exp, self.prepare, self.cache / "patches")
        return self._resolved

    def image(self) -> DistroImage | None:
        """The distribution kernel the config boots (checked against the source's version), or None."""
        if self.exp.distro_kernel is not None and self._image is None:
            self._image = distro.resolve(self.exp.distro_kernel, self.prepare(self.exp.source).version)
        return self._image

    def inputs(self, r: Resolved) -> dict:
        """What the build's output depends on, and nothing else: the cache key. The same change given as a
        series, a file, an mbox or a git range has one result id, so one build. A distribution kernel's
        modules depend on its image and headers instead of a config."""
        image = self.image()
        frags = [] if image else fragment_paths(self.exp)
        product = (
            {
                "distro_image": image.identity,
                "boot_init": hash_file(initramfs.DISTRO_INIT),
                "boot_modules": list(distro.BOOT_MODULES),
            }
            if image
            else {
                "config_base": base_identity(self.exp.kernel_config.base),
                "fragments": {
                    str(f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f): hash_file(f) for f in frags
                },
            }
        )
        return {
            "recipe": RECIPE,
            "source": r.source.identity,
            "patched_result": r.trial.result_id,
            **product,
            "compiler": compiler_version(),
            "arch": "x86_64",
        }

    @staticmethod
    def about(r: Resolved) -> dict:
        """How this variant got its inputs (said in metadata and the manifest; not part of the key)."""
        return {
            "source_description": r.source.description,
            "kernel_version": str(r.source.version),
            "own_source": r.own_source,
            "series": r.variant.series,
            "patch_variant": r.series_variant,
            "patches": {p.origin: p.path.stem for p in r.patches},
            "evidence": list(r.trial.evidence),
        }

    def build_all(self) -> dict[str, BuildResult]:
        return {v.name: self.build(v) for v in self.exp.variants}

    def build(self, v: Variant) -> BuildResult:
        r = self.resolved()[v.name]
        inputs = self.inputs(r)
        key = hash_text(repr(sorted(inputs.items())))[:20]
        out = self.cache / "builds" / key
        if (out / "metadata.json").exists() and (out / "bzImage").exists():
            meta = read_json(out / "metadata.json")
            meta["about"] = self.about(r)  # this variant's way to the same result
            self._check_abi(out)
            log(f"build {v.name}: cached ({meta['kernelrelease']}, built in {meta['duration_s']:.0f}s) -> {out}")
            return BuildResult(v.name, key, out, out / "bzImage", meta, cached=True)
        for tool in BUILD_TOOLS:
            need_tool(tool)
        for header, pkg in (("/usr/include/libelf.h", "libelf-dev"), ("/usr/include/openssl/ssl.h", "libssl-dev")):
            if not Path(header).exists():
                raise BuildError(f"missing {header}: install the Debian package '{pkg}'")
        if r.own_source:
            log(f"build {v.name}: its own source ({r.source.description}): a tree and objects of its own")
        return self._build(r, inputs, key, out)

    def _check_abi(self, out: Path) -> None:
        """A distribution kernel's modules against its image, before any boot (the build checked them too)."""
        if image := self.image():
            distro.check_abi([out / m for m in distro.KVM_MODULES], out / "Module.symvers", image)

    def _work_root(self, inputs: dict) -> Path:
        return self.cache / "work" / hash_text(inputs["source"], inputs["compiler"])[:16]

    def _tree(self, r: Resolved, inputs: dict) -> Path:
        """The hard-linked copy of the pristine tree that every variant of this source is built in, made once."""
        tree = self._work_root(inputs) / "tree"
        if not (tree / ".nestpress-tree-ok").exists():
            with atomic_dir(tree, replace=True) as tmp:  # under tree.lock
                run(["cp", "-al", str(r.source.tree) + "/.", str(tmp)])
                (tmp / ".nestpress-tree-ok").touch()
        return tree

    def _checkout(self, tree: Path, r: Resolved) -> None:
        """Make the tree hold exactly this variant's patches (reverse the others first). What is about to
        change is recorded before the tree is touched, so a kill halfway is undone on the next build, never
        compiled as the other variant. The patches recorded are the cache's copies: what was applied."""
        state = tree / ".nestpress-applied.json"
        applied = AppliedState.model_validate(read_json(state)) if state.exists() else None
        if applied and applied.changing:
            for rec in applied.changing:
                n = undo_partial(tree, [Path(p) for p in rec.patches])
                log(f"build: the last build was stopped while changing patches; took {n} of {len(rec.patches)} out")
            state.unlink()
            applied = None
        want = (
            AppliedState(
                result=r.trial.result_id,
                patches=[str(p.path) for p in r.patches],
                touched=list(r.trial.touched),
                removed=list(r.expect.removed),
            )
            if r.patches
            else None
        )
        if applied is not None and want is not None and applied.result == want.result:
            check_effect(tree, want.touched, r.expect, r.what)  # the tree still holds what it says
            return
        if applied is None and want is None:
            return
        write_json(state, AppliedState(changing=[x for x in (applied, want) if x]).model_dump())
        if applied:
            revert(tree, [Path(p) for p in applied.patches])
        if want:
            log(f"build {r.variant.name}: applying {len(r.patches)} patch(es)")
            apply(tree, r.patches, r.what)
            check_effect(tree, want.touched, r.expect, r.what)
            write_json(state, want.model_dump())
        else:
            state.unlink()

    def _make(self, tree: Path, *targets: str, env: dict) -> subprocess.CompletedProcess:
        return run(["make", "-s", "-C", str(tree), "O=o", *targets], capture=True, env=env)

    def _configure(self, tree: Path, env: dict) -> Path:
        o = tree / "o"
        o.mkdir(exist_ok=True)
        cfg = o / ".config"
        old = cfg.read_bytes() if cfg.exists() else None
        old_mtime = cfg.stat().st_mtime_ns if cfg.exists() else None
        base = self.exp.kernel_config.base
        if Path(base).expanduser().is_file():
            shutil.copy(Path(base).expanduser(), cfg)
        else:
            self._make(tree, base, env=env)
        frags = fragment_paths(self.exp)
        if frags:
            run(
                [str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(o), str(cfg), *map(str, frags)],
                cwd=tree,
                capture=True,
                env=env,
            )
        self._make(tree, "olddefconfig", env=env)
        check_config(cfg, requested_options(frags))
        if old is not None and old_mtime is not None and cfg.read_bytes() == old:
            os.utime(cfg, ns=(old_mtime, old_mtime))  # same config: keep make's view of it unchanged
        return cfg

    def _build(self, r: Resolved, inputs: dict, key: str, out: Path) -> BuildResult:
        work = self._work_root(inputs)
        work.mkdir(parents=True, exist_ok=True)
        name = r.variant.name
        with open(work / "tree.lock", "w") as lock:  # before the tree is made: one maker, one builder
            fcntl.flock(lock, fcntl.LOCK_EX)
            tree = self._tree(r, inputs)
            if (out / "metadata.json").exists():  # built meanwhile by another process
                return BuildResult(name, key, out, out / "bzImage", read_json(out / "metadata.json"), cached=True)
            self._checkout(tree, r)
            return self._build_locked(r, inputs, key, out, tree)

    def _build_locked(self, r: Resolved, inputs: dict, key: str, out: Path, tree: Path) -> BuildResult:
        v = r.variant
        env = dict(
            os.environ,
            KBUILD_BUILD_TIMESTAMP="nestpress",
            KBUILD_BUILD_USER="nestpress",
            KBUILD_BUILD_HOST="nestpress",
            LC_ALL="C",
        )
        image = self.image()
        cc = self._ccache(env, image)
        mod_dir = self._work_root(inputs) / f"kvm-{image.release}" if image else None
        if image and mod_dir:
            make_cmd = distro.make_command(image, mod_dir, self.jobs)
        else:
            make_cmd = ["make", "-C", str(tree), "O=o", f"-j{self.jobs}", f"CC={cc}", "bzImage"]
        meta = {
            "status": "running",
            "variant": v.name,
            "key": key,
            "inputs": inputs,
            "about": self.about(r),
            "started": time.time(),
            "reproducer": " ".join(make_cmd),
            "tree": str(tree),
            "host": os.uname().nodename,
        }
        write_json(tree / "metadata.json", meta)
        t0 = time.monotonic()
        try:
            if image and mod_dir:
                meta["kvm_sources_changed"] = distro.sync_kvm_sources(tree, mod_dir)
            else:
                meta["config_sha256"] = hash_file(self._configure(tree, env))
            write_json(tree / "metadata.json", meta)
            compiles, log_path = self._run_make(v.name, make_cmd, tree, env)
            if image and mod_dir:
                release = image.release
                kos = [mod_dir / "arch/x86/kvm" / m for m in distro.KVM_MODULES]
                distro.check_abi(kos, mod_dir / "arch/x86/kvm/Module.symvers", image)  # before it is cached
                artifacts = [
                    (image.path("image"), "bzImage"),
                    (image.path("config"), "config"),
                    (image.path("system_map"), "System.map"),
                    (mod_dir / "arch/x86/kvm/Module.symvers", "Module.symvers"),
                    *((ko, ko.name) for ko in kos),
                ]
            else:
                release = self._make(tree, "kernelrelease", env=env).stdout.strip()
                artifacts = [(tree / f"o/{a}", b) for a, b in KERNEL_ARTIFACTS]
        except BaseException as e:
            meta.update(
                status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                error=str(e)[-2000:],
                duration_s=time.monotonic() - t0,
            )
            write_json(tree / "metadata.json", meta)
            raise
        meta.update(
            status="complete",
            duration_s=time.monotonic() - t0,
            compiles=compiles,
            kernelrelease=release,
            finished=time.time(),
            ccache=self._ccache_stats(env),
        )
        with atomic_dir(out, replace=True) as tmp:  # under tree.lock
            for src, name in artifacts:
                shutil.copy2(src, tmp / name)
            if image:
                ours = [tmp / m for m in distro.KVM_MODULES]
                initramfs.boot_archive(image.distro.busybox, distro.boot_modules(image, ours), ours, tmp / INITRD)
            shutil.copy2(log_path, tmp / "build.log")
            meta["artifacts"] = {p.name: hash_file(p) for p in sorted(tmp.iterdir())}
            write_json(tmp / "metadata.json", meta)
        write_json(tree / "metadata.json", meta)
        what = f"KVM modules for {image.describe()}" if image else release
        log(f"build {v.name}: {what} in {meta['duration_s']:.0f}s, {compiles} compile(s) -> {out}")
        return BuildResult(v.name, key, out, out / "bzImage", meta, cached=False)

    def _ccache(self, env: dict, image: DistroImage | None) -> str:
        """The compiler command, with ccache when there is one (env updated for it)."""
        if not shutil.which("ccache"):
            log(
                "build: ccache not found (apt-get install ccache): cold builds will not be cached across trees",
                style="yellow",
            )
            return "gcc"
        env.update(
            CCACHE_DIR=str(self.cache / "ccache"),
            CCACHE_BASEDIR=str(self.cache / "work"),
            CCACHE_NOHASHDIR="true",
            CCACHE_SLOPPINESS="time_macros",
            **(image.distro.ccache_env if image else {}),
        )
        return "ccache gcc"

    def _run_make(self, name: str, cmd: list[str], tree: Path, env: dict) -> tuple[int, Path]:
        """Stream make's output to build.log with a live status line; the log tail on failure."""
        log_path = tree / "build.log"
        compiles = 0
        with open(log_path, "w", buffering=1) as logf, status(f"build {name}: {cmd[-1]}", every_s=60) as progress:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    logf.write(line)
                    if line.startswith("  CC "):
                        compiles += 1
                        progress.update(f"build {name}: {compiles} compiled, {line.split()[-1]}")
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
        if rc != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
            if "No space left on device" in tail:
                raise BuildError(
                    f"kernel build of {name} failed: disk full under {tree} "
                    f"({shutil.disk_usage(tree).free >> 20} MiB free); free space or set NESTPRESS_CACHE"
                )
            raise BuildError(f"kernel build of {name} failed (exit {rc}); log {log_path}; last lines:\n{tail}")
        return compiles, log_path

    def _ccache_stats(self, env: dict) -> str | None:
        if "CCACHE_DIR" not in env:
            return None
        r = run(["ccache", "-s"], capture=True, check=False, env=env)
        return " ".join(l.strip() for l in r.stdout.splitlines() if re.search(r"Hits|Misses", l))[:300] or None
