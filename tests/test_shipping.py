"""What fab ships to a lab host, where root runs it: tracked files only, owned by root, writable by nobody else."""

import io
import os
import tarfile
import uuid

from harness import REPO_ROOT
from harness.remote import _tarball, project_files


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
    assert stray.name not in shipped and "harness/remote.py" in shipped and "README.md" in shipped
