"""What each variant is, resolved before anything builds: its source, its patches in order, its boot parameters.

A variant's kernel is a source (the experiment's, or its own `source:` / `git.ref`) with patches applied in
this order: the series picked for the source's version, the `patches:` files and mbox messages, the
commits of a `git.range`. A `git.ref` in the experiment source's own repository is the diff from the
source's commit to that ref, applied to the same tree, so it builds incrementally like a patch. Every patch
is stashed in the cache by content (patches.stash) and tried on copies of the files it touches
(patches.trial): a failing hunk is named with its variant before any build, and the result's content is
the build's cache key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Experiment, Source, Variant
from ..errors import HarnessError, PatchError, SourceError
from ..util import log, run, what_is
from .patches import (
    Expectations,
    PatchFile,
    Trial,
    load_series,
    series_patches,
    stash,
    trial,
    user_patches,
)
from .source import PreparedSource, check_present, is_local_repo, resolve_commit

MAX_RANGE_COMMITS = 500


@dataclass(frozen=True)
class Resolved:
    """A variant ready to build: its prepared source, its patches in order, what they must do, what they do."""

    variant: Variant
    source: PreparedSource
    own_source: bool  # not the experiment's source: a build of its own, sharing nothing
    patches: tuple[PatchFile, ...]
    expect: Expectations
    series_variant: str | None  # the series' patch variant picked for the source's version
    trial: Trial

    @property
    def what(self) -> str:
        return f"variant {self.variant.name}"

    def describe(self) -> list[str]:
        v = self.variant
        lines = [f"variant {v.name}: {self.source.description} ({self.source.version})"]
        lines += ["  own source: its build shares nothing with the others'"] if self.own_source else []
        lines += [f"  patch {i}: {p.origin}" for i, p in enumerate(self.patches, 1)]
        if self.patches:
            touched = len(self.trial.touched)
            lines.append(f"  applies cleanly; touches {touched} file(s); result {self.trial.result_id[:12]}")
        lines += [f"  checked: {e}" for e in self.trial.evidence]
        lines += [f"  boots with: {' '.join(v.kernel_params())}"] if v.kernel_params() else []
        return lines


def _git(repo: str, *args: str, what: str) -> str:
    r = run(["git", "-C", repo, *args], capture=True, check=False)
    if r.returncode != 0:
        raise SourceError(f"{what}: git {' '.join(args[:2])} in {repo} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def range_patches(repo: str, spec: str, store: Path, what: str) -> list[PatchFile]:
    """The commits of base..topic, oldest first, as format-patch gives them (full index, binary)."""
    if not is_local_repo(repo):
        raise SourceError(f"{what}: git.range needs a local repository ({repo} is not one); clone it first")
    base, topic = spec.split("..", 1)
    for ref in (base, topic):
        resolve_commit(repo, ref, what)
    if _git(repo, "rev-list", "--merges", "--end-of-options", spec, what=what).strip():
        raise PatchError(f"{what}: git range {spec} holds merge commits; give the merged tree as git.ref instead")
    shas = _git(repo, "rev-list", "--reverse", "--end-of-options", spec, what=what).split()
    if not shas:
        raise PatchError(f"{what}: git range {spec} in {repo} holds no commits")
    if len(shas) > MAX_RANGE_COMMITS:
        raise PatchError(f"{what}: git range {spec} holds {len(shas)} commits (most: {MAX_RANGE_COMMITS}); use git.ref")
    out = []
    for sha in shas:
        text = _git(repo, "format-patch", "-1", "--stdout", "--full-index", "--binary", sha, what=what)
        subject = _git(repo, "log", "-1", "--format=%s", sha, what=what).strip()
        out.append(PatchFile(stash(text, store), f"git {sha} ({spec}): {subject}"))
    return out


def ref_diff(repo: str, base_sha: str, ref: str, store: Path, what: str) -> PatchFile:
    """The experiment source's commit -> ref as one patch: the tree at ref, built on the source's tree."""
    sha = resolve_commit(repo, ref, what)
    text = _git(repo, "diff", "--full-index", "--binary", base_sha, sha, what=what)
    if not text.strip():
        raise PatchError(f"{what}: git.ref {ref} ({sha[:12]}) is the source's own commit: nothing differs")
    return PatchFile(stash(text, store), f"git diff {base_sha}..{sha} ({ref})")


def variant_source(exp: Experiment, v: Variant) -> Source:
    """The source this variant's tree starts from: its own, a git.ref outside the experiment source's
    repository, or the experiment's."""
    if v.source is not None:
        return v.source
    if v.git and v.git.ref and not _ref_is_diff(exp, v):
        return Source(kind="git", url=v.git.repo or exp.source.where, ref=v.git.ref)
    return exp.source


