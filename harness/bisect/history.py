"""The commits a bisection walks: good's descendants on bad's first-parent line, up to bad, oldest first."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config import Experiment
from ..config.kernels import GIT_REF
from ..errors import ConfigError
from ..kernel.source import is_local_repo, resolve_commit
from ..util import run


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str

    @property
    def short(self) -> str:
        return self.sha[:12]

    def said(self) -> str:
        return f"{self.short} {self.subject}"


@dataclass(frozen=True)
class History:
    repo: str
    good: Commit
    after: tuple[Commit, ...]  # good's successors up to bad (the last), oldest first

    @property
    def bad(self) -> Commit:
        return self.after[-1]

    @property
    def line(self) -> tuple[Commit, ...]:
        """Good, then every commit up to bad: the positions the search marks."""
        return (self.good, *self.after)


def _git(repo: str, *args: str) -> str:
    return run(["git", "-C", repo, *args], capture=True).stdout


def history(exp: Experiment, good: str, bad: str) -> History:
    """The range, or a refusal naming what is wrong, before anything builds."""
    if exp.source.kind != "git":
        raise ConfigError(f"bisect walks a git history: {exp.name}'s source is a {exp.source.kind} (source.kind: git)")
    repo = os.path.expanduser(exp.source.where)
    if not is_local_repo(repo):
        raise ConfigError(f"bisect needs a local clone: {exp.source.where} is not a directory on this host")
    for flag, ref in (("--good", good), ("--bad", bad)):
        if not re.match(GIT_REF, ref) or ref.startswith("-"):
            raise ConfigError(f"{flag} {ref!r}: not a git revision")
    good_sha, bad_sha = (resolve_commit(repo, ref, flag) for flag, ref in (("--good", good), ("--bad", bad)))
    if good_sha == bad_sha:
        raise ConfigError(f"--good {good} and --bad {bad} are the same commit ({good_sha[:12]})")
    if run(["git", "-C", repo, "merge-base", "--is-ancestor", good_sha, bad_sha], check=False).returncode != 0:
        raise ConfigError(f"--good {good} ({good_sha[:12]}) is not an ancestor of --bad {bad} ({bad_sha[:12]})")
    span = f"{good_sha}..{bad_sha}"
    listed = _git(repo, "log", "--reverse", "--first-parent", "--ancestry-path", "--format=%H %s", span)
    after = tuple(Commit(*(line.split(" ", 1) + [""])[:2]) for line in listed.splitlines() if line.strip())
    if not after or after[-1].sha != bad_sha or _git(repo, "rev-parse", f"{after[0].sha}^").strip() != good_sha:
        raise ConfigError(f"--good {good} is not on the first-parent line of --bad {bad}: give a good on that line")
    subject = _git(repo, "log", "-1", "--format=%s", good_sha).strip()
    return History(repo, Commit(good_sha, subject), after)
