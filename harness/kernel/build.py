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

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..config import Experiment, Source, Variant
from ..errors import BuildError
from ..results.manifest import BuildEntry, Record
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
from . import distro, selftests
from .distro import DistroImage
from .patches import apply, check_effect, revert, undo_partial
from .products import INITRD, DistroModules, FullKernel, Product, fragment_paths
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


class BuildAbout(Record):
    """How a variant got its inputs (said in the metadata and the manifest; not part of the key)."""

    source_description: str
    kernel_version: str
    own_source: bool = False
    series: str | None = None
    patch_variant: str | None = None
    patches: dict[str, str] = Field(default_factory=dict)  # origin -> the stashed patch's content id, as applied
    evidence: list[str] = Field(default_factory=list)


class BuildMetadata(Record):
    """metadata.json of a build: written when it starts (status running), completed when it ends (TuxMake's way:
    what was built, from what, how long it took, and how to do it again by hand)."""

    status: Literal["running", "complete", "failed", "interrupted"]
    variant: str
    key: str
    inputs: dict[str, Any]
    about: BuildAbout
    started: float
    reproducer: str
    tree: str
    host: str
    duration_s: float | None = None
    compiles: int | None = None
    kernelrelease: str | None = None
    finished: float | None = None
    ccache: str | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)
    config_sha256: str | None = None
    kvm_sources_changed: list[str] | None = None
    error: str | None = None

    @classmethod
    def load(cls, path: Path) -> BuildMetadata:
        return cls.model_validate(read_json(path))


@dataclass
class BuildResult:
    variant: str
    key: str
    dir: Path
    bzimage: Path
    metadata: BuildMetadata
    cached: bool
    selftests: Path | None = None  # the KVM selftests its variant's tree built, where workloads run them

    @property
    def initrd(self) -> Path | None:
        """A distribution kernel's boot archive (its modules and ours); a full build needs none."""
        p = self.dir / INITRD
        return p if p.exists() else None

    def entry(self, kernel_params: list[str]) -> BuildEntry:
        """This build as the manifest lists it, with the parameters its variant boots it with."""
        m, about = self.metadata, self.metadata.about
        return BuildEntry(
            key=self.key,
            dir=str(self.dir),
            kernelrelease=m.kernelrelease,
            kernel_version=about.kernel_version,
            source=about.source_description,
            own_source=about.own_source,
            patch_variant=about.patch_variant,
            patches=about.patches,
            patched_result=str(m.inputs.get("patched_result", "")),
            evidence=about.evidence,
            kernel_params=kernel_params,
            config_sha256=m.config_sha256,
            fragments=m.inputs.get("fragments", {}),
            distro_image=m.inputs.get("distro_image", {}),
            bzImage_sha256=m.artifacts.get("bzImage"),
        )


