"""Kernel sources: a tarball, a git repository + ref, or a local tree -> a pristine tree in the cache.

The user's tree is never touched: tarballs are extracted, git refs are exported with
`git archive`, local trees are copied. The pristine tree is shared read-only by every
variant (variants hard-link it and break the links of files a patch changes).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import Source
from ..errors import SourceError
from ..util import atomic_dir, hash_file, log, need_tool, run, what_is


@dataclass(frozen=True)
class KernelVersion:
    major: int
    minor: int
    sublevel: int
    extra: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}{self.extra}"

    @property
    def mm(self) -> tuple[int, int]:
        return (self.major, self.minor)


@dataclass(frozen=True)
class PreparedSource:
    tree: Path  # pristine tree, do not modify
    identity: str  # what determines its contents (for cache keys)
    version: KernelVersion
    description: str


def makefile_version(tree: Path) -> KernelVersion:
    mk = tree / "Makefile"
    if not mk.exists():
        raise SourceError(f"{tree}: no top-level Makefile, not a kernel tree")
    return _parse_version(mk.read_text(errors="replace")[:2000], str(mk))


def _parse_version(head: str, where: str) -> KernelVersion:
    fields = {}
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION"):
        m = re.search(rf"^{key}[ \t]*=[ \t]*(.*)$", head, re.M)
        fields[key] = m.group(1).strip() if m else ""
    try:
        return KernelVersion(
            int(fields["VERSION"]), int(fields["PATCHLEVEL"]), int(fields["SUBLEVEL"] or 0), fields["EXTRAVERSION"]
        )
    except ValueError:
        raise SourceError(f"{where}: cannot read VERSION/PATCHLEVEL/SUBLEVEL ({fields})") from None


def _tree_fingerprint(tree: Path) -> str:
    """Identity of a local tree: git HEAD + diff when it is a repository, else names/sizes/mtimes."""
    if (tree / ".git").exists():
        head = run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture=True).stdout.strip()
        diff = run(["git", "-C", str(tree), "diff", "HEAD"], capture=True).stdout
        return f"git:{head}:{hashlib.sha256(diff.encode()).hexdigest()[:16]}"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for f in sorted(files):
            st = os.lstat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), tree)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "walk:" + h.hexdigest()[:16]


def is_local_repo(repo: str) -> bool:
    return Path(repo).expanduser().is_dir()


def resolve_commit(repo: str, ref: str, what: str) -> str:
    """The commit a ref names in a local repository (a tag peeled to its commit)."""
    r = run(
        ["git", "-C", str(Path(repo).expanduser()), "rev-parse", "--verify", "--end-of-options", ref + "^{commit}"],
        capture=True,
        check=False,
    )
    if r.returncode != 0:
        raise SourceError(f"{what}: ref '{ref}' not found in {repo}")
    return r.stdout.strip()


def check_present(src: Source) -> None:
    """The tarball or the local tree is there (a git ref is resolved by prepare)."""
    where = Path(src.where).expanduser()
    if src.kind == "tarball" and (kind := what_is(where)) != "a regular file":
        hint = f" (install it: apt-get install {src.package}, or `fab setup`)" if src.package else ""
        raise SourceError(f"kernel tarball {where}: {'does not exist' if kind.startswith('no such') else kind}{hint}")
    if src.kind == "local" and not where.is_dir():
        raise SourceError(f"local kernel tree {where.resolve()} does not exist")


def prepare(src: Source, cache: Path) -> PreparedSource:
    """Return a pristine tree for `src`, extracting/exporting it once per identity."""
    check_present(src)
    if src.kind == "tarball":
        tar = Path(src.where).expanduser()
        identity = "tarball:" + hash_file(tar)
        desc = str(tar)
    elif src.kind == "git":
        need_tool("git", "git")
        url = os.path.expanduser(src.where)
        if is_local_repo(url):
            sha = resolve_commit(url, src.ref, "git source")
        else:
            r = run(["git", "ls-remote", "--end-of-options", url, src.ref], capture=True, check=False)
            sha = r.stdout.split()[0] if r.returncode == 0 and r.stdout.strip() else ""
            if not sha:
                raise SourceError(f"git source {src.url}: ref '{src.ref}' not found")
        identity = "git:" + sha
        desc = f"{src.url}@{src.ref} ({sha[:12]})"
    else:
        tree = Path(src.where).expanduser().resolve()
        makefile_version(tree)
        identity = "local:" + _tree_fingerprint(tree)
        desc = str(tree)

    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    dest = cache / "src" / key
    if not (dest / "Makefile").exists():
        with atomic_dir(dest) as tmp:
            log(f"source: preparing {desc} -> {dest}")
            if src.kind == "tarball":
                need_tool("tar", "tar")
                run(["tar", "-xf", str(Path(src.where).expanduser()), "-C", str(tmp), "--strip-components=1"])
            elif src.kind == "git":
                archive = subprocess.Popen(
                    ["git", "-C", os.path.expanduser(src.where), "archive", "--end-of-options", identity[4:]]
                    if Path(os.path.expanduser(src.where)).exists()
                    else ["git", "archive", f"--remote={src.where}", "--end-of-options", src.ref],
                    stdout=subprocess.PIPE,
                )
                run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout)
                if archive.wait() != 0:
                    raise SourceError(f"git archive of {desc} failed")
            else:
                shutil.copytree(
                    Path(src.where).expanduser(),
                    tmp,
                    symlinks=True,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".git"),
                )
            if (tmp / ".config").exists():
                log("source: the local tree was configured in-tree; running `make mrproper` on our copy")
                run(["make", "-s", "-C", str(tmp), "mrproper"])
    return PreparedSource(tree=dest, identity=identity, version=makefile_version(dest), description=desc)
