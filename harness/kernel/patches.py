"""Patches as data, and applying them to a kernel tree all-or-nothing.

A series (`patches/<series>/index.yaml`) maps kernel versions to patch variants. A user's own patches come
as files, mbox files (several messages, as `git format-patch` or a list archive gives them) or directories;
split_mbox() makes one file per message. Every patch a build uses is kept in the cache under its content
hash (stash()), so the tree can always be reverted to what was applied even when the user's file changed.

trial() applies a variant's patches, in order, to copies of just the files they touch: it names the patch
and hunk that fails before any build, checks the variant's expectations (strings the patches must remove or
leave), and identifies the result by the content of those files, so the same change given as a file, an
mbox or a git range is the same build. apply() does the same to the build tree: each patch is checked
before it is applied and a failure rolls back what was already applied, so no half-patched tree is built.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import REPO_ROOT
from ..errors import PatchError, UnsupportedKernel
from ..util import hash_file, need_tool, run, what_is
from .source import KernelVersion

PATCHES_DIR = REPO_ROOT / "patches"
MAX_PATCH_BYTES = 256 << 20  # a whole release's diff is ~100 MB; anything larger is not a patch


def _mm(s: str) -> tuple[int, int]:
    major, minor = str(s).split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class PatchFile:
    """One patch, as it will be applied: a file holding exactly one change, and where it came from."""

    path: Path
    origin: str  # 'series shrinker-removal v6.0-6.6: 0001-....patch', 'my.mbox #2: Subject', 'git a1b2c3d4e5f6: ...'


@dataclass(frozen=True)
class PatchVariant:
    series: str
    name: str
    min: tuple[int, int]
    max: tuple[int, int]
    shape: str
    patches: tuple[Path, ...]


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


# -- a user's patches: files, mbox files, directories -------------------------------------------------------
def _read_patch(path: Path) -> bytes:
    """A patch or mbox file's bytes, gunzipped when it is gzip (lore's t.mbox.gz), at most MAX_PATCH_BYTES."""
    if (kind := what_is(path)) != "a regular file":
        raise PatchError(f"patch {path}: {kind}, not a patch file")
    if path.stat().st_size > MAX_PATCH_BYTES:
        raise PatchError(f"patch {path}: larger than {MAX_PATCH_BYTES >> 20} MiB; not a patch")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = zlib.decompressobj(wbits=31).decompress(data, MAX_PATCH_BYTES + 1)
        except zlib.error as e:
            raise PatchError(f"patch {path}: a broken gzip file ({e})") from None
        if len(data) > MAX_PATCH_BYTES:
            raise PatchError(f"patch {path}: more than {MAX_PATCH_BYTES >> 20} MiB unpacked; not a patch")
    return data


def is_diff(text: str) -> bool:
    return bool(re.search(r"^(diff --git |--- \S.*\n\+\+\+ )", text, re.M))


def split_mbox(path: Path) -> list[tuple[str, str]]:
    """(subject, text) of each message of an mbox that carries a diff, in file order; a cover letter or a
    reply without one is skipped. A plain diff (no 'From ' line) is one patch. Messages start at a line
    'From ...' (git format-patch, mboxo/mboxrd archives; '>From ' in a body is mboxrd's escape)."""
    data = _read_patch(path)
    if not data.startswith(b"From "):
        text = data.decode(errors="replace")
        if not is_diff(text):
            raise PatchError(f"patch {path}: holds no diff (neither `diff --git` nor ---/+++ lines)")
        return [(path.name, text)]
    out = []
    for raw in re.split(rb"(?m)^From [^\n]*\n", data)[1:]:
        m = email.message_from_bytes(re.sub(rb"(?m)^>(>*From )", rb"\1", raw), policy=email.policy.default)
        subject = " ".join(str(m.get("Subject", "(no subject)")).split())
        part = m.get_body(preferencelist=("plain",)) if m.is_multipart() else m
        body = part.get_content() if part is not None else ""
        if isinstance(body, bytes):
            body = body.decode(errors="replace")
        if is_diff(body):
            out.append((subject, f"Subject: {subject}\n\n{body}"))
    if not out:
        raise PatchError(f"mbox {path}: no message in it carries a diff")
    return out


def stash(text: str | bytes, store: Path) -> Path:
    """Keep a patch in the cache under its content hash (reverting needs exactly what was applied)."""
    data = text.encode() if isinstance(text, str) else text
    dest = store / f"{hashlib.sha256(data).hexdigest()[:32]}.patch"
    if not dest.exists():
        store.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return dest


def user_patches(given: Path, store: Path) -> list[PatchFile]:
    """A path from a variant's `patches:`: a patch, an mbox or a directory of *.patch (name order)."""
    if given.is_dir():
        files = sorted(given.glob("*.patch"))
        if not files:
            raise PatchError(f"patch directory {given}: no *.patch in it")
    else:
        files = [given]
    out = []
    for f in files:
        messages = split_mbox(f)
        for i, (subject, text) in enumerate(messages, 1):
            where = f"{f}" + (f" #{i}" if len(messages) > 1 else "")
            out.append(PatchFile(stash(text, store), f"{where}: {subject}" if subject != f.name else where))
    return out


def series_patches(pv: PatchVariant, store: Path) -> list[PatchFile]:
    return [PatchFile(stash(_read_patch(p), store), f"series {pv.series} {pv.name}: {p.name}") for p in pv.patches]


# -- applying -----------------------------------------------------------------------------------------------
def _git_apply(tree: Path, patch: Path, *flags: str):
    # a cache under some git checkout must not make git apply paths relative to that checkout
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    return run(["git", "apply", *flags, str(patch)], cwd=tree, capture=True, check=False, env=env)


def touched_files(patch: Path) -> list[str]:
    """Every path a patch reads or writes (renames and copies included), relative to the tree."""
    text = patch.read_text(errors="replace")
    found = set(re.findall(r"^\+\+\+ b/(\S+)", text, re.M)) | set(re.findall(r"^--- a/(\S+)", text, re.M))
    for a, b in re.findall(r"^diff --git a/(\S+) b/(\S+)$", text, re.M):
        found |= {a, b}
    found |= set(re.findall(r"^(?:rename|copy) (?:from|to) (\S+)$", text, re.M))
    bad = [f for f in found if f.startswith("/") or ".." in Path(f).parts]
    if bad:
        raise PatchError(f"patch {patch.name} names paths outside the tree: {', '.join(sorted(bad))}")
    return sorted(found)


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


def _failure_message(patch: PatchFile, output: str) -> str:
    m = re.search(r"patch failed: (\S+):(\d+)", output)
    if m:
        file, line = m.group(1), int(m.group(2))
        return f"patch {patch.origin} does not apply: {file}, {_hunk_of(patch.path, file, line)}"
    m = re.search(r"error: (\S+): (does not exist in index|No such file or directory|already exists.*)", output)
    if m:
        return f"patch {patch.origin} does not apply: {m.group(1)}: {m.group(2)}"
    last = output.strip().splitlines()[-1] if output.strip() else "unknown error"
    return f"patch {patch.origin} does not apply: {last}"


def _break_links(tree: Path, files: list[str]) -> None:
    """The tree shares inodes with the pristine source: give files a patch edits inodes of their own."""
    for rel in files:
        f = tree / rel
        if f.exists() and f.stat().st_nlink > 1:
            tmp = f.with_name(f.name + ".nestpress-unlink")
            shutil.copy2(f, tmp)
            tmp.replace(f)


def apply(tree: Path, patches: Sequence[PatchFile], what: str) -> None:
    """Check then apply each patch; on any failure undo the ones applied, and raise naming patch/file/hunk."""
    need_tool("git", "git")
    applied: list[PatchFile] = []
    try:
        for p in patches:
            r = _git_apply(tree, p.path, "--check", "-v")
            if r.returncode != 0:
                raise PatchError(f"{what}: " + _failure_message(p, r.stderr + r.stdout))
            _break_links(tree, touched_files(p.path))
            r = _git_apply(tree, p.path)
            if r.returncode != 0:
                raise PatchError(f"{what}: " + _failure_message(p, r.stderr + r.stdout))
            applied.append(p)
    except BaseException:
        for p in reversed(applied):
            _git_apply(tree, p.path, "-R")
        raise


def revert(tree: Path, patches: Sequence[Path]) -> None:
    """Take applied patches out again (last first), checking before touching anything."""
    for p in reversed(patches):
        r = _git_apply(tree, p, "-R", "--check")
        if r.returncode != 0:
            raise PatchError(
                f"cannot take {p.name} out of {tree}: the tree was changed by hand; delete {tree} and build again"
            )
        _git_apply(tree, p, "-R")


def undo_partial(tree: Path, patches: Sequence[Path]) -> int:
    """After a kill while applying or reverting: take out whichever of the patches are in."""
    undone = 0
    for p in reversed(patches):
        if _git_apply(tree, p, "-R", "--check").returncode == 0:
            _git_apply(tree, p, "-R")
            undone += 1
    return undone


@dataclass(frozen=True)
class Expectations:
    """What a variant's patches must do to the files they touch: remove these strings, leave those."""

    removed: tuple[str, ...] = ()
    present: tuple[str, ...] = ()

    def check(self, before: dict[str, str], after: dict[str, str], what: str) -> list[str]:
        """Evidence lines; raises naming what did not happen. before/after: path -> text of touched files."""
        evidence = []
        for s in self.removed:
            had = [f for f, t in before.items() if s in t]
            if not had:
                raise PatchError(
                    f"{what}: expect_removed {s!r} is in none of the files the patches touch, so removing it "
                    "proves nothing (a typo, or a kernel where it never was)"
                )
            if left := [f for f, t in after.items() if s in t]:
                raise PatchError(f"{what}: applied, but {', '.join(left)} still hold {s!r}: it did not take effect")
            evidence.append(f"{s!r} removed from {', '.join(had)}")
        for s in self.present:
            if not (has := [f for f, t in after.items() if s in t]):
                raise PatchError(f"{what}: applied, but no file it touches holds {s!r}")
            evidence.append(f"{s!r} in {', '.join(has)}")
        return evidence


@dataclass(frozen=True)
class Trial:
    """What applying a variant's patches to a tree gives, found without touching the tree."""

    result_id: str  # sha256 over (path, mode, content) of every touched file after applying; '' when no patches
    touched: tuple[str, ...]
    evidence: tuple[str, ...]


def _file_texts(root: Path, files: Sequence[str]) -> dict[str, str]:
    return {f: (root / f).read_text(errors="replace") for f in files if (root / f).is_file()}


def trial(tree: Path, patches: Sequence[PatchFile], expect: Expectations, what: str) -> Trial:
    """Apply the patches in order to copies of the files they touch: the failing patch and hunk named before
    any build, the expectations checked, and the result identified by content (the build's cache key)."""
    if not patches:
        if expect.removed or expect.present:
            raise PatchError(f"{what}: expect_removed/expect_present without patches")
        return Trial("", (), ())
    need_tool("git", "git")
    touched = sorted({f for p in patches for f in touched_files(p.path)})
    with tempfile.TemporaryDirectory(prefix="nestpress-trial-") as scratch:
        work = Path(scratch) / "tree"
        for rel in touched:
            if (tree / rel).is_file() or (tree / rel).is_symlink():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / rel, work / rel, follow_symlinks=False)
        work.mkdir(exist_ok=True)
        before = _file_texts(work, touched)
        for p in patches:
            r = _git_apply(work, p.path, "--check", "-v")
            if r.returncode == 0:
                r = _git_apply(work, p.path)
            if r.returncode != 0:
                raise PatchError(f"{what}: " + _failure_message(p, r.stderr + r.stdout))
        evidence = expect.check(before, _file_texts(work, touched), what)
        h = hashlib.sha256()
        for rel in touched:
            f = work / rel
            if f.is_symlink():
                h.update(f"{rel}\0link\0{os.readlink(f)}\n".encode())
            elif f.is_file():
                h.update(f"{rel}\0{f.stat().st_mode & 0o111:o}\0{hash_file(f)}\n".encode())
            else:
                h.update(f"{rel}\0absent\n".encode())
    return Trial(h.hexdigest()[:32], tuple(touched), tuple(evidence))


def check_effect(tree: Path, touched: Sequence[str], expect: Expectations, what: str) -> None:
    """The build tree still holds what its state file says: nothing expected removed is back."""
    after = _file_texts(tree, touched)
    if left := [f"{f}: {s!r}" for s in expect.removed for f, t in after.items() if s in t]:
        raise PatchError(f"{what}: the build tree holds {', '.join(left)}; delete {tree} and build again")
