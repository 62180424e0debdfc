"""Patch series as data: `patches/<series>/index.yaml` maps kernel versions to patch variants.

Applying is all-or-nothing: each patch is checked before it is applied, and a failure
rolls back what was already applied, so no half-patched tree is ever built. After
applying, the series' `verify` rules prove the change took effect.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import REPO_ROOT
from .errors import PatchError, UnsupportedKernel
from .source import KernelVersion
from .util import hash_file, need_tool, run

PATCHES_DIR = REPO_ROOT / "patches"


def _mm(s: str) -> tuple[int, int]:
    major, minor = str(s).split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class PatchVariant:
    series: str
    name: str
    min: tuple[int, int]
    max: tuple[int, int]
    shape: str
    patches: tuple[Path, ...]

    def hashes(self) -> dict[str, str]:
        return {
            p.name if len(self.patches) == 1 else str(p.relative_to(PATCHES_DIR)): hash_file(p) for p in self.patches
        }


@dataclass(frozen=True)
class Series:
    name: str
    title: str
    variants: tuple[PatchVariant, ...]
    upstream_since: tuple[int, int] | None
    verify_file: str | None
    verify_absent: tuple[str, ...]

    def select(self, version: KernelVersion, explicit: str = "auto") -> PatchVariant:
        if explicit != "auto":
            for v in self.variants:
                if v.name == explicit:
                    return v
            raise PatchError(
                f"series {self.name} has no variant '{explicit}' (variants: {', '.join(v.name for v in self.variants)})"
            )
        if self.upstream_since and version.mm >= self.upstream_since:
            raise UnsupportedKernel(
                f"kernel {version}: '{self.title}' is upstream since "
                f"{'.'.join(map(str, self.upstream_since))}; there is nothing to patch. An A/B on this kernel "
                "needs a baseline that reverts the change, which this series does not ship."
            )
        for v in self.variants:
            if v.min <= version.mm <= v.max:
                return v
        ranges = ", ".join(f"{v.name}: {'.'.join(map(str, v.min))}-{'.'.join(map(str, v.max))}" for v in self.variants)
        raise UnsupportedKernel(f"kernel {version}: no variant of series {self.name} fits this version ({ranges})")


def load_series(name: str, root: Path = PATCHES_DIR) -> Series:
    index = root / name / "index.yaml"
    if not index.exists():
        known = sorted(p.parent.name for p in root.glob("*/index.yaml"))
        raise PatchError(f"no patch series '{name}' (no {index}); known: {', '.join(known) or 'none'}")
    data = yaml.safe_load(index.read_text())
    variants = []
    for v in data["variants"]:
        files = tuple(root / name / p for p in v["patches"])
        for f in files:
            if not f.exists():
                raise PatchError(f"{index}: variant {v['name']} lists missing patch {f}")
        variants.append(PatchVariant(name, v["name"], _mm(v["min"]), _mm(v["max"]), v.get("shape", ""), files))
    verify = data.get("verify") or {}
    return Series(
        name,
        data.get("title", name),
        tuple(variants),
        _mm(data["upstream_since"]) if data.get("upstream_since") else None,
        verify.get("file"),
        tuple(verify.get("absent", [])),
    )


def _git_apply(tree: Path, patch: Path, *flags: str):
    # a cache under some git checkout must not make git apply paths relative to that checkout
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    return run(["git", "apply", *flags, str(patch)], cwd=tree, capture=True, check=False, env=env)


def touched_files(patch: Path) -> list[str]:
    text = patch.read_text(errors="replace")
    return sorted(set(re.findall(r"^\+\+\+ b/(\S+)", text, re.M)) | set(re.findall(r"^--- a/(\S+)", text, re.M)))


def _hunk_of(patch: Path, file: str, line: int) -> str:
    """Name the hunk git reported by its old-file line: 'hunk #3 (@@ -1725,7 ...)'."""
    current, n = None, 0
    for l in patch.read_text(errors="replace").splitlines():
        if l.startswith("--- a/"):
            current, n = l[6:], 0
        elif l.startswith("@@") and current == file:
            n += 1
            m = re.match(r"@@ -(\d+)", l)
            if m and int(m.group(1)) == line:
                return f"hunk #{n} ({l.strip()})"
    return f"the hunk at line {line}"


def _failure_message(patch: Path, output: str) -> str:
    m = re.search(r"patch failed: (\S+):(\d+)", output)
    if m:
        file, line = m.group(1), int(m.group(2))
        return f"patch {patch.name} does not apply: {file}, {_hunk_of(patch, file, line)}"
    m = re.search(r"error: (\S+): (does not exist in index|No such file or directory|already exists.*)", output)
    if m:
        return f"patch {patch.name} does not apply: {m.group(1)}: {m.group(2)}"
    last = output.strip().splitlines()[-1] if output.strip() else "unknown error"
    return f"patch {patch.name} does not apply: {last}"


def _break_links(tree: Path, files: list[str]) -> None:
    """The tree shares inodes with the pristine source: give files a patch edits inodes of their own."""
    for rel in files:
        f = tree / rel
        if f.exists() and f.stat().st_nlink > 1:
            tmp = f.with_name(f.name + ".nestpress-unlink")
            shutil.copy2(f, tmp)
            tmp.replace(f)


def apply(tree: Path, variant: PatchVariant) -> None:
    """Check then apply each patch; on any failure undo the ones applied, and raise naming patch/file/hunk."""
    need_tool("git", "git")
    applied: list[Path] = []
    try:
        for p in variant.patches:
            r = _git_apply(tree, p, "--check", "-v")
            if r.returncode != 0:
                raise PatchError(
                    _failure_message(p, r.stderr + r.stdout) + f" (series {variant.series}, variant {variant.name} for "
                    f"{variant.shape or 'its range'})"
                )
            _break_links(tree, touched_files(p))
            r = _git_apply(tree, p)
            if r.returncode != 0:
                raise PatchError(_failure_message(p, r.stderr + r.stdout))
            applied.append(p)
    except BaseException:
        for p in reversed(applied):
            _git_apply(tree, p, "-R")
        raise


def revert(tree: Path, variant: PatchVariant) -> None:
    """Take an applied variant out again (last patch first), checking before touching anything."""
    for p in reversed(variant.patches):
        r = _git_apply(tree, p, "-R", "--check")
        if r.returncode != 0:
            raise PatchError(
                f"cannot take {p.name} out of {tree}: the tree was changed by hand; delete {tree} and build again"
            )
        _git_apply(tree, p, "-R")


def undo_partial(tree: Path, variant: PatchVariant) -> int:
    """After a kill while applying or reverting: take out whichever of the variant's patches are in."""
    undone = 0
    for p in reversed(variant.patches):
        if _git_apply(tree, p, "-R", "--check").returncode == 0:
            _git_apply(tree, p, "-R")
            undone += 1
    return undone


def verify(tree: Path, series: Series) -> list[str]:
    """Evidence that the series took effect; raises if a marker the series removes is still there."""
    if not series.verify_file:
        return []
    text = (tree / series.verify_file).read_text(errors="replace")
    left = [s for s in series.verify_absent if s in text]
    if left:
        raise PatchError(
            f"series {series.name} applied but {series.verify_file} still contains "
            f"{', '.join(left)}: the patch did not take effect"
        )
    return [f"{series.verify_file}: no {s}" for s in series.verify_absent]
