"""Host memory groups, one per kernel under test, and what the guests' results export may do on this host."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..util import warn

GROUP_SLACK_MB = 1536  # a memory group's cap above guest RAM: TCG's code cache (up to 1 GiB), devices, file cache
CGROUP = Path("/sys/fs/cgroup")


class MemoryGroup:
    """A host memory cgroup for one kernel under test's QEMU and its root's server, capped at its RAM plus
    GROUP_SLACK_MB and kept out of swap: whatever the guest or the run does, it reclaims or is OOM-killed
    inside the group, and the host's OOM killer never picks a lab host's own processes for it. cgroup v2
    where the root delegates memory, else the v1 memory hierarchy below this process's own group (as on
    hybrid hosts such as ours)."""

    def __init__(self, path: Path, limit_mb: int):
        self.path, self.limit_mb = path, limit_mb

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit_mb: int) -> tuple[MemoryGroup | None, str]:
        """The group, and what to say about it; (None, why) where this host gives us none. `name` ends
        with the creating process's pid: a group whose creator was killed (SIGKILL runs no cleanup) is
        removed by the next run, once it is empty."""
        if (CGROUP / "cgroup.controllers").exists():
            if "memory" not in (CGROUP / "cgroup.subtree_control").read_text().split():
                return None, "cgroup v2 without the memory controller delegated from the root"
            path, limits = CGROUP / f"nestpress-{name}", {"memory.max": limit_mb << 20, "memory.swap.max": 0}
        else:
            own = [ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in ln]
            if not own or not (CGROUP / "memory").is_dir():
                return None, "no cgroup memory controller mounted"
            path = CGROUP / "memory" / own[0].lstrip("/") / f"nestpress-{name}"
            limits = {"memory.limit_in_bytes": limit_mb << 20, "memory.memsw.limit_in_bytes": limit_mb << 20}
        _sweep(path.parent)
        try:
            path.mkdir()
            for file, value in limits.items():
                if (path / file).exists():
                    (path / file).write_text(f"{value}\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None, f"{path}: {e.strerror}"
        return cls(path, limit_mb), f"{path}, capped at {limit_mb} MiB without swap"

    def oom_kills(self) -> int:
        for file in ("memory.events", "memory.oom_control"):  # v2, v1
            with contextlib.suppress(OSError):
                for line in (self.path / file).read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Once its processes are gone (the caller stopped them); a group still busy after 5 s is said."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        warn(f"{self.path}: still has processes; left in place")


def export_model(results: Path) -> tuple[str, str]:
    """The 9p security model of the kernel under test's results export on this host, and why. mapped-xattr:
    what the guest's root creates is, on the host, a plain root-owned file of mode 0600 or 0700 (ownership,
    modes, links and device nodes live in user.virtfs.* xattrs), so no setuid file, link or device node a
    guest makes ever exists on the host. It needs user xattrs on the results file system; without them,
    `none` (the guest writes as root) and the host defuses what is left once the guest is off."""
    probe = results / f".xattr-probe-{os.getpid()}"
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe.touch()
        os.setxattr(probe, "user.nestpress", b"1")
        return "mapped-xattr", f"{results}: user xattrs work, guest ownership and modes are mapped into them"
    except OSError as e:
        return "none", f"{results}: no user xattrs ({e.strerror}): the guest writes as root, defused after"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _sweep(parent: Path) -> None:
    """Groups of runs whose creator is gone (SIGKILL runs no cleanup), once empty."""
    for stale in parent.glob("nestpress-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # still has processes: not ours to end
                stale.rmdir()
        except PermissionError:
            pass
