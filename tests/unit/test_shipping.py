"""What crosses to and from hosts we do not fully trust: what fab ships to a lab host (tracked files only, owned
by root, writable by nobody else) and the host's records beside a guest's files."""

import io
import os
import tarfile
import uuid

from harness import REPO_ROOT
from harness.lab.shipping import project_files
from harness.lab.shipping import tarball as _tarball


def test_shipped_files_are_root_owned_and_not_group_or_world_writable(tmp_path):
    f = tmp_path / "agent.py"
    f.write_text("print('hi')\n")
    f.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(f, 1234, 1234)  # a controller user's file, as root may be asked to ship it
    with tarfile.open(fileobj=io.BytesIO(_tarball([("harness/agent.py", f)])), mode="r:gz") as tar:
        (m,) = tar.getmembers()
    assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root")
    assert m.mode & 0o777 == 0o755


def test_untracked_files_are_never_shipped():
    stray = REPO_ROOT / f"stray-secret-{uuid.uuid4().hex[:8]}.txt"  # untracked and not ignored
    stray.write_text("a token\n")
    try:
        shipped = project_files()
    finally:
        stray.unlink()
    assert stray.name not in shipped and "harness/lab/remote.py" in shipped and "README.md" in shipped


def test_host_records_never_write_through_links_a_guest_planted(tmp_path):
    """A guest can write its own export, where the host also keeps cell.json: links planted under the names
    the host writes must be replaced, never followed."""
    from harness.util import write_json

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    export = tmp_path / "cell"
    export.mkdir()
    (export / "cell.json.tmp").symlink_to(victim)  # the temp name the host once used
    (export / "cell.json").symlink_to(victim)
    write_json(export / "cell.json", {"status": "complete"})
    assert victim.read_text() == "precious\n"
    assert not (export / "cell.json").is_symlink() and '"complete"' in (export / "cell.json").read_text()
    assert sorted(p.name for p in export.iterdir()) == ["cell.json", "cell.json.tmp"]  # no temp left behind


def test_what_a_guest_leaves_in_its_export_is_defused(tmp_path):
    from harness.results.guest_files import defuse as defuse_guest_files

    export = tmp_path / "cell"
    (export / "l1-0").mkdir(parents=True)
    shell = export / "l1-0" / "sh"
    shell.write_text("#!/bin/sh\n")
    shell.chmod(0o6777)  # setuid root, as a guest's root can make it over 9p security_model=none
    (export / "link").symlink_to("/etc/shadow")
    os.mkfifo(export / "fifo")
    (export / "samples.csv").write_text("t,v\n")
    changed = defuse_guest_files(export)
    assert sorted(changed) == ["fifo", "l1-0/sh", "link"]
    assert shell.stat().st_mode & 0o7777 == 0o755 and (export / "samples.csv").read_text() == "t,v\n"
    assert sorted(p.name for p in export.iterdir()) == ["l1-0", "samples.csv"]


def test_every_module_of_the_harness_is_shipped():
    """A lab host runs what git tracks: a module an ignore pattern hides would be missing there (and in CI)."""
    shipped = set(project_files())
    missing = [
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "harness").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and str(p.relative_to(REPO_ROOT)) not in shipped
    ]
    assert not missing, missing
