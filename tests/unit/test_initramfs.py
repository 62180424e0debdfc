"""The L2 initramfs: a real cpio archive that real cpio reads, and a root in which the guests' Python
runs the agent's code with nothing else of the host's (chroot into the unpacked archive)."""

import os
import stat
import subprocess

import pytest

from harness import REPO_ROOT
from harness.errors import HarnessError
from harness.guest.contract import PATH
from harness.machine import initramfs
from harness.util import python_for_guests


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return initramfs.build(python_for_guests(), ["uname", "-r"], PATH, tmp_path_factory.mktemp("cache"))


def listing(path) -> dict[str, str]:
    """name -> the mode string cpio prints for it."""
    out = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=open(path, "rb"), capture_output=True, text=True, check=True
    ).stdout
    return {
        line.split()[-1] if " -> " not in line else line.split(" -> ")[0].split()[-1]: line.split()[0]
        for line in out.splitlines()
    }


def test_archive_holds_python_the_agent_the_command_and_a_console(archive):
    names = listing(archive)
    python = python_for_guests()
    assert python.lstrip("/") in names and names[python.lstrip("/")].startswith("-rwx")
    assert str(REPO_ROOT / "harness" / "guest" / "agent.py").lstrip("/") in names
    assert any(n.endswith("/uname") for n in names)
    assert names["dev/console"].startswith("c")
    assert any("ld-linux" in n for n in names)
    # each directory comes before what it holds, as the kernel's unpacker needs
    order = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=open(archive, "rb"), capture_output=True, text=True
    ).stdout.splitlines()
    seen = set()
    for name in order:
        parent = os.path.dirname(name)
        assert not parent or parent in seen, f"{name} before its directory"
        seen.add(name)


def test_same_inputs_reuse_the_cached_archive(archive, tmp_path):
    again = initramfs.build(python_for_guests(), ["uname", "-r"], PATH, archive.parent.parent)
    assert again == archive
    other = initramfs.build(python_for_guests(), None, PATH, archive.parent.parent)
    assert other != archive and other.stat().st_size < archive.stat().st_size


def test_a_missing_command_is_refused_with_its_name():
    with pytest.raises(HarnessError, match="no-such-tool-here"):
        initramfs.contents(python_for_guests(), ["no-such-tool-here"], PATH)


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_the_agent_imports_and_the_command_runs_inside_the_unpacked_root(archive, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=root, stdin=open(archive, "rb"), check=True
    )
    assert stat.S_ISCHR(os.lstat(root / "dev" / "console").st_mode)
    guest = REPO_ROOT / "harness" / "guest"
    code = (
        f"import sys; sys.path.insert(0, {str(guest)!r}); import agent, probe, pressure, sampler, supervise; "
        "print(probe.calibrate(1000)['loop_overhead_ns'] > 0)"
    )
    r = subprocess.run(
        ["chroot", str(root), python_for_guests(), "-E", "-S", "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": PATH},
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    r = subprocess.run(["chroot", str(root), "uname", "-r"], capture_output=True, text=True, env={"PATH": PATH})
    assert r.returncode == 0 and r.stdout.strip() == os.uname().release, r.stderr
    # and nothing more of the host: no shell, no coreutils beyond the command
    assert not (root / "bin" / "sh").exists() and not (root / "usr" / "bin" / "cat").exists()