def compiler_version() -> str:
    need_tool("gcc")
    return run(["gcc", "--version"], capture=True).stdout.splitlines()[0]


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

    def product(self, work_root: Path) -> Product:
        """What the builds make: KVM's modules for a distribution kernel, else the whole kernel."""
        image = self.image()
        return DistroModules(image, work_root) if image else FullKernel(self.exp)

    def inputs(self, r: Resolved) -> dict:
        """What the build's output depends on, and nothing else: the cache key. The same change given as a
        series, a file, an mbox or a git range has one result id, so one build."""
        return {
            "recipe": RECIPE,
            "source": r.source.identity,
            "patched_result": r.trial.result_id,
            **self.product(Path()).key(),
            "compiler": compiler_version(),
            "arch": "x86_64",
        }

    @staticmethod
    def about(r: Resolved) -> BuildAbout:
        """How this variant got its inputs (said in metadata and the manifest; not part of the key)."""
        return BuildAbout(
            source_description=r.source.description,
            kernel_version=str(r.source.version),
            own_source=r.own_source,
            series=r.variant.series,
            patch_variant=r.series_variant,
            patches={p.origin: p.path.stem for p in r.patches},
            evidence=list(r.trial.evidence),
        )

    def build_all(self) -> dict[str, BuildResult]:
        out = {}
        for v in self.exp.variants:
            out[v.name] = result = self.build(v)
            if tests := self.exp.workload.selftests():
                with self.checked_out(v) as tree:
                    what, version = f"variant {v.name}", result.metadata.about.kernel_version
                    result.selftests = selftests.build(tree, tests, self.cache, self.jobs, what, version)
        return out

    @contextlib.contextmanager
    def checked_out(self, v: Variant) -> Iterator[Path]:
        """The shared tree holding exactly this variant's patches, locked while in use."""
        r = self.resolved()[v.name]
        inputs = self.inputs(r)
        work = self._work_root(inputs)
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "tree.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tree = self._tree(r, inputs)
            self._checkout(tree, r)
            yield tree

    def build(self, v: Variant) -> BuildResult:
        r = self.resolved()[v.name]
        inputs = self.inputs(r)
        key = hash_text(repr(sorted(inputs.items())))[:20]
        out = self.cache / "builds" / key
        if (out / "metadata.json").exists() and (out / "bzImage").exists():
            meta = BuildMetadata.load(out / "metadata.json")
            meta.about = self.about(r)  # this variant's way to the same result
            self.product(self._work_root(inputs)).check(out)
            log(f"build {v.name}: cached ({meta.kernelrelease}, built in {meta.duration_s or 0:.0f}s) -> {out}")
            return BuildResult(v.name, key, out, out / "bzImage", meta, cached=True)
        for tool in BUILD_TOOLS:
            need_tool(tool)
        for header, pkg in (("/usr/include/libelf.h", "libelf-dev"), ("/usr/include/openssl/ssl.h", "libssl-dev")):
            if not Path(header).exists():
                raise BuildError(f"missing {header}: install the Debian package '{pkg}'")
        if r.own_source:
            log(f"build {v.name}: its own source ({r.source.description}): a tree and objects of its own")
        return self._build(r, inputs, key, out)

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

    def _build(self, r: Resolved, inputs: dict, key: str, out: Path) -> BuildResult:
        work = self._work_root(inputs)
        work.mkdir(parents=True, exist_ok=True)
        name = r.variant.name
        with open(work / "tree.lock", "w") as lock:  # before the tree is made: one maker, one builder
            fcntl.flock(lock, fcntl.LOCK_EX)
            tree = self._tree(r, inputs)
            if (out / "metadata.json").exists():  # built meanwhile by another process
                return BuildResult(name, key, out, out / "bzImage", BuildMetadata.load(out / "metadata.json"), True)
            self._checkout(tree, r)
            return self._build_locked(r, inputs, key, out, tree)

    def _build_locked(self, r: Resolved, inputs: dict, key: str, out: Path, tree: Path) -> BuildResult:
        """Build the checked-out tree: metadata first (running), then the product's preparation and make, then its
        artifacts into the cache, atomically; the metadata says how it ended, whatever happened."""
        product = self.product(self._work_root(inputs))
        env = dict(os.environ, KBUILD_BUILD_TIMESTAMP="nestpress", KBUILD_BUILD_USER="nestpress", LC_ALL="C")
        env["KBUILD_BUILD_HOST"] = "nestpress"
        cmd = product.command(tree, self._ccache(env, product), self.jobs)
        meta = BuildMetadata(
            status="running",
            variant=r.variant.name,
            key=key,
            inputs=inputs,
            about=self.about(r),
            started=time.time(),
            reproducer=" ".join(cmd),
            tree=str(tree),
            host=os.uname().nodename,
        )
        meta.save(tree / "metadata.json")
        t0 = time.monotonic()
        try:
            for name, value in product.prepare(tree, env).items():
                setattr(meta, name, value)
            meta.save(tree / "metadata.json")
            meta.compiles, log_path = self._run_make(r.variant.name, cmd, tree, env)
            meta.kernelrelease, artifacts = product.artifacts(tree, env)
        except BaseException as e:
            meta.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            meta.error, meta.duration_s = str(e)[-2000:], time.monotonic() - t0
            meta.save(tree / "metadata.json")
            raise
        meta.status, meta.duration_s, meta.finished = "complete", time.monotonic() - t0, time.time()
        meta.ccache = self._ccache_stats(env)
        with atomic_dir(out, replace=True) as tmp:  # under tree.lock
            for src, name in artifacts:
                shutil.copy2(src, tmp / name)
            product.finish(tmp)
            shutil.copy2(log_path, tmp / "build.log")
            meta.artifacts = {p.name: hash_file(p) for p in sorted(tmp.iterdir())}
            meta.save(tmp / "metadata.json")
        meta.save(tree / "metadata.json")
        what = product.describe(meta.kernelrelease)
        log(f"build {r.variant.name}: {what} in {meta.duration_s:.0f}s, {meta.compiles} compile(s) -> {out}")
        return BuildResult(r.variant.name, key, out, out / "bzImage", meta, cached=False)

    def _ccache(self, env: dict, product: Product) -> str:
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
            **product.ccache_env(),
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