def _ref_is_diff(exp: Experiment, v: Variant) -> bool:
    """A git.ref in the experiment source's own local repository is built as a diff on its tree."""
    assert v.git is not None and v.git.ref is not None
    if exp.source.kind != "git":
        return False
    repo = v.git.repo or exp.source.where
    return is_local_repo(repo) and Path(repo).expanduser().resolve() == Path(exp.source.where).expanduser().resolve()


def precheck(exp: Experiment, v: Variant) -> None:
    """What can be refused without unpacking a source: the source is there, the series and its patch
    variant exist, the patch paths exist."""
    check_present(variant_source(exp, v))
    if v.series:
        names = [pv.name for pv in load_series(v.series).variants]
        if v.patch_variant != "auto" and v.patch_variant not in names:
            raise PatchError(
                f"variant {v.name}: series {v.series} has no patch variant '{v.patch_variant}' (it has: "
                f"{', '.join(names)})"
            )
    for given in v.patches:
        if (kind := what_is(Path(given))).startswith("no such"):
            raise PatchError(f"variant {v.name}: patch path {given} does not exist")
        if kind not in ("a regular file", "a directory"):
            raise PatchError(f"variant {v.name}: patch path {given} is {kind}, not a patch file or a directory")


def resolve(exp: Experiment, v: Variant, prepare: Callable[[Source], PreparedSource], store: Path) -> Resolved:
    """Everything a build of this variant needs, checked: raises naming the variant and what is wrong."""
    src = variant_source(exp, v)
    prepared = prepare(src)
    what = f"variant {v.name}"
    patches: list[PatchFile] = []
    removed: list[str] = list(v.expect_removed)
    chosen = None
    if v.git and v.git.ref and src is exp.source:
        if not prepared.identity.startswith("git:"):
            raise SourceError(f"{what}: git.ref needs the experiment source's commit, got {prepared.identity}")
        patches.append(ref_diff(exp.source.where, prepared.identity[4:], v.git.ref, store, what))
    if v.series:
        series = load_series(v.series)
        try:
            chosen = series.select(prepared.version, v.patch_variant)
        except HarnessError as e:
            raise type(e)(f"{what}: {e}") from None
        patches += series_patches(chosen, store)
        removed += [s for s in series.verify_absent if s not in removed]
    for given in v.patches:
        patches += user_patches(Path(given), store)
    if v.git and v.git.range:
        patches += range_patches(v.git.repo or exp.source.where, v.git.range, store, what)
    expect = Expectations(tuple(removed), tuple(v.expect_present))
    return Resolved(
        variant=v,
        source=prepared,
        own_source=src is not exp.source,
        patches=tuple(patches),
        expect=expect,
        series_variant=chosen.name if chosen else None,
        trial=trial(prepared.tree, patches, expect, what),
    )


def resolve_all(exp: Experiment, prepare: Callable[[Source], PreparedSource], store: Path) -> dict[str, Resolved]:
    for v in exp.variants:  # the cheap refusals of every variant before any source is unpacked
        precheck(exp, v)
    out = {}
    for v in exp.variants:
        out[v.name] = r = resolve(exp, v, prepare, store)
        result = f", result {r.trial.result_id[:12]}" if r.patches else ""
        log(f"{r.what}: {len(r.patches)} patch(es) on {r.source.version}{result}")
    return out
