"""Kernel sources other than tarballs: a git repository + ref and a local tree (never modified)."""

import os
import subprocess

import pytest

from harness.config import Source
from harness.errors import SourceError
from harness.kernel.source import makefile_version, prepare

MAKEFILE = "VERSION = 6\nPATCHLEVEL = 6\nSUBLEVEL = 3\nEXTRAVERSION = -rc1\n"


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "linux"
    r.mkdir()
    git(r, "init", "-q")
    (r / "Makefile").write_text(MAKEFILE)
    (r / "README").write_text("one\n")
    git(r, "add", ".")
    git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "v1")
    git(r, "tag", "v6.6-test")
    (r / "README").write_text("two\n")
    git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "v2")
    return r


def test_git_ref_is_exported_at_that_ref(repo, tmp_path):
    p = prepare(Source(kind="git", url=str(repo), ref="v6.6-test"), tmp_path / "cache")
    assert (p.tree / "README").read_text() == "one\n" and not (p.tree / ".git").exists()
    assert str(p.version) == "6.6.3-rc1" and p.identity.startswith("git:")
    head = prepare(Source(kind="git", url=str(repo), ref="HEAD"), tmp_path / "cache")
    assert head.identity != p.identity and (head.tree / "README").read_text() == "two\n"


def test_unknown_git_ref_is_an_error(repo, tmp_path):
    with pytest.raises(SourceError, match="ref 'nope' not found"):
        prepare(Source(kind="git", url=str(repo), ref="nope"), tmp_path / "cache")


@pytest.mark.parametrize("field", ["url", "ref"])
def test_git_url_or_ref_that_git_would_read_as_an_option_is_refused(repo, field):
    given = {"url": str(repo), "ref": "HEAD", field: "--upload-pack=touch /tmp/PWNED"}
    with pytest.raises(ValueError, match=f"source.{field} may not start with '-'"):
        Source(kind="git", **given)


def test_local_tree_is_copied_not_touched_and_changes_change_identity(repo, tmp_path):
    before = sorted(p.name for p in repo.iterdir())
    a = prepare(Source(kind="local", path=str(repo)), tmp_path / "cache")
    assert makefile_version(a.tree).mm == (6, 6) and sorted(p.name for p in repo.iterdir()) == before
    (repo / "README").write_text("three\n")  # an uncommitted edit is a new identity
    b = prepare(Source(kind="local", path=str(repo)), tmp_path / "cache")
    assert a.identity != b.identity and (b.tree / "README").read_text() == "three\n"


def test_missing_tarball_names_the_package(tmp_path):
    with pytest.raises(SourceError, match=r"apt-get install linux-source-9\.9"):
        prepare(Source(kind="tarball", path=str(tmp_path / "x.tar.xz"), package="linux-source-9.9"), tmp_path)


def test_a_cache_another_user_could_write_is_refused(tmp_path):
    from harness.config import load
    from harness.errors import HarnessError
    from harness.kernel.build import Builder

    exp = load("shrinker-ab").experiment
    mine = tmp_path / "new" / "cache"
    assert Builder(exp, mine).cache == mine and mine.stat().st_mode & 0o777 == 0o700  # a new cache is private
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # as /var/tmp is: anyone could have made it first
    with pytest.raises(HarnessError, match="another user could plant kernels"):
        Builder(exp, shared)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 1234, 1234)
        with pytest.raises(HarnessError, match="owned by uid 1234"):
            Builder(exp, theirs)
